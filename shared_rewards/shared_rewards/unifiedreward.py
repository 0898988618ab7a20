"""UnifiedReward-7b-v1.5 as a reward: a client of the sglang server flow_grpo deploys it behind.

    python -m sglang.launch_server --model-path CodeGoat24/UnifiedReward-7b-v1.5 --api-key flowgrpo \
        --port 17140 --chat-template chatml-llava --enable-p2p-check --mem-fraction-static 0.85

As upstream (flow_grpo `unifiedreward_score_sglang`): the uint8 image is resized to 512 x 512 and sent as a
PNG with a question asking the model to judge the caption's alignment and the image's quality and to end
with "Final Score:"; greedy decoding (temperature 0), no max_tokens (the server's default); the reward is
the first "Final Score: s" (s in 1-5, optional decimals) divided by 5, and 0 when no score is found.
"""
from __future__ import annotations

import re

import torch

from .openai_chat import ChatCompletionsReward

# Only the first digit counts and it must be 1-5 ("Final Score: 10" reads as 1): upstream's pattern.
FINAL_SCORE = re.compile(r"Final Score:\s*([1-5](?:\.\d+)?)")

# The question in our words (clean room), with upstream's structure: the "<image>" placeholder line first,
# the two criteria (caption alignment, overall quality), a 1-5 score after "Final Score:" (which the parser
# reads) and the caption in brackets last. Wording moves a judge's scores a little.
QUESTION = (
    "<image>\n"
    "Below is a text caption and an image generated from it. Judge the image on two criteria:\n"
    "1. Alignment with the Caption: does the image show the objects, attributes and relations the caption "
    "describes, and show them correctly?\n"
    "2. Overall Image Quality: how clear, detailed, well coloured and visually pleasing is the image?\n"
    "Weigh both criteria and write a score from 1 to 5 after 'Final Score:'.\n"
    "Text Caption: [{caption}]"
)


def parse_final_score(answer: str) -> float | None:
    """"... Final Score: 4.5" -> 0.9; None when the answer has no score."""
    match = FINAL_SCORE.search(answer)
    return float(match.group(1)) / 5.0 if match else None


class UnifiedRewardReward(ChatCompletionsReward):
    """UnifiedReward caption alignment + quality in [0.2, 1] (0 for an answer without a score). Needs prompts;
    not differentiable. extras: `answer` (the model's text) and `score_found` (1.0 where a score was read)."""

    name = "unifiedreward"
    needs_prompts = True
    weights_source = "an sglang server of CodeGoat24/UnifiedReward-7b-v1.5 (see shared_rewards/README.md)"
    url_env = "TEMPFLOW_UNIFIEDREWARD_URL"
    default_url = "http://127.0.0.1:17140/v1"  # upstream's hard-coded endpoint
    start_command = ("python -m sglang.launch_server --model-path CodeGoat24/UnifiedReward-7b-v1.5 --api-key flowgrpo "
                     "--port 17140 --chat-template chatml-llava --enable-p2p-check --mem-fraction-static 0.85")
    image_size = 512

    def __init__(self, device="cpu", dtype=torch.float32, *, url: str | None = None, api_key: str | None = "flowgrpo",
                 model: str = "UnifiedReward-7b-v1.5", max_tokens: int | None = None, timeout: float = 600.0,
                 max_concurrency: int = 64):
        """url: the server's OpenAI base URL (default: $TEMPFLOW_UNIFIEDREWARD_URL, else
        http://127.0.0.1:17140/v1). api_key, model: upstream's. max_tokens: None leaves it to the server, as
        upstream. timeout: seconds to wait for one answer (the openai client's default, 600). max_concurrency:
        requests in flight at once (upstream sent a whole batch at once)."""
        super().__init__(device, dtype, url=url, model=model, api_key=api_key, max_tokens=max_tokens,
                         timeout=timeout, max_concurrency=max_concurrency)

    def question(self, prompt: str | None) -> str:
        return QUESTION.format(caption=prompt)

    def parse_score(self, answer: str) -> float | None:
        return parse_final_score(answer)
