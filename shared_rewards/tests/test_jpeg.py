"""JPEG (in)compressibility against sizes computed by hand with PIL on independently built arrays."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from shared_rewards import load_reward


def jpeg_bytes(array: np.ndarray, quality: int) -> int:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return len(buffer.getvalue())


def flat_and_noise():
    flat = np.full((64, 64, 3), 128, dtype=np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    tensor = torch.from_numpy(np.stack([flat, noise])).permute(0, 3, 1, 2).float() / 255.0
    return flat, noise, tensor


@pytest.mark.parametrize("quality", [95, 50])
def test_incompressibility_is_the_jpeg_size_in_kilobytes(quality):
    flat, noise, tensor = flat_and_noise()
    scores, extras = load_reward("jpeg_incompressibility", quality=quality)(tensor)
    expected = torch.tensor([jpeg_bytes(flat, quality), jpeg_bytes(noise, quality)], dtype=torch.float32) / 1000
    torch.testing.assert_close(scores, expected)
    torch.testing.assert_close(extras["jpeg_kb"], expected)
    assert scores[1] > 3 * scores[0]  # noise does not compress


def test_compressibility_is_minus_the_size_divided_by_the_divisor():
    flat, noise, tensor = flat_and_noise()
    kb = torch.tensor([jpeg_bytes(flat, 95), jpeg_bytes(noise, 95)], dtype=torch.float32) / 1000
    torch.testing.assert_close(load_reward("jpeg_compressibility")(tensor).scores, -kb)  # DDPO, SD1.5 copies
    torch.testing.assert_close(load_reward("jpeg_compressibility", divisor=500.0)(tensor).scores, -kb / 500)  # flow_grpo


def test_jpeg_reward_is_deterministic_and_batch_order_invariant():
    _, _, tensor = flat_and_noise()
    reward = load_reward("jpeg_compressibility")
    a = reward(tensor).scores
    torch.testing.assert_close(reward(tensor).scores, a)
    torch.testing.assert_close(reward(tensor.flip(0)).scores, a.flip(0))


def test_jpeg_reward_ignores_prompts():
    _, _, tensor = flat_and_noise()
    reward = load_reward("jpeg_incompressibility")
    torch.testing.assert_close(reward(tensor, ["x", "y"]).scores, reward(tensor).scores)


def test_bad_divisor_is_rejected():
    with pytest.raises(ValueError, match="divisor must be > 0"):
        load_reward("jpeg_compressibility", divisor=0)
