"""The benchmark runs (tiny kit) and its full-size models are the real architectures (counted on the meta device,
no memory): SD1.5's UNet, VAE and text encoder, the paper's LoRA (spec §2.2: 1,594,368 trainable parameters) and
HPS v2.1's ViT-H-14."""
import os
import subprocess
import sys
from pathlib import Path

import torch

COMPONENT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(COMPONENT / "bench"))


def test_full_size_models_have_the_sd15_parameter_counts_and_the_papers_lora():
    import open_clip

    from full_size_sd15 import PARAMETERS, build_models
    from sd15fo.models import ADAPTER, LORA_TARGETS

    unet, vae, text = build_models("meta")
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in
              (("unet", unet), ("vae", vae), ("text_encoder", text))}
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=LORA_TARGETS),
                     adapter_name=ADAPTER)
    lora = [p for n, p in unet.named_parameters() if f".{ADAPTER}." in n]
    counts["lora"] = sum(p.numel() for p in lora)
    assert len(lora) == 2 * 128  # A and B of the 4 projections of 32 attentions in 16 transformer blocks
    counts["hps"] = sum(p.numel() for p in open_clip.create_model("ViT-H-14", pretrained=None, load_weights=False,
                                                                  device="meta").parameters())
    assert counts == PARAMETERS


def test_tiny_bench_prints_the_time_split_table(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "bench/bench_epoch.py", "--tiny", "--epochs", "1", "--rows", "1",
                           "--json", str(tmp_path / "rows.json"), "--", "--set", "sample.num_steps=10"],
                          cwd=COMPONENT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| run | epochs | epoch s | sampling s | reward-grad s | training s | eval s |" in done.stdout
    assert "| ours (Ψ cached per trajectory) | 1 (warm-up) |" in done.stdout
    import json

    (row,) = json.loads((tmp_path / "rows.json").read_text())
    assert row["optimizer steps"] == 2 and row["trajectories/epoch"] == 2 and row["sampling s"] > 0
