"""The training loop (spec §5.8): one readable loop over named phases.

    per epoch e:  tau <- 1 (faithful) -> sample (rollout, reward; ours: terminal reward gradient) -> reward stats, images
                  -> train (shuffle, [subsample], micro-batches x K timesteps, accumulate, optimizer step, tau update)
                  -> evaluate / checkpoint when due -> one metrics record and console line

The objective of a timestep is `algorithm.VGGFlow.step`; what surrounds it is here: set-up in the contract's order
(config values -> prompt files and models' sources -> run folder -> rewards -> models -> create run folder), the
optimizer step with its divergence guard, metrics, evaluation and checkpoints that resume exactly.

Differences from upstream on purpose (spec §10): validation before any model loads, no DDP wrapper (one gradient
all-reduce per update), GradScaler only for fp16 (I6), rewards without autograd at sampling (C4), device-agnostic
autocast (I12), explicit seeded generators (so a resumed run repeats the uninterrupted one bit for bit on CPU),
full resumable checkpoints (I4), JSON metrics (I5), wandb only with a key (I1), evaluation that cannot hang and does
not disturb the training draws (C6), optional full-VAE evaluation (I11).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from . import checkpoints, config_check, preflight, run_folder
from .algorithm import StepBatch, VGGFlow
from .batching import micro_batches, shuffle, subsample, train_step_columns
from .evaluation import score_items
from .guidance import GuidedVelocity
from .metrics import aggregate, norm_records
from .reward_grad import RewardGrad
from .rewards import RewardLoadError, build_reward
from .rollout import NonFiniteRollout, concatenate, rollout_batch
from .schedule import scheduler_schedule
from .value_net import LORA_TARGETS, ValueNet, build as build_value_net, lora_config

logger = logging.getLogger("sd35fo.trainer")


class DivergenceError(RuntimeError):
    """A non-finite loss, gradient norm or weight; the message is one line for the user."""


def weight_dtype(mixed_precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)


def seed_from(*keys) -> int:
    seed = 0
    for key in keys:
        seed = (seed * 1_000_003 + int(key)) % (2**63 - 1)
    return seed


def generator(*keys, device="cpu") -> torch.Generator:
    """A generator seeded from integers (seed, epoch, batch, [rank]): explicit, resumable randomness."""
    return torch.Generator(device=device).manual_seed(seed_from(*keys))


class PhaseTimer:
    """Wall-clock seconds per phase, exclusive: time inside a nested phase is not counted in its parent
    (reward gradients inside training are "reward_grad", not "train"). Synchronises CUDA at the edges."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.totals, self._stack = {}, []

    def _now(self):
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name):
        start, child = self._now(), [0.0]
        self._stack.append(child)
        try:
            yield
        finally:
            self._stack.pop()
            elapsed = self._now() - start
            self.totals[name] = self.totals.get(name, 0.0) + elapsed - child[0]
            if self._stack:
                self._stack[-1][0] += elapsed

    def reset(self):
        self.totals = {}


@dataclass
class Run:
    """What the loop needs, built once by `setup`."""
    config: object
    dist: object
    budget: config_check.Budget
    pipe: object
    transformer: torch.nn.Module
    vae: torch.nn.Module
    reward_fn: object
    reward_grad: RewardGrad
    algorithm: VGGFlow
    value: Optional[ValueNet]
    policy_params: list
    value_params: list
    optimizer: torch.optim.Optimizer
    scaler: object
    sigmas: torch.Tensor
    timesteps: torch.Tensor
    prompt_source: object
    eval_items: Optional[list]
    run_dir: str
    logger: "MetricLogger"
    timer: PhaseTimer
    dtype: torch.dtype
    eval_vae: Optional[torch.nn.Module] = None
    plan: Optional[run_folder.RunPlan] = None
    epoch: int = 0
    global_step: int = 0
    samples: int = 0
    tau: float = 1.0
    elapsed_before: float = 0.0
    started: float = field(default_factory=time.time)
    skipped_steps: int = 0
    last_checkpoint: Optional[str] = None
    step_records: list = field(default_factory=list)
    epoch_info: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ set-up

def load_models(config, device, dtype):
    """The SD3 pipeline (text encoders in the weight dtype, VAE or TAESD3 in fp32) and its transformer; one line if
    a source cannot be loaded."""
    from diffusers import AutoencoderTiny, StableDiffusion3Pipeline

    pretrained = config.pretrained
    try:
        extra = {}
        if pretrained.autoencodertiny:
            extra["vae"] = AutoencoderTiny.from_pretrained(pretrained.autoencodertiny_model, torch_dtype=dtype)
        pipe = StableDiffusion3Pipeline.from_pretrained(pretrained.model, revision=pretrained.revision,
                                                        torch_dtype=dtype, **extra)
    except (OSError, ValueError) as error:  # hub errors are OSErrors, a bad config.json a ValueError
        reason = " ".join(str(error).split())[:300]
        raise config_check.ConfigError(f"pretrained.model={pretrained.model!r}: cannot load the SD3 pipeline: {reason}"
                                       ) from None
    for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        module.requires_grad_(False)
    pipe.vae.to(device, dtype=torch.float32).eval()
    for module in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        module.to(device, dtype=dtype).eval()
    pipe.transformer.requires_grad_(False)
    pipe.transformer.to(device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_full_vae(config, device):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(config.pretrained.model, subfolder="vae", revision=config.pretrained.revision)
    return vae.to(device, dtype=torch.float32).requires_grad_(False).eval()


def agree(dist, error: Optional[BaseException], kind=config_check.ConfigError) -> None:
    """Collective: stop every process when any of them failed. The failing process re-raises its own error (and,
    as the first failure, prints it on its node's console besides rank 0's); the others raise `kind` with the
    first failure's line, naming its rank and host."""
    line = None
    if error is not None:
        known = isinstance(error, (config_check.ConfigError, DivergenceError))
        line = str(error) if known else f"{type(error).__name__}: {error}"
    first = dist.first_error(line)
    if first is None:
        return
    if error is not None:
        error.print_here = first[0] == dist.rank
        raise error
    raise kind(first[1])


def start_checks(config, dist, name_given: bool):
    """(budget, prompt source, evaluation items, run plan), before any model loads. Every process checks the config
    and what it reads on its own node (model sources, prompt files); global rank 0 alone plans the run folder and
    reads the resume state, and sends that plan to the others: a second node needs no view of saving.output_dir and
    never refuses a folder that rank 0 has just created or forked. One error anywhere stops every process."""
    budget = prompt_source = eval_items = plan = error = None
    try:
        budget = config_check.validate(config, dist.world_size)
        prompt_source, eval_items = preflight.check_all(config)
        if dist.is_main:
            plan = run_folder.plan_run(config, checkpoints.load_state, checkpoints.math_key_diff, name_given)
    except config_check.ConfigError as failed:
        error = failed
    agree(dist, error)
    return budget, prompt_source, eval_items, dist.from_main(plan)


def setup(config, dist, name_given: bool = False) -> "Run":
    """Everything before the first epoch, in the contract's order; the run folder is created only once the models
    loaded, so a failed start leaves nothing behind."""
    budget, prompt_source, eval_items, plan = start_checks(config, dist, name_given)
    if dist.is_main:
        what = (f"resuming {os.path.basename(plan.resume_dir)} (epoch {plan.resume_state['epoch']})"
                if plan.resume_dir else "new run")
        logger.info("run folder: %s (%s)", plan.run_dir, what)
        trained_on = int(plan.resume_state.get("world_size", dist.world_size) if plan.resume_dir else dist.world_size)
        if trained_on != dist.world_size:
            logger.warning("the checkpoint was trained on %d processes, this run has %d: %s", trained_on,
                           dist.world_size, "the same numbers up to rounding, since every process draws the same "
                           "samples (quirks.same_seed_all_ranks)" if config.quirks.same_seed_all_ranks else
                           f"each update now averages the gradients of {dist.world_size} process(es), not {trained_on}")
    device, dtype = dist.device, weight_dtype(config.training.mixed_precision)
    reward_fn = pipe = error = None
    try:  # the reward weights and the models can be missing or unreadable on one node only
        reward_fn = build_reward(config.experiment.reward_fn, dict(config.experiment.reward_options), device)
        random.seed(config.seed)
        np.random.seed(config.seed)
        torch.manual_seed(config.seed)  # LoRA initialisations: the same draws on every rank
        if config.training.allow_tf32 and device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        pipe = load_models(config, device, dtype)
    except RewardLoadError as failed:
        error = config_check.ConfigError(str(failed))
    except config_check.ConfigError as failed:
        error = failed
    agree(dist, error)
    transformer = pipe.transformer
    base_for_value = None
    if config.model.use_value_net and config.model.value_net_param != "small":
        import copy

        base_for_value = copy.deepcopy(transformer)  # the base model, before the policy adapter
    transformer.add_adapter(lora_config(config.model.lora_rank), adapter_name="default")
    transformer.set_adapter("default")
    policy_params = [p for n, p in transformer.named_parameters() if p.requires_grad]
    for p in policy_params:
        p.data = p.data.float()  # LoRA weights (and their optimizer state) in fp32
    if config.training.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    value = None
    value_params = []
    if config.model.use_value_net:
        module = build_value_net(config.model.value_net_param, base_for_value if base_for_value is not None
                                 else transformer, config, device, dtype)
        del base_for_value
        value = ValueNet(module, config.model.value_net_param, config.quirks.value_net_negative_embeds)
        value_params = list(module.parameters())  # all of them, as upstream (frozen ones get no gradient)
    dist.broadcast_(policy_params + [p for p in value_params if p.requires_grad])

    groups = [{"params": policy_params, "lr": config.training.lr}]
    if value_params:
        groups.append({"params": value_params, "lr": config.training.lr})
    optimizer = torch.optim.AdamW(groups, betas=(config.training.adam_beta1, config.training.adam_beta2),
                                  weight_decay=config.training.adam_weight_decay, eps=config.training.adam_epsilon)
    scaler = None
    if config.training.mixed_precision == "fp16":
        scaler = torch.amp.GradScaler(device.type, growth_interval=config.training.gradscaler_growth_interval)
    sigmas, timesteps = scheduler_schedule(pipe.scheduler, config.sampling.num_steps, device)
    timer = PhaseTimer(device)
    leaf_dtype = None if config.quirks.rgrad_leaf_weight_dtype else torch.float32
    reward_grad = RewardGrad(reward_fn, pipe.vae, config.training.quantile_clipping, config.quirks.clip_shrink)
    algorithm = VGGFlow(
        GuidedVelocity(transformer, config.sampling.guidance_scale), reward_grad, sigmas, timesteps,
        reward_scale=config.model.reward_scale, eta_mode=config.model.eta_mode,
        reward_masking=config.training.reward_masking, unet_reg_scale=config.model.unet_reg_scale,
        use_saved_rgrad_x1=config.training.use_saved_rgrad_x1, value_net=value,
        coeff_terminal=config.training.coeff_terminal, detach_dir=config.training.detach_dir,
        finite_differences=config.training.finite_differences, leaf_dtype=leaf_dtype,
        value_autocast=torch.bfloat16 if dtype != torch.float32 else None, timer=timer)
    eval_vae = load_full_vae(config, device) if (config.eval.enabled and config.eval.decoder == "vae") else None

    state, hosts, error = plan.resume_state, dist.hosts(), None
    try:  # global rank 0 alone writes the run folder
        if dist.is_main:
            run_folder.create_run_dir(plan, state["metrics_lines"] if state else None)
        metric_logger = MetricLogger(plan.run_dir, config, dist.is_main)
        if dist.is_main:
            run_folder.write_start_files(plan.run_dir, config, dist.world_size, device, plan.resume_dir, hosts)
    except BaseException as failed:
        if dist.is_main:
            run_folder.remove_if_empty_start(plan)
        error = failed
    agree(dist, error)
    run = Run(config, dist, budget, pipe, transformer, pipe.vae, reward_fn, reward_grad, algorithm, value,
              policy_params, value_params, optimizer, scaler, sigmas, timesteps, prompt_source, eval_items,
              plan.run_dir, metric_logger, timer, dtype, eval_vae=eval_vae, plan=plan)
    if state is not None:
        apply_state(run, state)
        run.last_checkpoint = plan.resume_dir
    if dist.is_main:
        logger.info("budget: %s", budget.summary())
    return run


# ------------------------------------------------------------------------------------------------ logging

class MetricLogger:
    """`<run_dir>/metrics.jsonl` on the main process (strict JSON, `"kind": "step"` per optimizer step and
    `"kind": "epoch"` per epoch), the same records to wandb when it is on. `lines` counts the file's records."""

    def __init__(self, run_dir: str, config, is_main: bool):
        self.is_main, self.path, self.wandb, self.lines = is_main, os.path.join(run_dir, run_folder.METRICS_FILE), None, 0
        if not is_main:
            return
        if os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as f:
                self.lines = sum(1 for _ in f)
        mode = wandb_mode(config)
        if mode != "disabled":
            try:
                import wandb
            except ImportError:
                logger.warning("wandb is not installed; metrics go to %s only", self.path)
                return
            self.wandb = wandb.init(project=config.logging.proj_name, name=os.path.basename(run_dir), mode=mode,
                                    config=config.to_dict(), dir=os.path.abspath(config.logging.wandb_dir))
            for metric, axis in (("reward_*", "epoch"), ("eval_*", "epoch"), ("time_per_epoch", "epoch"),
                                 ("images", "epoch"), ("*", "global_step")):
                self.wandb.define_metric(metric, step_metric=axis)

    def log(self, record: dict, kind: str) -> None:
        if not self.is_main:
            return
        clean = run_folder.strict({"kind": kind, **{k: _plain_number(v) for k, v in record.items()}})
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean, allow_nan=False) + "\n")
        self.lines += 1
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in clean.items() if isinstance(v, (int, float))})

    def log_images(self, images: torch.Tensor, prompts, rewards, epoch: int) -> None:
        """The last rollout batch: `images/epoch_<epoch>.jpg` (256 px tiles) and wandb `images` captioned
        "<prompt> | <reward>"."""
        if not self.is_main or images.shape[0] == 0:
            return
        from PIL import Image

        tiles = torch.nn.functional.interpolate(images.detach().float().cpu().clamp(0, 1), size=(256, 256),
                                                mode="bilinear", antialias=True, align_corners=False)
        pixels = (tiles * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # [n, 256, 256, 3]
        columns = min(len(pixels), 4)
        rows = -(-len(pixels) // columns)
        grid = np.zeros((rows * 256, columns * 256, 3), dtype=np.uint8)
        for i, tile in enumerate(pixels):
            r, c = divmod(i, columns)
            grid[r * 256:(r + 1) * 256, c * 256:(c + 1) * 256] = tile
        folder = os.path.join(os.path.dirname(self.path), "images")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(grid).save(os.path.join(folder, f"epoch_{epoch}.jpg"), quality=90)
        if self.wandb is not None:
            import wandb

            self.wandb.log({"epoch": epoch, "images": [
                wandb.Image(Image.fromarray(p), caption=f"{prompt} | {float(r):.2f}")
                for p, prompt, r in zip(pixels, prompts, rewards)]})

    def finish(self):
        if self.wandb is not None:
            self.wandb.finish()


def wandb_mode(config) -> str:
    """wandb runs only with a key (spec §10 I1): `auto`/`online` need WANDB_API_KEY; `offline` writes locally."""
    if not config.logging.use_wandb or config.logging.wandb_mode == "disabled":
        return "disabled"
    if config.logging.wandb_mode == "offline":
        return "offline"
    return "online" if os.environ.get("WANDB_API_KEY") else "disabled"


def _plain_number(value):
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.floating):
        return float(value)
    return value


def progress(run: Run, iterable, desc: str):
    """tqdm on the main process when stderr is a terminal; the bare iterable otherwise."""
    if not (run.dist.is_main and sys.stderr.isatty()):
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)


# ------------------------------------------------------------------------------------------------ phases

def sample_epoch(run: Run, epoch: int) -> dict:
    """Phase 1 (spec §3): `num_batches_per_epoch` rollout batches on this process, concatenated."""
    config, dist = run.config, run.dist
    rank_key = () if config.quirks.same_seed_all_ranks else (dist.rank,)
    run.transformer.eval()
    batches, last_images, error = [], None, None
    try:
        for b in progress(run, range(config.sampling.num_batches_per_epoch), f"epoch {epoch + 1} sampling"):
            record, images, prompts = _sample_batch(run, epoch, b, rank_key)
            batches.append(record)
            last_images = (images, prompts, record["rewards"])
    except DivergenceError as failed:  # with quirks.same_seed_all_ranks=False one process can diverge alone
        error = failed
    agree(dist, error, DivergenceError)
    samples = concatenate(batches)
    everyone = dist.gather(samples["rewards"].double()).reshape(-1).cpu().numpy()
    run.epoch_info.update({"reward_mean": float(everyone.mean()), "reward_std": float(everyone.std()),
                           "samples_this_epoch": int(everyone.size)})
    run.logger.log_images(*last_images, epoch=epoch + 1)
    return samples


def _sample_batch(run: Run, epoch: int, b: int, rank_key: tuple):
    """Rollout batch `b` of the epoch: (record, decoded images, prompts)."""
    config, dist = run.config, run.dist
    rng = random.Random(seed_from(config.seed, epoch, b, 11, *rank_key))
    drawn = [run.prompt_source.draw(rng) for _ in range(config.sampling.batch_size)]
    prompts, metadata = [p for p, _ in drawn], [m for _, m in drawn]
    noise = generator(config.seed, epoch, b, 13, *rank_key, device=_generator_device(run))
    try:
        record, images = rollout_batch(
            pipe=run.pipe, transformer=run.transformer, vae=run.vae, reward_fn=run.reward_fn,
            reward_grad=run.reward_grad, prompts=prompts, metadata=metadata, sigmas=run.sigmas,
            timesteps=run.timesteps, guidance_scale=config.sampling.guidance_scale, generator=noise,
            device=dist.device, weight_dtype=run.dtype, keep_velocities=config.model.unet_reg_scale > 0,
            terminal_gradient=config.training.use_saved_rgrad_x1, leaf_dtype=run.algorithm.leaf_dtype,
            timer=run.timer)
    except NonFiniteRollout:
        raise DivergenceError(
            f"training diverged at epoch {epoch + 1} (sampling): the policy after step {run.global_step} produces "
            f"non-finite latents; last checkpoint: {run.last_checkpoint or 'none saved yet'}; lower training.lr "
            "and resume from an earlier checkpoint") from None
    return record, images, prompts


def _generator_device(run: Run):
    return run.dist.device if run.dist.device.type == "cuda" else "cpu"


def train_epoch(run: Run, samples: dict, epoch: int) -> None:
    """Phase 2 (spec §5.1, §5.7): `num_inner_epochs` passes; each shuffles, subsamples when timestep_fraction < 1,
    splits into micro-batches and runs K timesteps each, one optimizer step per `gradient_accumulation_steps`
    micro-batches."""
    config, budget = run.config, run.budget
    rank_key = () if config.quirks.same_seed_all_ranks else (run.dist.rank,)
    num_steps, fraction = config.sampling.num_steps, config.model.timestep_fraction
    accumulation = config.training.gradient_accumulation_steps
    for inner in range(config.training.num_inner_epochs):
        data = shuffle(samples, generator(config.seed, epoch, inner, 17, *rank_key, device=_generator_device(run)))
        if fraction < 1:
            columns = train_step_columns(num_steps, fraction, len(data["prompts"]),
                                         generator(config.seed, epoch, inner, 19, *rank_key),
                                         config.sampling.low_var_subsampling, config.quirks.clamp_step_zero)
            data = subsample(data, columns)
        run.transformer.train()
        if run.value is not None:
            run.value.module.train()
        window = []
        batches = micro_batches(data, config.training.batch_size)
        for index, batch in enumerate(progress(run, batches, f"epoch {epoch + 1} training")):
            text = torch.cat([batch["negative_prompt_embeds"], batch["prompt_embeds"]])  # [2B_t, L, D]
            pooled = torch.cat([batch["negative_pooled_prompt_embeds"], batch["pooled_prompt_embeds"]])
            for k in range(budget.train_timesteps):
                step = StepBatch(
                    x=batch["latents"][:, k].detach(), s=batch["timesteps"][:, k], step=batch["step_index"][:, k],
                    text=text, pooled=pooled, prompts=batch["prompts"], metadata=batch["prompt_metadata"],
                    rewards=batch["rewards"], rgrad_x1=batch.get("rgrad_x1"),
                    rollout_velocity=batch["unet_outputs"][:, k] if "unet_outputs" in batch else None)
                loss, stats = run.algorithm.step(step, run.tau)
                scaled = loss / budget.loss_divisor
                (run.scaler.scale(scaled) if run.scaler is not None else scaled).backward()
                stats.update(norm_records(stats["rgrad_norm"]))
                stats["loss"], stats["loss_total"] = scaled.detach(), loss.detach()
                window.append(stats)
            if (index + 1) % accumulation == 0:
                optimizer_step(run, window, epoch)
                window = []


def optimizer_step(run: Run, window: list, epoch: int) -> None:
    """Average gradients over processes, unscale (fp16), clip the policy and the value net separately, check that
    loss, gradient norms and weights are finite (contract §6), step, and log the update's diagnostics; tau becomes
    the update's `rgrad_08quantile` (spec §5.7). The whole step reads the device once."""
    config, dist = run.config, run.dist
    dist.average_gradients(run.policy_params + [p for p in run.value_params if p.requires_grad])
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    max_norm = config.training.max_grad_norm
    extra = {"grad_norm": torch.nn.utils.clip_grad_norm_(run.policy_params, max_norm)}
    if run.value_params:
        extra["value_grad_norm"] = torch.nn.utils.clip_grad_norm_(
            [p for p in run.value_params if p.requires_grad], max_norm)
    weights = run.policy_params + [p for p in run.value_params if p.requires_grad]
    extra["weights_finite_min"] = torch.stack([torch.isfinite(p).all() for p in weights]).all().double()
    for record in window:  # the update-level values join the window once (the first record)
        record.update({k: v.detach().double() for k, v in extra.items()})
        break
    metrics = aggregate(window, dist.world_size, dist.gather, config.quirks.single_rank_quantile)
    weights_ok = metrics.pop("weights_finite_min") == 1.0
    run.global_step += 1
    metrics.update({"global_step": run.global_step, "epoch": epoch + 1, "tau": run.tau})
    bad = [(name, metrics[key]) for name, key in (("loss", "loss_total"), ("gradient norm", "grad_norm"),
                                                   ("value-net gradient norm", "value_grad_norm"))
           if key in metrics and not math.isfinite(metrics[key])]
    if run.scaler is not None:  # fp16: the scaler skips steps with non-finite gradients by itself
        bad = [b for b in bad if b[0] == "loss"]
    if not weights_ok:
        bad.append(("weights (after the previous step)", float("nan")))
    if bad:
        run.optimizer.zero_grad(set_to_none=True)
        if config.training.nan_policy == "skip" and weights_ok:
            run.skipped_steps += 1
            run.logger.log({**metrics, "skipped_step": 1}, "step")
            logger.warning("step %d: non-finite %s; step skipped (training.nan_policy=skip, %d skipped so far)",
                           run.global_step, " and ".join(n for n, _ in bad), run.skipped_steps)
            return
        run.logger.log(metrics, "step")
        raise DivergenceError(
            f"training diverged at epoch {epoch + 1}, step {run.global_step}: non-finite "
            f"{' and '.join(f'{name} ({value})' for name, value in bad)}; last good checkpoint: "
            f"{run.last_checkpoint or 'none saved yet'}; lower training.lr and resume from it, or pass "
            "--config.training.nan_policy=skip to skip such steps")
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
        metrics["grad_scale"] = float(run.scaler.get_scale())
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.logger.log(metrics, "step")
    run.tau = metrics["rgrad_08quantile"]
    run.step_records.append(metrics)
    if run.dist.is_main:
        logger.info("global_step=%d  %s", run.global_step, " ".join(
            f"{k}={v:.6g}" for k, v in metrics.items() if k not in ("global_step", "epoch")))


# ------------------------------------------------------------------------------------------------ evaluation

@torch.no_grad()
def evaluate(run: Run) -> dict:
    """Spec §9.6 with C6/I11 fixed: this process's strided share of the evaluation prompts in batches of
    `sampling.batch_size`, the noise seeded by item (the training draws are untouched), the current policy, CFG, N
    steps; the reward of the decode (TAESD3, or the full SD3 VAE with eval.decoder='vae') and the transition drift
    of the evaluation trajectories. No collective inside the loop (uneven shares cannot hang); one sum at the end."""
    config, dist = run.config, run.dist

    def check_finite(latents):
        if not bool(torch.isfinite(latents[:, -1]).all()):
            raise DivergenceError(
                f"training diverged by epoch {run.epoch} (evaluation): the policy after step {run.global_step} "
                f"produces non-finite latents; last checkpoint: {run.last_checkpoint or 'none saved yet'}; lower "
                "training.lr and resume from an earlier checkpoint")

    run.transformer.eval()
    sums, error = None, None
    try:  # each process evaluates other prompts: one of them can find non-finite latents alone
        sums, _ = score_items(
            pipe=run.pipe, transformer=run.transformer, vae=run.eval_vae if run.eval_vae is not None else run.vae,
            reward_fn=run.reward_fn, items=run.eval_items,
            indices=list(range(dist.rank, len(run.eval_items), dist.world_size)), sigmas=run.sigmas,
            timesteps=run.timesteps, guidance_scale=config.sampling.guidance_scale,
            batch_size=config.sampling.batch_size, seed=config.seed, device=dist.device, dtype=run.dtype,
            check_finite=check_finite, progress=lambda it: progress(run, it, "evaluation"))
    except DivergenceError as failed:
        error = failed
    agree(dist, error, DivergenceError)
    dist.sum_(sums)
    return {"eval_reward_mean": (sums[0] / sums[1].clamp(min=1)).item(),
            "eval_transition_drift": (sums[2] / sums[3].clamp(min=1)).item(),
            "eval_prompts": len(run.eval_items), "eval_decoder": config.eval.decoder}


# ------------------------------------------------------------------------------------------------ checkpoints

def save_checkpoint(run: Run, epoch: int, metrics_lines: int) -> str:
    """`checkpoint-<epoch>`: the policy LoRA (diffusers format) and the full training state, written by the main
    process once every process checked that the replicas agree."""
    _check_replicas_agree(run)
    path = os.path.join(run.run_dir, run_folder.CHECKPOINTS_DIR, f"checkpoint-{epoch}")
    if run.dist.is_main:
        state = {
            "config_json": json.dumps(run.config.to_dict()), "epoch": epoch, "global_step": run.global_step,
            "samples": run.samples, "elapsed_s": elapsed(run), "skipped_steps": run.skipped_steps, "tau": run.tau,
            "metrics_lines": metrics_lines, "world_size": run.dist.world_size,
            "policy": [p.detach().cpu().clone() for p in run.policy_params],
            "value": [p.detach().cpu().clone() for p in run.value_params if p.requires_grad],
            "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler is not None else None,
            "prompts": run.prompt_source.state_dict(), "rng": checkpoints.rng_state(),
        }
        path = checkpoints.save(run.run_dir, epoch, lambda d: checkpoints.save_lora(run.transformer, d), state,
                                run.config.logging.num_checkpoint_limit)
    run.dist.barrier()
    run.last_checkpoint = path
    return path


def _check_replicas_agree(run: Run) -> None:
    if run.dist.world_size == 1:
        return
    weights = run.policy_params + [p for p in run.value_params if p.requires_grad]
    local = torch.stack([p.detach().double().sum() for p in weights]).to(run.dist.device)
    everyone = run.dist.gather(local)
    if bool((everyone - everyone[:1]).abs().max() > 0):
        raise RuntimeError("LoRA weights differ between processes; gradients were not averaged identically")


def apply_state(run: Run, state: dict) -> None:
    """Restore what `save_checkpoint` wrote; training continues with epoch `state["epoch"]`."""
    value_trainable = [p for p in run.value_params if p.requires_grad]
    for saved, live, what in ((state["policy"], run.policy_params, "policy LoRA"), (state["value"], value_trainable,
                                                                                    "value net")):
        if len(saved) != len(live) or any(s.shape != p.shape for s, p in zip(saved, live)):
            raise config_check.ConfigError(f"--resume={run.config.saving.resume_from!r}: its {what} tensors do not fit "
                                           f"this model ({len(saved)} saved, {len(live)} here)")
        with torch.no_grad():
            for p, s in zip(live, saved):
                p.copy_(s.to(p.device))
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scaler is not None and state["scaler"] is not None:
        run.scaler.load_state_dict(state["scaler"])
    run.prompt_source.load_state_dict(state["prompts"])
    checkpoints.set_rng_state(state["rng"])
    run.epoch, run.global_step, run.samples = int(state["epoch"]), int(state["global_step"]), int(state["samples"])
    run.elapsed_before, run.skipped_steps, run.tau = float(state["elapsed_s"]), int(state["skipped_steps"]), float(state["tau"])
    if run.dist.is_main:
        logger.info("resumed at epoch %d, step %d", run.epoch, run.global_step)


# ------------------------------------------------------------------------------------------------ the loop

def elapsed(run: Run) -> float:
    return run.elapsed_before + time.time() - run.started


def peak_memory(device) -> dict:
    """Peak memory of the epoch (MiB): the CUDA allocator's peak (reset after reading), or on a CPU the process's
    peak resident set so far."""
    if torch.device(device).type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        return {"peak_memory_mib": peak, "peak_memory_kind": "cuda_allocated"}
    import resource

    return {"peak_memory_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_memory_kind": "cpu_max_rss"}


def train_one_epoch(run: Run, epoch: int) -> dict:
    """sample -> train; returns the epoch's time split."""
    config = run.config
    run.timer.reset()
    run.epoch_info, run.step_records = {}, []
    if config.quirks.reset_threshold_each_epoch:
        run.tau = 1.0  # upstream resets tau every epoch (spec §5.7 step 5, §10 N2)
    run.epoch_info["tau"] = run.tau
    calls_before = run.reward_grad.calls
    with run.timer("rollout"):
        samples = sample_epoch(run, epoch)
    sampling_calls = run.reward_grad.calls - calls_before
    with run.timer("train"):
        train_epoch(run, samples, epoch)
    run.epoch_info["reward_grad_calls_sampling"] = sampling_calls
    run.epoch_info["reward_grad_calls_training"] = run.reward_grad.calls - calls_before - sampling_calls
    totals = run.timer.totals
    return {"sample_time_per_epoch": totals.get("rollout", 0.0), "train_time_per_epoch": totals.get("train", 0.0),
            "reward_grad_time_per_epoch": totals.get("reward_grad", 0.0)}


def finish_epoch(run: Run, epoch: int, timings: dict) -> None:
    """After 0-based epoch `epoch`: evaluate and save when due (upstream's `epoch % every == 0 or last`), write the
    epoch's record (contract keys beside the component's) and console line."""
    config = run.config
    run.epoch = epoch + 1
    run.samples += int(run.epoch_info.get("samples_this_epoch", 0))
    steps = run.step_records
    record = {"epoch": run.epoch, "global_step": run.global_step, "samples": run.samples,
              "reward_mean": run.epoch_info.get("reward_mean"), "reward_std": run.epoch_info.get("reward_std"),
              "loss": float(np.mean([s["loss_total"] for s in steps])) if steps else None,
              "loss_raw": float(np.mean([s["loss_raw"] for s in steps])) if steps else None,
              **timings, "optimizer_updates_this_epoch": len(steps), "skipped_steps": run.skipped_steps,
              **peak_memory(run.dist.device)}
    record.update({k: v for k, v in run.epoch_info.items() if k not in record})
    last = run.epoch == config.training.num_epochs
    if config.eval.enabled and (epoch % config.eval.every_epochs == 0 or last):
        started = time.time()
        record.update(evaluate(run))
        record["eval_time"] = time.time() - started
    record["elapsed_s"] = elapsed(run)
    if epoch % config.logging.save_freq == 0 or last:
        weights = run.policy_params + [p for p in run.value_params if p.requires_grad]
        if not checkpoints.all_finite(weights):
            raise DivergenceError(f"training diverged in epoch {run.epoch}: the weights are non-finite after step "
                                  f"{run.global_step}; not saving them (last good checkpoint: "
                                  f"{run.last_checkpoint or 'none saved yet'})")
        record["checkpoint_path"] = save_checkpoint(run, run.epoch, metrics_lines=run.logger.lines + 1)
    run.logger.log(record, "epoch")
    if run.dist.is_main:
        logger.info(console_line(record, config.training.num_epochs))


def console_line(record: dict, num_epochs: int) -> str:
    """`epoch 3/201  reward 0.2712 ± 0.0123  loss 0.0123  45.2 s  0.18 samples/s  eval 0.2801  saved <path>`"""
    def number(value, spec):
        return format(value, spec) if isinstance(value, (int, float)) and math.isfinite(value) else "nan"

    parts = [f"epoch {record['epoch']}/{num_epochs}",
             f"reward {number(record.get('reward_mean'), '.4f')} ± {number(record.get('reward_std'), '.4f')}",
             f"loss {number(record.get('loss'), '.4g')}", f"{record['time_per_epoch']:.1f} s"]
    if record.get("samples_this_epoch"):
        parts.append(f"{record['samples_this_epoch'] / max(record['time_per_epoch'], 1e-9):.2f} samples/s")
    if record.get("eval_reward_mean") is not None:
        parts.append(f"eval {number(record['eval_reward_mean'], '.4f')}")
    if record.get("skipped_steps"):
        parts.append(f"skipped steps {record['skipped_steps']}")
    if record.get("checkpoint_path"):
        parts.append(f"saved {record['checkpoint_path']}")
    return "  ".join(parts)


def train(config, dist, name_given: bool = False) -> Run:
    """Set up, then epochs until training.num_epochs; a closing summary on the main process."""
    run = setup(config, dist, name_given)
    first = run.epoch
    kernel = contextlib.nullcontext()
    if config.training.use_jvp:  # upstream's only effect of the flag: the math SDPA kernel
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernel = sdpa_kernel(SDPBackend.MATH)
    try:
        with kernel:
            while run.epoch < config.training.num_epochs:
                epoch, started = run.epoch, time.time()
                timings = train_one_epoch(run, epoch)
                finish_epoch(run, epoch, {"time_per_epoch": time.time() - started, **timings})
    except BaseException:
        if dist.is_main and run.logger.lines == 0:
            run_folder.remove_if_empty_start(run.plan)  # a start that failed before its first record leaves nothing
        raise
    if dist.is_main:
        logger.info("done: %d epochs (%d this start), %d optimizer steps, %d samples, %.0f s; run folder %s%s",
                    run.epoch, run.epoch - first, run.global_step, run.samples, elapsed(run), run.run_dir,
                    f"; last checkpoint {run.last_checkpoint}" if run.last_checkpoint else "")
    run.logger.finish()
    return run
