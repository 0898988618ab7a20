"""Qwen2.5-VL-7B-Instruct as an aesthetic judge: a client of an OpenAI-compatible server, e.g.

    vllm serve Qwen/Qwen2.5-VL-7B-Instruct --port 17141

Upstream (flow_grpo `QwenVLScorer`) ran the model inside the trainer (bf16, `generate` with at most 2048
new tokens); a server keeps the 7B model out of every training process. The question is upstream's 5-level
aesthetic rubric (Bad / Poor / Fair / Good / Excellent), worded here, asking for a <Thought> analysis, then a
<Score> tag. The image goes at its own size as a PNG (the server's Qwen processor resizes it, as upstream's did); the
image's text prompt is not used. Greedy decoding (temperature 0), max_tokens 2048; the reward is the integer
in the first <Score>n</Score> divided by 5, and 0 when there is none.
"""
from __future__ import annotations

import re

import torch

from .openai_chat import ChatCompletionsReward

# Any integer, as upstream: "<Score>7</Score>" gives 1.4, "<Score>4.5</Score>" no score.
SCORE_TAG = re.compile(r"<Score>(\d+)</Score>")

# The rubric in our words (clean room): upstream's five levels and criteria, and its answer format (a
# <Thought> analysis, then an integer 1-5 in <Score>...</Score>), which the parser below depends on. Wording
# moves a judge's scores a little, so values are close to, not identical with, upstream's.
RUBRIC = """
Rate the aesthetic quality of the image on a five-level scale:
1. Bad: very blurry or dark, heavy noise, subjects that cannot be made out, no coherent composition.
2. Poor: visible blur, weak lighting, faded colours, clumsy framing that cuts subjects off.
3. Fair: sharp enough and adequately lit, but flat colours and an ordinary, uninspired composition.
4. Good: crisp, well exposed, lively colours, a deliberate composition with a clear subject.
5. Excellent: outstanding sharpness and exposure, rich colour, expert composition that moves the viewer.

First reason step by step about these criteria inside a <Thought> tag. Then give one integer from 1 to 5
inside a <Score> tag, in exactly this form:
<Thought>
[your analysis]
</Thought>
<Score>X</Score>
"""

def parse_score_tag(answer: str) -> float | None:
    """"<Thought>...</Thought><Score>3</Score>" -> 0.6; None when there is no integer score tag."""
    match = SCORE_TAG.search(answer)
    return int(match.group(1)) / 5.0 if match else None


class QwenVLReward(ChatCompletionsReward):
    """Qwen2.5-VL aesthetic rubric score, n / 5 (0 for an answer without a score). Ignores prompts; not
    differentiable. extras: `answer` (the model's text) and `score_found` (1.0 where a score was read)."""

    name = "qwenvl"
    needs_prompts = False
    weights_source = "an OpenAI-compatible server of Qwen/Qwen2.5-VL-7B-Instruct (see shared_rewards/README.md)"
    url_env = "TEMPFLOW_QWENVL_REWARD_URL"
    default_url = "http://127.0.0.1:17141/v1"  # ours: upstream had no server
    start_command = "vllm serve Qwen/Qwen2.5-VL-7B-Instruct --port 17141"
    image_size = None

    def __init__(self, device="cpu", dtype=torch.float32, *, url: str | None = None,
                 model: str = "Qwen/Qwen2.5-VL-7B-Instruct", api_key: str | None = None, max_tokens: int = 2048,
                 timeout: float = 600.0, max_concurrency: int = 64):
        """url: the server's OpenAI base URL (default: $TEMPFLOW_QWENVL_REWARD_URL, else
        http://127.0.0.1:17141/v1). model: the name the server serves. api_key: the server's --api-key, if
        any. max_tokens: upstream's max_new_tokens. timeout: seconds to wait for one answer (a long
        <Thought> under a full batch takes a while). max_concurrency: requests in flight at once."""
        super().__init__(device, dtype, url=url, model=model, api_key=api_key, max_tokens=max_tokens,
                         timeout=timeout, max_concurrency=max_concurrency)

    def question(self, prompt: str | None) -> str:
        return RUBRIC

    def parse_score(self, answer: str) -> float | None:
        return parse_score_tag(answer)
