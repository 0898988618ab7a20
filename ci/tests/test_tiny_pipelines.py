"""The tiny diffusion checkpoints load with diffusers' own `from_pretrained` and behave like the real ones:
same classes, latent contract, scheduler configs and tokenizer classes, only smaller."""
from __future__ import annotations

import json

import pytest
import torch

PROMPTS = ["a photo of a cat on the beach", "a zorblax riding a quuxbird, 8k"]  # unknown words included


def _directory_megabytes(path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


@pytest.fixture(scope="module")
def sd35(tiny_models):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_models.path("sd35"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd15(tiny_models):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_models.path("sd15"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name", ["sd35", "sd15", "taesd3"])
def test_tiny_diffusion_checkpoints_stay_small(tiny_models, name):
    assert _directory_megabytes(tiny_models.path(name)) < 5


@pytest.mark.parametrize("pipe_name", ["sd35", "sd15"])
def test_pipeline_generates_images_in_unit_range(request, pipe_name):
    pipe = request.getfixturevalue(pipe_name)
    out = pipe(PROMPTS, num_inference_steps=4, height=64, width=64, guidance_scale=4.5, output_type="pt",
               generator=torch.Generator().manual_seed(0))
    images = out.images  # [B, 3, H, W]
    assert images.shape == (2, 3, 64, 64)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert images.std() > 0


def test_sd35_latents_have_the_real_contract(sd35):
    assert sd35.vae_scale_factor == 8
    assert sd35.vae.config.latent_channels == sd35.transformer.config.in_channels == 16
    assert sd35.vae.config.scaling_factor == pytest.approx(1.5305)
    assert sd35.vae.config.shift_factor == pytest.approx(0.0609)
    assert not sd35.vae.config.use_quant_conv and not sd35.vae.config.use_post_quant_conv
    latents = sd35(PROMPTS[:1], num_inference_steps=2, height=128, width=64, output_type="latent").images
    assert latents.shape == (1, 16, 16, 8)
    # SD3.5 Medium's MMDiT-X: dual attention in the first layer, RMS qk-norm.
    assert tuple(sd35.transformer.config.dual_attention_layers) == (0,)
    assert sd35.transformer.config.qk_norm == "rms_norm"


def test_sd3_scheduler_is_flow_matching_with_shift_3(sd35):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = sd35.scheduler
    assert isinstance(scheduler, FlowMatchEulerDiscreteScheduler)
    assert scheduler.config.shift == 3.0 and scheduler.config.num_train_timesteps == 1000
    scheduler.set_timesteps(10)
    sigmas = scheduler.sigmas
    assert sigmas[0] == pytest.approx(1.0) and sigmas[-1] == 0
    assert (sigmas[1:] < sigmas[:-1]).all()
    # shift 3 maps evenly spaced s to sigma = 3s / (1 + 2s): undoing it must give even spacing again.
    unshifted = sigmas[:-1] / (3 - 2 * sigmas[:-1])
    steps = unshifted[:-1] - unshifted[1:]
    torch.testing.assert_close(steps, steps.mean().expand_as(steps), atol=1e-5, rtol=0)


def test_sd15_scheduler_config_is_the_hub_one(tiny_models, sd15):
    from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler

    path = tiny_models.path("sd15") / "scheduler"
    raw = json.loads((path / "scheduler_config.json").read_text())
    assert raw["_class_name"] == "PNDMScheduler"
    expected = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    steps_offset=1, set_alpha_to_one=False, clip_sample=False, skip_prk_steps=True)
    assert {k: raw[k] for k in expected} == expected
    assert isinstance(sd15.scheduler, PNDMScheduler)

    # The trainers rebuild DDIM / DDPM from this file: clip_sample must come through as False.
    ddim = DDIMScheduler.from_pretrained(path)
    assert ddim.config.clip_sample is False and ddim.config.prediction_type == "epsilon"
    assert ddim.config.timestep_spacing == "leading"
    ddim.set_timesteps(50)
    assert ddim.timesteps[:3].tolist() == [981, 961, 941] and ddim.timesteps[-1].item() == 1
    assert ddim.final_alpha_cumprod.item() == pytest.approx(0.99915, abs=1e-5)
    assert DDPMScheduler.from_pretrained(path).config.clip_sample is False
    betas = (torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2).float()
    torch.testing.assert_close(ddim.betas, betas)


def test_sd15_components_match_the_real_layout(sd15):
    assert sd15.vae_scale_factor == 8
    assert sd15.vae.config.latent_channels == sd15.unet.config.in_channels == 4
    assert sd15.vae.config.scaling_factor == pytest.approx(0.18215)
    assert sd15.unet.config.cross_attention_dim == sd15.text_encoder.config.hidden_size
    assert sd15.safety_checker is None and sd15.feature_extractor is None
    assert sd15.tokenizer.model_max_length == 77


def test_taesd3_decodes_sd35_latents(tiny_models, sd35):
    from diffusers import AutoencoderTiny

    taesd = AutoencoderTiny.from_pretrained(tiny_models.path("taesd3"))
    assert taesd.config.latent_channels == sd35.vae.config.latent_channels
    assert taesd.config.scaling_factor == pytest.approx(sd35.vae.config.scaling_factor)
    latents = sd35(PROMPTS, num_inference_steps=2, height=64, width=64, output_type="latent").images
    with torch.no_grad():
        image = taesd.decode(latents / taesd.config.scaling_factor + taesd.config.shift_factor).sample
    assert image.shape == (2, 3, 64, 64) and torch.isfinite(image).all()
    sd35.vae, real_vae = taesd, sd35.vae  # the upstream trainers swap the VAE in place
    try:
        out = sd35(PROMPTS[:1], num_inference_steps=2, height=64, width=64, output_type="pt").images
    finally:
        sd35.vae = real_vae
    assert out.shape == (1, 3, 64, 64)


@pytest.mark.parametrize("pipe_name,slots", [("sd35", ["tokenizer", "tokenizer_2", "tokenizer_3"]),
                                             ("sd15", ["tokenizer"])])
def test_tokenizers_load_with_their_real_classes_and_round_trip(request, tiny_models, tmp_path, pipe_name, slots):
    from transformers import AutoTokenizer, CLIPTokenizer, T5TokenizerFast

    pipe = request.getfixturevalue(pipe_name)
    for slot in slots:
        tokenizer = getattr(pipe, slot)
        real_class = T5TokenizerFast if slot == "tokenizer_3" else CLIPTokenizer
        direct = real_class.from_pretrained(tiny_models.path(pipe_name), subfolder=slot)
        tokenizer.save_pretrained(tmp_path / slot)
        again = AutoTokenizer.from_pretrained(tmp_path / slot)
        ids = tokenizer(PROMPTS, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
        assert direct(PROMPTS, padding="max_length", max_length=tokenizer.model_max_length,
                      truncation=True).input_ids == ids
        assert again(PROMPTS, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True).input_ids == ids
        assert max(max(row) for row in ids) < len(tokenizer)
        text_encoder = getattr(pipe, slot.replace("tokenizer", "text_encoder"))
        assert text_encoder.config.vocab_size == len(tokenizer)
        assert tokenizer.decode(tokenizer("a photo of a cat").input_ids, skip_special_tokens=True) == "a photo of a cat"


def test_sd35_prompt_embeddings_have_the_real_layout(sd35):
    """CLIP-L + CLIP-G hidden states padded to the T5 width, then T5's 256 tokens: [B, 77 + 256, D]."""
    embeds, negative, pooled, negative_pooled = sd35.encode_prompt(PROMPTS, PROMPTS, PROMPTS, do_classifier_free_guidance=True)
    width = sd35.text_encoder_3.config.d_model
    assert embeds.shape == negative.shape == (2, 77 + 256, width) == (2, 333, sd35.transformer.config.joint_attention_dim)
    clip_width = sd35.text_encoder.config.projection_dim + sd35.text_encoder_2.config.projection_dim
    assert pooled.shape == negative_pooled.shape == (2, clip_width) == (2, sd35.transformer.config.pooled_projection_dim)


@pytest.mark.parametrize("make", ["clip_tokenizer", "t5_tokenizer", "bert_tokenizer", "word_level_tokenizer"])
def test_offline_tokenizers_round_trip_and_take_any_prompt(tmp_path, make):
    from transformers import AutoTokenizer

    from rsm_testkit import tokenizers

    tokenizer = getattr(tokenizers, make)()
    prompts = ["A photo of a cat, 8k!", "ünïcödé zorblax 日本 ✨", ""]
    batch = tokenizer(prompts, padding="max_length", max_length=24, truncation=True)
    assert all(len(row) == 24 for row in batch.input_ids)
    assert all(0 <= i < len(tokenizer) for row in batch.input_ids for i in row)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded).__name__ == type(tokenizer).__name__
    assert loaded(prompts, padding="max_length", max_length=24, truncation=True).input_ids == batch.input_ids
    # every word of the built-in list is one known token (CLIP's BPE merges spell each of them whole)
    for word in ("cat", "astronaut", "photograph", "beach"):
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) == 1 and ids[0] != tokenizer.unk_token_id
