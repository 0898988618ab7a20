"""The call contract every reward shares: input validation, options, the registry, weighted mixes."""
import pytest
import torch

from shared_rewards import (CATALOGUE, Reward, RewardInputError, RewardOutput, UnknownRewardError, WeightedReward,
                            load_reward, reward_options)
from shared_rewards.preprocess import to_uint8


class MeanBrightness(Reward):
    """A differentiable toy reward: the mean pixel value, times a factor."""
    name = "mean_brightness"
    differentiable = True
    needs_prompts = False

    def __init__(self, device="cpu", dtype=torch.float32, *, factor: float = 1.0):
        super().__init__(device, dtype)
        self.factor = factor

    def score(self, images, prompts, metadata):
        return RewardOutput(self.factor * images.mean(dim=(1, 2, 3)), {"raw_mean": images.mean(dim=(1, 2, 3)).detach()})


def images(batch=2, size=16, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def jpeg():
    return load_reward("jpeg_incompressibility")


@pytest.mark.parametrize("bad, message", [
    (torch.rand(3, 16, 16), "shape [B,3,H,W]"),
    (torch.rand(2, 4, 16, 16), "shape [B,3,H,W]"),
    (torch.randint(0, 255, (2, 3, 16, 16), dtype=torch.uint8), "float tensor"),
    (torch.rand(0, 3, 16, 16), "empty batch"),
    (torch.rand(2, 3, 16, 16) * 255, "in [0,1]"),
    (torch.rand(2, 3, 16, 16) - 0.5, "in [0,1]"),
    (torch.full((2, 3, 16, 16), float("nan")), "NaN"),
    ([[0.5]], "torch.Tensor"),
])
def test_bad_images_raise_one_clear_error(jpeg, bad, message):
    with pytest.raises(RewardInputError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
        jpeg(bad, ["a", "b"])
    assert "\n" not in str(err.value) and str(err.value).startswith("jpeg_incompressibility:")


def test_prompts_and_metadata_must_match_the_batch(jpeg):
    with pytest.raises(RewardInputError, match="2 images but 3 prompts"):
        jpeg(images(2), ["a", "b", "c"])
    with pytest.raises(RewardInputError, match="2 images but 1 metadata"):
        jpeg(images(2), ["a", "b"], [{}])
    with pytest.raises(RewardInputError, match="sequence of str"):
        jpeg(images(2), "ab")


def test_a_reward_that_needs_prompts_refuses_none():
    reward = MeanBrightness()
    reward.needs_prompts = True
    with pytest.raises(RewardInputError, match="needs prompts"):
        reward(images(2))


def test_slight_decoder_overshoot_is_accepted(jpeg):
    x = images(2).clamp(0, 1)
    x[0, 0, 0, 0] = 1.0005
    x[1, 0, 0, 0] = -0.0005
    assert jpeg(x).scores.shape == (2,)


def test_unknown_reward_and_option_name_what_is_wrong():
    with pytest.raises(UnknownRewardError, match="unknown reward 'hps_v3'; available: .*hpsv2"):
        load_reward("hps_v3")
    with pytest.raises(ValueError, match="jpeg_compressibility: unknown option 'qualty'; allowed: divisor, quality"):
        load_reward("jpeg_compressibility", qualty=90)
    with pytest.raises(ValueError, match="dtype: unknown torch dtype 'float17'"):
        load_reward("jpeg_compressibility", dtype="float17")
    with pytest.raises(ValueError, match="quality must be in"):
        load_reward("jpeg_compressibility", quality=0)


def test_every_catalogue_entry_resolves_to_a_reward_class_with_documented_options():
    from shared_rewards.registry import reward_class

    for name in CATALOGUE:
        cls = reward_class(name)
        assert issubclass(cls, Reward) and cls.name == name
        assert isinstance(reward_options(cls), dict)


def test_scores_are_float32_on_the_image_device_and_non_differentiable_rewards_detach(jpeg):
    x = images(3).requires_grad_()
    out = jpeg(x)
    assert out.scores.dtype == torch.float32 and out.scores.shape == (3,) and out.scores.device == x.device
    assert not out.scores.requires_grad


def test_weighted_reward_sums_parts_and_reports_each():
    x = images(4)
    mix = WeightedReward({"a": MeanBrightness(factor=1.0), "b": MeanBrightness(factor=3.0)}, {"a": 2.0, "b": -1.0})
    out = mix(x)
    mean = x.mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.scores, 2.0 * mean - 3.0 * mean)
    torch.testing.assert_close(out.extras["a"], mean)
    torch.testing.assert_close(out.extras["b"], 3.0 * mean)
    torch.testing.assert_close(out.extras["a/raw_mean"], mean)


def test_weighted_reward_gradient_comes_only_from_nonzero_weights():
    x = images(2).requires_grad_()
    mix = WeightedReward({"a": MeanBrightness(factor=1.0), "b": MeanBrightness(factor=5.0)}, {"a": 1.0, "b": 0.0})
    assert mix.differentiable
    mix(x).scores.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 1.0 / x[0].numel()))


def test_weighted_reward_is_not_differentiable_if_an_active_part_is_not():
    mix = WeightedReward({"a": MeanBrightness(), "jpeg": load_reward("jpeg_compressibility")}, {"a": 1.0, "jpeg": 0.5})
    assert not mix.differentiable
    logged_only = WeightedReward({"a": MeanBrightness(), "jpeg": load_reward("jpeg_compressibility")},
                                 {"a": 1.0, "jpeg": 0.0})
    assert logged_only.differentiable


def test_load_reward_with_a_mapping_builds_a_mix_with_per_reward_options():
    mix = load_reward({"jpeg_compressibility": 1.0, "jpeg_incompressibility": 0.0},
                      jpeg_compressibility={"divisor": 500.0})
    x = images(2)
    out = mix(x)
    torch.testing.assert_close(out.scores, -out.extras["jpeg_incompressibility"] / 500.0)
    with pytest.raises(ValueError, match="not in the mix: \\['pickscore'\\]"):
        load_reward({"jpeg_compressibility": 1.0}, pickscore={"divisor": 26.0})
    with pytest.raises(ValueError, match="weight for 'jpeg_compressibility' must be a number"):
        load_reward({"jpeg_compressibility": "high"})


def test_to_uint8_rounds_to_nearest():
    x = torch.tensor([0.0, 0.6 / 255, 1.49 / 255, 1.51 / 255, 1.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 1, 1, 2, 255]


def test_a_weighted_mix_reads_the_batch_off_the_device_once(monkeypatch):
    """The parts of a mix share one uint8 copy of the images (GenEval's JPEGs and PickScore's PIL images in the
    paper's run used to convert the batch once each); the scores are those of the parts scored alone."""
    from shared_rewards import preprocess

    conversions = []
    original_cpu = torch.Tensor.cpu

    def counting_cpu(self, *args, **kwargs):
        if self.dtype == torch.uint8:
            conversions.append(tuple(self.shape))
        return original_cpu(self, *args, **kwargs)

    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    parts = {"small": load_reward("jpeg_compressibility"), "big": load_reward("jpeg_incompressibility")}
    alone = {name: part(images).scores for name, part in parts.items()}
    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    out = WeightedReward(parts, {"small": 1.0, "big": 0.5})(images)
    assert len(conversions) == 1
    assert torch.equal(out.extras["small"], alone["small"]) and torch.equal(out.extras["big"], alone["big"])
    # outside a mix nothing is cached; inside, the shared array is read-only so no part can alter another's input
    assert preprocess.to_uint8(images) is not preprocess.to_uint8(images)
    with preprocess.shared_conversions():
        shared = preprocess.to_uint8(images)
        assert preprocess.to_uint8(images) is shared and not shared.flags.writeable
        images.add_(0.0)  # an in-place change of the tensor is a new version: converted again
        assert preprocess.to_uint8(images) is not shared
