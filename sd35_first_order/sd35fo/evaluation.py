"""Evaluation of policies: the periodic evaluation's rollouts (spec §9.6), and the two offline commands built on
them, `evaluate.py` (checkpoints x prompts -> rewards, TAESD3 or the full SD3 VAE decode, spec §10 I11) and
`qualitative_grid.py` (checkpoints x prompts x seeds -> one labelled image grid).

Every prompt's noise is seeded by (seed, its index in the prompt list), so every checkpoint is scored on the same
noise and the numbers do not depend on the batch size or the number of processes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from .algorithm import transition_drift
from .decode import decode_images
from .rollout import encode_prompts, initial_noise, sample_ode
from .schedule import next_sigma_of_steps, scheduler_schedule, sigma_of_steps

EVAL_SEED_OFFSET = 1_000_003


def item_noise(transformer, seed: int, indices, device, dtype) -> torch.Tensor:
    """z_0 `[len(indices), C, h, w]`, one seeded draw per prompt index."""
    from .trainer import generator

    gen_device = device if torch.device(device).type == "cuda" else "cpu"
    return torch.cat([initial_noise(1, transformer, generator(seed, EVAL_SEED_OFFSET, i, device=gen_device), device,
                                    dtype) for i in indices])


@torch.no_grad()
def score_items(*, pipe, transformer, vae, reward_fn, items, indices, sigmas, timesteps, guidance_scale, batch_size,
                seed, device, dtype, drift=True, on_images=None, check_finite=None, progress=None):
    """Roll out the items `indices` with `transformer` as it is (adapter on or off), score them with `reward_fn`
    after decoding with `vae`; returns float64 sums [reward sum, count, drift sum, drift count] and the per-item
    rewards. `on_images(indices, images)` sees each decoded batch; `check_finite(latents)` may raise."""
    from .guidance import GuidedVelocity

    sums = torch.zeros(4, dtype=torch.float64, device=device)
    per_item = {}
    velocity = GuidedVelocity(transformer, guidance_scale)
    starts = range(0, len(indices), batch_size)
    for start in (progress(starts) if progress else starts):
        chunk = list(indices[start:start + batch_size])
        prompts = [items[i][0] for i in chunk]
        metadata = [dict(items[i][1]) for i in chunk]
        positive, negative, pooled, negative_pooled = encode_prompts(pipe, prompts, device)
        text, pooled_both = torch.cat([negative, positive]), torch.cat([negative_pooled, pooled])
        z0 = item_noise(transformer, seed, chunk, device, dtype)
        latents, _ = sample_ode(transformer, z0, text, pooled_both, sigmas, timesteps, guidance_scale)
        if check_finite is not None:
            check_finite(latents)
        images = decode_images(vae, latents[:, -1])
        if on_images is not None:
            on_images(chunk, images)
        rewards, _ = reward_fn(images, prompts, metadata)
        sums[0] += rewards.double().sum()
        sums[1] += rewards.numel()
        per_item.update({i: float(r) for i, r in zip(chunk, rewards.tolist())})
        if drift:
            for i in range(len(timesteps)):
                step = torch.full((len(chunk),), i, dtype=torch.int64, device=device)
                x, s = latents[:, i], timesteps[i].expand(len(chunk))
                d = transition_drift(velocity.policy(x, s, text, pooled_both), velocity.reference(x, s, text, pooled_both),
                                     sigma_of_steps(sigmas, step), next_sigma_of_steps(sigmas, step), reduce=False)
                sums[2] += d.double().sum()
                sums[3] += d.numel()
    return sums, per_item


# ------------------------------------------------------------------------------------------------ checkpoints

def load_run_config(run_dir: str):
    from ml_collections import ConfigDict

    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise SystemExit(f"error: --run={run_dir!r}: no config.json there (not a run folder of train_vggflow.py)")
    with open(path, encoding="utf-8") as f:
        return ConfigDict(json.load(f))


def select_checkpoints(run_dir: str, which: str) -> list:
    """[(label, lora folder)] of `which`: "all", "latest" or comma-separated epoch numbers."""
    from .run_folder import list_checkpoints

    found = list_checkpoints(run_dir)
    if not found:
        raise SystemExit(f"error: --run={run_dir!r}: no checkpoints/checkpoint-<n> folders")
    if which == "latest":
        found = found[-1:]
    elif which != "all":
        wanted = {int(n) for n in which.split(",")}
        missing = wanted - {n for n, _ in found}
        if missing:
            raise SystemExit(f"error: --checkpoints: no checkpoint-{sorted(missing)[0]} in {run_dir} (there are: "
                             f"{', '.join(str(n) for n, _ in found)})")
        found = [(n, p) for n, p in found if n in wanted]
    return [(f"checkpoint-{n}", os.path.join(p, "lora")) for n, p in found]


def load_lora_into(transformer, lora_dir: str) -> None:
    """A diffusers SD3 LoRA folder (ours or any `save_lora_weights` output) into the transformer's "default"."""
    from diffusers import StableDiffusion3Pipeline
    from peft import set_peft_model_state_dict

    state = StableDiffusion3Pipeline.lora_state_dict(lora_dir)
    state = {k[len("transformer."):]: v for k, v in state.items() if k.startswith("transformer.")}
    result = set_peft_model_state_dict(transformer, state, adapter_name="default")
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise SystemExit(f"error: {lora_dir}: the LoRA misses {len(missing)} adapter tensors, e.g. {missing[0]}")


def build_policy_stack(config, device, decoder: str):
    """(pipe, transformer with an empty "default" adapter, decoding VAE, dtype) as the run built them."""
    from .trainer import load_full_vae, load_models, weight_dtype
    from .value_net import lora_config

    dtype = weight_dtype(config.training.mixed_precision)
    pipe = load_models(config, device, dtype)
    pipe.transformer.add_adapter(lora_config(config.model.lora_rank), adapter_name="default")
    vae = load_full_vae(config, device) if decoder == "vae" else pipe.vae
    return pipe, pipe.transformer, vae, dtype


def _common_arguments(parser):
    parser.add_argument("--run", required=True, help="a run folder of train_vggflow.py")
    parser.add_argument("--checkpoints", default="all", help="all | latest | comma-separated epochs (default all)")
    parser.add_argument("--no_base", action="store_true", help="leave out the base model (adapters off)")
    parser.add_argument("--decoder", choices=("taesd", "vae"), default="taesd",
                        help="taesd: the training decoder; vae: the full SD3 VAE of pretrained.model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")


def _device(choice):
    from .distributed import resolve_device

    return resolve_device(choice, 0)


def policies(transformer, checkpoints, include_base):
    """Yields (label, transformer set to that policy)."""
    from .guidance import adapters_disabled

    if include_base:
        with adapters_disabled(transformer):
            yield "base", transformer
    for label, lora_dir in checkpoints:
        load_lora_into(transformer, lora_dir)
        yield label, transformer


# ------------------------------------------------------------------------------------------------ evaluate.py

def evaluate_main(argv=None):
    """checkpoints x prompts -> mean reward (+ per prompt) and transition drift, printed and written as JSON."""
    parser = argparse.ArgumentParser(prog="evaluate.py", description=evaluate_main.__doc__)
    _common_arguments(parser)
    parser.add_argument("--prompt_fn", help="an evaluation prompt function (default: the run's eval.prompt_fn)")
    parser.add_argument("--prompt_fn_kwargs", default=None, help='JSON arguments, e.g. \'{"path": "geneval/test_metadata.jsonl"}\'')
    parser.add_argument("--data_dir", default=None, help="prompt files (default: the run's experiment.data_dir)")
    parser.add_argument("--reward", default=None, help="hpscore | pickscore | imagereward | aesthetic_score (default: the run's)")
    parser.add_argument("--batch_size", type=int, default=None, help="default: the run's sampling.batch_size")
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    parser.add_argument("--out", default=None, help="JSON file (default <run>/evaluation_<decoder>.json)")
    args = parser.parse_args(argv)
    from . import prompts
    from .cli import quiet_libraries
    from .config_check import ConfigError
    from .rewards import RewardLoadError, build_reward

    quiet_libraries()
    config = load_run_config(args.run)
    name = args.prompt_fn or (config.eval.prompt_fn if config.eval.enabled else None)
    if not name:
        raise SystemExit("error: --prompt_fn is required (the run had no evaluation prompt function), e.g. "
                         "--prompt_fn=from_jsonl --prompt_fn_kwargs='{\"path\": \"geneval/test_metadata.jsonl\"}'")
    if name not in prompts.EVAL_PROMPT_FNS:
        raise SystemExit(f"error: --prompt_fn={name!r} is not supported; allowed: {', '.join(prompts.EVAL_PROMPT_FNS)}")
    if args.prompt_fn_kwargs is not None:
        kwargs = json.loads(args.prompt_fn_kwargs)
    else:
        from .config_check import eval_prompt_kwargs

        kwargs = eval_prompt_kwargs(config) if (not args.prompt_fn or args.prompt_fn == config.eval.prompt_fn) else {}
    try:
        items = prompts.eval_items(name, kwargs, args.data_dir or config.experiment.data_dir or None)
    except (prompts.PromptFileError, OSError, TypeError) as error:
        raise SystemExit(f"error: --prompt_fn={name!r}: {error}") from None
    items = items[:args.limit] if args.limit else items
    device = _device(args.device)
    checkpoints = select_checkpoints(args.run, args.checkpoints)
    reward_name = args.reward or config.experiment.reward_fn
    options = dict(config.experiment.reward_options) if reward_name == config.experiment.reward_fn else _default_options(
        reward_name, config)
    try:
        reward_fn = build_reward(reward_name, options, device)
        pipe, transformer, vae, dtype = build_policy_stack(config, device, args.decoder)
    except (RewardLoadError, ConfigError) as error:
        raise SystemExit(f"error: {error}") from None
    sigmas, timesteps = scheduler_schedule(pipe.scheduler, config.sampling.num_steps, device)
    results = {"run": os.path.abspath(args.run), "prompt_fn": name, "prompt_fn_kwargs": kwargs, "prompts": len(items),
               "reward": reward_name, "decoder": args.decoder, "seed": args.seed, "policies": {}}
    print(f"{'policy':>16}  {'reward':>10}  {'drift':>10}  ({len(items)} prompts, {reward_name}, {args.decoder} decode)")
    for label, policy in policies(transformer, checkpoints, not args.no_base):
        sums, per_item = score_items(pipe=pipe, transformer=policy, vae=vae, reward_fn=reward_fn, items=items,
                                     indices=list(range(len(items))), sigmas=sigmas, timesteps=timesteps,
                                     guidance_scale=config.sampling.guidance_scale,
                                     batch_size=args.batch_size or config.sampling.batch_size, seed=args.seed,
                                     device=device, dtype=dtype, drift=label != "base")
        mean = (sums[0] / sums[1]).item()
        drift = (sums[2] / sums[3]).item() if sums[3] > 0 else 0.0
        results["policies"][label] = {"eval_reward_mean": mean, "eval_transition_drift": drift,
                                      "rewards": [per_item[i] for i in range(len(items))]}
        print(f"{label:>16}  {mean:10.5f}  {drift:10.3g}")
    out = args.out or os.path.join(args.run, f"evaluation_{args.decoder}.json")
    with open(out, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {out}")
    return results


def _default_options(reward_name, config):
    import importlib.util

    from .config_check import COMPONENT_ROOT, REWARD_FNS
    from .rewards import SHARED_NAME

    if reward_name not in REWARD_FNS:
        raise SystemExit(f"error: --reward={reward_name!r} is not supported; allowed: {', '.join(REWARD_FNS)}")
    spec = importlib.util.spec_from_file_location("sd35fo_defaults_eval", os.path.join(COMPONENT_ROOT, "config",
                                                                                      "default_config.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    options = dict(module.REWARD_OPTIONS[reward_name])
    if config.get("tiny"):
        from rsm_testkit import tiny_reward_options

        options.update(tiny_reward_options(SHARED_NAME[reward_name]))
    return options


# ------------------------------------------------------------------------------------------------ qualitative_grid.py

def grid_main(argv=None):
    """checkpoints (rows, the base model first) x prompts x seeds (columns) -> one labelled JPEG grid."""
    parser = argparse.ArgumentParser(prog="qualitative_grid.py", description=grid_main.__doc__)
    _common_arguments(parser)
    parser.add_argument("--prompts", nargs="+", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--tile", type=int, default=256, help="pixels per image in the grid")
    parser.add_argument("--out", default=None, help="image file (default <run>/qualitative.jpg)")
    args = parser.parse_args(argv)
    from PIL import Image, ImageDraw

    from .cli import quiet_libraries

    quiet_libraries()
    config = load_run_config(args.run)
    device = _device(args.device)
    checkpoints = select_checkpoints(args.run, args.checkpoints)
    pipe, transformer, vae, dtype = build_policy_stack(config, device, args.decoder)
    sigmas, timesteps = scheduler_schedule(pipe.scheduler, config.sampling.num_steps, device)
    columns = [(p, s) for p in args.prompts for s in args.seeds]
    rows = []
    for label, policy in policies(transformer, checkpoints, not args.no_base):
        tiles = []
        for seed in args.seeds:
            items = [(p, {}) for p in args.prompts]
            collected = {}
            score_items(pipe=pipe, transformer=policy, vae=vae, reward_fn=lambda im, p, m: (torch.zeros(len(p)), {}),
                        items=items, indices=list(range(len(items))), sigmas=sigmas, timesteps=timesteps,
                        guidance_scale=config.sampling.guidance_scale, batch_size=len(items), seed=seed, device=device,
                        dtype=dtype, drift=False, on_images=lambda idx, im: collected.update(zip(idx, im.cpu())))
            tiles.append([collected[i] for i in range(len(items))])
        rows.append((label, [tiles[args.seeds.index(s)][args.prompts.index(p)] for p, s in columns]))
    tile, header, margin = args.tile, 40, 140
    canvas = Image.new("RGB", (margin + tile * len(columns), header + tile * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, (prompt, seed) in enumerate(columns):
        draw.text((margin + c * tile + 4, 4), f"{prompt[:38]}", fill="black")
        draw.text((margin + c * tile + 4, 20), f"seed {seed}", fill="black")
    for r, (label, images) in enumerate(rows):
        draw.text((4, header + r * tile + tile // 2), label, fill="black")
        for c, image in enumerate(images):
            pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            canvas.paste(Image.fromarray(pixels).resize((tile, tile)), (margin + c * tile, header + r * tile))
    out = args.out or os.path.join(args.run, "qualitative.jpg")
    canvas.save(out, quality=92)
    print(f"wrote {out} ({len(rows)} policies x {len(columns)} prompt/seed columns)")
    return out


if __name__ == "__main__":
    sys.exit(evaluate_main())
