"""Qualitative results: render the same prompts with the same initial noise through several checkpoints.

For every epoch in `checkpoint_epochs` a fresh `StableDiffusion3Pipeline` is loaded (epoch 0 = the base model,
otherwise the LoRA of `<checkpoint_root>/checkpoint-<epoch>`), and every prompt is drawn once per seed with the
stock ODE sampler from initial latents that depend only on the seed, so rows of the per-prompt grid differ only
by the weights (spec §1.4, upstream `scripts/qualitative_results_tempflowgrpo.py`).

Two checkpoint layouts are read:
  - ours (`sd35zo.trainer_common.save_checkpoint`): `checkpoint-<n>/lora/pytorch_lora_weights.safetensors`,
    written by diffusers `save_lora_weights`, loaded with `pipe.load_lora_weights`;
  - upstream's PEFT `save_pretrained` folder (`adapter_config.json` + `adapter_model.safetensors`), directly in
    `checkpoint-<n>/` or in `checkpoint-<n>/lora/`, loaded with peft.

Everything that can be wrong with the inputs (missing checkpoint, bad size, no prompt) is found by `plan()`,
before any model loads and before anything is written.
"""
from __future__ import annotations

import dataclasses
import datetime
import gc
import hashlib
import json
import logging
import os
import random
import re
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

COMPONENT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' save_lora_weights default name
PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PEFT_KEY_PREFIX = "base_model.model."  # PeftModel.save_pretrained prefixes every key with the wrapper path
SLUG_MAX_CHARS = 80
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class QualitativeError(ValueError):
    """Bad input, reported as one line before any model loads."""


@dataclasses.dataclass
class Checkpoint:
    epoch: int
    path: Optional[str]  # the folder holding the LoRA files; None for epoch 0 (base model)
    layout: str  # "base" | "diffusers" | "peft"


@dataclasses.dataclass
class Plan:
    """Everything a run needs, resolved and validated."""
    prompts: List[str]
    slugs: List[str]
    seeds: List[int]
    checkpoints: List[Checkpoint]
    output_dir: str
    dtype: str  # the dtype actually used (fp32 on CPU)
    device: str
    latent_channels: int
    latent_height: int
    latent_width: int


# ------------------------------------------------------------------------------------------ naming

def prompt_slug(prompt: str) -> str:
    """A file-name-safe stand-in for `prompt`: lower-case words joined by '_', at most SLUG_MAX_CHARS, plus a
    short hash of the full text so that two prompts never share files (upstream used the raw prompt, so a '/'
    in a prompt broke the path and long prompts hit the file-name limit)."""
    words = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:SLUG_MAX_CHARS].rstrip("_")
    digest = hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:8]
    return f"{words or 'prompt'}-{digest}"


def image_file_name(slug: str, seed: int, epoch: int) -> str:
    return f"{slug}_seed_{seed:06d}_epoch_{epoch}.png"


def grid_file_name(slug: str) -> str:
    return f"{slug}_grid.png"


def default_output_dir() -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join(COMPONENT_ROOT, "outputs", "qualitative", stamp)


# ------------------------------------------------------------------------------------------ checks

def resolve_checkpoint(checkpoint_root: Optional[str], epoch: int) -> Checkpoint:
    """Where the LoRA of `epoch` lives and in which layout; a clear error naming the path if it is not there."""
    if epoch == 0:
        return Checkpoint(epoch=0, path=None, layout="base")
    if epoch < 0:
        raise QualitativeError(f"--checkpoint-epochs: epochs are >= 0, got {epoch}")
    if not checkpoint_root:
        raise QualitativeError(f"--checkpoint-root is required to load epoch {epoch} (only epoch 0, the base model, "
                               "needs no checkpoint)")
    path = os.path.join(checkpoint_root, f"checkpoint-{epoch}")
    if not os.path.isdir(path):
        raise QualitativeError(f"checkpoint directory not found: {path}")
    lora_dir = os.path.join(path, "lora")
    if os.path.isfile(os.path.join(lora_dir, DIFFUSERS_LORA_FILE)):
        return Checkpoint(epoch=epoch, path=lora_dir, layout="diffusers")
    for folder in (path, lora_dir):
        if all(os.path.isfile(os.path.join(folder, f)) for f in (PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE)):
            return Checkpoint(epoch=epoch, path=folder, layout="peft")
    raise QualitativeError(f"no LoRA weights in {path}: expected lora/{DIFFUSERS_LORA_FILE}, or "
                           f"{PEFT_CONFIG_FILE} + {PEFT_WEIGHTS_FILE} in it or in its lora/ folder")


def collect_prompts(prompts: Sequence[str], prompt_files: Sequence[str]) -> List[str]:
    """`--prompt` values then the prompts of each `--prompt-file`, stripped, first occurrence kept."""
    from .embeddings import read_prompt_file

    collected = [p.strip() for p in prompts]
    for path in prompt_files:
        try:
            collected.extend(read_prompt_file(path)[0])
        except (FileNotFoundError, ValueError) as err:
            raise QualitativeError(str(err)) from None
    if any(not p for p in collected):
        raise QualitativeError("--prompt: empty prompt")
    unique = list(dict.fromkeys(collected))
    if not unique:
        raise QualitativeError("no prompt: give --prompt TEXT (repeatable) or --prompt-file FILE")
    if len(unique) < len(collected):
        logger.info("dropped %d repeated prompt(s)", len(collected) - len(unique))
    return unique


def resolve_device_and_dtype(device: Optional[str], dtype: str) -> tuple[str, str]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype not in DTYPES:
        raise QualitativeError(f"--dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    if torch.device(device).type == "cpu":
        dtype = "fp32"  # half-precision CPU kernels are slow or missing
    return device, dtype


def latent_geometry(pretrained_model: str, height: int, width: int) -> tuple[int, int, int]:
    """(channels, latent height, latent width) from the model's configs only (no weights are read)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    try:
        transformer_config = SD3Transformer2DModel.load_config(pretrained_model, subfolder="transformer")
        vae_config = AutoencoderKL.load_config(pretrained_model, subfolder="vae")
    except (OSError, ValueError) as err:
        raise QualitativeError(f"--pretrained-model {pretrained_model}: cannot read its transformer/vae config "
                               f"({str(err).splitlines()[0]})") from None
    vae_scale = 2 ** (len(vae_config["block_out_channels"]) - 1)  # 8 for SD3.5, as the pipeline computes it
    multiple = vae_scale * transformer_config["patch_size"]
    for name, value in (("--height", height), ("--width", width)):
        if value <= 0 or value % multiple:
            raise QualitativeError(f"{name} {value}: must be a positive multiple of {multiple} "
                                   f"(VAE factor {vae_scale} x patch size {transformer_config['patch_size']})")
    return transformer_config["in_channels"], height // vae_scale, width // vae_scale


DEFAULT_MODEL = "stabilityai/stable-diffusion-3.5-medium"


def resolve_defaults(args) -> None:
    """Fill the options left unset: the base model (--tiny: the tiny test model; else the run's own from the
    config.json beside --checkpoint-root; else SD3.5-Medium), the size (64 px tiny, 512 otherwise) and the
    seeds per prompt (2 tiny, 8 otherwise)."""
    tiny = getattr(args, "tiny", False)
    if args.pretrained_model is None:
        if tiny:
            from rsm_testkit import get_tiny_model  # the test kit, installed by `make install`

            args.pretrained_model = str(get_tiny_model("sd35"))
        else:
            args.pretrained_model = run_base_model(args.checkpoint_root) or DEFAULT_MODEL
    for name, small, full in (("height", 64, 512), ("width", 64, 512), ("images_per_prompt", 2, 8)):
        if getattr(args, name, None) is None:
            setattr(args, name, small if tiny else full)


def run_base_model(checkpoint_root: Optional[str]) -> Optional[str]:
    """`pretrained.model` of the run whose `checkpoints/` folder is `checkpoint_root` (its config.json)."""
    if not checkpoint_root:
        return None
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint_root)), "config.json")
    try:
        with open(path, encoding="utf-8") as fh:
            model = json.load(fh)["pretrained"]["model"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    logger.info("base model from %s: %s", path, model)
    return model


def plan(args) -> Plan:
    """Validate every input of a run (see module doc); raises QualitativeError with one line."""
    resolve_defaults(args)
    for name in ("images_per_prompt", "image_batch_size", "num_inference_steps"):
        if getattr(args, name) < 1:
            raise QualitativeError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.attention_slicing not in ("auto", "off"):
        raise QualitativeError(f"--attention-slicing: expected auto or off, got {args.attention_slicing!r}")
    epochs = list(dict.fromkeys(args.checkpoint_epochs))  # a repeated epoch would just redo the same row
    checkpoints = [resolve_checkpoint(args.checkpoint_root, e) for e in epochs]
    prompts = collect_prompts(args.prompt or [], args.prompt_file or [])
    device, dtype = resolve_device_and_dtype(args.device, args.dtype)
    channels, latent_h, latent_w = latent_geometry(args.pretrained_model, args.height, args.width)
    return Plan(prompts=prompts, slugs=[prompt_slug(p) for p in prompts],
                seeds=[args.seed + i for i in range(args.images_per_prompt)], checkpoints=checkpoints,
                output_dir=args.output_dir or default_output_dir(), dtype=dtype, device=device,
                latent_channels=channels, latent_height=latent_h, latent_width=latent_w)


# ------------------------------------------------------------------------------------------ generation

def seed_everything(seed: int) -> None:
    """Global seeding as upstream: python, numpy, torch (+CUDA); deterministic cuDNN, warn-only determinism."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def initial_latents(seeds: Sequence[int], channels: int, height: int, width: int) -> Dict[int, torch.Tensor]:
    """Per seed, fp32 Gaussian noise from a CPU generator: the same on every device, dtype and epoch."""
    return {seed: torch.randn((1, channels, height, width), generator=torch.Generator().manual_seed(seed),
                              dtype=torch.float32)  # [1, C, H/8, W/8]
            for seed in seeds}


def _load_peft_adapter(transformer, adapter_dir: str) -> None:
    """Upstream's PEFT `save_pretrained` folder, injected into the transformer in place (its keys carry the
    PeftModel wrapper prefix, stripped here)."""
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    transformer.add_adapter(LoraConfig.from_pretrained(adapter_dir))
    state = load_file(os.path.join(adapter_dir, PEFT_WEIGHTS_FILE))
    state = {k[len(PEFT_KEY_PREFIX):] if k.startswith(PEFT_KEY_PREFIX) else k: v for k, v in state.items()}
    result = set_peft_model_state_dict(transformer, state, adapter_name="default")
    unexpected = list(getattr(result, "unexpected_keys", []))
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if unexpected or missing:
        example = (unexpected or missing)[0]
        raise QualitativeError(f"{adapter_dir}: LoRA weights do not fit the transformer "
                               f"({len(missing)} missing, {len(unexpected)} unexpected, e.g. {example})")


def load_pipeline(pretrained_model: str, checkpoint: Checkpoint, dtype: str, device: str, attention_slicing: str):
    """A fresh pipeline with the LoRA of `checkpoint` (none for epoch 0)."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(pretrained_model, dtype=DTYPES[dtype])
    if checkpoint.layout == "diffusers":
        adapter_name = f"checkpoint_{checkpoint.epoch}"
        pipe.load_lora_weights(checkpoint.path, adapter_name=adapter_name)
    elif checkpoint.layout == "peft":
        _load_peft_adapter(pipe.transformer, checkpoint.path)
    pipe.to(device)
    if attention_slicing == "auto" and hasattr(pipe, "enable_attention_slicing"):
        pipe.enable_attention_slicing("auto")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def render(pipe, prompt: str, latents: Dict[int, torch.Tensor], seeds: Sequence[int], batch_size: int,
           num_inference_steps: int, guidance_scale: float, height: int, width: int,
           negative_prompt: str = "") -> list:
    """PIL images of `prompt`, one per seed in order, with the stock pipeline's ODE sampler."""
    images = []
    for start in range(0, len(seeds), batch_size):
        batch = list(seeds[start:start + batch_size])
        noise = torch.cat([latents[s] for s in batch]).to(pipe.device, pipe.transformer.dtype)  # [b, C, h, w]
        extra = {"negative_prompt": [negative_prompt] * len(batch)} if negative_prompt else {}
        out = pipe(prompt=[prompt] * len(batch), latents=noise, num_inference_steps=num_inference_steps,
                   guidance_scale=guidance_scale, height=height, width=width, output_type="pil", **extra)
        images.extend(out.images)
    return images


GRID_LABEL_LEFT, GRID_LABEL_TOP = 96, 24  # px of the label bands: "epoch <n>" on the left, "seed <s>" on top


def save_grid(rows: List[List[str]], path: str, row_labels: Sequence[str] = (),
              column_labels: Sequence[str] = ()) -> None:
    """Image files of equal size pasted into one image (rows = epochs, columns = seeds), with a white band on
    the left naming each row and one on top naming each column (the cell of row r, column c starts at
    (GRID_LABEL_LEFT + c·w, GRID_LABEL_TOP + r·h)). Images are read back from disk so that a run over a whole
    prompt set never holds more than one grid in memory."""
    from PIL import Image, ImageDraw, ImageFont

    grid, draw = None, None
    for r, row in enumerate(rows):
        for c, file in enumerate(row):
            with Image.open(file) as image:
                w, h = image.size
                if grid is None:
                    grid = Image.new("RGB", (GRID_LABEL_LEFT + w * len(row), GRID_LABEL_TOP + h * len(rows)), "white")
                    draw = ImageDraw.Draw(grid)
                grid.paste(image.convert("RGB"), (GRID_LABEL_LEFT + c * w, GRID_LABEL_TOP + r * h))
    font = ImageFont.load_default()
    for r, label in enumerate(row_labels):
        draw.text((4, GRID_LABEL_TOP + r * h + h // 2 - 6), label, fill="black", font=font)
    for c, label in enumerate(column_labels):
        draw.text((GRID_LABEL_LEFT + c * w + 4, 6), label, fill="black", font=font)
    grid.save(path)


def run(args) -> str:
    """Plan, write run_config.json and prompts.txt, render every epoch, save images and grids; returns the
    output folder."""
    p = plan(args)
    if p.dtype != args.dtype:
        logger.info("--dtype %s forced to %s on %s", args.dtype, p.dtype, p.device)
    seed_everything(args.seed)
    os.makedirs(p.output_dir, exist_ok=True)
    settings = {k: v for k, v in vars(args).items()}
    settings.update(resolved_dtype=p.dtype, resolved_device=p.device, output_dir=p.output_dir, seeds=p.seeds,
                    prompts=[{"prompt": t, "slug": s} for t, s in zip(p.prompts, p.slugs)],
                    checkpoints=[dataclasses.asdict(c) for c in p.checkpoints])
    with open(os.path.join(p.output_dir, "run_config.json"), "w", encoding="utf-8") as fh:
        json.dump(settings, fh, indent=2)
    with open(os.path.join(p.output_dir, "prompts.txt"), "w", encoding="utf-8") as fh:
        fh.writelines(prompt + "\n" for prompt in p.prompts)

    latents = initial_latents(p.seeds, p.latent_channels, p.latent_height, p.latent_width)
    for checkpoint in p.checkpoints:
        logger.info("epoch %d: %s", checkpoint.epoch, checkpoint.path or "base model")
        pipe = load_pipeline(args.pretrained_model, checkpoint, p.dtype, p.device, args.attention_slicing)
        for prompt, slug in zip(p.prompts, p.slugs):
            images = render(pipe, prompt, latents, p.seeds, args.image_batch_size, args.num_inference_steps,
                            args.guidance_scale, args.height, args.width, args.negative_prompt)
            for seed, image in zip(p.seeds, images):
                image.save(os.path.join(p.output_dir, image_file_name(slug, seed, checkpoint.epoch)))
        del pipe  # one pipeline at a time: SD3.5-Medium is ~5 GB in fp16
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    for slug in p.slugs:
        rows = [[os.path.join(p.output_dir, image_file_name(slug, seed, c.epoch)) for seed in p.seeds]
                for c in p.checkpoints]
        save_grid(rows, os.path.join(p.output_dir, grid_file_name(slug)),
                  row_labels=[f"epoch {c.epoch}" for c in p.checkpoints], column_labels=[f"seed {s}" for s in p.seeds])
    logger.info("wrote %d images and %d grids to %s", len(p.prompts) * len(p.seeds) * len(p.checkpoints),
                len(p.prompts), p.output_dir)
    return p.output_dir
