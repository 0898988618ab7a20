"""Qualitative results: the same prompts and seeds through several checkpoints of a run, one image per (prompt,
seed, epoch) and one labelled grid per prompt (rows = epochs, columns = seeds).

Each epoch's policy is the run's base model (read from the run's config.json unless --model names one) with the
LoRA of `<run>/checkpoints/checkpoint-<epoch>/lora` (epoch 0 = the base model alone), loaded with diffusers'
`StableDiffusionPipeline.load_lora_weights`, exactly as a user of the checkpoint would. Images come from the DDIM
scheduler with initial latents that depend only on the seed, so the rows of a grid differ only by the weights.
Upstream's `checkpoint_<e>.pt` LoRA files are read too (`--checkpoint-file`). Every input problem (missing run or
checkpoint, no prompt) is one line before any model loads.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Optional

import torch

from .config import ConfigError


@dataclass
class Plan:
    model: str
    revision: str
    epochs: list          # [(epoch, LoRA folder or .pt file or None)]
    prompts: list
    seeds: list
    out_dir: str


def plan(args) -> Plan:
    """Everything checked, nothing loaded or written."""
    prompts = list(args.prompt)
    for path in args.prompt_file:
        if not os.path.isfile(path):
            raise ConfigError(f"--prompt-file {path!r}: no such file")
        with open(path, encoding="utf-8") as f:
            prompts += [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ConfigError("no prompt: give --prompt TEXT (repeatable) or --prompt-file FILE")
    model, revision = args.model, "main"
    config_path = os.path.join(args.run, "config.json") if args.run else None
    if args.run and not os.path.isdir(args.run):
        raise ConfigError(f"--run {args.run!r}: no such run folder")
    if model is None and config_path and os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            saved = json.load(f)
        model, revision = saved["pretrained_model"], saved.get("revision", "main")
    if model is None and args.tiny:
        from rsm_testkit import get_tiny_model

        model = str(get_tiny_model("sd15"))
    if model is None:
        model = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    epochs = []
    for epoch in args.epochs:
        if epoch == 0:
            epochs.append((0, None))
            continue
        if not args.run:
            raise ConfigError(f"epoch {epoch} needs --run (the run folder holding checkpoints/checkpoint-{epoch})")
        lora = os.path.join(args.run, "checkpoints", f"checkpoint-{epoch}", "lora")
        if not os.path.isfile(os.path.join(lora, "pytorch_lora_weights.safetensors")):
            raise ConfigError(f"epoch {epoch}: no {lora}/pytorch_lora_weights.safetensors (saved checkpoints: "
                              f"{_saved(args.run) or 'none'})")
        epochs.append((epoch, lora))
    for path in args.checkpoint_file:
        if not os.path.isfile(path):
            raise ConfigError(f"--checkpoint-file {path!r}: no such file")
        match = re.search(r"(\d+)", os.path.basename(path))
        epochs.append((int(match.group(1)) + 1 if match else -1, path))
    if not epochs:
        raise ConfigError("no checkpoint: give --epochs 0 10 ... and/or --checkpoint-file")
    return Plan(model, revision, epochs, prompts, list(range(args.seed, args.seed + args.images_per_prompt)),
                args.output_dir)


def _saved(run: str) -> str:
    folder = os.path.join(run, "checkpoints")
    names = sorted((int(n.split("-")[1]) for n in os.listdir(folder) if re.fullmatch(r"checkpoint-\d+", n))
                   if os.path.isdir(folder) else [])
    return ", ".join(map(str, names))


def _pipeline(p: Plan, device, dtype):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(p.model, revision=p.revision, torch_dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _load_lora(pipe, source: str) -> None:
    if source.endswith(".pt"):  # upstream's {lora_weights: PEFT state dict without the adapter name}
        from .checkpoints import load_state

        state = load_state(source)
        pipe.load_lora_weights({f"unet.{k}": v for k, v in state["lora_weights"].items()})
    else:
        pipe.load_lora_weights(source)


def _label(image, text: str):
    from PIL import ImageDraw

    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 0, min(image.width, 8 + 7 * len(text)), 14], fill=(0, 0, 0))
    draw.text((3, 1), text, fill=(255, 255, 255))
    return image


def run(p: Plan, steps: int, guidance: float, eta: float, device: str, dtype) -> list[str]:
    """Render every (epoch, prompt, seed); returns the grid paths."""
    from PIL import Image

    os.makedirs(p.out_dir, exist_ok=True)
    cells = {}  # (prompt index, epoch) -> [PIL per seed]
    for epoch, source in p.epochs:
        pipe = _pipeline(p, device, dtype)
        if source is not None:
            _load_lora(pipe, source)
        size = pipe.unet.config.sample_size
        for i, prompt in enumerate(p.prompts):
            images = []
            for seed in p.seeds:
                gen = torch.Generator().manual_seed(seed)
                latents = torch.randn((1, pipe.unet.config.in_channels, size, size), generator=gen).to(device, dtype)
                image = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, eta=eta,
                             latents=latents).images[0]
                image.save(os.path.join(p.out_dir, f"prompt{i:02d}_epoch{epoch:04d}_seed{seed}.png"))
                images.append(image)
            cells[(i, epoch)] = images
        del pipe
    grids = []
    for i, prompt in enumerate(p.prompts):
        rows = [cells[(i, epoch)] for epoch, _ in p.epochs]
        w, h = rows[0][0].size
        grid = Image.new("RGB", (w * len(p.seeds), h * len(rows)))
        for r, (epoch, _) in enumerate(p.epochs):
            for c, image in enumerate(rows[r]):
                grid.paste(_label(image.copy(), f"epoch {epoch}" if c == 0 else f"seed {p.seeds[c]}"), (c * w, r * h))
        path = os.path.join(p.out_dir, f"grid_prompt{i:02d}.png")
        grid.save(path)
        with open(os.path.join(p.out_dir, f"grid_prompt{i:02d}.txt"), "w", encoding="utf-8") as f:
            f.write(prompt + "\n")
        grids.append(path)
    return grids


def main(argv=None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="scripts/qualitative_results.py", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--run", default=None, help="the run folder (<logging_dir>/<run_name>) holding checkpoints/")
    add("--epochs", type=int, nargs="+", default=[], help="checkpoint epochs to render; 0 = the base model")
    add("--checkpoint-file", action="append", default=[], help="an upstream checkpoint_<e>.pt (repeatable)")
    add("--prompt", action="append", default=[], help="a prompt (repeatable)")
    add("--prompt-file", action="append", default=[], help="one prompt a line (repeatable)")
    add("--images-per-prompt", type=int, default=4, help="seeds seed .. seed+n-1 (the grid's columns)")
    add("--seed", type=int, default=0)
    add("--steps", type=int, default=50, help="DDIM steps")
    add("--guidance-scale", type=float, default=5.0, help="the presets' sample_cfg_scale")
    add("--eta", type=float, default=0.0, help="0: deterministic DDIM")
    add("--model", default=None, help="base model (default: the run's pretrained_model)")
    add("--tiny", action="store_true", help="the tiny SD1.5 of the test kit as base model (runs trained with --tiny)")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="forced to fp32 on a CPU")
    add("--output-dir", default="outputs/qualitative")
    args = parser.parse_args(argv)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    try:
        p = plan(args)
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
        if args.device == "cpu":
            dtype = torch.float32
        for path in run(p, args.steps, args.guidance_scale, args.eta, args.device, dtype):
            print(path)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
