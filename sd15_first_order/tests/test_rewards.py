"""The reward of a config on top of shared_rewards and its gradients (spec §6.1, §11 item 17)."""
import pytest
import torch

from sd15fo.choices import reward_options
from sd15fo.rewards import as_images, load


@pytest.fixture(scope="module")
def hps():
    from rsm_testkit import tiny_reward_options

    return load("hpsv2_score_diff", tiny_reward_options("hpsv2"), "cpu")


def test_hps_score_diff_is_the_v21_tensor_path_and_upstream_kwargs_translate():
    assert reward_options("hpsv2_score_diff", {}) == ("hpsv2", {"path": "tensor"})
    assert reward_options("hpsv2_score_diff", {"checkpoint_path": "/w/HPS.pt", "hps_version": "v2.0", "distributed": True}) == \
        ("hpsv2", {"path": "tensor", "weights": "/w/HPS.pt", "version": "v2.0"})
    with pytest.raises(ValueError, match="hps_version='v3'"):
        reward_options("hpsv2_score_diff", {"hps_version": "v3"})


def test_the_hps_preprocessing_resizes_to_the_model_and_is_differentiable(hps):
    images = torch.rand(2, 3, 512, 512, requires_grad=True)
    pixels = hps.reward.pixel_values(as_images(images))
    assert pixels.shape == (2, 3, hps.reward.image_size, hps.reward.image_size)
    scores, _ = hps(images, ["a cat", "a dog"])
    assert scores.shape == (2,) and scores.dtype == torch.float32
    (grad,) = torch.autograd.grad(scores.sum(), images)
    assert grad.abs().sum() > 0


def test_pixels_outside_0_1_get_no_gradient_through_the_clamp(hps):
    images = torch.rand(1, 3, 64, 64) * 0.8 + 0.1
    images[:, :, :8] = -0.0005  # an undershoot (a max above 1 means 0..255 to the reference's rule: / 255)
    images.requires_grad_(True)
    scores, _ = hps(images, ["x"])
    (grad,) = torch.autograd.grad(scores.sum(), images)
    assert bool((grad[:, :, :8] == 0).all()) and grad[:, :, 8:].abs().sum() > 0


def test_uint8_and_nhwc_inputs_are_accepted(hps):
    chw = torch.rand(2, 3, 64, 64)
    uint8_nhwc = (chw * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    a, _ = hps(chw, ["a", "b"])
    b, _ = hps(uint8_nhwc, ["a", "b"])
    torch.testing.assert_close(a, b, atol=5e-3, rtol=0)  # uint8 quantisation only
    gray = torch.rand(1, 1, 64, 64)
    assert hps(gray, ["g"])[0].shape == (1,)


def test_a_prompt_count_mismatch_raises(hps):
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        hps(torch.rand(2, 3, 64, 64), ["only one"])
