"""SD3.5-Medium with random weights, in the diffusers layout the trainer loads (no hub, no download).

The trainer reads only `<model>/transformer` (`SD3Transformer2DModel.from_pretrained`) and `<model>/vae`
(`AutoencoderKL.from_pretrained`): text encoders are never loaded, since prompts arrive as precomputed
embeddings (`random_embeddings.py` writes those). The architecture is the real one, so a benchmark on
this directory costs what the real checkpoint costs (same shapes, same FLOPs, same memory); only the
numbers in the weights are random.

    python bench/full_size_sd35.py --out ../.cache/bench_sd35/sd35_medium_random   # ~10 GB of fp32 weights
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# stabilityai/stable-diffusion-3.5-medium, transformer/config.json. Cross-checked with: the diffusers
# `SD3Transformer2DModel` docstring (argument names and meaning); the SD3.5 blog post (dual attention +
# QK-normalisation are what SD3.5 adds to SD3's MMDiT); ci/rsm_testkit/diffusion.py `build_sd35` (the same
# structure shrunk: "24 layers x 24 heads x 64", "pos_embed_max_size ... real: 384").
SD35_MEDIUM_TRANSFORMER = dict(
    sample_size=128,            # 1024 px / VAE factor 8: the default latent side
    patch_size=2,               # 2x2 latent patches -> a 512 px image is 32 x 32 = 1024 image tokens
    in_channels=16,             # SD3 VAE latent channels
    out_channels=16,
    num_layers=24,              # MMDiT-X depth ("24 layers")
    attention_head_dim=64,      # 24 heads x 64 = 1536 hidden width
    num_attention_heads=24,
    joint_attention_dim=4096,   # T5-XXL width: the prompt embeddings are [S, 4096]
    caption_projection_dim=1536,  # = hidden width; the context stream is projected to it
    pooled_projection_dim=2048,   # CLIP-L (768) + CLIP-G (1280) pooled projections
    pos_embed_max_size=384,     # positional table side (up to 384 patches per side)
    dual_attention_layers=tuple(range(13)),  # MMDiT-X: blocks 0..12 add a second, image-only attention
    qk_norm="rms_norm",         # SD3.5's QK-normalisation
)

# stabilityai/stable-diffusion-3.5-medium, vae/config.json (the SD3 VAE, unchanged in SD3.5): four 2x stages
# (8x), 16 latent channels, no quant convs; scaling/shift as in ci/rsm_testkit/diffusion.py
# (SD3_SCALING_FACTOR, SD3_SHIFT_FACTOR), which copies them from the same file.
SD3_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
    force_upcast=True,
)

DONE_MARKER = ".done"  # written last: a directory without it is half-written and is rebuilt
SEED = 0


def write_random_sd3(out_dir: Path, transformer_config: dict = SD35_MEDIUM_TRANSFORMER,
                     vae_config: dict = SD3_VAE) -> Path:
    """Write `out_dir/transformer` and `out_dir/vae` with random weights once; returns `out_dir`.

    A directory that already holds a finished build with the same configs is reused as is; one with other
    configs (e.g. a scaled-down test build at the same path) is refused rather than silently mixed."""
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    out_dir = Path(out_dir)
    wanted = {"transformer": _jsonable(transformer_config), "vae": _jsonable(vae_config)}
    marker = out_dir / DONE_MARKER
    if marker.is_file():
        built = json.loads(marker.read_text())
        if built != wanted:
            raise ValueError(f"{out_dir}: holds a random SD3 build with other configs; choose another directory")
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    SD3Transformer2DModel(**transformer_config).save_pretrained(out_dir / "transformer")
    AutoencoderKL(**vae_config).save_pretrained(out_dir / "vae")
    marker.write_text(json.dumps(wanted, sort_keys=True))
    return out_dir


def parameter_counts(transformer_config: dict = SD35_MEDIUM_TRANSFORMER, vae_config: dict = SD3_VAE) -> dict:
    """Parameter counts of the two models, built on the meta device (no memory, no weights)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    with init_empty_weights():
        transformer = SD3Transformer2DModel(**transformer_config)
        vae = AutoencoderKL(**vae_config)
    return {"transformer": sum(p.numel() for p in transformer.parameters()),
            "vae": sum(p.numel() for p in vae.parameters())}


def _jsonable(config: dict) -> dict:
    return json.loads(json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory to write (transformer/, vae/)")
    parser.add_argument("--count-only", action="store_true", help="print the parameter counts and exit")
    args = parser.parse_args(argv)
    if args.count_only:
        print(json.dumps(parameter_counts()))
        return 0
    print(write_random_sd3(Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
