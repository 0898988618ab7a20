"""Stable Diffusion 1.5 with random weights, in the diffusers layout the trainers load (no hub, no download).

The architecture is the real one (runwayml/stable-diffusion-v1-5's unet/, vae/ and text_encoder/ configs), so a
benchmark on this folder costs what the real checkpoint costs (same shapes, FLOPs and memory); only the numbers in
the weights are random, and the tokenizer is the test kit's small word-level one (the text encoder's vocabulary
is sized to it; CLIP's 49408-row embedding table is a lookup, not compute).

    python bench/full_size_sd15.py --out ../.cache/bench_sd15/sd15_random      # ~4 GB of fp32 weights
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# runwayml/stable-diffusion-v1-5 unet/config.json (the diffusers defaults plus cross_attention_dim 768)
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
# vae/config.json: four stages (8x), 4 latent channels, scaling 0.18215
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, scaling_factor=0.18215)
# text_encoder/config.json: CLIP ViT-L/14's text tower
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")


def build(out: Path) -> Path:
    """Write the folder once (a `.complete` marker says it is whole); returns it."""
    if (out / ".complete").is_file():
        return out
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from rsm_testkit import get_tiny_model
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    kit = Path(get_tiny_model("sd15"))
    tokenizer = CLIPTokenizer.from_pretrained(str(kit), subfolder="tokenizer")
    torch.manual_seed(0)
    text_config = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **SD15_TEXT)
    scheduler = DDIMScheduler.from_pretrained(str(kit), subfolder="scheduler")
    pipe = StableDiffusionPipeline(vae=AutoencoderKL(**SD15_VAE), text_encoder=CLIPTextModel(text_config),
                                   tokenizer=tokenizer, unet=UNet2DConditionModel(**SD15_UNET), scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(out))
    config = json.loads((kit / "scheduler" / "scheduler_config.json").read_text())
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=2))
    (out / ".complete").write_text("ok\n")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    print(build(Path(parser.parse_args(argv).out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
