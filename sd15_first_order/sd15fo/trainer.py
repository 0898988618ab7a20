"""The residual ∇-DB trainer for SD1.5 (pruned baseline and RSM "ours", spec §5), one loop over named phases:

    per epoch e:   [evaluate, when e % eval.freq == 0]  ->  sample (trajectories + rewards)
                   ->  update (per micro-batch: reward gradients -> K transition losses -> backward;
                       an optimizer step every gradient_accumulation_steps micro-batches)
                   ->  record / checkpoint / console line

On-policy: each epoch trains on its own samples. The math is `schedule.py` (DDIM step), `subsampling.py`
(which transitions train), `loss.py` (the per-transition loss and its modes) and `rewards.py` (Ψ); set-up,
checkpoints and reporting follow the repository's trainer contract.

Differences from upstream, on purpose (spec §9): runs as one plain process, CPU/gloo or torchrun/NCCL; DDP
averages gradients once per optimizer step (`no_sync` before); the reference pass runs without a graph; Ψ of
"ours" is computed once per trajectory and reused by its K transitions (`train.cache_z0_reward_grad`, same
numbers); the training reward is gathered over every process; resume restores the optimizer, scaler, RNG and
counters and continues with the next epoch; the scheduler is never mutated (strides are passed explicitly).
Upstream's quirks that change numbers stay under `parity: true` (config.PARITY_QUIRKS).

Epoch numbering: epochs run 0 .. train.max_epochs-1 as upstream (evaluation "before epoch e" = the policy after
e trained epochs); records, checkpoints and the console count trained epochs (`checkpoint-<n>` = n epochs).
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import checkpoints, distributed, preflight, run_folder
from .choices import parse_reward_mode, parse_strength
from .config import ConfigError, Loaded
from .loss import alpha_bar_next, guidance, residual_nabla_db_loss, strength
from .metrics import MetricLogger, console_line, peak_memory
from .models import Models, ModelLoadError, add_lora, load_lora_into, load_models, reference_mode, save_conv_out, save_lora
from .models import UPSTREAM_LORA_WEIGHTS
from .prompts import (SALT_EVAL_NOISE, SALT_EVAL_PROMPTS, SALT_SHUFFLE, SALT_TRAIN_NOISE, SALT_TRAIN_PROMPTS,
                      PromptSource, eval_kwargs, rank_batches, seed_mix)
from .rewards import RewardFn, lookahead_gradient, terminal_gradient
from .rewards import load as load_reward
from .sampling import cfg_eps, encode_prompts, sample_trajectories
from .schedule import helper_schedule, helper_stride
from .subsampling import num_train_timesteps, shuffle_and_batch

logger = logging.getLogger("sd15fo.trainer")


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss, gradient norm or weight; the message is one line for the user."""


@dataclass
class Run:
    """What the loop needs, built once by `setup`."""
    config: dict
    config_id: str
    procs: distributed.Processes
    models: Models
    policy: torch.nn.Module  # the UNet, DDP-wrapped when several processes train
    params: list
    optimizer: torch.optim.Optimizer
    scaler: Optional[object]
    reward: RewardFn
    prompts: PromptSource
    negative: torch.Tensor  # [1, 77, D] embedding of "" in the weight dtype
    run_dir: str
    logger: MetricLogger
    num_train_timesteps: int  # K, transitions trained per trajectory
    updates_per_epoch: int
    epoch: int = 0  # epochs trained
    global_step: int = 0
    samples: int = 0  # trajectories sampled so far, all processes
    elapsed_before: float = 0.0
    started: float = field(default_factory=time.time)
    skipped_steps: int = 0
    scaler_skipped_steps: int = 0
    last_checkpoint: Optional[str] = None
    step_losses: list = field(default_factory=list)
    grad_stats: list = field(default_factory=list)  # (mean |g|, var |g|) per backward of the hooked LoRA tensor
    timers: dict = field(default_factory=dict)
    plan: Optional[run_folder.RunPlan] = None

    @property
    def unet(self):
        return distributed.unwrap(self.policy)

    @property
    def device(self):
        return self.procs.device


# ------------------------------------------------------------------------------------------------ set-up

def setup(loaded: Loaded, procs: distributed.Processes) -> Run:
    """Everything before the first epoch. Order (contract §2): config values (already validated at load), paths
    and the run folder, the reward, then the models; the run folder is created once they loaded, so a failed
    start leaves nothing behind."""
    config = loaded.values
    plan = _plan_on_main(config, procs)
    state = _resume_state(plan, procs)
    if procs.is_main:
        what = ("new run" if plan.resume_dir is None else
                f"warm start from upstream {os.path.basename(plan.resume_dir)}" if plan.upstream_epoch is not None else
                f"resuming {os.path.basename(plan.resume_dir)} ({state['epoch']} epochs trained)")
        logger.info("run folder: %s (%s)", plan.run_dir, what)
    try:
        reward = load_reward(config["reward_fn"], config["reward_fn_kwargs"], procs.device)
    except (OSError, ValueError) as error:
        raise ConfigError(f"reward_fn={config['reward_fn']!r}: {' '.join(str(error).split())[:300]}") from None

    if config["allow_tf32"]:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    try:
        models = load_models(config, procs.device)
    except ModelLoadError as error:
        raise ConfigError(str(error)) from None
    torch.manual_seed(config["seed"])  # LoRA init: the same on every rank (DDP also broadcasts rank 0's)
    params = add_lora(models.unet, config["model"]["lora_rank"], config["model"]["lora_alpha"],
                      config["model"]["use_xformers"])
    if config["train"]["gradient_checkpointing"]:
        models.unet.enable_gradient_checkpointing()
    optimizer = make_optimizer(config, params)
    scaler = make_scaler(config, procs.device)
    with torch.no_grad():
        negative = encode_prompts(models.tokenizer, models.text_encoder, [""], procs.device)  # [1, 77, D]
    if plan.upstream_epoch is not None:
        load_lora_into(models.unet, plan.resume_dir)
    policy = distributed.wrap(models.unet, procs)

    if procs.is_main:
        run_folder.create_run_dir(plan, state["metrics_lines"] if state else None)
    procs.barrier()
    try:
        metric_logger = MetricLogger(plan.run_dir, config, procs.is_main)
        if procs.is_main:
            run_folder.write_start_files(plan.run_dir, config, loaded.config_id, procs.world_size, procs.device,
                                         plan.resume_dir)
    except BaseException:
        if procs.is_main:
            run_folder.remove_if_empty_start(plan)
        raise
    sample, train = config["sample"], config["train"]
    per_rank = sample["batch_size"] * sample["num_batches_per_epoch"]
    run = Run(config, loaded.config_id, procs, models, policy, params, optimizer, scaler, reward,
              PromptSource(config["data_dir"]), negative, plan.run_dir, metric_logger,
              num_train_timesteps(sample["num_steps"], train["timestep_fraction"]),
              per_rank // (train["batch_size"] * train["gradient_accumulation_steps"]))
    run.plan = plan
    if state is not None:
        apply_checkpoint_state(run, state)
        run.last_checkpoint = plan.resume_dir
    elif plan.upstream_epoch is not None:  # upstream resumed *at* its saved epoch; the saved one is trained
        run.epoch = plan.upstream_epoch + 1
        run.global_step = run.epoch * run.updates_per_epoch
    if procs.is_main:
        logger.info("budget: %s", budget_line(run))
    return run


def _plan_on_main(config: dict, procs: distributed.Processes) -> run_folder.RunPlan:
    """Every process checks what it reads from its own node (preflight: model, prompts, reward weights, device);
    then the main process (global rank 0) alone decides the run folder (its timestamp names it; on several nodes
    the others never look at it) and shares it. A refusal on any process is raised on every process."""
    plan, error = None, None
    try:
        preflight.check_all(config)
        if procs.is_main:
            plan = run_folder.plan_run(config, checkpoints.load_state, checkpoints.math_key_diff, procs.world_size)
    except ConfigError as caught:
        error = str(caught)
    procs.agree(error)
    return procs.broadcast_object(plan)


def _resume_state(plan: run_folder.RunPlan, procs: distributed.Processes) -> Optional[dict]:
    """The checkpoint's training state, read by every process (each restores it); None for a new run or an
    upstream warm start."""
    if plan.resume_dir is None or plan.upstream_epoch is not None:
        return None
    state, error = None, None
    try:
        state = checkpoints.load_state(plan.resume_dir)
    except ConfigError as caught:
        error = str(caught) if procs.is_main else (
            f"{caught}; rank 0 read it, so the run folder must be on a filesystem every node sees")
    procs.agree(error)
    return state


def make_optimizer(config: dict, params: list):
    """AdamW over the LoRA tensors (one group, constant lr), or bitsandbytes' AdamW8bit (train.adam.use_8bit)."""
    adam = config["train"]["adam"]
    kwargs = dict(lr=config["train"]["lr"], betas=(adam["beta1"], adam["beta2"]), weight_decay=adam["weight_decay"],
                  eps=adam["epsilon"])
    if adam["use_8bit"]:
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def make_scaler(config: dict, device: torch.device):
    """A GradScaler (initial scale 2^16, growth interval from the config) for fp16, and for bf16 in parity mode
    as upstream did; none for fp32 (upstream crashed there, spec §9 item 5)."""
    precision = config["mixed_precision"]
    if precision == "fp16" or (precision == "bf16" and config["parity"]):
        return torch.amp.GradScaler(device.type, growth_interval=config["train"]["gradscaler_growth_interval"])
    return None


def budget_line(run: Run) -> str:
    sample, train = run.config["sample"], run.config["train"]
    per_rank = sample["batch_size"] * sample["num_batches_per_epoch"]
    return (f"{per_rank} trajectories per process an epoch ({sample['batch_size']} x {sample['num_batches_per_epoch']}), "
            f"{per_rank * run.procs.world_size} over {run.procs.world_size} process(es); K = {run.num_train_timesteps} "
            f"transitions each; {run.updates_per_epoch} optimizer steps an epoch of {train['gradient_accumulation_steps']} "
            f"micro-batches x {train['batch_size']}; epochs {run.epoch}..{train['max_epochs'] - 1}")


def progress(run: Run, iterable, desc: str, total: Optional[int] = None):
    """A tqdm bar on the main process when stderr is a terminal; the iterable itself otherwise."""
    if not (run.procs.is_main and sys.stderr.isatty()):
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


def _timed(run: Run, name: str, started: float) -> None:
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    run.timers[name] = run.timers.get(name, 0.0) + time.time() - started


# ------------------------------------------------------------------------------------------------ phase 1: sample

@torch.no_grad()
def sample_epoch(run: Run, epoch: int) -> dict:
    """This process's sample.num_batches_per_epoch batches of trajectories from the current policy, with their
    rewards (spec §5.3). Returns per-trajectory tensors [M, ...] and lists of length M."""
    config, models = run.config, run.models
    sample = config["sample"]
    run.unet.eval()
    batches = rank_batches(run.prompts, config["prompt_fn"], config["prompt_fn_kwargs"], seed=config["seed"],
                           salt=SALT_TRAIN_PROMPTS, key=epoch, batch_size=sample["batch_size"],
                           num_batches=sample["num_batches_per_epoch"], rank=run.procs.rank,
                           world_size=run.procs.world_size)
    timesteps = models.timesteps(sample["num_steps"])
    out = {"prompts": [], "prompt_metadata": [], "prompt_embeds": [], "timesteps": [], "latents": [],
           "noise_preds": [], "log_probs": [], "rewards": []}
    images = None
    for i, (prompts, metadata) in enumerate(progress(run, batches, f"epoch {epoch + 1} sampling",
                                                     sample["num_batches_per_epoch"])):
        embeds = encode_prompts(models.tokenizer, models.text_encoder, prompts, run.device)  # [b, 77, D]
        generator = torch.Generator(run.device).manual_seed(seed_mix(config["seed"], SALT_TRAIN_NOISE, epoch,
                                                                      run.procs.rank, i))
        traj = sample_trajectories(run.unet, models.vae, models.alphas_cumprod, embeds, run.negative,
                                   timesteps=timesteps, guidance_scale=sample["cfg_scale"], eta=sample["eta"],
                                   generator=generator, latent_shape=models.latent_shape(),
                                   num_train_timesteps=models.num_train_timesteps)
        rewards = run.reward(traj.images.float(), prompts, metadata)[0]  # [b]
        images = traj.images
        for key, value in (("prompts", prompts), ("prompt_metadata", metadata)):
            out[key].extend(value)
        for key, value in (("prompt_embeds", embeds), ("timesteps", traj.timesteps), ("latents", traj.latents),
                           ("noise_preds", traj.noise_preds), ("log_probs", traj.log_probs), ("rewards", rewards)):
            out[key].append(value)
    samples = {k: (torch.cat(v) if k not in ("prompts", "prompt_metadata") else v) for k, v in out.items()}
    if config["train"]["use_z0"]:
        samples["z0"] = samples["latents"][:, -1]  # [M, C, h, w], the trajectories' final latents
    samples["last_images"] = images
    return samples


# ------------------------------------------------------------------------------------------------ phase 2: update

@dataclass
class UpdateModes:
    """The loss settings of an update, parsed once (spec §5.4 step 0)."""
    strength: object  # a number, or "sigma"
    reward: str
    strength_scale: float  # a
    reward_scale_sigma: float  # b
    stride: int  # T // N: t' of a trained transition (the scheduler's stride, passed explicitly)

    @classmethod
    def of(cls, config: dict, num_train_timesteps: int) -> "UpdateModes":
        train = config["train"]
        return cls(parse_strength(train["pretrained_strength"]), parse_reward_mode(train["reward_adaptive_mode"]),
                   train["pretrained_strength_sigma_scale"], train["reward_adaptive_sigma_scale"],
                   num_train_timesteps // config["sample"]["num_steps"])


def transition_loss(run: Run, modes: UpdateModes, mb: dict, j: int, embeds: torch.Tensor, helper,
                    cache: dict, sync: bool = True):
    """The loss of transition column j of micro-batch `mb` (spec §5.4 step 3): reward guidance g (Ψ from the
    terminal sample, once per micro-batch when train.cache_z0_reward_grad, or through the lookahead), the
    reference ε (adapter off, no graph), the policy ε through the (DDP) policy, and the residual ∇-DB loss.
    `embeds` [2B, 77, D] = [negatives; prompts]; `helper` the micro-batch's helper schedule; `cache` a dict
    living as long as the micro-batch. `sync` False runs the policy forward under DDP's no_sync."""
    config, models = run.config, run.models
    train, sample = config["train"], config["sample"]
    x, x_next = mb["latents"][:, j], mb["next_latents"][:, j]  # [B, C, h, w]
    t = mb["timesteps"][:, j]  # [B]
    sigma = helper.sigmas[:, j]  # [B, 1, 1, 1] σ'_t
    k = strength(modes.strength, modes.strength_scale, sigma)

    started = time.time()
    if train["use_z0"]:
        if "psi" not in cache or not train["cache_z0_reward_grad"]:
            cache["psi"] = terminal_gradient(run.reward, models.vae, mb["z0"], mb["prompts"], mb["prompt_metadata"])[0]
        psi = cache["psi"]
    else:
        psi = lookahead_gradient(run.reward, models.vae, run.unet, models.alphas_cumprod, x_next,
                                 (t - modes.stride).clamp(min=0), embeds, sample["cfg_scale"], mb["prompts"],
                                 mb["prompt_metadata"])[0]
    g = guidance(psi, train["reward_scale"], modes.reward, alpha_bar_next(models.alphas_cumprod, t, psi, modes.stride),
                 sigma, modes.reward_scale_sigma)
    _timed(run, "reward_grad_time_per_epoch", started)

    with torch.no_grad(), reference_mode(run.unet):
        eps_ref = cfg_eps(run.unet, x, t, embeds, sample["cfg_scale"])
    with distributed.maybe_no_sync(run.policy, sync):
        eps_theta = cfg_eps(run.policy, x, t, embeds, sample["cfg_scale"])
    return residual_nabla_db_loss(
        eps_theta, eps_ref, mb["noise_preds"][:, j], x, x_next, t, g, k, alphas_cumprod=models.alphas_cumprod,
        eta=sample["eta"], num_train_timesteps=models.num_train_timesteps, num_inference_steps=sample["num_steps"],
        kl_weight=helper.weights[:, j], forward_loss_scale=train["forward_loss_scale"],
        unet_reg_scale=train["unet_reg_scale"], normalize_reg=train["normalize_unet_reg_by_one_minus_alpha_bar_t"])


def training_batches(run: Run, samples: dict, epoch: int, inner: int):
    """(micro-batches, helper stride) of one inner epoch: a fresh shuffle from the (seed, epoch, rank, inner)
    generator, the first K columns of each trajectory's row (spec §5.2)."""
    config, train = run.config, run.config["train"]
    keys = ("prompts", "prompt_metadata", "prompt_embeds", "timesteps", "latents", "noise_preds") + \
        (("z0",) if train["use_z0"] else ())
    generator = torch.Generator().manual_seed(seed_mix(config["seed"], SALT_SHUFFLE, epoch, run.procs.rank, inner))
    batches, columns = shuffle_and_batch({key: samples[key] for key in keys}, batch_size=train["batch_size"],
                                         num_steps=config["sample"]["num_steps"],
                                         timestep_fraction=train["timestep_fraction"],
                                         low_var=train["low_var_subsampling"], generator=generator,
                                         dedupe_final=not config["parity"], keep_columns=run.num_train_timesteps)
    stride = helper_stride(columns.shape[1], run.models.num_train_timesteps, config["sample"]["num_steps"],
                           legacy=config["parity"])
    return batches, stride


def policy_update(run: Run, samples: dict, epoch: int) -> None:
    """Train on the epoch's samples (spec §5.4): per inner epoch a fresh shuffle; per micro-batch of
    train.batch_size trajectories its K transitions, one backward each of L / (GA·K); an optimizer step after
    every train.gradient_accumulation_steps micro-batches, gradients averaged over processes then."""
    train = run.config["train"]
    ga, k_steps = train["gradient_accumulation_steps"], run.num_train_timesteps
    modes = UpdateModes.of(run.config, run.models.num_train_timesteps)
    hook = _grad_hook(run)
    try:
        for inner in range(train["num_inner_epochs"]):
            batches, helper_step = training_batches(run, samples, epoch, inner)
            run.unet.train()
            window = []
            for i, mb in enumerate(progress(run, batches, f"epoch {epoch + 1} training")):
                batch = mb["timesteps"].shape[0]
                embeds = torch.cat([run.negative.expand(batch, -1, -1), mb["prompt_embeds"]])  # [2B, 77, D]
                helper = helper_schedule(run.models.alphas_cumprod, mb["timesteps"], helper_step)  # [B, K, 1, 1, 1]
                cache = {}
                for j in range(k_steps):
                    sync = (i + 1) % ga == 0 and j == k_steps - 1  # the window's last backward averages gradients
                    out = transition_loss(run, modes, mb, j, embeds, helper, cache, sync)
                    with distributed.maybe_no_sync(run.policy, sync):
                        scaled = out.loss / (ga * k_steps)
                        (run.scaler.scale(scaled) if run.scaler is not None else scaled).backward()
                    window.append(out.stats)
                if (i + 1) % ga == 0:
                    optimizer_step(run, window, epoch)
                    window = []
    finally:
        hook.remove()


def _grad_hook(run: Run):
    """Record mean and variance of |grad| of the first LoRA tensor on every backward (upstream's grad_mean /
    grad_var; in GradScaler-scaled units when a scaler is on). Kept on the device until the optimizer step."""
    def record(grad):
        magnitude = grad.detach().flatten().float().abs()
        run.grad_stats.append(torch.stack([magnitude.mean(), magnitude.var()]))

    return run.params[0].register_hook(record)


def optimizer_step(run: Run, window: list, epoch: int) -> None:
    """One optimizer step over an accumulation window: unscale, clip the global norm (train.max_grad_norm),
    reduce the window's diagnostics (keys with _min -> min, _max -> max, others mean; then over processes),
    stop on a non-finite loss, gradient norm or weight (contract §6), step, log. One host sync (`tolist`)."""
    config = run.config
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, config["train"]["max_grad_norm"])
    device = run.device
    keys = sorted(window[0])
    ops = {key: "min" if "_min" in key else "max" if "_max" in key else "mean" for key in keys}
    local = {}
    for key in keys:
        stacked = torch.stack([s[key].to(device) for s in window]).double()
        local[key] = getattr(stacked, ops[key])() if ops[key] != "mean" else stacked.mean()
    if run.grad_stats:
        grads = torch.stack(run.grad_stats).double().mean(dim=0)
        local["grad_mean"], local["grad_var"] = grads[0], grads[1]
        ops["grad_mean"] = ops["grad_var"] = "mean"
    run.grad_stats.clear()
    local["grad_norm"] = grad_norm.to(device).double()
    local["params_ok"] = torch.stack([torch.isfinite(p).all() for p in run.params]).all().double()
    ops["grad_norm"], ops["params_ok"] = "max", "min"
    names = list(local)
    reduced = {}
    for op in ("min", "max", "mean"):
        chosen = [n for n in names if ops[n] == op]
        if chosen:
            values = run.procs.reduce(torch.stack([local[n] for n in chosen]), op)
            reduced.update(zip(chosen, values.unbind()))
    numbers = torch.stack([reduced[n] for n in names]).tolist()  # the step's one host sync
    record = dict(zip(names, numbers))
    params_ok = record.pop("params_ok") == 1.0
    run.global_step += 1
    record["epoch"] = epoch + 1
    if run.scaler is not None:
        record["grad_scale"] = float(run.scaler.get_scale())
    bad = [(name, record[key]) for name, key in (("loss", "loss"), ("gradient norm", "grad_norm"))
           if not math.isfinite(record[key]) and not (key == "grad_norm" and run.scaler is not None)]
    if not params_ok:
        bad.append(("LoRA weights (after the previous step)", float("nan")))
    if bad and config["nan_policy"] == "skip" and params_ok:
        run.optimizer.zero_grad(set_to_none=True)
        run.skipped_steps += 1
        run.logger.log({**record, "skipped_step": 1}, run.global_step)
        logger.warning("step %d: non-finite %s; step skipped (nan_policy=skip, %d skipped so far)", run.global_step,
                       " and ".join(name for name, _ in bad), run.skipped_steps)
        return
    if bad:
        run.logger.log(record, run.global_step)
        raise DivergenceError(
            f"training diverged at epoch {epoch + 1}, step {run.global_step}: non-finite "
            f"{' and '.join(f'{name} ({value})' for name, value in bad)}; last good checkpoint: "
            f"{run.last_checkpoint or 'none saved yet'}; lower train.lr and resume from it, or pass "
            "--set nan_policy=skip to skip such steps")
    if run.scaler is not None:
        scale_before = run.scaler.get_scale()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        if not math.isfinite(record["grad_norm"]) or run.scaler.get_scale() < scale_before:
            run.scaler_skipped_steps += 1  # inf/nan gradients: the scaler skipped the step and backed off
            record["scaler_skipped_step"] = 1
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.logger.log(record, run.global_step)
    run.step_losses.append(record["loss"])


# ------------------------------------------------------------------------------------------------ evaluation

@torch.no_grad()
def evaluate(run: Run, key: int, image_name: Optional[str] = None) -> dict:
    """GenEval test prompts (eval_prompt_fn_kwargs) at eval.num_steps with the policy; reward and the mean per-step
    KL to the reference ½ mean (w_t (ε_θ - ε_ref))², gathered over processes (spec §5.5). `key` (the global step)
    seeds the prompts and the noise; images of this process's last batch go to images/eval_step<key>.jpg."""
    config, models = run.config, run.models
    ev, sample = config["eval"], config["sample"]
    run.unet.eval()
    timesteps = models.timesteps(ev["num_steps"])
    stride = helper_stride(ev["num_steps"], models.num_train_timesteps, ev["num_steps"], legacy=config["parity"])
    rewards, kls = [], []
    images = prompts_shown = None
    batches = rank_batches(run.prompts, config["prompt_fn"], eval_kwargs(config), seed=config["seed"],
                           salt=SALT_EVAL_PROMPTS, key=key, batch_size=ev["batch_size"], num_batches=ev["num_batches"],
                           rank=run.procs.rank, world_size=run.procs.world_size)
    for i, (prompts, metadata) in enumerate(progress(run, batches, "evaluating", ev["num_batches"])):
        embeds = encode_prompts(models.tokenizer, models.text_encoder, prompts, run.device)
        generator = torch.Generator(run.device).manual_seed(seed_mix(config["seed"], SALT_EVAL_NOISE, key,
                                                                      run.procs.rank, i))
        traj = sample_trajectories(run.unet, models.vae, models.alphas_cumprod, embeds, run.negative,
                                   timesteps=timesteps, guidance_scale=sample["cfg_scale"], eta=sample["eta"],
                                   generator=generator, latent_shape=models.latent_shape(),
                                   num_train_timesteps=models.num_train_timesteps)
        weights = helper_schedule(models.alphas_cumprod, traj.timesteps, stride).weights  # [b, N, 1, 1, 1]
        both = torch.cat([run.negative.expand(len(prompts), -1, -1), embeds])
        step_kls = []
        with reference_mode(run.unet):
            for s in range(len(timesteps)):
                eps_ref = cfg_eps(run.unet, traj.latents[:, s], timesteps[s], both, sample["cfg_scale"])
                delta = traj.noise_preds[:, s].float() - eps_ref.float()
                step_kls.append(0.5 * torch.mean((weights[:, s].float() * delta) ** 2, dim=(1, 2, 3)))
        kls.append(torch.stack(step_kls, dim=1).mean(dim=1))  # [b]
        rewards.append(run.reward(traj.images.float(), prompts, metadata)[0])
        images, prompts_shown = traj.images, prompts
    all_rewards = run.procs.all_gather(torch.cat(rewards).float()).double()
    all_kls = run.procs.all_gather(torch.cat(kls).float()).double()
    captions = [f"{p[:100]} | {r:.2f}" for p, r in zip(prompts_shown, rewards[-1].tolist())]
    run.logger.log_images(image_name or f"eval_step{key}", images, captions, run.global_step)
    return {"eval_reward_mean": all_rewards.mean().item(), "eval_reward_std": all_rewards.std(unbiased=False).item(),
            "eval_kl_divergence": all_kls.mean().item(), "eval_samples": int(all_rewards.numel())}


# ------------------------------------------------------------------------------------------------ checkpoints

def save_checkpoint(run: Run, metrics_lines: int) -> str:
    """`checkpoint-<n>` for n = run.epoch trained epochs: the diffusers LoRA, the full training state and (parity)
    upstream's file names, written by the main process once every process agrees on the weights."""
    _check_replicas_agree(run)
    path = os.path.join(run.run_dir, run_folder.CHECKPOINTS_DIR, f"checkpoint-{run.epoch}")
    if run.procs.is_main:
        def write_files(directory):
            save_lora(run.unet, os.path.join(directory, "lora"))
            if run.config["parity"]:
                save_lora(run.unet, directory, weight_name=UPSTREAM_LORA_WEIGHTS)
                save_conv_out(run.unet, os.path.join(directory, f"conv_out_weights_epoch{run.epoch - 1}.pt"))

        state = {"config_json": json.dumps(run.config), "config_id": run.config_id, "world_size": run.procs.world_size,
                 "epoch": run.epoch, "global_step": run.global_step, "samples": run.samples,
                 "elapsed_s": elapsed(run), "skipped_steps": run.skipped_steps,
                 "scaler_skipped_steps": run.scaler_skipped_steps, "metrics_lines": metrics_lines,
                 "params": [p.detach().cpu().clone() for p in run.params], "optimizer": run.optimizer.state_dict(),
                 "scaler": run.scaler.state_dict() if run.scaler is not None else None,
                 "rng": checkpoints.rng_state()}
        path = checkpoints.save(run.run_dir, run.epoch, write_files, state, run.config["num_checkpoint_limit"])
    run.procs.barrier()
    run.last_checkpoint = path
    return path


def _check_replicas_agree(run: Run) -> None:
    if run.procs.world_size == 1:
        return
    local = torch.stack([p.detach().double().sum() for p in run.params]).to(run.device)
    everyone = run.procs.all_gather(local[None])  # [W, n]
    if bool((everyone - everyone[:1]).abs().max() > 0):
        raise RuntimeError("LoRA weights differ between processes; gradients were not averaged identically")


def apply_checkpoint_state(run: Run, state: dict) -> None:
    if len(state["params"]) != len(run.params) or any(s.shape != p.shape for s, p in zip(state["params"], run.params)):
        raise ConfigError(f"model.resume_from_checkpoint: its LoRA tensors do not fit this model "
                          f"({len(state['params'])} tensors, this model has {len(run.params)})")
    with torch.no_grad():
        for p, saved in zip(run.params, state["params"]):
            p.copy_(saved.to(p.device))
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scaler is not None and state["scaler"] is not None:
        run.scaler.load_state_dict(state["scaler"])
    checkpoints.set_rng_state(state["rng"])
    run.epoch, run.global_step, run.samples = int(state["epoch"]), int(state["global_step"]), int(state["samples"])
    run.elapsed_before, run.skipped_steps = float(state["elapsed_s"]), int(state["skipped_steps"])
    run.scaler_skipped_steps = int(state["scaler_skipped_steps"])


# ------------------------------------------------------------------------------------------------ the loop

def elapsed(run: Run) -> float:
    return run.elapsed_before + time.time() - run.started


def run_epoch(run: Run, epoch: int) -> None:
    """Epoch `epoch` (0-based): [evaluate] -> sample -> update -> record, checkpoint, console line."""
    config = run.config
    started, run.timers, run.step_losses = time.time(), {}, []
    evaluation = {}
    if epoch % config["eval"]["freq"] == 0:  # before training: epoch 0 evaluates the untouched model
        t0 = time.time()
        key = 0 if config["eval"]["fixed_key"] else run.global_step  # upstream: prompts and noise keyed by the step
        evaluation = {**evaluate(run, key), "eval_epoch": epoch, "eval_global_step": run.global_step}
        _timed(run, "eval_time", t0)
        evaluation.update(peak_memory(run.device, "eval_"))
    t0 = time.time()
    samples = sample_epoch(run, epoch)
    _timed(run, "sample_time_per_epoch", t0)
    everyone = run.procs.all_gather(samples["rewards"].float()).double()  # [M·W]
    if epoch % 10 == 0 or epoch == config["train"]["max_epochs"] - 1:
        shown = samples["last_images"].shape[0]
        captions = [f"{p} | {r:.2f}" for p, r in zip(samples["prompts"][-shown:], samples["rewards"][-shown:].tolist())]
        run.logger.log_images(f"train_epoch{epoch + 1}", samples["last_images"], captions, run.global_step)
    t0 = time.time()
    steps_before = run.global_step
    policy_update(run, samples, epoch)
    del samples
    update_time = time.time() - t0
    run.epoch = epoch + 1
    run.samples += int(everyone.numel())
    if not checkpoints.all_finite(run.params):
        raise DivergenceError(f"training diverged in epoch {run.epoch}: the LoRA weights are non-finite after step "
                              f"{run.global_step}; last good checkpoint: {run.last_checkpoint or 'none saved yet'}")
    reward_grad = run.timers.get("reward_grad_time_per_epoch", 0.0)
    record = {"epoch": run.epoch, "global_step": run.global_step, "samples": run.samples,
              "samples_this_epoch": int(everyone.numel()), "reward_mean": everyone.mean().item(),
              "reward_std": everyone.std().item() if everyone.numel() > 1 else float("nan"),
              "loss": sum(run.step_losses) / len(run.step_losses) if run.step_losses else None,
              "time_per_epoch": time.time() - started, "elapsed_s": elapsed(run),
              "sample_time_per_epoch": run.timers.get("sample_time_per_epoch", 0.0),
              "reward_grad_time_per_epoch": reward_grad, "train_time_per_epoch": update_time - reward_grad,
              "optimizer_updates_this_epoch": run.global_step - steps_before, "skipped_steps": run.skipped_steps,
              "scaler_skipped_steps": run.scaler_skipped_steps, **peak_memory(run.device)}
    if evaluation:
        record.update({**evaluation, "eval_time": run.timers["eval_time"]})
    if epoch % config["save_freq"] == 0 or epoch == config["train"]["max_epochs"] - 1:
        record["checkpoint_path"] = save_checkpoint(run, metrics_lines=run.logger.lines + 1)
    record["time_per_epoch"] = time.time() - started
    record["elapsed_s"] = elapsed(run)
    run.logger.log(record, run.global_step, kind="epoch")
    if run.procs.is_main:
        logger.info(console_line(record, config["train"]["max_epochs"]))


def train(loaded: Loaded, procs: distributed.Processes) -> Run:
    run = setup(loaded, procs)
    first = run.epoch
    try:
        for epoch in range(run.epoch, run.config["train"]["max_epochs"]):
            run_epoch(run, epoch)
    except BaseException:
        if procs.is_main and run.plan is not None:
            run_folder.remove_if_empty_start(run.plan)  # failed before its first record: leave nothing behind
        raise
    finally:
        run.logger.finish()
    if procs.is_main:
        logger.info("done: %d epochs (%d this start), %d optimizer steps, %d trajectories, %.0f s; run folder %s%s",
                    run.epoch, run.epoch - first, run.global_step, run.samples, elapsed(run), run.run_dir,
                    f"; last checkpoint {run.last_checkpoint}" if run.last_checkpoint else "")
    return run
