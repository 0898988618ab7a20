"""DeQA-Score (zhiyuanyou/DeQA-Score-Mix3) image quality as a reward: a client of the reward-server DeQA app.

    # in a yifan123/reward-server checkout, with reward='deqa' in gunicorn.conf.py (binds 127.0.0.1:18086)
    gunicorn "app_deqa:create_app()"

The wire format is upstream's (flow_grpo `deqa_score_remote`, reward-server `app_deqa.py`): POST to the URL
itself a body that is `pickle.dumps({"images": [JPEG bytes, ...]})`, no other key; the answer is
`pickle.dumps({"outputs": [score, ...]})`, one float per image, already divided by 5 on the server. Images are
the rounded uint8 images as PIL JPEG at its default quality 75, at most 64 per request in nearly equal chunks
(np.array_split), posted one after the other. The prompt is not sent.

The answer is unpickled as plain data only (a crafted pickle runs nothing). A failure is one error line that
names the URL; upstream's client retried HTTP 500 up to 1000 times, this one does not retry: the DeQA server
answers 500 only when scoring itself failed, and the line shows its traceback's last line.
"""
from __future__ import annotations

import math
import pickle
from typing import Any, Sequence

import numpy as np
import torch

from .base import Reward, RewardOutput
from .geneval.protocol import JPEG_QUALITY, ProtocolError, encode_jpeg, safe_loads
from .http_service import post_bytes, resolve_service_url
from .preprocess import to_uint8

URL_ENV = "TEMPFLOW_DEQA_REWARD_URL"  # upstream's variable
DEFAULT_URL = "http://127.0.0.1:18086"  # reward-server gunicorn.conf.py with reward='deqa'
START_COMMAND = ('gunicorn "app_deqa:create_app()" in a yifan123/reward-server checkout, with reward=\'deqa\' '
                 'in its gunicorn.conf.py')
BATCH_SIZE = 64  # upstream's images per request


class DeQAServerError(RuntimeError):
    """The DeQA server could not be reached, refused the request or sent an unusable answer."""


def encode_request(jpegs: Sequence[bytes]) -> bytes:
    return pickle.dumps({"images": list(jpegs)})


def check_outputs(answer: Any, batch: int) -> list[float]:
    """The `outputs` of a DeQA answer, one real number per image; ProtocolError says what is wrong."""
    if not isinstance(answer, dict):
        raise ProtocolError(f"answer must be a dict with key 'outputs', got {type(answer).__name__}")
    if "outputs" not in answer:
        raise ProtocolError(f"answer has no key 'outputs' (keys: {sorted(map(str, answer))})")
    outputs = answer["outputs"]
    if not isinstance(outputs, (list, tuple)) or len(outputs) != batch:
        got = f"{len(outputs)} values" if isinstance(outputs, (list, tuple)) else type(outputs).__name__
        raise ProtocolError(f"outputs must be a list of {batch} scores (one per image), got {got}")
    for i, value in enumerate(outputs):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ProtocolError(f"outputs[{i}] must be a number, got {type(value).__name__}")
    return [float(v) for v in outputs]


def _server_reason(body: bytes) -> str:
    """One line from an error body: the exception line of a Python traceback (upstream sends the whole
    traceback with a 500), else the first line."""
    lines = [line.strip() for line in body.decode("utf-8", "replace").splitlines() if line.strip()]
    if not lines:
        return ""
    return (lines[-1] if lines[0].startswith("Traceback") else lines[0])[:300]


class DeQAReward(Reward):
    """DeQA-Score / 5 from a reward server (about [0.2, 1]). Ignores prompts; not differentiable."""

    name = "deqa"
    differentiable = False
    needs_prompts = False
    weights_source = "a DeQA reward server (yifan123/reward-server app_deqa.py; see shared_rewards/README.md)"

    def __init__(self, device="cpu", dtype=torch.float32, *, url: str | None = None, batch_size: int = BATCH_SIZE,
                 jpeg_quality: int = JPEG_QUALITY, timeout: float = 120.0):
        """url: the server (default: $TEMPFLOW_DEQA_REWARD_URL, else http://127.0.0.1:18086). batch_size:
        images per request (upstream 64). jpeg_quality: 75 is PIL's default, as upstream. timeout: seconds
        to wait for one answer (upstream 120)."""
        super().__init__(device, dtype)
        self.url = resolve_service_url(self.name, url, URL_ENV, DEFAULT_URL)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"{self.name}: batch_size must be an int >= 1, got {batch_size!r}")
        if not isinstance(jpeg_quality, int) or isinstance(jpeg_quality, bool) or not 1 <= jpeg_quality <= 100:
            raise ValueError(f"{self.name}: jpeg_quality must be an int in [1, 100], got {jpeg_quality!r}")
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
            raise ValueError(f"{self.name}: timeout must be a positive number of seconds, got {timeout!r}")
        self.batch_size = batch_size
        self.jpeg_quality = jpeg_quality
        self.timeout = float(timeout)

    def _unreachable(self, what: str) -> DeQAServerError:
        return DeQAServerError(f"{self.name}: {what}; point the reward at the server with the option url (config "
                               f"key reward_options.deqa.url) or ${URL_ENV}, or start one: {START_COMMAND}")

    def post(self, body: bytes, batch: int) -> list[float]:
        """One request of `batch` images; their scores."""
        # upstream sent no Content-Type; urllib would label the body a form, which a Flask server may parse
        raw = post_bytes(self.url, body, {"Content-Type": "application/octet-stream"}, self.timeout,
                         refused=lambda what: DeQAServerError(f"{self.name}: {what}"),
                         unreachable=self._unreachable, server_reason=_server_reason,
                         load=f"{batch} images", remedy="raise timeout or lower batch_size")
        try:
            return check_outputs(safe_loads(raw), batch)
        except ProtocolError as exc:
            raise DeQAServerError(f"{self.name}: {self.url} sent an unusable answer: {exc}") from None

    def score_arrays(self, arrays: np.ndarray | Sequence[np.ndarray]) -> list[float]:
        """Scores uint8 RGB images ([B, H, W, 3] or a list of [H, W, 3]), in order."""
        scores: list[float] = []
        # upstream: np.array_split into ceil(n / 64) nearly equal chunks, posted one after the other
        for chunk in np.array_split(np.arange(len(arrays)), math.ceil(len(arrays) / self.batch_size)):
            jpegs = [encode_jpeg(np.ascontiguousarray(arrays[i]), self.jpeg_quality) for i in chunk]
            scores.extend(self.post(encode_request(jpegs), len(chunk)))
        return scores

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None,
              metadata: Sequence[dict] | None) -> RewardOutput:
        del prompts, metadata
        scores = self.score_arrays(to_uint8(images))  # [B, H, W, 3] uint8
        return RewardOutput(torch.tensor(scores, dtype=torch.float32, device=images.device), {})
