"""`make demo`: every moving part of the repository run once on the tiny random-weight models.

    python -m rsm_testkit.demo --out outputs/demo [--size 64 --steps 4 --device cpu]

Part "rewards": generate a few images with the tiny SD3.5 and SD1.5 pipelines, score them with every
reward of shared_rewards' catalogue that can be built on its tiny checkpoint (the others are skipped with a
one-line reason), and write `<out>/rewards/grid.png` (one row per pipeline, each tile captioned with its
prompt and scores) and `<out>/rewards/scores.json`. The weights are random, so the images are noise.

Each part is a function `run_<part>(args) -> dict` registered in PARTS; components add their own paper
command on the tiny models as a new part (`--parts` picks a subset).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable

import torch

from .factory import get_tiny_model, tiny_reward_options

log = logging.getLogger("rsm_testkit.demo")

PROMPTS = ["a photo of a cat on the beach", "a red car in the snow", "an astronaut riding a horse",
           'a sign that says "hello"']
PIPELINES = {"sd35": "StableDiffusion3Pipeline", "sd15": "StableDiffusionPipeline"}
GUIDANCE = {"sd35": 4.5, "sd15": 5.0}  # the paper runs' CFG: SD3.5 zeroth order 4.5, SD1.5 5.0


# ---------------------------------------------------------------- generation
def generate(pipeline: str, prompts: list[str], size: int, steps: int, device: str, seed: int) -> torch.Tensor:
    """Images `[B, 3, size, size]` in [0, 1] from the tiny pipeline `pipeline` (a key of PIPELINES)."""
    import diffusers

    pipe = getattr(diffusers, PIPELINES[pipeline]).from_pretrained(get_tiny_model(pipeline)).to(device)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        out = pipe(prompts, num_inference_steps=steps, height=size, width=size, guidance_scale=GUIDANCE[pipeline],
                   output_type="pt", generator=generator)
    return out.images.float().clamp(0, 1)  # [B, 3, H, W]


# ---------------------------------------------------------------- rewards
def load_tiny_rewards(device: str, names: list[str] | None = None, strict: bool = False):
    """`({name: reward}, {name: reason skipped})` for the catalogue's rewards on their tiny checkpoints.

    Skipped: a missing dependency (ImportError), a reward with weights but no tiny checkpoint, and, unless
    `strict`, any other load error (logged as a warning).
    """
    from shared_rewards.registry import CATALOGUE, load_reward, reward_class

    rewards, skipped = {}, {}
    for name in names or list(CATALOGUE):
        try:
            cls = reward_class(name)
            options = tiny_reward_options(name)
            if not options and not cls.weights_source.startswith("none"):
                skipped[name] = f"no tiny checkpoint in rsm_testkit (weights: {cls.weights_source})"
            else:
                rewards[name] = load_reward(name, device=device, **options)
        except ImportError as err:
            skipped[name] = f"missing dependency: {err}"
        except Exception as err:  # noqa: BLE001 - the demo reports every reward it could not build
            if strict:
                raise
            skipped[name] = f"load failed: {type(err).__name__}: {err}"
            log.warning("reward %s: %s", name, skipped[name])
        if name in skipped:
            log.info("skipping reward %s: %s", name, skipped[name])
    return rewards, skipped


def score_all(rewards: dict, images: torch.Tensor, prompts: list[str], strict: bool = False):
    """`({reward: [scores]}, {reward: error})` for one batch of images `[B, 3, H, W]`. A reward that cannot take
    these prompts at all (ocr needs quoted text to render) is reported under its name in `errors` with the
    prefix "unsuitable prompts: "."""
    from shared_rewards import RewardInputError

    scores, errors = {}, {}
    for name, reward in rewards.items():
        try:
            with torch.no_grad():
                scores[name] = reward(images, prompts).scores.cpu().tolist()
        except RewardInputError as err:
            errors[name] = f"unsuitable prompts: {err}"
        except Exception as err:  # noqa: BLE001
            if strict:
                raise
            errors[name] = f"{type(err).__name__}: {err}"
            log.warning("reward %s failed to score: %s", name, errors[name])
    return scores, errors


# ---------------------------------------------------------------- grid
def tile(image: torch.Tensor, caption: list[str], tile_px: int = 192):
    """One PIL tile: the image `[3, H, W]` scaled to `tile_px` wide, the caption lines below it."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    array = (image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    picture = Image.fromarray(array).resize((tile_px, tile_px * image.shape[1] // image.shape[2]), Image.NEAREST)
    lines = [wrapped for line in caption for wrapped in (textwrap.wrap(line, width=tile_px // 6) or [""])]
    line_px = 12
    canvas = Image.new("RGB", (tile_px, picture.height + 4 + line_px * len(lines)), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((2, picture.height + 2 + i * line_px), line, fill="black", font=font)
    return canvas


def grid(rows: list[list]):
    """Pastes rows of PIL tiles into one image (rows may differ in height)."""
    from PIL import Image

    width = max(sum(t.width for t in row) for row in rows)
    heights = [max(t.height for t in row) for row in rows]
    canvas = Image.new("RGB", (width, sum(heights)), "white")
    y = 0
    for row, height in zip(rows, heights):
        x = 0
        for t in row:
            canvas.paste(t, (x, y))
            x += t.width
        y += height
    return canvas


# ---------------------------------------------------------------- parts
def run_rewards(args: argparse.Namespace) -> dict:
    """Tiny SD3.5 and SD1.5 images scored by every reward that builds on its tiny checkpoint."""
    out = Path(args.out) / "rewards"
    out.mkdir(parents=True, exist_ok=True)
    prompts = args.prompts or PROMPTS
    rewards, skipped = load_tiny_rewards(args.device, args.rewards, strict=args.strict)
    result = {"prompts": prompts, "size": args.size, "steps": args.steps, "seed": args.seed,
              "rewards": [], "skipped": skipped, "pipelines": {}}
    rows = []
    for pipeline in args.pipelines:
        start = time.perf_counter()
        images = generate(pipeline, prompts, args.size, args.steps, args.device, args.seed)  # [B, 3, H, W]
        generate_s = time.perf_counter() - start
        scores, errors = score_all(rewards, images, prompts, strict=args.strict)
        for name in [n for n, e in errors.items() if e.startswith("unsuitable prompts: ")]:
            skipped[name] = errors.pop(name)  # e.g. ocr without a prompt that quotes text: not a failure
            rewards.pop(name)
        result["pipelines"][pipeline] = {"checkpoint": str(get_tiny_model(pipeline)), "generate_s": round(generate_s, 3),
                                         "scores": scores, "score_errors": errors}
        row = []
        for i, prompt in enumerate(prompts):
            caption = [f"{pipeline}: {prompt}"] + [f"{name} {s[i]:.4g}" for name, s in scores.items()]
            row.append(tile(images[i].cpu(), caption))
        rows.append(row)
    result["rewards"] = sorted(rewards)
    for pipeline in result["pipelines"].values():  # a reward skipped at a later pipeline leaves no half row
        pipeline["scores"] = {name: v for name, v in pipeline["scores"].items() if name in rewards}
    grid(rows).save(out / "grid.png")
    (out / "scores.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"rewards: {len(rewards)} scored ({', '.join(sorted(rewards)) or 'none'}), "
          f"{len(skipped)} skipped ({', '.join(sorted(skipped)) or 'none'})")
    print(f"  grid   {out / 'grid.png'}\n  scores {out / 'scores.json'}")
    return result


PARTS: dict[str, Callable[[argparse.Namespace], dict]] = {"rewards": run_rewards}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rsm_testkit.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/demo", help="output folder (default: %(default)s)")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS), help="what to run")
    parser.add_argument("--size", type=int, default=64, help="image size in pixels, a multiple of 16")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=list(PIPELINES))
    parser.add_argument("--prompts", nargs="+", default=None, help=f"default: {PROMPTS}")
    parser.add_argument("--rewards", nargs="+", default=None, help="default: the whole catalogue")
    parser.add_argument("--strict", action="store_true", help="fail on a reward that fails to load or score")
    args = parser.parse_args(argv)
    if args.size % 16:
        parser.error(f"--size must be a multiple of 16 (8x VAE, 2x2 patches), got {args.size}")
    return args


def main(argv: list[str] | None = None) -> int:
    import diffusers
    import transformers

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.ERROR)  # open_clip's root-logger notes about the tiny checkpoints
    log.setLevel(logging.INFO)
    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    args = parse_args(argv)
    start = time.perf_counter()
    summary = {}
    for part in args.parts:
        print(f"=== demo part: {part} ===", flush=True)
        summary[part] = PARTS[part](args)
    print(f"demo done in {time.perf_counter() - start:.1f} s; outputs under {Path(args.out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
