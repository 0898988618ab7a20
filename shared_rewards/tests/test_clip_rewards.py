"""The CLIP-family rewards (hpsv2, pickscore, aesthetic, clipscore) on tiny random-weight checkpoints.

Every reward is built through `load_reward` with the tiny checkpoints' paths, exactly as a user would pass
hub ids. The tiny models take 32 px images, so "at the model's size" means 32 px and 64 px inputs exercise
the resize.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import rsm_testkit
from shared_rewards import RewardWeightsError, load_reward
from shared_rewards.preprocess import CLIP_MEAN, CLIP_STD

REWARDS = ("hpsv2", "pickscore", "aesthetic", "clipscore")
PROMPTS = ("a cat", "a red dog on the grass", "two birds", "an astronaut riding a horse")

# Largest |tensor path - PIL path| measured on seeded uniform-noise batches (torch 2.14, transformers 5.2x,
# open_clip 3.3, Pillow): at the model's 32 px the only difference is uint8 rounding; at 64x64, 64x48 and
# 48x64 it adds torch's vs PIL's antialiased bicubic. The tolerance is about 4x the measured value.
#            reward: (measured at 32 px, tolerance), (measured at 64 px / 64x48, tolerance)
PATH_AGREEMENT = {
    "hpsv2": ((7.8e-5, 3e-4), (5.0e-4, 2e-3)),
    "pickscore": ((2.7e-3, 1e-2), (1.6e-2, 6e-2)),  # scores ~14x larger: exp(logit_scale) of a fresh CLIP
    "aesthetic": ((2.9e-5, 1.5e-4), (1.1e-4, 4e-4)),
    "clipscore": ((2.6e-4, 1e-3), (7.4e-4, 3e-3)),
}


@functools.lru_cache(maxsize=None)
def _cached_reward(name: str, options: tuple):
    return load_reward(name, **rsm_testkit.tiny_reward_options(name), **dict(options))


def reward(name: str, **options):
    """One instance per (reward, options) for the whole module: loading is the slow part."""
    return _cached_reward(name, tuple(sorted(options.items())))


def images(batch: int = 4, height: int = 32, width: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def prompts(batch: int = 4) -> list[str]:
    return list(PROMPTS[:batch])


# ---------------------------------------------------------------- the contract, for every reward

@pytest.mark.parametrize("name", REWARDS)
def test_scores_are_float32_per_image_on_the_images_device(name):
    out = reward(name)(images(3), prompts(3))
    assert out.scores.shape == (3,)
    assert out.scores.dtype == torch.float32
    assert out.scores.device == torch.device("cpu")
    assert torch.isfinite(out.scores).all()


@pytest.mark.parametrize("name", REWARDS)
@pytest.mark.parametrize("path", ["tensor", "pil"])
def test_same_call_twice_gives_identical_scores(name, path):
    r, x = reward(name, path=path), images(height=64, width=48)
    assert torch.equal(r(x, prompts()).scores, r(x, prompts()).scores)


@pytest.mark.parametrize("name", REWARDS)
def test_permuting_the_batch_permutes_the_scores(name):
    r, x, p = reward(name), images(), prompts()
    order = torch.tensor([2, 0, 3, 1])
    permuted = r(x[order], [p[i] for i in order]).scores
    torch.testing.assert_close(permuted, r(x, p).scores[order], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", REWARDS)
def test_reward_models_are_frozen_in_eval_mode(name):
    r = reward(name)
    modules = [m for m in vars(r).values() if isinstance(m, torch.nn.Module)]
    assert modules
    for module in modules:
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())


@pytest.mark.parametrize("name", REWARDS)
def test_tensor_path_gradients_reach_every_image(name):
    r = reward(name, path="tensor")
    assert r.differentiable
    x = images(height=64, width=48).requires_grad_()
    r(x, prompts()).scores.sum().backward()
    per_image = x.grad.flatten(1).abs().sum(dim=1)  # [B]
    assert torch.isfinite(x.grad).all()
    assert (per_image > 0).all()


@pytest.mark.parametrize("name", REWARDS)
def test_pil_path_is_not_differentiable(name):
    r = reward(name, path="pil")
    assert not r.differentiable
    x = images().requires_grad_()
    assert not r(x, prompts()).scores.requires_grad


@pytest.mark.parametrize("name", REWARDS)
@pytest.mark.parametrize("size_index, shapes", [(0, [(32, 32)]), (1, [(64, 64), (64, 48), (48, 64)])])
def test_tensor_and_pil_paths_agree_within_measured_tolerance(name, size_index, shapes):
    _, tolerance = PATH_AGREEMENT[name][size_index]
    tensor_path, pil_path = reward(name, path="tensor"), reward(name, path="pil")
    for seed, (height, width) in enumerate(shapes):
        x = images(height=height, width=width, seed=seed)
        diff = (tensor_path(x, prompts()).scores - pil_path(x, prompts()).scores).abs().max().item()
        assert diff <= tolerance, f"{name} at {height}x{width}: |tensor - pil| = {diff:.2e} > {tolerance:.0e}"


@pytest.mark.parametrize("name", REWARDS)
@pytest.mark.parametrize("height, width", [(64, 48), (48, 64), (75, 40)])
def test_tensor_path_resize_geometry_matches_the_reference_processor(name, height, width):
    """Pixel-level check of the crop/pad geometry on non-square images: mean |diff| is ~0.005 (normalised
    units) when the geometry matches and ~0.3 when the resize is off by one pixel or the crop is shifted."""
    x = images(2, height, width)
    diff = (reward(name, path="tensor").pixel_values(x) - reward(name, path="pil").pixel_values(x)).abs()
    assert diff.mean() < 0.02


@pytest.mark.parametrize("name", REWARDS)
def test_unknown_path_is_a_value_error_naming_the_option(name):
    with pytest.raises(ValueError, match=r"path must be one of \('tensor', 'pil'\)"):
        reward(name, path="numpy")


@pytest.mark.parametrize("name", REWARDS)
def test_unknown_option_is_rejected_by_load_reward(name):
    with pytest.raises(ValueError, match="unknown option 'scale'"):
        load_reward(name, scale=2.0, **rsm_testkit.tiny_reward_options(name))


@pytest.mark.parametrize("name, option", [
    ("hpsv2", "weights"), ("pickscore", "weights"), ("pickscore", "processor"),
    ("aesthetic", "clip"), ("aesthetic", "weights"), ("clipscore", "weights"),
])
def test_missing_weights_raise_a_weights_error_naming_the_option(name, option, tmp_path):
    options = {**rsm_testkit.tiny_reward_options(name), option: str(tmp_path / "no-such-checkpoint")}
    with pytest.raises(RewardWeightsError, match=rf"{name}: {option}="):
        load_reward(name, **options)


# ---------------------------------------------------------------- HPSv2

def test_hps_score_is_the_cosine_of_open_clip_embeddings(tiny_models):
    import open_clip

    directory = tiny_models.path("hps")
    model = open_clip.create_model(f"local-dir:{directory}", load_weights=False)
    model.load_state_dict(torch.load(directory / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"])
    model.eval()
    x, p = images(), prompts()  # 32 px: the tensor path does no resize, only CLIP normalisation
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        image_emb = F.normalize(model.encode_image((x - mean) / std), dim=-1)
        text_emb = F.normalize(model.encode_text(open_clip.get_tokenizer(f"local-dir:{directory}")(p)), dim=-1)
    expected = (image_emb * text_emb).sum(-1)
    torch.testing.assert_close(reward("hpsv2")(x, p).scores, expected, atol=1e-5, rtol=0)
    assert expected.abs().max() <= 1


def test_hps_versions_load_different_checkpoints():
    x, p = images(), prompts()
    v20, v21 = reward("hpsv2", version="v2.0")(x, p).scores, reward("hpsv2", version="v2.1")(x, p).scores
    assert not torch.allclose(v20, v21)
    torch.testing.assert_close(v21, reward("hpsv2")(x, p).scores, atol=0, rtol=0)  # v2.1 is the default


def test_hps_strips_the_ddp_module_prefix(tiny_models, tmp_path):
    directory = tiny_models.path("hps")
    (tmp_path / "open_clip_config.json").write_text((directory / "open_clip_config.json").read_text())
    state = torch.load(directory / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"]
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "HPS_v2.1_compressed.pt")
    x, p = images(), prompts()
    prefixed = load_reward("hpsv2", weights=str(tmp_path / "HPS_v2.1_compressed.pt"))(x, p).scores
    assert torch.equal(prefixed, reward("hpsv2")(x, p).scores)


def test_hps_architecture_comes_from_open_clip_config_json(tiny_models):
    config = json.loads((tiny_models.path("hps") / "open_clip_config.json").read_text())
    r = reward("hpsv2")
    assert r.image_size == config["model_cfg"]["vision_cfg"]["image_size"]
    assert r.model.text_projection.shape[1] == config["model_cfg"]["embed_dim"]


def test_hps_fp16_autocast_is_ignored_on_cpu():
    x, p = images(), prompts()
    assert torch.equal(reward("hpsv2", amp_dtype="float16")(x, p).scores, reward("hpsv2")(x, p).scores)


def test_hps_antialias_changes_downsampled_scores_only():
    small, large, p = images(), images(height=64, width=64), prompts()
    sharp, smooth = reward("hpsv2", antialias=False), reward("hpsv2")
    assert torch.equal(sharp(small, p).scores, smooth(small, p).scores)
    assert not torch.allclose(sharp(large, p).scores, smooth(large, p).scores)


def test_hps_weights_of_another_architecture_are_a_weights_error(tmp_path):
    from rsm_testkit.rewards_clip import HPS_OPEN_CLIP_CONFIG

    source = rsm_testkit.tiny_reward_options("hpsv2")["weights"]
    config = json.loads(json.dumps(HPS_OPEN_CLIP_CONFIG))
    config["model_cfg"]["embed_dim"] = 24
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    (tmp_path / "HPS_v2.1_compressed.pt").write_bytes((Path(source) / "HPS_v2.1_compressed.pt").read_bytes())
    with pytest.raises(RewardWeightsError, match="does not fit the local-dir:"):
        load_reward("hpsv2", weights=str(tmp_path))


@pytest.mark.parametrize("option, value", [("version", "v3"), ("amp_dtype", "bfloat16")])
def test_hps_bad_option_values_are_value_errors(option, value):
    with pytest.raises(ValueError, match=rf"hpsv2: {option} must be one of"):
        reward("hpsv2", **{option: value})


# ---------------------------------------------------------------- PickScore

def test_pickscore_is_logit_scale_times_cosine_of_clip_embeddings(tiny_models):
    from transformers import AutoTokenizer, CLIPModel

    directory = tiny_models.path("pickscore")
    model, tokenizer = CLIPModel.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(directory)
    x, p = images(), prompts()
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model(pixel_values=(x - mean) / std, **tokenizer(p, padding=True, return_tensors="pt"))
    expected = out.logits_per_image.diagonal()  # exp(logit_scale) * cosine, HF's own computation
    torch.testing.assert_close(reward("pickscore")(x, p).scores, expected, atol=1e-4, rtol=1e-5)


def test_pickscore_divisor_26_is_the_raw_score_over_26():
    x, p = images(), prompts()
    raw = reward("pickscore")(x, p).scores
    assert torch.equal(reward("pickscore", divisor=26.0)(x, p).scores, raw / 26.0)


def test_pickscore_pad_and_crop_agree_on_square_images_only():
    p = prompts()
    crop, pad = reward("pickscore", resize_mode="crop"), reward("pickscore", resize_mode="pad")
    square, wide = images(height=64, width=64), images(height=48, width=64)
    assert torch.equal(crop(square, p).scores, pad(square, p).scores)
    assert not torch.allclose(crop(wide, p).scores, pad(wide, p).scores)


def test_pickscore_truncates_prompts_to_77_tokens():
    long_prompt = " ".join(["a very long prompt"] * 60)
    scores = reward("pickscore")(images(2), [long_prompt, "a cat"]).scores
    assert torch.isfinite(scores).all()


@pytest.mark.parametrize("option, value, message", [
    ("resize_mode", "squash", "resize_mode must be one of"), ("divisor", 0.0, "divisor must be a number > 0"),
])
def test_pickscore_bad_option_values_are_value_errors(option, value, message):
    with pytest.raises(ValueError, match=rf"pickscore: {message}"):
        reward("pickscore", **{option: value})


# ---------------------------------------------------------------- aesthetic

def test_aesthetic_head_is_one_affine_map_of_the_normalised_embedding():
    r = reward("aesthetic")
    x = images()
    with torch.no_grad():
        embedding = r.clip.get_image_features(pixel_values=r.pixel_values(x))
        embedding = getattr(embedding, "pooler_output", embedding)
        embedding = embedding / embedding.norm(dim=-1, keepdim=True)  # [B, D]
    dim = embedding.shape[1]
    weight, bias = torch.eye(dim, dtype=torch.float64), torch.zeros(dim, dtype=torch.float64)
    for layer in r.head.layers:
        if isinstance(layer, torch.nn.Linear):  # compose x -> Wx + b through the five linear layers
            w, b = layer.weight.double(), layer.bias.double()
            weight, bias = w @ weight, w @ bias + b
    expected = (embedding.double() @ weight.T + bias).squeeze(-1)
    torch.testing.assert_close(r(x).scores.double(), expected, atol=1e-6, rtol=1e-6)


def test_aesthetic_head_state_dict_keys_match_upstream(tiny_models):
    state = torch.load(tiny_models.path("aesthetic_head") / "aesthetic-model.pth", weights_only=True)
    expected = {f"layers.{i}.{kind}" for i in (0, 2, 4, 6, 7) for kind in ("weight", "bias")}
    assert set(state) == expected == set(reward("aesthetic").head.state_dict())


def test_aesthetic_needs_no_prompts():
    assert not reward("aesthetic").needs_prompts
    assert reward("aesthetic")(images(2)).scores.shape == (2,)


@pytest.mark.parametrize("path", ["tensor", "pil"])
def test_aesthetic_crop_and_squash_differ_on_non_square_images(path):
    crop, squash = reward("aesthetic", path=path), reward("aesthetic", path=path, resize_mode="squash")
    at_model_size, wide = images(), images(height=32, width=64)
    assert not torch.allclose(crop(wide).scores, squash(wide).scores, atol=1e-6, rtol=0)
    if path == "tensor":  # nothing to resize: both are the identity on 32 px images
        assert torch.equal(crop(at_model_size).scores, squash(at_model_size).scores)


def test_aesthetic_head_of_the_wrong_width_is_a_weights_error(tmp_path):
    state = {}
    for index, (d_in, d_out) in zip((0, 2, 4, 6, 7), [(8, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]):
        state[f"layers.{index}.weight"], state[f"layers.{index}.bias"] = torch.zeros(d_out, d_in), torch.zeros(d_out)
    torch.save(state, tmp_path / "aesthetic-model.pth")
    options = {**rsm_testkit.tiny_reward_options("aesthetic"), "weights": str(tmp_path)}
    with pytest.raises(RewardWeightsError, match="takes 8-d embeddings"):
        load_reward("aesthetic", **options)


def test_aesthetic_unknown_resize_mode_is_a_value_error():
    with pytest.raises(ValueError, match=r"aesthetic: resize_mode must be one of \('crop', 'squash'\)"):
        reward("aesthetic", resize_mode="pad")


# ---------------------------------------------------------------- CLIPScore

def test_clipscore_is_the_raw_cosine_by_default():
    out = reward("clipscore")(images(), prompts())
    assert torch.equal(out.scores, out.extras["clip_cosine"])
    assert out.scores.abs().max() <= 1


def test_clipscore_w_gives_w_times_the_positive_part_of_the_cosine():
    x = images(16, height=64, width=64, seed=0)  # enough random pairs for both signs (asserted below)
    p = list(PROMPTS) * 4
    cosine = reward("clipscore")(x, p).scores
    assert (cosine < 0).any() and (cosine > 0).any()  # both branches of max(cos, 0) are exercised
    assert torch.equal(reward("clipscore", w=2.5)(x, p).scores, 2.5 * cosine.clamp(min=0))


def test_clipscore_non_positive_w_is_a_value_error():
    with pytest.raises(ValueError, match="clipscore: w must be None or a number > 0"):
        reward("clipscore", w=0)


# ---------------------------------------------------------------- on a GPU, when there is one

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("name", REWARDS)
def test_cuda_scores_match_cpu_scores_and_stay_on_the_gpu(name):
    on_gpu = load_reward(name, device="cuda", **rsm_testkit.tiny_reward_options(name))
    x = images(height=64, width=48)
    scores = on_gpu(x.cuda(), prompts()).scores
    assert scores.device.type == "cuda"
    torch.testing.assert_close(scores.cpu(), reward(name)(x, prompts()).scores, atol=2e-3, rtol=2e-3)


@cuda
def test_hps_fp16_autocast_stays_close_to_fp32_on_cuda():
    options = rsm_testkit.tiny_reward_options("hpsv2")
    x, p = images().cuda(), prompts()
    fp32 = load_reward("hpsv2", device="cuda", **options)(x, p).scores
    fp16 = load_reward("hpsv2", device="cuda", amp_dtype="float16", **options)(x, p).scores
    torch.testing.assert_close(fp16, fp32, atol=5e-3, rtol=0)
