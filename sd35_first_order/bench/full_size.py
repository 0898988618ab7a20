"""SD3.5-Medium's transformer and TAESD3 with random weights, in the diffusers layout `train_vggflow.py` loads (no hub),
and a random-weight HPSv2 reward of the real ViT-H-14 architecture: a benchmark on them costs what the real weights
cost (same shapes, FLOPs, memory); only the numbers are random.

    python bench/full_size.py --out ../.cache/bench_sd35fo      # then bench_epoch.py --full-size uses it

The text encoders keep the real output widths (CLIP-L 768, CLIP-G 1280, T5-XXL 4096, so the embeddings are
[333, 4096] and pooled 2048 as the trainer sees them) with one layer each and the test kit's small tokenizers:
text encoding is a small part of an epoch and is not what this measures.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

# stabilityai/stable-diffusion-3.5-medium transformer/config.json (spec §2.3: hidden 1536, 24 blocks, 13 dual-attention)
SD35_MEDIUM_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                               attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                               caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                               dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
# madebyollin/taesd3 config.json: AutoencoderTiny with 16 latent channels, 64-wide blocks, (1,3,3,3)/(3,3,3,1) blocks
TAESD3 = dict(in_channels=3, out_channels=3, encoder_block_out_channels=(64, 64, 64, 64),
              decoder_block_out_channels=(64, 64, 64, 64), act_fn="relu", latent_channels=16,
              upsampling_scaling_factor=2, num_encoder_blocks=(1, 3, 3, 3), num_decoder_blocks=(3, 3, 3, 1),
              latent_magnitude=3, latent_shift=0.5, scaling_factor=1.5305, shift_factor=0.0)
DONE = ".done"


def write_pipeline(out: Path, transformer_config: dict | None = None, hps_arch: str | None = "ViT-H-14") -> Path:
    """`out/pipeline` (a StableDiffusion3Pipeline folder), `out/taesd3` and `out/hps`; written once. The two
    arguments shrink the architectures for a smoke test of this builder."""
    import torch
    from diffusers import (AutoencoderTiny, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from rsm_testkit.tokenizers import clip_tokenizer, special_ids, t5_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    pipeline_dir, taesd_dir = out / "pipeline", out / "taesd3"
    if (out / DONE).is_file():
        return out
    torch.manual_seed(0)
    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(), clip_tokenizer(pad_token="!"), t5_tokenizer(model_max_length=256)

    def clip(width, tok, act):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=width, intermediate_size=64, num_hidden_layers=1, num_attention_heads=8,
            max_position_embeddings=77, projection_dim=width, hidden_act=act, **special_ids(tok))).to(torch.bfloat16)

    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), d_model=4096, d_ff=64, d_kv=64, num_layers=1,
                                 num_heads=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                                 **special_ids(tokenizer_3))).to(torch.bfloat16)
    transformer = SD3Transformer2DModel(**(transformer_config or SD35_MEDIUM_TRANSFORMER)).to(torch.bfloat16)
    vae = AutoencoderTiny(**TAESD3)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=clip(768, tokenizer, "quick_gelu"), tokenizer=tokenizer,
                                    text_encoder_2=clip(1280, tokenizer_2, "gelu"), tokenizer_2=tokenizer_2,
                                    text_encoder_3=t5, tokenizer_3=tokenizer_3)
    pipe.save_pretrained(pipeline_dir)
    vae.save_pretrained(taesd_dir)
    if hps_arch:
        write_hps(out / "hps", hps_arch)
    (out / DONE).write_text("ok\n")
    return out


def write_hps(out: Path, arch: str = "ViT-H-14") -> None:
    """xswu/HPSv2's layout with random ViT-H-14 weights (open_clip's architecture, as shared_rewards builds it)."""
    import open_clip
    import torch

    out.mkdir(parents=True, exist_ok=True)
    model = open_clip.create_model(arch, pretrained=None)
    torch.save({"state_dict": {k: v.half() for k, v in model.state_dict().items()}}, out / "HPS_v2.1_compressed.pt")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    print(write_pipeline(Path(parser.parse_args().out)))
