"""Rewards that ask a vision-language model about each image through an OpenAI-compatible chat-completions
server (sglang, vLLM): the shared client of `unifiedreward` and `qwenvl`.

Each image is one request, POST `<url>/chat/completions` with JSON

    {"model": ..., "temperature": 0, ["max_tokens": ...,]
     "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
                                               {"type": "text", "text": <question>}]}]}

and `Authorization: Bearer <api_key>` when a key is set. The answer is `choices[0].message.content`; a
subclass turns it into a score. Requests of one batch run concurrently (upstream sent them all at once with
asyncio), at most `max_concurrency` at a time, and the answers are put back in image order. Only the standard
library is used: no `openai` package, no `requests`.

Failures are one line naming the reward and the URL: nothing listening (refused, unknown host, connect
timeout) or no answer within `timeout` adds how to point the reward elsewhere and how to start the server;
an HTTP error gives the server's own message; a reply that is not a chat completion says what is missing.
"""
from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from .base import Reward, RewardOutput
from .http_service import one_line, post_bytes, resolve_service_url
from .preprocess import to_uint8


class ChatServerError(RuntimeError):
    """The chat-completions server could not be reached, refused the request or sent an unusable answer."""


def png_data_url(image: np.ndarray) -> str:
    """[H, W, 3] uint8 RGB -> a base64 PNG data URL, the image form both servers accept in `image_url`."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    # upstream wrote "data:image;base64,"; the explicit image/png type is what vLLM and sglang both expect
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _error_message(body: bytes) -> str:
    """The server's reason from an error body: OpenAI's {"error": {"message"}}, vLLM's {"message"}, or text."""
    text = body.decode("utf-8", "replace")
    try:
        payload = json.loads(text)
    except ValueError:
        return one_line(text)
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return one_line(error["message"])
        if isinstance(error, str):
            return one_line(error)
        if isinstance(payload.get("message"), str):
            return one_line(payload["message"])
    return one_line(text)


def completion_text(payload: Any) -> str:
    """`choices[0].message.content` of a chat completion, '' for a null content; a ValueError names what is
    missing."""
    if not isinstance(payload, dict):
        raise ValueError(f"reply must be a JSON object, got {type(payload).__name__}")
    choices = payload.get("choices")
    if not isinstance(choices, list) or not choices:
        raise ValueError(f"reply has no choices (keys: {sorted(payload)})")
    message = choices[0].get("message") if isinstance(choices[0], dict) else None
    if not isinstance(message, dict) or "content" not in message:
        raise ValueError("reply's choices[0] has no message.content")
    content = message["content"]
    if content is None:
        return ""
    if not isinstance(content, str):
        raise ValueError(f"reply's choices[0].message.content must be a string, got {type(content).__name__}")
    return content


class ChatCompletionsReward(Reward):
    """Base class: a subclass sets the class attributes below, `question(prompt)` and `parse_score(answer)`,
    and passes its options to `__init__`. Not differentiable."""

    differentiable = False
    url_env: str = ""        # environment variable for the URL
    default_url: str = ""
    start_command: str = ""  # how to start the server, for the error when nothing answers
    image_size: int | None = None  # square side the image is resized to before encoding; None keeps it

    def __init__(self, device="cpu", dtype=torch.float32, *, url: str | None, model: str, api_key: str | None,
                 max_tokens: int | None, timeout: float, max_concurrency: int):
        super().__init__(device, dtype)
        self.url = resolve_service_url(self.name, url, self.url_env, self.default_url)
        self.endpoint = self.url + "/chat/completions"
        if not isinstance(model, str) or not model:
            raise ValueError(f"{self.name}: model must be a non-empty string, got {model!r}")
        if api_key is not None and not isinstance(api_key, str):
            raise ValueError(f"{self.name}: api_key must be a string or None, got {type(api_key).__name__}")
        for key, value, allow_none in (("max_tokens", max_tokens, True), ("max_concurrency", max_concurrency, False)):
            if value is None and allow_none:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{self.name}: {key} must be an int >= 1{' or None' if allow_none else ''}, "
                                 f"got {value!r}")
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
            raise ValueError(f"{self.name}: timeout must be a positive number of seconds, got {timeout!r}")
        self.model = model
        self.api_key = api_key
        self.max_tokens = max_tokens
        self.timeout = float(timeout)
        self.max_concurrency = max_concurrency

    # --- what a subclass defines -----------------------------------------------------------------------

    def question(self, prompt: str | None) -> str:
        raise NotImplementedError

    def parse_score(self, answer: str) -> float | None:
        """The reward for one answer, or None when the answer holds no score (the reward is then 0)."""
        raise NotImplementedError

    # --- transport -------------------------------------------------------------------------------------

    def _unreachable(self, what: str) -> ChatServerError:
        return ChatServerError(
            f"{self.name}: {what}; point the reward at the server with the option url (config key "
            f"reward_options.{self.name}.url) or ${self.url_env}, or start one: {self.start_command}")

    def request_body(self, image: np.ndarray, prompt: str | None) -> dict:
        """The chat-completions JSON for one [H, W, 3] uint8 image."""
        if self.image_size is not None and image.shape[:2] != (self.image_size, self.image_size):
            # PIL's resize, bicubic (its default for RGB), as upstream resized before encoding
            image = np.asarray(Image.fromarray(image).resize((self.image_size, self.image_size), Image.BICUBIC))
        body = {"model": self.model,
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": png_data_url(image)}},
                    {"type": "text", "text": self.question(prompt)}]}],
                "temperature": 0}  # greedy
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        return body

    def ask(self, image: np.ndarray, prompt: str | None) -> str:
        """One request; the model's answer text."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(self.request_body(image, prompt)).encode("utf-8")
        # "cannot reach" names the base URL, the one the user configures; the other failures the endpoint
        raw = post_bytes(self.endpoint, data, headers, self.timeout,
                         refused=lambda what: ChatServerError(f"{self.name}: {what}"),
                         unreachable=self._unreachable, server_reason=_error_message, server_url=self.url)
        try:
            return completion_text(json.loads(raw.decode("utf-8")))
        except ValueError as exc:  # also bad JSON and bad UTF-8
            raise ChatServerError(f"{self.name}: {self.endpoint} sent an unusable answer: "
                                  f"{one_line(str(exc))}") from None

    def ask_all(self, images: np.ndarray | Sequence[np.ndarray], prompts: Sequence[str] | None) -> list[str]:
        """One answer per image, in order; requests run concurrently. The first failure is raised and the
        requests not yet sent are dropped."""
        n = len(images)
        prompt_of = (lambda i: None) if prompts is None else (lambda i: prompts[i])
        if n == 1 or self.max_concurrency == 1:
            return [self.ask(images[i], prompt_of(i)) for i in range(n)]
        pool = ThreadPoolExecutor(max_workers=min(n, self.max_concurrency), thread_name_prefix=f"{self.name}-reward")
        try:
            futures = [pool.submit(self.ask, images[i], prompt_of(i)) for i in range(n)]
            return [f.result() for f in futures]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    # --- scoring ---------------------------------------------------------------------------------------

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None,
              metadata: Sequence[dict] | None) -> RewardOutput:
        del metadata
        answers = self.ask_all(to_uint8(images), prompts if self.needs_prompts else None)  # [B, H, W, 3] uint8
        parsed = [self.parse_score(a) for a in answers]
        scores = torch.tensor([0.0 if p is None else p for p in parsed], dtype=torch.float32, device=images.device)
        # the answers (strings; the trainer logs only numbers) and whether each held a score, to spot a
        # model or template that stopped answering in the expected format
        found = torch.tensor([float(p is not None) for p in parsed], dtype=torch.float32, device=images.device)
        return RewardOutput(scores, {"answer": answers, "score_found": found})
