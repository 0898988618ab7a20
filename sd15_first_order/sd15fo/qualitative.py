"""Qualitative grids: the base model and checkpoints on the same prompts from the same noise.

    python scripts/qualitative.py --config config/simple_res-nabladb_sd_hps_usez0_basesnr.yaml \
        --checkpoints logs/<ours run> logs/<pruned run>/checkpoints/checkpoint-101 \
        --prompts "a photo of a red bench" "a photo of two cups" --seeds 0 1 --out grid.jpg

One row per model (the base model first unless --no-base; a run folder means its newest checkpoint), one column
per (prompt, seed); every cell is sampled like training samples (η = sample.eta, CFG sample.cfg_scale, the
DDIM steps of --steps or eval.num_steps) from noise seeded by the column's seed, so rows differ only by the
weights. Each row is labelled with its checkpoint and mean reward, each column with its prompt and seed; the
scores go to <out>.json.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from .config import ConfigError


def _newest(path: str) -> str:
    from .run_folder import list_checkpoints

    found = list_checkpoints(path)
    return found[-1][1] if found else path


def grid_with_labels(rows: list, row_labels: list, column_labels: list):
    """rows: [[image [3, H, W] in [0, 1]] per column] -> a labelled PIL image."""
    from PIL import Image, ImageDraw

    height, width = rows[0][0].shape[1:]
    left, top = 260, 28
    canvas = Image.new("RGB", (left + width * len(column_labels), top + height * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(column_labels):
        draw.text((left + c * width + 2, 2), label[: max(8, width // 6)], fill="black")
    for r, (images, label) in enumerate(zip(rows, row_labels)):
        draw.text((2, top + r * height + height // 2 - 6), label[-42:], fill="black")
        for c, image in enumerate(images):
            pixels = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            canvas.paste(Image.fromarray(pixels), (left + c * width, top + r * height))
    return canvas


def main(argv=None) -> None:
    from . import distributed
    from .cli import common_arguments, fail, load_config, setup_logging
    from .evaluation import build_eval_run
    from .models import load_lora_into
    from .prompts import SALT_EVAL_NOISE, seed_mix
    from .sampling import encode_prompts, sample_trajectories

    parser = argparse.ArgumentParser(description="Labelled image grids of the base model and checkpoints.")
    common_arguments(parser)
    parser.add_argument("--checkpoints", nargs="*", default=[], help="checkpoint folders, or run folders (newest)")
    parser.add_argument("--prompts", nargs="+", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, help="DDIM steps (default eval.num_steps)")
    parser.add_argument("--no-base", action="store_true", help="leave out the base model's row")
    parser.add_argument("--out", default="qualitative.jpg")
    args = parser.parse_args(argv)
    try:
        loaded = load_config(args)
        checkpoints = [_newest(os.path.abspath(path)) for path in args.checkpoints]
        for path in checkpoints:
            if not os.path.isdir(path):
                raise ConfigError(f"--checkpoints {path}: no such checkpoint or run folder")
        if args.no_base and not checkpoints:
            raise ConfigError("--no-base with no --checkpoints: nothing to draw")
    except ConfigError as error:
        fail(str(error))
    setup_logging()
    out = os.path.abspath(args.out)
    config = loaded.values
    procs = distributed.Processes(device=distributed.select_device(config["device"], 0))
    try:
        run = build_eval_run(loaded, procs, os.path.dirname(out))
    except ConfigError as error:
        fail(str(error))
    models, sample = run.models, config["sample"]
    steps = args.steps or config["eval"]["num_steps"]
    timesteps = models.timesteps(steps)
    columns = [(prompt, seed) for prompt in args.prompts for seed in args.seeds]
    rows, labels, scores = [], [], {}
    for name in (["base"] if not args.no_base else []) + checkpoints:
        if name != "base":
            try:
                load_lora_into(run.unet, name)
            except (ValueError, FileNotFoundError) as error:
                fail(" ".join(str(error).split()))
        images, rewards = [], []
        with torch.no_grad():
            for prompt, seed in columns:
                embeds = encode_prompts(models.tokenizer, models.text_encoder, [prompt], procs.device)
                generator = torch.Generator(procs.device).manual_seed(seed_mix(seed, SALT_EVAL_NOISE))
                traj = sample_trajectories(run.unet, models.vae, models.alphas_cumprod, embeds, run.negative,
                                           timesteps=timesteps, guidance_scale=sample["cfg_scale"], eta=sample["eta"],
                                           generator=generator, latent_shape=models.latent_shape(),
                                           num_train_timesteps=models.num_train_timesteps)
                images.append(traj.images[0])
                rewards.append(float(run.reward(traj.images.float(), [prompt])[0][0]))
        rows.append(images)
        label = name if name == "base" else os.path.relpath(name, os.path.dirname(os.path.dirname(os.path.dirname(name))))
        labels.append(f"{label}  r={sum(rewards) / len(rewards):.3f}")
        scores[name] = rewards
    os.makedirs(os.path.dirname(out), exist_ok=True)
    grid_with_labels(rows, labels, [f"{p} | seed {s}" for p, s in columns]).save(out, quality=92)
    with open(os.path.splitext(out)[0] + ".json", "w", encoding="utf-8") as f:
        json.dump({"columns": [{"prompt": p, "seed": s} for p, s in columns], "rewards": scores}, f, indent=1)
    print(f"wrote {out}")
