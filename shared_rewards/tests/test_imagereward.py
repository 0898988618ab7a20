"""ImageReward on tiny checkpoints in the ORIGINAL upstream layout: the key mapping is exact, the score is
upstream's (CLS feature -> MLP -> standardise), and the tensor and PIL paths agree."""
import math

import pytest
import torch
import torch.nn.functional as F

import rsm_testkit
from rsm_testkit import rewards_blip
from shared_rewards import load_reward
from shared_rewards.blip_convert import CheckpointKeyError
from shared_rewards.imagereward import RAW_MEAN, RAW_STD
from shared_rewards.preprocess import CLIP_STD
from shared_rewards.weights import RewardWeightsError

PROMPTS = ["a photo of a cat", "a red sign that says \"hello world\"", "a painting of the ocean at night"]
LONG_PROMPT = ("a photo of a big red cat with a small blue dog on a green field at night in the city with "
               "clouds and birds in the sky and a yellow sun over the mountain lake and a white horse")


@pytest.fixture(scope="module")
def options():
    return rsm_testkit.tiny_reward_options("imagereward")


@pytest.fixture(scope="module")
def reward(options):
    return load_reward("imagereward", **options)


def images(batch=3, height=48, width=40, seed=0, smooth=False):
    g = torch.Generator().manual_seed(seed)
    if smooth:  # photo-like: low-frequency content, where resampling filters matter least
        return F.interpolate(torch.rand(batch, 3, 8, 8, generator=g), size=(height, width), mode="bilinear")
    return torch.rand(batch, 3, height, width, generator=g)


def test_scores_are_float32_per_image_and_the_standardised_raw_head_output(reward):
    scores, extras = reward(images(), PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    torch.testing.assert_close(scores, (extras["imagereward_raw"] - RAW_MEAN) / RAW_STD)
    assert scores.unique().numel() == 3


def test_repeated_calls_give_identical_scores(reward):
    x = images()
    assert torch.equal(reward(x, PROMPTS).scores, reward(x, PROMPTS).scores)


def test_a_score_does_not_depend_on_batch_order_or_batch_size(reward):
    x = images()
    scores = reward(x, PROMPTS).scores
    order = [2, 0, 1]
    torch.testing.assert_close(reward(x[order], [PROMPTS[i] for i in order]).scores, scores[order],
                               atol=1e-5, rtol=0)
    alone = torch.cat([reward(x[i:i + 1], PROMPTS[i:i + 1]).scores for i in range(3)])
    torch.testing.assert_close(alone, scores, atol=1e-5, rtol=0)


def test_max_length_35_truncates_long_prompts_and_leaves_short_ones_alone(options, reward):
    assert len(reward.tokenizer(LONG_PROMPT).input_ids) > 35
    long_reward = load_reward("imagereward", max_length=512, **options)
    x = images(batch=2)
    prompts = ["a photo of a cat", LONG_PROMPT]
    short, full = reward(x, prompts).scores, long_reward(x, prompts).scores
    torch.testing.assert_close(short[0], full[0], atol=1e-5, rtol=0)  # padding is masked out
    assert (short[1] - full[1]).abs() > 1e-4


def test_tensor_path_gradients_reach_every_image_and_are_finite(reward):
    x = images().requires_grad_(True)
    reward(x, PROMPTS).scores.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad.abs().flatten(1).sum(1) > 0).all()
    assert all(p.grad is None for p in reward.vision.parameters())  # the reward model stays frozen


@pytest.mark.parametrize("size", [512, 1024])
def test_pil_path_matches_tensor_path_within_uint8_rounding(options, reward, size):
    # Measured on the tiny model (CPU, fp32): smooth 512/1024 images differ by <= 0.0010 in score and
    # <= 0.0195 in normalised pixels (~1.3/255 before normalising: uint8 rounding plus PIL vs torch bicubic).
    pil = load_reward("imagereward", path="pil", **options)
    assert reward.differentiable and not pil.differentiable
    x = images(batch=2, height=size, width=size, smooth=True)
    pixel_gap = (reward.pixels(x) - pil.pixels(x)).abs() * torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    assert pixel_gap.max() <= 2 / 255
    torch.testing.assert_close(pil(x, PROMPTS[:2]).scores, reward(x, PROMPTS[:2]).scores, atol=5e-3, rtol=0)
    x.requires_grad_(True)
    assert not pil(x, PROMPTS[:2]).scores.requires_grad


def test_bfloat16_models_score_close_to_float32(options, reward):
    half = load_reward("imagereward", dtype="bfloat16", **options)
    assert half.vision.dtype == torch.bfloat16 and half.head.layers[0].weight.dtype == torch.float32
    x = images()
    torch.testing.assert_close(half(x, PROMPTS).scores, reward(x, PROMPTS).scores, atol=0.05, rtol=0)


def test_the_first_token_is_cls_and_blip_special_tokens_are_added(reward):
    tok = reward.tokenizer
    ids = tok(["a cat"], padding="max_length", max_length=35).input_ids[0]
    assert ids[0] == tok.cls_token_id and len(ids) == 35
    assert tok.bos_token == "[DEC]" and tok.convert_tokens_to_ids("[ENC]") == len(tok) - 1


# --- the checkpoint mapping ------------------------------------------------------------------------------

def blip_vit_reference(sd: dict, pixels: torch.Tensor, heads: int) -> torch.Tensor:
    """BLIP's vit.py forward written from the ORIGINAL keys: pre-norm blocks, fused qkv, final norm."""
    p = "blip.visual_encoder."
    x = F.conv2d(pixels, sd[p + "patch_embed.proj.weight"], sd[p + "patch_embed.proj.bias"], stride=sd[
        p + "patch_embed.proj.weight"].shape[-1]).flatten(2).transpose(1, 2)  # [B, N, D]
    x = torch.cat([sd[p + "cls_token"].expand(len(x), -1, -1), x], 1) + sd[p + "pos_embed"]
    dim = x.shape[-1]
    i = 0
    while f"{p}blocks.{i}.norm1.weight" in sd:
        b = f"{p}blocks.{i}."
        h = F.layer_norm(x, (dim,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], 1e-6)
        q, k, v = F.linear(h, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]).view(
            len(x), -1, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) / math.sqrt(dim // heads)).softmax(-1)
        h = (attn @ v).transpose(1, 2).reshape(len(x), -1, dim)
        x = x + F.linear(h, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        h = F.layer_norm(x, (dim,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], 1e-6)
        h = F.linear(F.gelu(F.linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])),
                     sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        x = x + h
        i += 1
    return F.layer_norm(x, (dim,), sd[p + "norm.weight"], sd[p + "norm.bias"], 1e-6)


@pytest.fixture(scope="module")
def built():
    """Fresh tiny modules (another seed than the cached checkpoint) and their original-layout state dict."""
    vision, text, head = rewards_blip.tiny_imagereward_modules(seed=3)
    return vision, text, head, rewards_blip.original_layout(vision, text, head)


def write(directory, state_dict, **kwargs):
    rewards_blip.write_imagereward(directory, state_dict, **kwargs)
    return str(directory)


def test_original_checkpoint_loads_to_exactly_the_modules_it_was_written_from(built, options, tmp_path):
    vision, text, head, sd = built
    reward = load_reward("imagereward", weights=write(tmp_path, sd), tokenizer=options["tokenizer"])
    for ours, theirs in ((reward.vision, vision), (reward.text, text), (reward.head.layers, head)):
        expected = theirs.state_dict()
        assert ours.state_dict().keys() == expected.keys()
        assert all(torch.equal(t, expected[k]) for k, t in ours.state_dict().items())

    x = images()
    with torch.no_grad():
        pixels = reward.pixels(x)
        embeds = vision(pixel_values=pixels).last_hidden_state
        tokens = reward.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        feature = text(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, encoder_hidden_states=embeds,
                       encoder_attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long)).last_hidden_state[:, 0]
        expected = (head(feature).squeeze(-1) - RAW_MEAN) / RAW_STD
        # and the transformers ViT computes what BLIP's vit.py computes from the original keys
        torch.testing.assert_close(reward.vision(pixel_values=pixels).last_hidden_state,
                                   blip_vit_reference(sd, pixels, heads=4), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reward(x, PROMPTS).scores, expected, atol=1e-6, rtol=0)


def test_heads_default_to_64_wide_without_vision_config_json(built, options, tmp_path):
    reward = load_reward("imagereward", weights=write(tmp_path, built[3], num_attention_heads=None),
                         tokenizer=options["tokenizer"])
    assert reward.vision.config.num_attention_heads == 1  # hidden 64 // 64
    assert reward.vision.config.layer_norm_eps == 1e-6 and reward.vision.config.image_size == 32


def test_a_ddp_module_prefix_is_accepted(built, options, tmp_path):
    sd = {f"module.{k}": v for k, v in built[3].items()}
    reward = load_reward("imagereward", weights=write(tmp_path, sd), tokenizer=options["tokenizer"])
    assert torch.equal(reward.vision.post_layernorm.weight, built[0].post_layernorm.weight)


@pytest.mark.parametrize("drop", ["blip.visual_encoder.blocks.1.norm2.weight",
                                  "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight",
                                  "mlp.layers.6.bias"])
def test_a_checkpoint_missing_a_key_names_it(built, options, tmp_path, drop):
    sd = {k: v for k, v in built[3].items() if k != drop}
    with pytest.raises(CheckpointKeyError, match=f"missing the key '{drop}'") as err:
        load_reward("imagereward", weights=write(tmp_path, sd), tokenizer=options["tokenizer"])
    assert isinstance(err.value, RewardWeightsError) and "\n" not in str(err.value)


@pytest.mark.parametrize("extra", ["blip.itm_head.weight", "blip.visual_encoder.blocks.0.attn.rel_pos.weight",
                                   "blip.text_encoder.pooler.dense.weight", "text_decoder.bert.x.weight"])
def test_a_checkpoint_with_an_unexpected_key_names_it(built, options, tmp_path, extra):
    sd = {**built[3], extra: torch.zeros(2, 2)}
    with pytest.raises(CheckpointKeyError, match=f"unexpected key '{extra}'"):
        load_reward("imagereward", weights=write(tmp_path, sd), tokenizer=options["tokenizer"])


def test_a_checkpoint_with_a_wrong_shape_names_the_key(built, options, tmp_path):
    key = "blip.text_encoder.encoder.layer.0.output.dense.weight"
    sd = {**built[3], key: torch.zeros(3, 3)}
    with pytest.raises(CheckpointKeyError, match=f"key '{key}' has shape \\[3, 3\\]"):
        load_reward("imagereward", weights=write(tmp_path, sd), tokenizer=options["tokenizer"])


def test_missing_weights_name_the_weights_option(options, tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # fail fast without the runner's env
    with pytest.raises(RewardWeightsError, match=r"imagereward: weights='.*' is a directory without 'ImageReward.pt'"):
        load_reward("imagereward", weights=str(tmp_path), tokenizer=options["tokenizer"])
    with pytest.raises(RewardWeightsError, match=r"imagereward: weights='.*nope' does not exist"):
        load_reward("imagereward", weights=str(tmp_path / "nope"), tokenizer=options["tokenizer"])
    with pytest.raises(RewardWeightsError, match=r"cannot load ImageReward.pt from weights='no-org/no-ir'"):
        load_reward("imagereward", weights="no-org/no-ir", tokenizer=options["tokenizer"])


def test_a_missing_tokenizer_names_the_tokenizer_option(options, tmp_path):
    with pytest.raises(RewardWeightsError, match=r"imagereward: tokenizer='.*nope' does not exist"):
        load_reward("imagereward", weights=options["weights"], tokenizer=str(tmp_path / "nope"))


def test_a_tokenizer_larger_than_the_text_vocabulary_is_refused(options, tmp_path):
    from transformers import BertTokenizer

    words = rewards_blip.TINY_VOCAB + [f"word{i}" for i in range(50)]
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"tokenizer has \d+ tokens but the text encoder only \d+"):
        load_reward("imagereward", weights=options["weights"], tokenizer=str(tmp_path))


def test_med_config_without_cross_attention_is_refused(built, options, tmp_path):
    med = {**rewards_blip.TINY_MED_CONFIG, "add_cross_attention": False}
    with pytest.raises(CheckpointKeyError, match="add_cross_attention"):
        load_reward("imagereward", weights=write(tmp_path, built[3], med_config=med), tokenizer=options["tokenizer"])


@pytest.mark.parametrize("bad, message", [({"path": "numpy"}, "path must be one of"),
                                          ({"max_length": 0}, r"max_length must be in \[1, 512\]"),
                                          ({"max_length": 513}, r"max_length must be in \[1, 512\]")])
def test_bad_options_raise_one_clear_error(options, bad, message):
    with pytest.raises(ValueError, match=message):
        load_reward("imagereward", **{**options, **bad})
