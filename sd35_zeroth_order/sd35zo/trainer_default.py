"""The default trainer (Flow-GRPO baseline, `--sampler default`; spec §3.4, §4.7, §7.9 "train_sd3.py").

    per epoch e:   sample (full SDE trajectories) -> score -> advantages (per prompt) -> select samples
                   -> update (one micro-step per trained transition) -> log/eval/checkpoint

One reward per trajectory, shared by its T trained transitions. What differs from the branch trainer lives
here: the per-epoch prompt batches (`EpochPromptSampler`), prompt-text grouping with the batch-wide std
(`sample.global_std`), dropping samples whose advantage is zero, and the training order (per training batch,
transitions j = 0..T-1 one after the other, each one backward pass). The row loss (ppo / matching + KL),
set-up, evaluation and checkpoints are `trainer_common`'s.

Zero advantages (spec §4.7, rough edge 12): upstream restarted the epoch with the same prompts when no sample
survived, which also deadlocks when it happens on one process only. Here: if every advantage of the epoch
is zero on every process, the epoch trains nothing (logged as `skipped_update`) and the next epoch draws new
prompts; if only this process has none, it trains on all its samples (their policy loss is zero; the KL
term still acts), so every process takes the same optimizer steps.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch

from .advantages import gather_group_advantages, mean_group_size, mean_group_std, zero_std_ratio
from .prompt_samplers import EpochPromptSampler
from .rewards import reward_pool, submit_scores
from .sampling import decode_latents, initial_latents, sample_sde_trajectory
from .trainer_common import (IMAGE_LOG_EVERY, Run, collate, count_inner_epoch_updates, ema_step, optimizer_step,
                             policy_velocity, progress, reward_statistics, rows_loss, run_epochs, seeded_generator,
                             setup as setup_common)

__all__ = ["setup", "train", "select_training_samples"]

logger = logging.getLogger("sd35zo.trainer_default")


def _epoch_sampler(config, num_prompts, accelerator):
    return EpochPromptSampler(num_prompts, config.sample.train_batch_size, config.sample.num_image_per_prompt,
                              config.sample.num_prompt_per_epoch, accelerator.num_processes,
                              accelerator.process_index, seed=config.seed)


def _every_trained_step(schedule):
    """The eval KL probe visits every trained transition with weight 1 (spec §8.1)."""
    return [1.0] * len(schedule)


def setup(config, accelerator) -> Run:
    return setup_common(config, accelerator, "default", _epoch_sampler, _every_trained_step)


# ------------------------------------------------------------------------------------------------ phases

def sample_epoch(run: Run, epoch: int) -> dict:
    """Phase 1+2: this rank's `num_batches_per_epoch` rollouts of `train_batch_size` full SDE trajectories,
    each scored (strict GenEval for training) on a worker thread while the next one samples."""
    config, acc = run.config, run.accelerator
    device, rank, steps = acc.device, acc.process_index, run.budget.train_steps
    matching = config.train.loss_type == "matching"
    guard = config.train.reweight_type == "grpo_guard"
    run.sampler.set_epoch(epoch)
    rollouts, futures, prompts = [], [], []
    pool = reward_pool()
    run.transformer.eval()
    images = None
    batches = run.sampler.epoch_batches(epoch)
    for b, indices in progress(run, enumerate(batches), f"epoch {epoch + 1} sampling", total=len(batches)):
        batch = collate(run.train_set, indices)
        embeds = batch["prompt_embeds"].to(device)  # [B, S, D]
        pooled = batch["pooled_prompt_embeds"].to(device)  # [B, Dp]
        gen = seeded_generator(config.seed, rank, epoch, b, device=device)
        x0 = initial_latents(embeds.shape[0], config.resolution, generator=gen, device=device)  # [B, C, h, w]
        trajectory = sample_sde_trajectory(policy_velocity(run, embeds, pooled), x0, run.sigmas,
                                           noise_level=config.sample.noise_level, generator=gen,
                                           keep_prev_sample_mean=guard, keep_matching_aux=matching)
        images = decode_latents(run.vae, trajectory.final_latents, chunk_size=config.get("latent_chunk_size"))
        futures.append(submit_scores(pool, run.reward, images, batch["prompts"], batch["metadatas"]))
        # only transitions j < T train (the step to sigma = 0 never does, spec §3.4); ppo does not need ε, v_old
        kept = {"latents": trajectory.latents, "next_latents": trajectory.next_latents,
                "log_probs": trajectory.log_probs, "timesteps": trajectory.timesteps,
                "mean_old": trajectory.prev_sample_mean if guard else None,
                "noises": trajectory.noises, "v_old": trajectory.noise_preds}
        rollouts.append(({k: v[:, :steps] for k, v in kept.items() if v is not None}, embeds, pooled))
        prompts.extend(batch["prompts"])
        run.seen_prompts.update(batch["prompts"])
    sampled_at = time.time()
    scores = [f.result() for f in futures]
    pool.shutdown()
    return {"rollouts": rollouts, "scores": scores, "prompts": prompts, "last_images": images,
            "reward_wait_time": time.time() - sampled_at}


def compute_advantages(run: Run, sampled: dict, epoch: int) -> tuple[torch.Tensor, dict, bool]:
    """Phase 3 (spec §4.5, default trainer): one advantage per trajectory `[S]` (the same for its T
    transitions), the metrics, and whether any advantage of any process is nonzero. Grouped by prompt text
    across every process, with the batch-wide std when `sample.global_std`; a plain z-score over the batch
    when per-prompt tracking is off or there is one image per prompt. Prompts are grouped by their dataset
    text (upstream: CLIP-decoded, lower-cased text)."""
    config = run.config
    rewards = {k: torch.cat([s[k] for s in sampled["scores"]]) for k in sampled["scores"][0]}
    per_prompt = config.per_prompt_stat_tracking and config.sample.num_image_per_prompt > 1
    labels = sampled["prompts"] if per_prompt else ["batch"] * len(sampled["prompts"])
    gathered = gather_group_advantages(rewards["avg"], labels, adv_clip=float(config.train.adv_clip_max),
                                       global_std=config.sample.global_std and per_prompt)
    metrics = {"group_size": mean_group_size(gathered.all_labels),
               "zero_std_ratio": zero_std_ratio(gathered.all_rewards, gathered.all_labels),
               "reward_std_mean": mean_group_std(gathered.all_rewards, gathered.all_labels),
               "trained_prompt_num": len(run.seen_prompts), **reward_statistics(run, rewards)}
    sampled["rewards"] = rewards
    return gathered.local, metrics, bool((gathered.all_advantages != 0).any())


def select_training_samples(advantages: torch.Tensor, num_batches: int, any_nonzero_anywhere: bool,
                            generator: torch.Generator) -> Optional[torch.Tensor]:
    """Which of this rank's samples train (spec §4.7): those with a nonzero advantage, topped up with
    randomly chosen zero-advantage samples to the next multiple of `num_batches` (so the samples split into
    `num_batches` equal training batches). `advantages` `[S]`, S a multiple of num_batches. Returns sample
    indices (ascending), or None when no advantage of the epoch is nonzero on any process (nothing to learn).
    A rank whose own advantages are all zero while another's are not trains on all of its samples."""
    if not any_nonzero_anywhere:
        return None
    nonzero = (advantages != 0).nonzero().flatten()  # [K]
    if nonzero.numel() == 0:
        return torch.arange(advantages.shape[0])
    zero = (advantages == 0).nonzero().flatten()
    short = -nonzero.numel() % num_batches  # zero-advantage samples needed to fill the last batch
    extra = zero[torch.randperm(zero.numel(), generator=generator)[:short]]
    return torch.cat([nonzero, extra]).sort().values


def build_rows(sampled: dict) -> tuple[dict, dict]:
    """One table of training rows, row s·T + j = transition j of sample s (the layout `rows_loss` reads),
    and the samples' prompt embeddings (`prompt_embeds` [S, ...], `pooled` [S, ...])."""
    per_key, embeds, pooled = {}, [], []
    for stored, e, p in sampled["rollouts"]:
        for key, value in stored.items():
            per_key.setdefault(key, []).append(value)  # [B, T, ...]
        embeds.append(e)
        pooled.append(p)
    samples, steps = sum(e.shape[0] for e in embeds), per_key["log_probs"][0].shape[1]
    table = {k: torch.cat(v).flatten(0, 1) for k, v in per_key.items()}  # [S·T, ...]
    table["sample"] = torch.arange(samples, device=table["latents"].device).repeat_interleave(steps)
    table["step"] = torch.arange(steps, device=table["latents"].device).repeat(samples)  # row s·T + j: step j
    return table, {"prompt_embeds": torch.cat(embeds), "pooled": torch.cat(pooled)}


def update(run: Run, table: dict, prompts: dict, advantages: torch.Tensor, chosen: torch.Tensor, epoch: int) -> None:
    """Phase 4: per inner epoch, shuffle the chosen samples into `num_batches_per_epoch` training batches; for
    each batch and each trained transition j one backward pass of the mean row loss over the batch; an
    optimizer step every `gradient_accumulation` passes (2 per epoch); EMA after each batch (spec §4.7)."""
    config, budget = run.config, run.budget
    steps, num_batches, accum = budget.train_steps, budget.rollouts_per_epoch, budget.gradient_accumulation
    adv = advantages.cpu()
    run.epoch_metrics["actual_batch_size"] = chosen.numel() // num_batches
    run.transformer.train()
    no_anchor = torch.zeros(0, dtype=torch.long)
    for inner in range(config.train.num_inner_epochs):
        gen = seeded_generator(config.seed, run.accelerator.process_index, epoch, inner, 7)
        batches = chosen[torch.randperm(chosen.numel(), generator=gen)].reshape(num_batches, -1)  # [nb, b]
        steps_before, window, passes = run.global_step, [], 0
        for batch in progress(run, batches, f"epoch {epoch + 1} training"):
            ones = torch.ones(batch.numel())
            for j in range(steps):
                rows = batch * steps + j  # transition j of each sample in the batch
                loss, stats = rows_loss(run, table, {}, prompts, rows, no_anchor, adv[batch], ones.bool(), ones,
                                        per_timestep_clipfrac=False)
                (loss / accum).backward()
                window.append(stats)
                passes += 1
                if passes % accum == 0:
                    optimizer_step(run, window, epoch=epoch, inner_epoch=inner)
                    window = []
            ema_step(run)  # after each training batch, as upstream (spec §7.3), unless train.ema_once_per_step
        count_inner_epoch_updates(run, steps_before)


# ------------------------------------------------------------------------------------------------ the loop

def train_one_epoch(run: Run, epoch: int) -> dict:
    """sample + score -> advantages -> sample selection -> update; returns the phase timings."""
    started = time.time()
    sampled = sample_epoch(run, epoch)                                           # sample + score
    sample_time = time.time() - started - sampled["reward_wait_time"]
    advantages, adv_metrics, learnable = compute_advantages(run, sampled, epoch)  # advantages
    run.epoch_metrics.update(adv_metrics)
    if epoch % IMAGE_LOG_EVERY == 0:
        count = sampled["last_images"].shape[0]  # the last rollout's images (spec §7.7)
        run.logger.log_images(sampled["last_images"], sampled["prompts"][-count:],
                              sampled["rewards"]["avg"][-count:], epoch)
    gen = seeded_generator(run.config.seed, run.accelerator.process_index, epoch, 11)
    chosen = select_training_samples(advantages.cpu(), run.budget.rollouts_per_epoch, learnable, gen)
    table, prompts = build_rows(sampled)
    wait_time = sampled["reward_wait_time"]
    del sampled
    update_started = time.time()
    if chosen is None:
        logger.warning("epoch %d: every advantage is zero on every process; no update this epoch", epoch)
    else:
        update(run, table, prompts, advantages, chosen, epoch)                   # update
    return {"sample_time_per_epoch": sample_time, "reward_wait_time_per_epoch": wait_time,
            "train_time_per_epoch": time.time() - update_started, "skipped_update": int(chosen is None)}


def train(config, accelerator) -> Run:
    """Epochs until num_epochs; evaluate/save when the trained epoch count hits eval_freq / save_freq, and
    always after the last one."""
    return run_epochs(setup(config, accelerator), train_one_epoch)
