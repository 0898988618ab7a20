"""What both SD1.5 trainers share: set-up, the training forward and per-row loss, the optimizer step with its
divergence guard, per-epoch records, evaluation, checkpoints. The loops are `trainer_grpo` (baseline, full
trajectories) and `trainer_grpo_pr` (ours, branching); both read as named phases:

    sample -> score -> advantages -> update -> (evaluate, save, log)

Set-up order (contract §2): config values and budget, the model path / prompt file / libraries, the run folder and
the resume state, the reward, the scheduler's σ check, and only then the UNet, VAE and text encoder; the run
folder is created once they have loaded, so a failed start leaves nothing behind. With several processes (on one
node or many) every check runs on every process and a failure anywhere stops all of them with its line; the run
folder is decided and written by global rank 0 alone (`distributed.py`).

Differences from upstream, on purpose (spec §11): every random draw of an epoch comes from generators seeded by
(seed, rank, epoch, purpose), so a resumed run repeats the uninterrupted one exactly; gradients are averaged over
processes explicitly before each optimizer step (no DDP wrapper, nothing to unwrap); the logged grad_mean /
grad_var are of the unscaled accumulated gradient of each update; wandb is optional and metrics.jsonl always
written; evaluation and a checkpoint always follow the last epoch. Epoch numbers count trained epochs:
checkpoint-<n> and "eval at epoch n" are the policy after n epochs (upstream evaluated at the start of epoch n).
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

from . import checkpoints, config as config_module, distributed, models as sd_models, preflight, run_folder
from . import prompts as prompt_sets
from .config import ConfigError
from .ddim import ddim_step_with_logprob
from .losses import RATIO_ALGORITHMS, RowLoss, clamp_advantages, gaussian_kl_rows, noise_matching_row_loss, \
    ratio_row_loss
from .rewards import Scorer, build_reward, submit
from .sampling import sample_trajectory
from .schedule import inference_timesteps, natural_weight

logger = logging.getLogger("sd15zo.trainer")


class DivergenceError(RuntimeError):
    """A non-finite loss, gradient norm or weight; the message is one line for the user."""


@dataclass
class Run:
    config: object
    accelerator: object
    budget: config_module.Budget
    models: sd_models.Models
    params: list
    optimizer: torch.optim.Optimizer
    scaler: object
    scorer: Scorer
    prompts: list
    eval_batches: list
    eval_seeds: list
    timesteps: torch.Tensor       # [N] training sampler timesteps
    eval_timesteps: torch.Tensor  # [N_eval]
    run_dir: str
    logger: "MetricLogger"
    plan: run_folder.RunPlan
    epoch: int = 0
    global_step: int = 0
    samples: int = 0
    elapsed_before: float = 0.0
    started: float = field(default_factory=time.time)
    skipped_steps: int = 0
    scaler_skipped_steps: int = 0
    seen_prompts: set = field(default_factory=set)
    epoch_metrics: dict = field(default_factory=dict)
    step_records: list = field(default_factory=list)
    updates_this_epoch: int = 0
    last_checkpoint: Optional[str] = None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def seeded_generator(*keys, device="cpu") -> torch.Generator:
    """A generator seeded from integers (seed, rank, epoch, purpose, ...): explicit, resumable randomness."""
    seed = 0
    for key in keys:
        seed = (seed * 1_000_003 + int(key)) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(seed)


def progress(run: Run, iterable, desc: str, total: Optional[int] = None):
    """A tqdm bar on the main process when stderr is a terminal; the bare iterable otherwise."""
    if not (run.is_main and sys.stderr.isatty()):
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


def make_optimizer(config, params, lr: float):
    """AdamW (spec §10.2), bitsandbytes' AdamW8bit with use_8bit_adam."""
    kwargs = dict(lr=lr, betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.adam_weight_decay,
                  eps=config.adam_epsilon)
    if config.use_8bit_adam:
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def scaled_learning_rate(config, budget, world_size: int) -> float:
    """scale_lr (spec §10.2): lr × accumulation × rows per micro-batch × processes."""
    if not config.scale_lr:
        return config.learning_rate
    if config.trainer == "grpo":
        return config.learning_rate * config.train_gradient_accumulation_steps * config.train_batch_size * world_size
    return config.learning_rate * budget.accumulation * config.policy_update_row_batch_size * world_size


def setup(config, accelerator) -> Run:
    """Everything before the first epoch (order in the module docstring)."""
    with distributed.together(accelerator):  # each process (each node) checks the files it sees
        budget = config_module.validate(config)
        prompts = preflight.check_all(config)
    plan = plan_on_main(config, accelerator)
    main = accelerator.is_main_process  # global rank 0: the one process that writes the run folder
    if main:
        what = (f"resuming {os.path.basename(plan.resume_dir)} (epoch {plan.resume_state['epoch']})"
                if plan.resume_dir else "new run")
        logger.info("run folder: %s (%s)", plan.run_dir, what)
    device = accelerator.device
    with distributed.together(accelerator):
        scorer = Scorer(build_reward(config, device), config.reward_batch_size, config.reward_score_dtype)
        scheduler = sd_models._from_pretrained(config.pretrained_model, config.revision, None, "scheduler",
                                               lambda m: sd_models.load_scheduler(m, config.revision))
        config_module.check_sigma(config, scheduler.alphas_cumprod, lambda n: inference_timesteps(scheduler, n))

    if config.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    models = sd_models.load_models(config, device)
    torch.manual_seed(config.seed)  # the LoRA's Gaussian A: identical on every process (nothing broadcasts it)
    params = sd_models.trainable_parameters(config, models)
    lr = scaled_learning_rate(config, budget, accelerator.num_processes)
    optimizer = make_optimizer(config, params, lr)
    scaler = torch.amp.GradScaler(device.type, enabled=config.mixed_precision == "fp16")
    prompt_seed, noise_seed = prompt_sets.eval_seeds(config)
    rank = accelerator.process_index
    eval_batches = prompt_sets.eval_prompts(prompts, config.eval_num_batches, config.eval_batch_size, prompt_seed, rank)
    eval_seeds = prompt_sets.eval_batch_seeds(noise_seed, rank, config.eval_num_batches)

    state = plan.resume_state
    if main:
        run_folder.create_run_dir(plan, state.get("metrics_lines") if state else None)
    accelerator.wait_for_everyone()
    try:
        metric_logger = MetricLogger(plan.run_dir, config, main)
        if main:
            run_folder.write_start_files(plan.run_dir, config, budget, accelerator.num_processes, device,
                                         plan.resume_dir)
    except BaseException:
        if main:
            run_folder.remove_if_empty_start(plan)
        raise
    run = Run(config, accelerator, budget, models, params, optimizer, scaler, scorer, prompts, eval_batches,
              eval_seeds, inference_timesteps(models.scheduler, config.sample_num_steps).to(device),
              inference_timesteps(models.scheduler, config.eval_num_steps).to(device), plan.run_dir, metric_logger, plan)
    if state is not None:
        apply_checkpoint_state(run, state)
        run.last_checkpoint = plan.resume_dir
    if main:
        logger.info("budget (per process): %s; %d trainable parameters, lr %g", budget.summary(),
                    sum(p.numel() for p in params), lr)
    return run


def plan_on_main(config, accelerator) -> run_folder.RunPlan:
    """The run folder and the checkpoint to resume, decided by global rank 0 alone and sent to every process (on a
    shared save dir, another node deciding for itself could find the folder rank 0 has just created and refuse);
    every other process then reads that checkpoint itself, so the save dir must be one every node sees."""
    with distributed.together(accelerator):
        plan = (run_folder.plan_run(config, checkpoints.load_state, checkpoints.math_key_diff)
                if accelerator.is_main_process else None)
    if accelerator.num_processes == 1:
        return plan
    run_dir, resume_dir, fork_from = distributed.from_main(
        accelerator, (plan.run_dir, plan.resume_dir, plan.fork_from) if plan is not None else None)
    with distributed.together(accelerator):
        if plan is None:
            state = checkpoints.load_state(resume_dir) if resume_dir else None
            plan = run_folder.RunPlan(run_dir, resume_dir, state, fork_from)
    return plan


# ------------------------------------------------------------------------------------------------ logging

class MetricLogger:
    """<run_dir>/metrics.jsonl (main process): one strict-JSON object a line, "kind": "step" after every optimizer
    update and "kind": "epoch" once per epoch (contract §4); the same records go to wandb when it is on (report_to:
    wandb and wandb_mode online/offline, or auto with WANDB_API_KEY set). `lines` counts the file's records."""

    def __init__(self, run_dir: str, config, is_main: bool):
        self.is_main, self.run_dir = is_main, run_dir
        self.path = os.path.join(run_dir, run_folder.METRICS_FILE)
        self.wandb, self.lines = None, 0
        if not is_main:
            return
        if os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as f:
                self.lines = sum(1 for _ in f)
        mode = config.wandb_mode
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "disabled"
        if config.report_to == "wandb" and mode != "disabled":
            try:
                import wandb
            except ImportError:
                logger.warning("wandb is not installed; metrics go to %s only", self.path)
            else:
                self.wandb = wandb.init(project=config.wandb_project, mode=mode, dir=run_dir,
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

    def log_images(self, images: torch.Tensor, captions: Sequence[str], name: str, key: str = "images") -> None:
        """A grid of `images` [n, 3, H, W] in [0, 1] as <run>/images/<name>.jpg; wandb `key` with captions."""
        if not self.is_main or images.shape[0] == 0:
            return
        from PIL import Image

        pixels = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        n, height, width, _ = pixels.shape
        columns = min(n, 5)
        grid = np.zeros((-(-n // columns) * height, columns * width, 3), dtype=np.uint8)
        for i in range(n):
            r, c = divmod(i, columns)
            grid[r * height:(r + 1) * height, c * width:(c + 1) * width] = pixels[i]
        folder = os.path.join(self.run_dir, "images")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(grid).save(os.path.join(folder, f"{name}.jpg"), quality=90)
        if self.wandb is not None:
            import wandb

            self.wandb.log({key: [wandb.Image(Image.fromarray(p).resize((256, 256)), caption=c)
                                  for p, c in zip(pixels, captions)]}, commit=False)

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


# ------------------------------------------------------------------------------------------------ the training forward

def encode(run: Run, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    return sd_models.encode_prompts(run.models, prompts)


def predictor(run: Run, cond: torch.Tensor, reference: bool = False) -> sd_models.NoisePredictor:
    """The sampling predictor: guided by sample_cfg_scale, under the run's autocast."""
    return sd_models.NoisePredictor(run.models, cond, run.config.sample_cfg_scale,
                                    lambda: sd_models.autocast(run.config, run.device), use_reference=reference)


def training_noise_pred(run: Run, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                        reference: bool = False) -> torch.Tensor:
    """ε of the policy (with gradient) or the reference (without) at per-row (x, t, prompt): guided with
    sample_cfg_scale when train_cfg, the conditional branch alone otherwise (spec §6.2 item 9e)."""
    scale = run.config.sample_cfg_scale if run.config.train_cfg else None
    with sd_models.autocast(run.config, run.device):
        if reference:
            with torch.no_grad(), sd_models.reference(run.models) as unet:
                out = sd_models.cfg_noise_pred(unet, x, t, cond, run.models.negative, scale)
        else:
            out = sd_models.cfg_noise_pred(run.models.unet, x, t, cond, run.models.negative, scale)
    return out.float()


def loss_weight(run: Run, t: torch.Tensor):
    """ω per row: const_weight, or the natural weight w(t) with the step count given explicitly."""
    if run.config.const_weight is not None:
        return run.config.const_weight
    return natural_weight(run.models.alphas_cumprod, t, run.config.sample_num_steps)


def row_losses(run: Run, eps: torch.Tensor, x: torch.Tensor, t: torch.Tensor, adv: torch.Tensor,
               eps_old: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
               next_latents: Optional[torch.Tensor] = None, old_log_probs: Optional[torch.Tensor] = None) -> RowLoss:
    """The surrogate of each row (spec §8): the ratio losses recompute ℓ_θ of the stored x' through the step
    (N given explicitly), the noise-matching losses use Δ = ε_θ − ε_old and the stored ξ."""
    c = run.config
    adv = clamp_advantages(adv, c.train_adv_clip_max)
    if c.algorithm in RATIO_ALGORITHMS:
        step = ddim_step_with_logprob(run.models.alphas_cumprod, eps, t, x, num_inference_steps=c.sample_num_steps,
                                      eta=c.sample_eta, algorithm=c.algorithm, const_weight=c.const_weight,
                                      prev_sample=next_latents)
        return ratio_row_loss(step.log_prob, old_log_probs, adv, c.train_clip_range, c.algorithm)
    return noise_matching_row_loss(eps, eps_old, noise, adv, loss_weight(run, t), c.weight_scale_factor,
                                   c.noise_matching_precision, c.train_clip_range, c.train_do_clip)


def wants_approx_kl(run: Run, first_of_window: bool) -> bool:
    mode = run.config.train_approx_kl
    return mode == "every_microbatch" or (mode == "first_microbatch" and first_of_window)


def approx_kl_rows(run: Run, eps: torch.Tensor, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """½ mean ω²(ε_θ − ε_ref)² per row [R] (diagnostic; two extra UNet passes)."""
    eps_ref = training_noise_pred(run, x, t, cond, reference=True)
    return gaussian_kl_rows(eps.detach(), eps_ref, loss_weight(run, t))


def backward(run: Run, loss: torch.Tensor, window: int) -> None:
    """loss / window into the accumulated gradients (fp16: through the dynamic loss scale)."""
    run.scaler.scale(loss / window).backward()


# ------------------------------------------------------------------------------------------------ the optimizer step

def _sync_gradients(run: Run) -> None:
    """Average gradients over processes (what DDP would do), one flat all-reduce."""
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
    """One update from the micro-steps of `window` (their diagnostics, 0-d tensors; ratios as `_ratios`): average
    gradients over processes, unscale (fp16), clip the global norm to train_max_grad_norm, check loss, gradient
    norm and weights (contract §6), step, and log the update's diagnostics averaged over its micro-steps and
    processes. The whole update reads the device once."""
    _sync_gradients(run)
    run.scaler.unscale_(run.optimizer)
    first = run.params[0].grad
    grad_abs = first.detach().abs().float() if first is not None else torch.zeros(1, device=run.device)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, run.config.train_max_grad_norm)
    device = run.device
    keys = sorted({k for s in window for k in s if not k.startswith("_")})
    means = [torch.stack([s[k].to(device).double() for s in window if k in s]).mean() for k in keys]
    ratios = [r for s in window for r in s.get("_ratios", [])]
    if ratios:
        every = torch.cat(ratios).double()
        keys += ["ratio_mean", "ratio_std", "ratio_min", "ratio_max"]
        means += [every.mean(), every.std() if every.numel() > 1 else every.new_zeros(()), every.min(), every.max()]
    params_ok = torch.stack([torch.isfinite(p).all() for p in run.params]).all().double()
    values = torch.stack(means + [grad_norm.to(device).double(), grad_abs.mean().double(),
                                  grad_abs.var().double() if grad_abs.numel() > 1 else grad_abs.new_zeros(()).double(),
                                  params_ok])
    if run.accelerator.num_processes > 1:
        values = run.accelerator.reduce(values, reduction="mean")
    numbers = values.tolist()  # the update's one host sync
    record = dict(zip(keys, numbers[:len(keys)]))
    grad_norm, record["grad_mean"], record["grad_var"] = numbers[len(keys):len(keys) + 3]
    params_ok = numbers[len(keys) + 3] == 1.0
    record["grad_norm"] = grad_norm
    run.global_step += 1
    loss_ok = record.get("loss") is None or math.isfinite(record["loss"])
    bad = [] if loss_ok else [("loss", record["loss"])]
    if not math.isfinite(grad_norm) and not run.scaler.is_enabled():
        bad.append(("gradient norm", grad_norm))
    if not params_ok:
        bad.append(("weights (after the previous step)", float("nan")))
    record.update(extra)
    if bad and run.config.nan_policy == "skip" and params_ok:
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.update()
        run.skipped_steps += 1
        run.logger.log({**record, "skipped_step": 1}, run.global_step)
        logger.warning("step %d: non-finite %s; step skipped (nan_policy=skip, %d so far)", run.global_step,
                       " and ".join(name for name, _ in bad), run.skipped_steps)
        return
    if bad:
        run.logger.log(record, run.global_step)
        raise DivergenceError(
            f"training diverged at epoch {run.epoch + 1}, step {run.global_step}: non-finite "
            f"{' and '.join(f'{name} ({value})' for name, value in bad)}; last good checkpoint: "
            f"{run.last_checkpoint or 'none saved yet'}; lower learning_rate and resume from it, or pass "
            "--set nan_policy=skip to skip such steps")
    scale_before = run.scaler.get_scale() if run.scaler.is_enabled() else None
    run.scaler.step(run.optimizer)
    run.scaler.update()
    if scale_before is not None and not math.isfinite(grad_norm):
        run.scaler_skipped_steps += 1  # fp16: the dynamic loss scale dropped this update and lowered the scale
        record["scaler_skipped_step"] = 1
    run.optimizer.zero_grad(set_to_none=True)
    run.logger.log(record, run.global_step)
    run.step_records.append(record)
    run.updates_this_epoch += 1


# ------------------------------------------------------------------------------------------------ epochs

def epoch_prompts(run: Run, epoch: int) -> list[str]:
    """This process's prompts of the epoch, each repeated num_generations_per_prompt times."""
    c, acc = run.config, run.accelerator
    indices = prompt_sets.epoch_prompts(len(run.prompts), c.num_prompts_per_epoch, acc.num_processes,
                                        acc.process_index, c.seed, epoch)
    chosen = [run.prompts[i] for i in indices]
    return prompt_sets.expand(chosen, c.num_generations_per_prompt)


def gather_cat(run: Run, values: torch.Tensor) -> torch.Tensor:
    """Rows of every process, in process order (equal counts per process)."""
    values = values.to(run.device)
    return run.accelerator.gather(values) if run.accelerator.num_processes > 1 else values


def gather_objects(run: Run, values: list) -> list:
    if run.accelerator.num_processes == 1:
        return list(values)
    import torch.distributed as dist

    out = [None] * run.accelerator.num_processes
    dist.all_gather_object(out, list(values))
    return [v for part in out for v in part]


def reward_metrics(run: Run, rewards: torch.Tensor) -> dict:
    """reward_mean / reward_std (population) over every process and the images scored this epoch."""
    every = gather_cat(run, rewards.float()).double()
    return {"reward_mean": every.mean().item(), "reward_std": every.std(unbiased=False).item(),
            "samples_this_epoch": int(every.numel())}


def run_epochs(run: Run, train_one_epoch: Callable) -> Run:
    """Epochs run.epoch .. num_train_epochs − 1: `train_one_epoch(run, epoch)` samples, scores and updates and
    returns its phase timings; `finish_epoch` evaluates, saves, writes the record and the console line."""
    first = run.epoch
    while run.epoch < run.config.num_train_epochs:
        epoch, started = run.epoch, time.time()
        run.updates_this_epoch, run.epoch_metrics, run.step_records = 0, {}, []
        timings = train_one_epoch(run, epoch)
        finish_epoch(run, epoch, {"time_per_epoch": time.time() - started, **timings})
    if run.is_main:
        logger.info("done: %d epochs (%d this start), %d optimizer steps, %d samples, %.0f s; run folder %s%s",
                    run.epoch, run.epoch - first, run.global_step, run.samples, elapsed(run), run.run_dir,
                    f"; last checkpoint {run.last_checkpoint}" if run.last_checkpoint else "")
    run.logger.finish()
    return run


def elapsed(run: Run) -> float:
    return run.elapsed_before + time.time() - run.started


def _epoch_means(records: list) -> dict:
    keys = ("loss", "clipfrac", "approx_kl", "grad_norm", "kl_anchor_loss")
    out = {}
    for key in keys:
        values = [r[key] for r in records if r.get(key) is not None]
        if values:
            out[key] = float(np.mean(values))
    return out


def finish_epoch(run: Run, epoch: int, timings: dict) -> None:
    """End of epoch `epoch` (0-based): evaluate and save when the trained-epoch count n hits eval_freq / save_freq
    and after the last epoch, then write the epoch's record (contract §4 keys beside the trainer's own) and its
    console line."""
    c = run.config
    run.epoch = n = epoch + 1
    metrics = run.epoch_metrics
    scored = int(metrics.pop("samples_this_epoch", 0))
    run.samples += scored
    record = {"epoch": n, "global_step": run.global_step, "samples": run.samples,
              "reward_mean": metrics.get("reward_mean"), "reward_std": metrics.get("reward_std"),
              "samples_this_epoch": scored, **_epoch_means(run.step_records), **timings, "optimizer_updates_this_epoch": run.updates_this_epoch,
              "skipped_steps": run.skipped_steps, "scaler_skipped_steps": run.scaler_skipped_steps,
              **peak_memory(run.device)}
    record.update({k: v for k, v in metrics.items() if k not in record})
    if not checkpoints.all_finite(run.params):
        raise DivergenceError(f"training diverged in epoch {n}: the weights are non-finite after step "
                              f"{run.global_step}; last good checkpoint: {run.last_checkpoint or 'none saved yet'}")
    last = n == c.num_train_epochs
    if last or n % c.eval_freq == 0:
        started = time.time()
        record.update(evaluate(run, n))
        record["eval_time"] = time.time() - started
        record.update(peak_memory(run.device, "eval_"))
    record["elapsed_s"] = elapsed(run)
    if last or n % c.save_freq == 0:
        record["checkpoint_path"] = save_checkpoint(run, n, metrics_lines=run.logger.lines + 1)
    run.logger.log(record, run.global_step, kind="epoch")
    if run.is_main:
        logger.info(console_line(record, c.num_train_epochs))


def console_line(record: dict, num_epochs: int) -> str:
    """`epoch 3/300  reward 0.2712 ± 0.0104  loss 0.0012  41.0 s  3.1 samples/s  eval 0.2750  saved <path>`"""
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
    """Peak memory since the last call (MiB): the CUDA allocator's peak on a GPU (reset after reading), the
    process's peak resident set on a CPU."""
    if torch.device(device).type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        return {f"{prefix}peak_memory_mib": peak, f"{prefix}peak_memory_kind": "cuda_allocated"}
    import resource

    return {f"{prefix}peak_memory_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            f"{prefix}peak_memory_kind": "cpu_max_rss"}


# ------------------------------------------------------------------------------------------------ evaluation

@torch.no_grad()
def evaluate(run: Run, epoch: int) -> dict:
    """Spec §10.7: the fixed eval prompts and batch seeds, full stochastic trajectories (η = sample_eta) of
    eval_num_steps with the reference's prediction at every step; eval_reward_mean / _std over every process,
    eval_approx_kl = ½ mean over steps and latent of ω²(ε̂ − ε̂_ref)². The first ≤ 8 images of the last batch go to
    <run>/images/eval_<n>.jpg (and wandb `eval_images`)."""
    c, models = run.config, run.models
    models.unet.eval()
    rewards, kls = [], []
    images = prompts = None
    n = c.eval_num_steps
    for batch, seed in zip(run.eval_batches, run.eval_seeds):
        _, cond = encode(run, batch)
        gen = torch.Generator(device=run.device).manual_seed(int(seed))
        x = torch.randn((len(batch), *models.latent_shape), generator=gen, device=run.device)
        traj = sample_trajectory(predictor(run, cond), x, models.alphas_cumprod, run.eval_timesteps, eta=c.sample_eta,
                                 algorithm=c.algorithm, const_weight=c.const_weight, generator=gen,
                                 predict_ref=predictor(run, cond, reference=True), keep_ref=True,
                                 clip_sample_range=c.clip_sample_range if c.clip_sample else None)
        if c.const_weight is not None:
            weight = torch.full((n,), float(c.const_weight), device=run.device)
        else:
            weight = natural_weight(models.alphas_cumprod, run.eval_timesteps, n)
        diff = (traj.noise_preds - traj.ref_noise_preds).pow(2) * weight.reshape(1, n, 1, 1, 1).pow(2)
        kls.append(0.5 * diff.mean(dim=(1, 2, 3, 4)))  # [b]
        images, prompts = sd_models.decode(models, traj.final_latents), batch
        rewards.append(run.scorer(images, batch))
    every = gather_cat(run, torch.cat(rewards)).double()
    kl = gather_cat(run, torch.cat(kls)).double()
    scores = rewards[-1]
    run.logger.log_images(images[:8], [f"{p[:100]} | {r:.2f}" for p, r in zip(prompts, scores.tolist())],
                          f"eval_{epoch}", key="eval_images")
    return {"eval_reward_mean": every.mean().item(), "eval_reward_std": every.std(unbiased=False).item(),
            "eval_approx_kl": kl.mean().item()}


# ------------------------------------------------------------------------------------------------ checkpoints

def save_checkpoint(run: Run, epoch: int, metrics_lines: int) -> str:
    """checkpoint-<epoch>: the LoRA for diffusers (or the full UNet's state under use_lora: false) and the full
    training state, written by the main process after every process checked the replicas agree."""
    _check_replicas_agree(run)
    path = os.path.join(run.run_dir, run_folder.CHECKPOINTS_DIR, f"checkpoint-{epoch}")
    if run.is_main:
        def write_weights(folder):
            if run.config.use_lora:
                checkpoints.save_lora(run.models.unet, os.path.join(folder, checkpoints.LORA_DIR))
            else:
                run.models.unet.save_pretrained(os.path.join(folder, "unet"))

        state = {"trainer": run.config.trainer, "config": json.loads(json.dumps(run.config.to_dict())),
                 "epoch": epoch, "global_step": run.global_step, "samples": run.samples, "elapsed_s": elapsed(run),
                 "skipped_steps": run.skipped_steps, "scaler_skipped_steps": run.scaler_skipped_steps,
                 "metrics_lines": metrics_lines, "params": [p.detach().cpu().clone() for p in run.params],
                 "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(),
                 "seen_prompts": sorted(run.seen_prompts), "rng": checkpoints.rng_state()}
        path = checkpoints.save(run.run_dir, epoch, write_weights, state, run.config.num_checkpoint_limit)
        logger.info("saved %s", path)
    run.accelerator.wait_for_everyone()
    run.last_checkpoint = path
    return path


def _check_replicas_agree(run: Run) -> None:
    if run.accelerator.num_processes == 1:
        return
    local = torch.stack([p.detach().double().sum() for p in run.params]).to(run.device)
    everyone = run.accelerator.gather(local[None])  # [processes, n]
    if bool((everyone - everyone[:1]).abs().max() > 0):
        raise RuntimeError("weights differ between processes; gradients were not averaged identically")


def apply_checkpoint_state(run: Run, state: dict) -> None:
    """Restore what save_checkpoint wrote (or an upstream checkpoint's LoRA and optimizer); training continues
    after epoch state["epoch"]."""
    source = run.config.resume_from_checkpoint
    if state.get("format") == "upstream":
        if not run.config.use_lora:
            raise ConfigError(f"resume_from_checkpoint={source!r}: an upstream LoRA checkpoint, but use_lora=false")
        checkpoints.load_lora_state(run.models.unet, state["lora_weights"])
    else:
        saved = state["params"]
        if len(saved) != len(run.params) or any(s.shape != p.shape for s, p in zip(saved, run.params)):
            raise ConfigError(f"resume_from_checkpoint={source!r}: its weights do not fit this model ({len(saved)} "
                              f"tensors, this model trains {len(run.params)})")
        with torch.no_grad():
            for p, s in zip(run.params, saved):
                p.copy_(s.to(p.device))
        run.scaler.load_state_dict(state["scaler"])
        checkpoints.set_rng_state(state["rng"])
        run.samples, run.elapsed_before = int(state["samples"]), float(state["elapsed_s"])
        run.skipped_steps, run.scaler_skipped_steps = int(state["skipped_steps"]), int(state["scaler_skipped_steps"])
        run.seen_prompts = set(state["seen_prompts"])
    try:
        run.optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as error:
        raise ConfigError(f"resume_from_checkpoint={source!r}: its optimizer state does not fit ({error})") from None
    run.epoch, run.global_step = int(state["epoch"]), int(state["global_step"])
    if run.is_main:
        logger.info("resumed after epoch %d, step %d", run.epoch, run.global_step)
