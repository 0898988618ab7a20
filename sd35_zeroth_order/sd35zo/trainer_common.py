"""What both SD3.5 trainers share (spec §7.1-7.7, §8.1 "Shared code"): model and LoRA set-up, the
optimizer and EMA, metric logging, the policy's guided velocity and the reference mean, gradient
averaging, evaluation with the KL probe, and checkpoints that resume exactly.

The two loops live beside it: `trainer_default` (Flow-GRPO, full SDE trajectories, `scripts/train_sd3.py`)
and `trainer_branch` (TempFlow-GRPO / RSM branching, `scripts/train_sd3_pr.py`).

Differences from upstream, on purpose (spec §7.10): runs on one process (no DDP `.module` needed: the
transformer is never wrapped; gradients are all-reduced explicitly before each optimizer step), wandb is
optional and a JSONL of metrics is always written, checkpoints carry the full training state and resume
exactly, the last epoch is always evaluated and saved, v_old is stored in the embedding dtype (fp32 with
fp32 embeddings), and every random draw comes from a generator seeded by (seed, rank, epoch, ...), so a
resumed run repeats the uninterrupted one bit for bit on CPU.

What every trainer of this repository promises (the trainer contract; README "What a run promises") lives in
small modules beside this one: `preflight` (paths and model checked before any model loads), `run_folder` (the
run folder, its config.json / run.json / metrics.jsonl, refusing to overwrite a run), `checkpoints` (atomic,
weights-only, limited); here, `optimizer_step` stops a run at the first non-finite loss, gradient norm or
weight.

Epoch numbering: `checkpoint-<n>` and evaluation "at epoch n" describe the policy after n trained epochs
(both trainers; upstream's default trainer named checkpoints by optimizer step).
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from . import checkpoints, config_check, preflight, run_folder
from .ema import ParameterEMA
from .embeddings import PrecomputedEmbeddingDataset, read_negative
from .kl import anchor_kl, sde_kl_rows
from .ppo_loss import ppo_row_loss
from .rsm_loss import matching_row_loss
from .sampling_branch import mean_active_k
from .rewards import build_reward, submit_scores
from .sampling import decode_latents, initial_latents, make_cfg_velocity, sample_ode
from .sde import flow_sigmas, sde_mean, sde_step_with_logprob, timesteps_from_sigmas

logger = logging.getLogger("sd35zo.trainer")

# Spec §7.1 step 5: LoRA on the joint-attention projections of every MM-DiT block (not SD3.5's attn2).
LORA_TARGETS = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"]
LORA_RANK, LORA_ALPHA = 32, 64  # upstream train_sd3*.py LoraConfig
IMAGE_LOG_EVERY = 10  # epochs between logged training images (spec §7.7)
# The trainer script each sampling mode belongs to (for the error when a config reaches the wrong one).
TRAINER_SCRIPTS = {"default": "scripts/train_sd3.py", "sde_branching": "scripts/train_sd3_pr.py"}


# ------------------------------------------------------------------------------------------------ set-up

class DivergenceError(RuntimeError):
    """Training produced a non-finite loss, gradient norm or weight; the message is one line for the user."""


@dataclass
class Run:
    """What a loop needs, built once by `setup`."""
    config: object
    accelerator: object
    budget: config_check.Budget
    transformer: torch.nn.Module
    vae: torch.nn.Module
    params: list
    optimizer: torch.optim.Optimizer
    ema: Optional[ParameterEMA]
    train_set: PrecomputedEmbeddingDataset
    test_set: Optional[PrecomputedEmbeddingDataset]
    negative: tuple
    sampler: object  # EpochPromptSampler (default) or BranchPromptSampler (branch); state_dict() for resume
    reward: object
    eval_reward: object
    sigmas: torch.Tensor
    schedule: list  # k_i of the trained steps (branch); all ones for the default trainer
    eval_kl_weights: list  # weight of the eval KL probe at trained step j (0 = not probed)
    run_dir: str
    logger: "MetricLogger"
    epoch: int = 0
    global_step: int = 0
    seen_prompts: set = field(default_factory=set)
    updates_this_epoch: int = 0
    samples: int = 0  # images scored since the run began, all processes (the x-axis of compute curves)
    elapsed_before: float = 0.0  # seconds trained before this start (resumed runs)
    started: float = field(default_factory=time.time)
    skipped_steps: int = 0  # optimizer steps skipped by nan_policy=skip
    epoch_metrics: dict = field(default_factory=dict)  # what the epoch's record collects while it runs
    step_losses: list = field(default_factory=list)  # this epoch's per-step mean losses
    last_checkpoint: Optional[str] = None


def seeded_generator(*keys, device="cpu") -> torch.Generator:
    """A generator on `device` seeded from integers (seed, rank, epoch, ...): explicit, resumable randomness.
    Noise is drawn on the device it is used on (torch needs the generator there)."""
    seed = 0
    for key in keys:
        seed = (seed * 1_000_003 + int(key)) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(seed)


def progress(run: "Run", iterable, desc: str, total: Optional[int] = None):
    """A tqdm bar on the main process when stderr is a terminal; the bare iterable otherwise."""
    if not (run.accelerator.is_main_process and sys.stderr.isatty()):
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


def add_lora(transformer):
    from peft import LoraConfig

    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, init_lora_weights="gaussian",
                                       target_modules=LORA_TARGETS))
    return [p for p in transformer.parameters() if p.requires_grad]


def load_lora_weights_into(transformer, lora_dir: str) -> None:
    """Load a `save_lora_weights` directory (ours or any diffusers SD3 LoRA) into the existing adapter."""
    from diffusers import StableDiffusion3Pipeline
    from peft import set_peft_model_state_dict

    state = StableDiffusion3Pipeline.lora_state_dict(lora_dir)
    prefix = "transformer."
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    result = set_peft_model_state_dict(transformer, state, adapter_name="default")
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise ValueError(f"{lora_dir}: LoRA weights miss {len(missing)} adapter tensors, e.g. {missing[0]}")


def load_base_models(config, device):
    """The SD3 transformer and VAE of `pretrained.model` at `pretrained.revision`; a failure is one line."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    model, revision = config.pretrained.model, config.pretrained.revision
    try:
        transformer = SD3Transformer2DModel.from_pretrained(model, subfolder="transformer", revision=revision)
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae", revision=revision)
    except (OSError, ValueError) as error:  # hub errors are OSErrors; a bad config.json a ValueError
        reason = " ".join(str(error).split())[:300]
        raise config_check.ConfigError(f"pretrained.model={model!r} (revision {revision!r}): cannot load the SD3 "
                                       f"transformer and VAE: {reason}") from None
    return transformer.to(device), vae.to(device).requires_grad_(False)


def make_optimizer(config, params):
    """AdamW (spec §7.1 step 8), or bitsandbytes' AdamW8bit with train.use_8bit_adam."""
    train = config.train
    kwargs = dict(lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2),
                  weight_decay=train.adam_weight_decay, eps=train.adam_epsilon)
    if train.use_8bit_adam:
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def setup(config, accelerator, sampling_mode: str, make_sampler: Callable, eval_kl_weights: Callable) -> Run:
    """Everything before the first epoch, for the trainer of `sampling_mode`. `make_sampler(config,
    num_prompts, accelerator)` builds its prompt sampler; `eval_kl_weights(schedule)` says which trained
    steps the eval KL probe visits and with what weight.

    Order (contract §2): config values, then every path and the run folder, then the rewards (a missing
    server or weight fails here), and only then the transformer and VAE; the run folder is created once
    they loaded, so a failed start leaves nothing behind."""
    budget = config_check.finalize(config, accelerator.num_processes)
    if config.sample.sampling_mode != sampling_mode:
        raise config_check.ConfigError(
            f"sample.sampling_mode={config.sample.sampling_mode!r} belongs to "
            f"{TRAINER_SCRIPTS.get(config.sample.sampling_mode, 'no trainer')}, not {TRAINER_SCRIPTS[sampling_mode]}")
    if not config.use_lora:
        raise config_check.ConfigError("use_lora=False is not supported: the trainer optimises a LoRA adapter")
    train_set, test_set = preflight.check_all(config)
    plan = run_folder.plan_run(config, checkpoints.load_state, checkpoints.math_key_diff)
    main = accelerator.is_main_process
    if main:
        what = (f"resuming {os.path.basename(plan.resume_dir)} (epoch {plan.resume_state['epoch']})"
                if plan.resume_dir else "new run")
        logger.info("run folder: %s (%s)", plan.run_dir, what)
    device = accelerator.device
    reward, eval_reward = build_reward(config, device), build_reward(config, device, for_eval=True)

    torch.manual_seed(config.seed)  # the LoRA init draws: identical on every rank (nothing broadcasts them)
    if config.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    transformer, vae = load_base_models(config, device)
    params = add_lora(transformer)
    if config.train.lora_path:
        load_lora_weights_into(transformer, config_check.run_path(config.train.lora_path))
    if config.activation_checkpointing:
        transformer.enable_gradient_checkpointing()
    for p in params:
        p.data = p.data.float()  # LoRA weights and optimizer state stay fp32 (spec §7.2)
    optimizer = make_optimizer(config, params)
    ema = (ParameterEMA(params, interval=config.train.ema_update_interval, once_per_step=config.train.ema_once_per_step)
           if config.train.ema else None)
    negative = tuple(t.to(device) for t in read_negative(config.train_hdf5_path, 1))  # [1,S,D], [1,Dp]
    sampler = make_sampler(config, len(train_set), accelerator)
    sigmas = flow_sigmas(config.sample.num_steps).to(device)  # [N+1]
    # [T] k_i of the trained steps; the default sampler has one SDE transition per step
    schedule = list(config_check.training_schedule(config)) if config_check.is_branch(config) else [1] * budget.train_steps

    state = plan.resume_state
    if main:
        run_folder.create_run_dir(plan, state["metrics_lines"] if state else None)
    accelerator.wait_for_everyone()
    try:
        metric_logger = MetricLogger(plan.run_dir, config, main)
        if main:
            run_folder.write_start_files(plan.run_dir, config, accelerator.num_processes, device, plan.resume_dir)
    except BaseException:
        if main:
            run_folder.remove_if_empty_start(plan)
        raise
    run = Run(config, accelerator, budget, transformer, vae, params, optimizer, ema, train_set, test_set, negative,
              sampler, reward, eval_reward, sigmas, schedule, list(eval_kl_weights(schedule)), plan.run_dir,
              metric_logger)
    if state is not None:
        apply_checkpoint_state(run, state)
        run.last_checkpoint = plan.resume_dir
    if main:
        logger.info("budget: %s", budget.summary())
    return run


# ------------------------------------------------------------------------------------------------ logging

class MetricLogger:
    """`<run_dir>/metrics.jsonl` (main process): one strict-JSON object a line, `"kind": "step"` after every
    optimizer step and `"kind": "epoch"` once per epoch (TRAINER_CONTRACT.md §4); the same dicts go to wandb
    when it is on. `lines` counts the records in the file, so a checkpoint can say where its history ends."""

    def __init__(self, run_dir: str, config, is_main: bool):
        self.is_main = is_main
        self.path = os.path.join(run_dir, run_folder.METRICS_FILE)
        self.wandb = None
        self.lines = 0
        if not is_main:
            return
        if os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as f:
                self.lines = sum(1 for _ in f)
        mode = config.wandb.mode
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "disabled"
        if mode != "disabled":
            try:
                import wandb
            except ImportError:
                logger.warning("wandb is not installed; metrics go to %s only", self.path)
            else:
                self.wandb = wandb.init(project=config.wandb.project, mode=mode, dir=run_dir,
                                        name=os.path.basename(run_dir), config=config.to_dict())

    def log(self, metrics: dict, step: int, kind: str = "step") -> None:
        if not self.is_main:
            return
        clean = {k: (float(v) if isinstance(v, (torch.Tensor, np.floating, float)) else v) for k, v in metrics.items()}
        record = run_folder.strict({"kind": kind, "step": step, **clean})
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        self.lines += 1
        if self.wandb is not None:
            self.wandb.log(record, step=step)

    def log_images(self, images: torch.Tensor, prompts: Sequence[str], rewards: torch.Tensor, epoch: int,
                   limit: int = 15) -> None:
        """Up to `limit` training images (`[n, 3, H, W]` in [0, 1]) of an epoch with their prompts and rewards
        `[n]`: `<run_dir>/images/epoch_<e>.jpg` as one grid, and wandb `images` captioned
        "<prompt[:100]> | avg: <reward>" when wandb is on (spec §7.7: every 10 epochs)."""
        if not self.is_main or images.shape[0] == 0:
            return
        captions = [f"{p[:100]} | avg: {r:.2f}" for p, r in zip(prompts, rewards.tolist())]
        from PIL import Image

        chosen = images[:limit].detach().float().cpu()
        pixels = (chosen.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # [n, H, W, 3]
        n, height, width, _ = pixels.shape
        columns = min(n, 5)
        rows = -(-n // columns)
        grid = np.zeros((rows * height, columns * width, 3), dtype=np.uint8)
        for i in range(n):
            r, c = divmod(i, columns)
            grid[r * height:(r + 1) * height, c * width:(c + 1) * width] = pixels[i]
        folder = os.path.join(os.path.dirname(self.path), "images")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(grid).save(os.path.join(folder, f"epoch_{epoch}.jpg"), quality=90)
        if self.wandb is not None:
            import wandb

            self.wandb.log({"images": [wandb.Image(Image.fromarray(p), caption=c)
                                       for p, c in zip(pixels, captions)]}, commit=False)

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


# ------------------------------------------------------------------------------------------------ shared pieces of the loops

def policy_velocity(run: Run, embeds: torch.Tensor, pooled: torch.Tensor, guided: bool = True):
    """The velocity of the current policy for these prompts, under the Accelerator's autocast (fp16 on the
    paper's GPUs, a no-op in fp32). Embeddings are taken in fp32, so v_old is stored in fp32 and Δ is exactly 0
    on-policy (upstream stored fp16, spec §7.2). Sampling is always guided (sample.guidance_scale); the
    training forward and the KL terms pass `guided=config.train.cfg`: False runs the conditional branch only,
    as upstream does with train.cfg=False (every paper config uses True)."""
    scale = run.config.sample.guidance_scale if guided else 1.0
    velocity = make_cfg_velocity(run.transformer, embeds.float(), pooled.float(), run.negative[0].float(),
                                 run.negative[1].float(), scale)

    def autocast_velocity(x, t, rows):
        with run.accelerator.autocast():
            return velocity(x, t, rows).float()

    return autocast_velocity


def collate(dataset, indices):
    return dataset.collate_fn([dataset[i] for i in indices])


@torch.no_grad()
def reference_mean(run: Run, velocity, x, t, rows, sigma, sigma_next, sigmas=None):
    """μ_ref: the same SDE-step mean with the LoRA adapter switched off (the frozen base model).
    `sigmas`: the schedule the step belongs to (the training one unless given), for σ̃ at σ = 1."""
    run.transformer.disable_adapters()
    try:
        v_ref = velocity(x, t, rows)
    finally:
        run.transformer.enable_adapters()
    sigma_max = float((run.sigmas if sigmas is None else sigmas)[1])
    return sde_mean(v_ref, x, sigma, sigma_next, run.config.sample.noise_level, sigma_max)[0]


def _sync_gradients(run: Run) -> None:
    """Average gradients over processes (what DDP would do; explicit so a 1-process run needs no wrapper), as
    one flat all-reduce rather than one per LoRA tensor."""
    if run.accelerator.num_processes == 1:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in run.params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= run.accelerator.num_processes
    offset = 0
    for p, g in zip(run.params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def optimizer_step(run: Run, window: Sequence[dict], **extra) -> None:
    """One optimizer step over the microbatches of `window` (their diagnostics, 0-d tensors): average gradients
    over processes, clip the global norm (max_grad_norm), check that loss, gradient norm and LoRA weights are
    finite (contract §6), AdamW step, and log the step's diagnostics averaged over its microbatches and over
    processes. The whole step reads the device once (`tolist`), not once per microbatch."""
    _sync_gradients(run)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, run.config.train.max_grad_norm)
    device = run.accelerator.device
    keys = sorted({k for s in window for k in s})
    zero = torch.zeros((), device=device)
    means = [torch.stack([s.get(k, zero).to(device).double() for s in window]).mean() for k in keys]
    params_ok = torch.stack([torch.isfinite(p).all() for p in run.params]).all().double()
    values = torch.stack(means + [grad_norm.to(device).double(), params_ok])
    if run.accelerator.num_processes > 1:
        values = run.accelerator.reduce(values, reduction="mean")
    numbers = values.tolist()  # the step's one host sync
    record = dict(zip(keys, numbers[:len(keys)]))
    grad_norm, params_ok = numbers[len(keys)], numbers[len(keys) + 1] == 1.0
    run.global_step += 1
    record["grad_norm"] = grad_norm
    bad = [(name, value) for name, value in (("loss", record.get("loss")), ("gradient norm", grad_norm))
           if value is not None and not math.isfinite(value)]
    if not params_ok:
        bad.append(("LoRA weights (after the previous step)", float("nan")))
    if bad and run.config.nan_policy == "skip" and params_ok:
        run.optimizer.zero_grad(set_to_none=True)
        run.skipped_steps += 1
        run.logger.log({**record, **extra, "skipped_step": 1}, run.global_step)
        logger.warning("step %d: non-finite %s; step skipped (nan_policy=skip, %d skipped so far)",
                       run.global_step, " and ".join(name for name, _ in bad), run.skipped_steps)
        return
    run.logger.log({**record, **extra}, run.global_step)
    if bad:
        raise DivergenceError(
            f"training diverged at epoch {run.epoch + 1}, step {run.global_step}: non-finite "
            f"{' and '.join(f'{name} ({value})' for name, value in bad)}; last good checkpoint: "
            f"{run.last_checkpoint or 'none saved yet'}; lower train.learning_rate and resume from it, or pass "
            "--config.nan_policy=skip to skip such steps")
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step_losses.append(record.get("loss", float("nan")))


def reward_statistics(run: Run, rewards: dict) -> dict:
    """`reward_<key>`: the mean over every process of each training reward key (per-tag GenEval accuracies are
    eval metrics, spec §7.7; GenEval's -10 filler rows are left out), and the contract's `reward_mean`,
    `reward_std` (of the reward the advantages use, over every process) and `samples_this_epoch` (images
    scored, every process)."""
    metrics = {}
    for key, value in rewards.items():
        if "_accuracy" not in key:
            every = run.accelerator.gather(value.to(run.accelerator.device))
            every = every[every != -10.0]
            metrics[f"reward_{key}"] = every.mean().item() if every.numel() else float("nan")
            if key == "avg":
                metrics["reward_mean"] = metrics["reward_avg"]
                metrics["reward_std"] = every.double().std(unbiased=False).item() if every.numel() else float("nan")
                metrics["samples_this_epoch"] = int(every.numel())
    metrics["reward_ori_avg"] = metrics["reward_avg"]
    return metrics


def count_inner_epoch_updates(run: Run, steps_before: int) -> None:
    """Add an inner epoch's optimizer steps to the epoch's count; it must be exactly updates_per_epoch (the
    budget's no-carry promise: no microbatch is carried to the next update or epoch)."""
    taken = run.global_step - steps_before
    run.updates_this_epoch += taken
    if taken != run.budget.updates_per_epoch:
        raise RuntimeError(f"inner epoch took {taken} optimizer steps, expected {run.budget.updates_per_epoch}")


def ema_step(run: Run) -> None:
    if run.ema is not None:
        run.ema.step(run.params, run.global_step)


def rows_loss(run: Run, table: dict, anchors: dict, prompts: dict, idx: torch.Tensor, anchor_idx: torch.Tensor,
              adv: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, per_timestep_clipfrac: bool = True):
    """Policy + beta·(SDE KL + anchor KL) of one microbatch: rows `idx` `[U]` of `table` with their
    advantage, mask and exploration weight `[U]` each (spec §4.2-4.4, §4.6). A row is one stored SDE
    transition (x, t, x', log p_old, [μ_old, ε, v_old]) of sample `table["sample"]`, whose prompt embeddings
    are `prompts[...][sample]`. The branch trainer passes masks and k̄/k weights; the default trainer all ones
    (its plain mean over the batch) and no anchors. Diagnostics are masked means; `per_timestep_clipfrac` adds
    the branch trainer's `clipfrac_timestep_<t>` (its microbatches mix timesteps)."""
    config, device = run.config, run.accelerator.device
    noise_level, sigma_max = config.sample.noise_level, float(run.sigmas[1])
    get = lambda key: table[key][idx.to(table[key].device)]  # noqa: E731
    x, t, step = get("latents"), get("timesteps"), get("step")  # [U, C, h, w], [U], [U] step index
    # σ by the stored step index, not by looking t up in the table: that lookup reads the device every call
    sigma, sigma_next = run.sigmas[step], run.sigmas[step + 1]  # [U] each
    h = sigma - sigma_next
    rows = torch.arange(idx.shape[0], device=device)

    def velocity_fn(samples):  # the policy's velocity for rows of these samples' prompts (train.cfg: guided)
        return policy_velocity(run, prompts["prompt_embeds"][samples], prompts["pooled"][samples],
                               guided=config.train.cfg)

    v = velocity_fn(get("sample"))(x, t, rows)  # [U, C, h, w] with grad
    mean, tilde = sde_mean(v, x, sigma, sigma_next, noise_level, sigma_max)
    tilde = tilde.reshape(-1)  # [U]
    adv = adv.to(device)
    m = mask.to(device).to(torch.float32)
    w = m * weight.to(device)  # mask·k̄/k
    count = m.sum().clamp(min=1.0)
    if config.train.loss_type == "matching":
        row_loss, diag = matching_row_loss(v, get("v_old"), get("noises"), adv, sigma=sigma, h=h, sigma_tilde=tilde,
                                           reweight=config.train.reweight_type, clip_range=config.train.clip_range)
    else:
        log_prob = sde_step_with_logprob(v, sigma, sigma_next, x, noise_level=noise_level,
                                         prev_sample=get("next_latents"), sigma_max=sigma_max).log_prob
        old_mean = get("mean_old") if "mean_old" in table else None
        row_loss, diag = ppo_row_loss(log_prob, get("log_probs"), adv, sigma=sigma, h=h, sigma_tilde=tilde,
                                      reweight=config.train.reweight_type, clip_range=config.train.clip_range,
                                      mean=mean, old_mean=old_mean)
    policy = (row_loss * w).sum() / count
    loss = policy
    # diagnostics stay on the device (0-d tensors): optimizer_step reads a whole step's worth at once
    stats = {k: v.detach() for k, v in diag.summary(m).items()}
    stats["policy_loss"] = policy.detach()
    if per_timestep_clipfrac:  # masked, per trained timestep (spec §7.7); 0 where the microbatch has none
        clipped = diag.clipped.to(m.dtype)
        for name, step_t in trained_timesteps(run):
            at = m * (t == step_t).to(m.dtype)
            stats[f"clipfrac_timestep_{name}"] = ((clipped * at).sum() / at.sum().clamp(min=1)).detach()
    if config.train.beta > 0:
        heuristic = config.train.heuristic_kldenom_trick
        mean_ref = reference_mean(run, velocity_fn(get("sample")), x, t, rows, sigma,
                                   sigma_next)
        kl_sde = (sde_kl_rows(mean, mean_ref, h=h, sigma_tilde=tilde, heuristic=heuristic) * w).sum() / count
        kl_total = kl_sde
        stats["kl_loss"] = kl_sde.detach()
        if anchors and anchor_idx.numel():
            ax, at_, a_step = (anchors[key][anchor_idx] for key in ("latents", "timesteps", "step"))
            a_sigma, a_next = run.sigmas[a_step], run.sigmas[a_step + 1]
            a_rows = torch.arange(anchor_idx.shape[0], device=device)
            a_vel = velocity_fn(anchors["sample"][anchor_idx])
            a_mean, a_tilde = sde_mean(a_vel(ax, at_, a_rows), ax, a_sigma, a_next, noise_level, sigma_max)
            a_ref = reference_mean(run, a_vel, ax, at_, a_rows, a_sigma, a_next)
            kl_anchor = anchor_kl(a_mean, a_ref, h=a_sigma - a_next, sigma_tilde=a_tilde.reshape(-1),
                                  k_bar=mean_active_k(run.schedule), heuristic=heuristic)
            kl_total = kl_total + kl_anchor
            stats["kl_anchor_loss"] = kl_anchor.detach()
        loss = loss + config.train.beta * kl_total
    stats["loss"] = loss.detach()
    return loss, stats


def trained_timesteps(run: Run) -> list:
    """[(int(t), t)] of the trained steps with branches: t = 1000·σ_j as the rows store it, on the device."""
    if getattr(run, "_trained_timesteps", None) is None:
        t = timesteps_from_sigmas(run.sigmas)  # the same arithmetic as the samplers' stored timesteps
        active = [j for j, k in enumerate(run.schedule) if k > 0]
        run._trained_timesteps = [(int(value), t[j]) for j, value in zip(active, t[active].tolist())]
    return run._trained_timesteps


def run_epochs(run: Run, train_one_epoch: Callable) -> Run:
    """Epochs `run.epoch .. num_epochs-1`. `train_one_epoch(run, epoch)` samples, scores and updates (putting
    what the epoch's record needs into `run.epoch_metrics`) and returns its phase timings; `finish_epoch`
    then evaluates, saves and writes the epoch's record and console line."""
    first_epoch = run.epoch
    while run.epoch < run.config.num_epochs:
        epoch, started = run.epoch, time.time()
        run.updates_this_epoch, run.epoch_metrics, run.step_losses = 0, {}, []
        timings = train_one_epoch(run, epoch)
        finish_epoch(run, epoch, {"time_per_epoch": time.time() - started, **timings})
    if run.accelerator.is_main_process:
        logger.info("done: %d epochs (%d this start), %d optimizer steps, %d samples, %.0f s; run folder %s%s",
                    run.epoch, run.epoch - first_epoch, run.global_step, run.samples, elapsed(run), run.run_dir,
                    f"; last checkpoint {run.last_checkpoint}" if run.last_checkpoint else "")
    run.logger.finish()
    return run


def elapsed(run: Run) -> float:
    """Seconds of training since the run first started (earlier starts included)."""
    return run.elapsed_before + time.time() - run.started


def finish_epoch(run: Run, epoch: int, timings: dict) -> None:
    """End of epoch `epoch`: evaluate and save when the trained epoch count hits eval_freq / save_freq, and
    always after the last epoch (upstream never did, §7.10), then write the epoch's one record (contract §4
    keys beside the component's own) and its console line."""
    config = run.config
    run.epoch = epoch + 1
    metrics = run.epoch_metrics
    run.samples += int(metrics.get("samples_this_epoch", 0))
    record = {"epoch": run.epoch, "global_step": run.global_step, "samples": run.samples,
              "reward_mean": metrics.get("reward_mean"), "reward_std": metrics.get("reward_std"),
              "loss": float(np.mean(run.step_losses)) if run.step_losses else None,
              **timings, "optimizer_updates_this_epoch": run.updates_this_epoch,
              "skipped_steps": run.skipped_steps, **peak_memory(run.accelerator.device)}
    record.update({k: v for k, v in metrics.items() if k not in record})
    if not checkpoints.all_finite(run.params):
        raise DivergenceError(f"training diverged in epoch {run.epoch}: the LoRA weights are non-finite after step "
                              f"{run.global_step}; last good checkpoint: {run.last_checkpoint or 'none saved yet'}")
    last = run.epoch == config.num_epochs
    if last or run.epoch % config.eval_freq == 0:
        started = time.time()
        evaluation = evaluate(run, run.epoch)
        record.update({**evaluation, "eval_reward_mean": evaluation.get("eval_reward_avg"),
                       "eval_time": time.time() - started, **peak_memory(run.accelerator.device, "eval_")})
    record["elapsed_s"] = elapsed(run)
    if last or run.epoch % config.save_freq == 0:
        record.update({"checkpoint_epoch": run.epoch, "checkpoint_global_step": run.global_step})
        record["checkpoint_path"] = save_checkpoint(run, run.epoch, metrics_lines=run.logger.lines + 1)
    run.logger.log(record, run.global_step, kind="epoch")
    if run.accelerator.is_main_process:
        logger.info(console_line(record, config.num_epochs))


def console_line(record: dict, num_epochs: int) -> str:
    """`epoch 3/10  reward 0.1234 ± 0.0456  loss 0.0012  12.3 s  9.8 samples/s  eval 0.1300  saved <path>`"""
    def number(value, spec):
        return format(value, spec) if isinstance(value, (int, float)) and math.isfinite(value) else "nan"

    parts = [f"epoch {record['epoch']}/{num_epochs}",
             f"reward {number(record.get('reward_mean'), '.4f')} ± {number(record.get('reward_std'), '.4f')}",
             f"loss {number(record.get('loss'), '.4g')}", f"{record['time_per_epoch']:.1f} s"]
    samples = record.get("samples_this_epoch")
    if samples:
        parts.append(f"{samples / max(record['time_per_epoch'], 1e-9):.1f} samples/s")
    if record.get("eval_reward_mean") is not None:
        parts.append(f"eval {number(record['eval_reward_mean'], '.4f')}")
    if record.get("skipped_steps"):
        parts.append(f"skipped steps {record['skipped_steps']}")
    if record.get("checkpoint_path"):
        parts.append(f"saved {record['checkpoint_path']}")
    return "  ".join(parts)


def peak_memory(device, prefix: str = "") -> dict:
    """Peak memory since the last call (MiB): the CUDA allocator's peak on a GPU, reset after reading so each
    phase reports its own; on a CPU the process's peak resident set so far (it cannot be reset)."""
    if torch.device(device).type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        return {f"{prefix}peak_memory_mib": peak, f"{prefix}peak_memory_kind": "cuda_allocated"}
    import resource

    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {f"{prefix}peak_memory_mib": rss_kib / 1024, f"{prefix}peak_memory_kind": "cpu_max_rss"}


def mean_over_processes(run: Run, value: float) -> float:
    if run.accelerator.num_processes == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=run.accelerator.device)
    return run.accelerator.reduce(tensor, reduction="mean").item()


# ------------------------------------------------------------------------------------------------ eval

@torch.no_grad()
def evaluate(run: Run, epoch: int) -> dict:
    """Deterministic ODE sampling (`sample.eval_num_steps`) of this rank's share of the test prompts,
    rewards averaged over every process (spec §3.6, §7.6); EMA weights when train.ema. The test set is
    split without padding, so no prompt is counted twice."""
    if run.test_set is None:
        return {}
    config, acc = run.config, run.accelerator
    if run.ema is not None:
        run.ema.copy_ema_to(run.params, store_temp=True)
    run.transformer.eval()
    try:
        sigmas = flow_sigmas(config.sample.eval_num_steps).to(acc.device)
        mine = list(range(acc.process_index, len(run.test_set), acc.num_processes))
        sums, counts = {}, {}
        kl_sum, kl_count = 0.0, 0
        for start in range(0, len(mine), config.sample.test_batch_size):
            indices = mine[start:start + config.sample.test_batch_size]
            batch = collate(run.test_set, indices)
            embeds, pooled = batch["prompt_embeds"].to(acc.device), batch["pooled_prompt_embeds"].to(acc.device)
            velocity = policy_velocity(run, embeds, pooled)
            # the KL probe uses the training forward's guidance (train.cfg), as upstream's eval does
            probe = velocity if config.train.cfg else policy_velocity(run, embeds, pooled, guided=False)
            visited = []  # (x_j, t_j, v_j) of every ODE step, for the KL probe

            def recording_velocity(x, t, rows):
                v = velocity(x, t, rows)
                visited.append((x, t, rows, v))
                return v

            gen = seeded_generator(config.seed, 1_000_000 + indices[0], device=acc.device)  # same noise at every eval
            x0 = initial_latents(len(indices), config.resolution, generator=gen, device=acc.device)
            final = sample_ode(recording_velocity, x0, sigmas)
            images = decode_latents(run.vae, final, chunk_size=config.get("latent_chunk_size"))
            kl_sum, kl_count = _eval_kl_probe(run, probe, visited, sigmas, kl_sum, kl_count,
                                              recompute=not config.train.cfg)
            scores = submit_scores(None, run.eval_reward, images, batch["prompts"], batch["metadatas"]).result()
            for key, value in scores.items():
                keep = value != -10.0  # upstream's filler for rows a GenEval tag does not apply to
                sums[key] = sums.get(key, 0.0) + float(value[keep].sum())
                counts[key] = counts.get(key, 0) + int(keep.sum())
    finally:
        if run.ema is not None:
            run.ema.copy_temp_to(run.params)
    metrics = {"eval_epoch": epoch, "eval_global_step": run.global_step}
    kl = torch.tensor([kl_sum, kl_count], dtype=torch.float64, device=acc.device)
    kl = acc.reduce(kl, reduction="sum") if acc.num_processes > 1 else kl
    metrics["eval_kl_divergence"] = (kl[0] / kl[1]).item() if kl[1] > 0 else float("nan")
    for key in sorted(sums):
        pair = torch.tensor([sums[key], counts[key]], dtype=torch.float64, device=acc.device)
        pair = acc.reduce(pair, reduction="sum") if acc.num_processes > 1 else pair
        metrics[f"eval_reward_{key}"] = (pair[0] / pair[1]).item() if pair[1] > 0 else float("nan")
    return metrics


def _eval_kl_probe(run: Run, velocity, visited, sigmas, kl_sum: float, kl_count: int, recompute: bool = False):
    """KL(policy || reference) of one SDE step at the eval trajectory's states x_j for the trained steps j < T
    with a nonzero `run.eval_kl_weights[j]` (branch trainer: k_j > 0, weight k̄/k_j; default trainer: every j,
    weight 1), exact denominator σ̃²h of the eval schedule (spec §7.6 step 2; upstream's indices, which on a
    40-step trajectory probe its first steps). `recompute`: the policy side is `velocity` at x_j rather than the
    sampler's guided velocity (train.cfg=False). Returns the running (sum over rows, row count)."""
    for j, weight in enumerate(run.eval_kl_weights[:len(visited)]):
        if weight == 0:
            continue
        x, t, rows, v = visited[j]
        v = velocity(x, t, rows) if recompute else v
        sigma, sigma_next = sigmas[j].expand(x.shape[0]), sigmas[j + 1].expand(x.shape[0])  # [b] each
        mean, tilde = sde_mean(v, x, sigma, sigma_next, run.config.sample.noise_level, float(sigmas[1]))
        mean_ref = reference_mean(run, velocity, x, t, rows, sigma, sigma_next, sigmas)
        kl = sde_kl_rows(mean, mean_ref, h=sigma - sigma_next, sigma_tilde=tilde.reshape(-1)) * weight  # [b]
        kl_sum += float(kl.sum())
        kl_count += int(kl.numel())
    return kl_sum, kl_count


# ------------------------------------------------------------------------------------------------ checkpoints

def save_lora(transformer, directory: str) -> None:
    """The transformer's LoRA as diffusers `save_lora_weights` writes it, with the adapter config in the file's
    metadata so `load_lora_weights` applies alpha/r = 2 (without it diffusers assumes alpha = r: half strength)."""
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    lora = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}
    StableDiffusion3Pipeline.save_lora_weights(directory, transformer_lora_layers=lora,
                                               transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict())


def save_checkpoint(run: Run, epoch: int, metrics_lines: int) -> str:
    """`checkpoint-<epoch>/` (see checkpoints.py): the LoRA (EMA weights when train.ema) and the full training
    state, written by the main process after every process checked the replicas agree. `metrics_lines`: the
    records `metrics.jsonl` will hold once this epoch's record is written (a resume cuts the file back to it)."""
    _check_replicas_agree(run)
    path = os.path.join(run.run_dir, run_folder.CHECKPOINTS_DIR, f"checkpoint-{epoch}")
    if run.accelerator.is_main_process:
        if run.ema is not None and not checkpoints.all_finite(run.ema.shadow):
            raise DivergenceError(f"epoch {epoch}: the EMA weights are non-finite; not saving them (last good "
                                  f"checkpoint: {run.last_checkpoint or 'none saved yet'})")

        def write_lora(directory):
            if run.ema is not None:
                run.ema.copy_ema_to(run.params, store_temp=True)
            try:
                save_lora(run.transformer, directory)
            finally:
                if run.ema is not None:
                    run.ema.copy_temp_to(run.params)

        state = {
            "trainer": TRAINER_SCRIPTS[run.config.sample.sampling_mode],
            "sampling_mode": run.config.sample.sampling_mode,
            "config_json": json.dumps(run.config.to_dict()),
            "epoch": epoch, "global_step": run.global_step, "samples": run.samples, "elapsed_s": elapsed(run),
            "skipped_steps": run.skipped_steps, "metrics_lines": metrics_lines,
            "params": [p.detach().cpu().clone() for p in run.params],
            "optimizer": run.optimizer.state_dict(),
            "ema": run.ema.state_dict() if run.ema is not None else None,
            "sampler": run.sampler.state_dict(), "seen_prompts": sorted(run.seen_prompts),
            "rng": checkpoints.rng_state(),
        }
        path = checkpoints.save(run.run_dir, epoch, write_lora, state, run.config.num_checkpoint_limit)
    run.accelerator.wait_for_everyone()
    run.last_checkpoint = path
    return path


def _check_replicas_agree(run: Run) -> None:
    """Every rank must hold the same LoRA weights (same init, averaged gradients): rank 0 saves for all."""
    if run.accelerator.num_processes == 1:
        return
    local = torch.stack([p.detach().double().sum() for p in run.params]).to(run.accelerator.device)  # [n]
    # gathered copies, compared exactly: a sum over 3+ ranks divided back rounds even for identical replicas
    everyone = run.accelerator.gather(local[None])  # [processes, n]
    if bool((everyone - everyone[:1]).abs().max() > 0):
        raise RuntimeError("LoRA weights differ between processes; gradients were not averaged identically")


def apply_checkpoint_state(run: Run, state: dict) -> None:
    """Restore what `save_checkpoint` wrote (loaded by `checkpoints.load_state` before the models); training
    continues with epoch `state["epoch"]`."""
    if len(state["params"]) != len(run.params) or any(
            saved.shape != p.shape for saved, p in zip(state["params"], run.params)):
        raise config_check.ConfigError(f"resume_from={run.config.resume_from!r}: its LoRA tensors do not fit this "
                                       f"model ({len(state['params'])} tensors, this model has {len(run.params)})")
    with torch.no_grad():
        for p, saved in zip(run.params, state["params"]):
            p.copy_(saved.to(p.device))
    run.optimizer.load_state_dict(state["optimizer"])
    if run.ema is not None and state["ema"] is not None:
        run.ema.load_state_dict(state["ema"])
    run.sampler.load_state_dict(state["sampler"])
    run.seen_prompts = set(state["seen_prompts"])
    checkpoints.set_rng_state(state["rng"])
    run.epoch, run.global_step = int(state["epoch"]), int(state["global_step"])
    run.samples, run.elapsed_before = int(state["samples"]), float(state["elapsed_s"])
    run.skipped_steps = int(state["skipped_steps"])
    if run.accelerator.is_main_process:
        logger.info("resumed at epoch %d, step %d", run.epoch, run.global_step)
