"""Tiny random-weight diffusion checkpoints: SD3.5 Medium, TAESD3 and SD1.5, in the hub layout.

Each builder keeps the real architecture's classes, latent contract (channels, 8x downsampling, scaling
and shift factors) and scheduler config, and shrinks only the widths and depths, so that product code
loads them with the same `from_pretrained` calls it uses for the real weights:

    sd35    StableDiffusion3Pipeline.from_pretrained(path)   MMDiT-X with one dual-attention layer, 16 latent ch.
    taesd3  AutoencoderTiny.from_pretrained(path)            decodes sd35 latents (16 ch, 8x)
    sd15    StableDiffusionPipeline.from_pretrained(path)    UNet + CLIP-L-like text encoder, 4 latent ch.

Defaults: 64 px images (8x8 latents). Every directory is about 1 MB and builds in seconds. Heavy imports
happen inside the builders, so registering them (`import rsm_testkit.diffusion`) is cheap.
"""
from __future__ import annotations

import json
from pathlib import Path

from .factory import tiny_model
from .tokenizers import clip_tokenizer, special_ids, t5_tokenizer

SEED = 0
# SD3 / SD3.5 VAE latent contract (stabilityai/stable-diffusion-3.5-medium, vae/config.json).
SD3_LATENT_CHANNELS = 16
SD3_SCALING_FACTOR = 1.5305
SD3_SHIFT_FACTOR = 0.0609
# SD1.5 VAE (runwayml/stable-diffusion-v1-5, vae/config.json).
SD15_SCALING_FACTOR = 0.18215
# Four encoder/decoder blocks -> three 2x down/up-samplings -> 8x, like the real VAEs.
TINY_VAE_BLOCKS = (8, 8, 8, 8)
TINY_IMAGE_SIZE = 64


def _seed() -> None:
    import torch

    torch.manual_seed(SEED)


def _tiny_vae(latent_channels: int, scaling_factor: float, shift_factor: float | None, quant_conv: bool):
    from diffusers import AutoencoderKL

    n = len(TINY_VAE_BLOCKS)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=TINY_VAE_BLOCKS, layers_per_block=1, norm_num_groups=4,
        sample_size=TINY_IMAGE_SIZE, scaling_factor=scaling_factor, shift_factor=shift_factor,
        use_quant_conv=quant_conv, use_post_quant_conv=quant_conv,  # SD3's VAE has none, SD1.5's has both
    )


def _clip_text_config(hidden: int, tokenizer, act: str = "quick_gelu"):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=hidden, hidden_act=act,
        **special_ids(tokenizer),
    )


@tiny_model("sd35")
def build_sd35(out_dir: Path) -> None:
    """SD3.5 Medium in miniature.

    Real -> tiny: CLIP-L (768) -> 16 wide, CLIP-G (1280) -> 32 wide, pooled 2048 -> 48; T5-XXL (4096) -> 64,
    so the pipeline pads the 48-wide CLIP embeddings up to the T5 width as it pads 2048 to 4096;
    MMDiT-X 24 layers x 24 heads x 64 -> 2 layers x 4 heads x 8, layer 0 with dual attention and RMS
    qk-norm as in SD3.5 Medium; VAE 16 latent channels, 8x, scaling 1.5305, shift 0.0609, no quant convs.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    _seed()
    # SD3.5's tokenizer pads with <|endoftext|>, tokenizer_2 with "!" (the hub tokenizer configs).
    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer(pad_token="!")
    tokenizer_3 = t5_tokenizer(model_max_length=256)
    # CLIP-L uses quick_gelu, OpenCLIP bigG gelu (the hub text_encoder{,_2}/config.json).
    text_encoder = CLIPTextModelWithProjection(_clip_text_config(16, tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(32, tokenizer_2, act="gelu"))
    text_encoder_3 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_3), d_model=64, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
        decoder_start_token_id=0, **special_ids(tokenizer_3),
    ))
    transformer = SD3Transformer2DModel(
        sample_size=TINY_IMAGE_SIZE // 8, patch_size=2, in_channels=SD3_LATENT_CHANNELS,
        out_channels=SD3_LATENT_CHANNELS, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=16 + 32,
        pos_embed_max_size=32,  # up to 512 px images (real: 384)
        dual_attention_layers=(0,), qk_norm="rms_norm",
    )
    vae = _tiny_vae(SD3_LATENT_CHANNELS, SD3_SCALING_FACTOR, SD3_SHIFT_FACTOR, quant_conv=False)
    # SD3.5 Medium scheduler/scheduler_config.json: shift 3.0, 1000 training steps.
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(out_dir)


@tiny_model("taesd3")
def build_taesd3(out_dir: Path) -> None:
    """TAESD3 in miniature: `AutoencoderTiny` with 16 latent channels and three 2x stages (8x), as
    madebyollin/taesd3; 64 -> 8 channels and 3 -> 1 blocks per stage.

    Scaling 1.5305 as the SD3 VAE; shift_factor stays at AutoencoderTiny's default 0.0 (TAESD3's hub
    README sets `vae.config.shift_factor = 0.0` before use with the SD3 pipeline).
    """
    from diffusers import AutoencoderTiny

    _seed()
    vae = AutoencoderTiny(
        in_channels=3, out_channels=3, latent_channels=SD3_LATENT_CHANNELS,
        encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1),
        scaling_factor=SD3_SCALING_FACTOR, shift_factor=0.0,
    )
    vae.save_pretrained(out_dir)


# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json (a PNDM config; trainers rebuild a DDIM
# or DDPM scheduler from it, which reads clip_sample from the same file).
SD15_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, trained_betas=None,
)


@tiny_model("sd15")
def build_sd15(out_dir: Path) -> None:
    """SD1.5 in miniature.

    Real -> tiny: CLIP ViT-L/14 text model (768, 12 layers) -> 32 wide, 2 layers; UNet blocks
    (320, 640, 1280, 1280) -> (8, 8, 16, 16) with the same block types (three cross-attention down blocks,
    then a plain one), 1 layer per block, 2 heads, cross-attention width 32; VAE 4 latent channels, 8x,
    scaling 0.18215, with quant convs; the PNDM scheduler config of the hub checkpoint.
    """
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    _seed()
    tokenizer = clip_tokenizer()
    text_encoder = CLIPTextModel(_clip_text_config(32, tokenizer))
    unet = UNet2DConditionModel(
        sample_size=TINY_IMAGE_SIZE // 8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
        cross_attention_dim=32, attention_head_dim=2,
    )
    vae = _tiny_vae(4, SD15_SCALING_FACTOR, None, quant_conv=True)
    scheduler = PNDMScheduler(**SD15_SCHEDULER)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir)
    # The hub file also carries clip_sample: false, which PNDM ignores but DDIM/DDPM read (default True).
    config_path = out_dir / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["clip_sample"] = False
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
