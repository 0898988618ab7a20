"""SD1.5 at full size with random weights, written once for the GPU benchmark (no hub, no download).

    python bench/full_size_sd15.py --out <dir>     # <dir>/sd15 (diffusers layout) and <dir>/hps/HPS_v2.1_compressed.pt

The architectures are the real ones, with the config values of runwayml/stable-diffusion-v1-5 (unet/, vae/,
text_encoder/ config.json; scheduler/scheduler_config.json) and HPS v2.1's open_clip ViT-H-14; only the weights are
random, so speed and memory are those of the paper runs while the numbers mean nothing. Parameter counts:
UNet 859,520,964 (LoRA r 8 on to_q/k/v/out.0: 1,594,368), VAE 83,653,863, CLIP text encoder 123,060,480,
ViT-H-14 986,109,441. The tokenizer is the test kit's (a small word-level vocabulary; the prompt text does not
matter for timing). About 4.3 GB in fp16 for the pipeline and 3.9 GB in fp32 for the reward.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

# runwayml/stable-diffusion-v1-5 (model_index.json components), the values that define the architecture
UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8,
            norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
           norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
SCHEDULER = dict(_class_name="PNDMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, clip_sample=False,
                 prediction_type="epsilon", timestep_spacing="leading", trained_betas=None)
PARAMETERS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480, "hps": 986_109_441, "lora": 1_594_368}


def build_models(device="cpu"):
    """(unet, vae, text_encoder) of the SD1.5 architecture (random weights; pass device="meta" to only count)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device(device):
        return UNet2DConditionModel(**UNET), AutoencoderKL(**VAE), CLIPTextModel(CLIPTextConfig(**TEXT))


def build(out: Path) -> tuple[Path, Path]:
    """Write <out>/sd15 and <out>/hps once (skipped when present); returns their paths."""
    import torch
    from rsm_testkit import get_tiny_model

    pipeline, hps = out / "sd15", out / "hps"
    if not (pipeline / "model_index.json").is_file():
        from transformers import CLIPTokenizer

        torch.manual_seed(0)
        unet, vae, text = build_models()
        for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text)):
            module.half().save_pretrained(pipeline / name)
        CLIPTokenizer.from_pretrained(get_tiny_model("sd15"), subfolder="tokenizer").save_pretrained(pipeline / "tokenizer")
        (pipeline / "scheduler").mkdir(parents=True, exist_ok=True)
        (pipeline / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2))
        (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    if not (hps / "HPS_v2.1_compressed.pt").is_file():
        import open_clip

        torch.manual_seed(1)
        model = open_clip.create_model("ViT-H-14", pretrained=None, load_weights=False)
        hps.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": model.state_dict()}, hps / "HPS_v2.1_compressed.pt")
    return pipeline, hps / "HPS_v2.1_compressed.pt"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    print(build(Path(parser.parse_args().out)))
