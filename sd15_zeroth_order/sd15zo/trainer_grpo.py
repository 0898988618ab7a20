"""The baseline trainer (`train_grpo.py`): PCPO, a DanceGRPO-style GRPO for SD1.5 (spec §6; Figure 4(b, c)).

    per epoch e:  sample (full stochastic trajectories) -> score -> advantages (blocks of G) -> update -> log/eval/save

Sampling: n_calls = P·G / sample_batch_size calls of sample_batch_size trajectories, every step stochastic
(η = sample_eta, PCPO's σ for uw-sigma), calls starting from the epoch's two shared initial latents; one reward per
trajectory. Training, per inner epoch: the trajectories in random order, each with its own random order of its
N − 1 trained time positions (the last step, t = 1, never trains); micro-batches of train_batch_size
trajectories, each iterated over its T = ⌊(N − 1)·train_timestep_fraction⌋ time columns, one backward pass per
column (the batch-mean row loss of spec §8.3); an optimizer update every train_gradient_accumulation_steps
micro-batches (window = accumulation × T backward passes; 2 updates an epoch in the preset).
"""
from __future__ import annotations

import logging
import time

import torch

from . import models as sd_models
from .advantages import block_advantages
from .losses import RATIO_ALGORITHMS
from .rewards import reward_pool, submit
from .sampling import call_latents, initial_latent_plan, sample_trajectory
from .trainer_common import (Run, approx_kl_rows, backward, encode, epoch_prompts, optimizer_step, predictor,
                             progress, reward_metrics, row_losses, run_epochs, seeded_generator, setup,
                             training_noise_pred, wants_approx_kl)

logger = logging.getLogger("sd15zo.trainer_grpo")
SAMPLE, TRAIN = 1, 2  # generator purposes


def sample_epoch(run: Run, epoch: int) -> dict:
    """Phases 1-2: this process's n_calls sampling calls, each scored on a worker thread while the next samples.
    Keeps, per trajectory, the first N − 1 steps: x_t, ξ, ε̂ (and x', ℓ for the ratio algorithms)."""
    c, models, acc = run.config, run.models, run.accelerator
    expanded = epoch_prompts(run, epoch)
    per_call, calls = c.sample_batch_size, run.budget.calls_per_epoch
    gen = seeded_generator(c.seed, acc.process_index, epoch, SAMPLE, device=run.device)
    plan = initial_latent_plan(calls, c.shared_initial_noise, models.latent_shape, gen, run.device)
    ratio = c.algorithm in RATIO_ALGORITHMS
    lam = "lambda" in c.algorithm
    pool, futures, stored = reward_pool(), [], []
    models.unet.eval()
    images = None
    for i in progress(run, range(calls), f"epoch {epoch + 1} sampling"):
        prompts = expanded[i * per_call:(i + 1) * per_call]
        _, cond = encode(run, prompts)  # [b, 77, D]
        x = call_latents(plan[i], per_call, models.latent_shape, gen, run.device)
        traj = sample_trajectory(predictor(run, cond), x, models.alphas_cumprod, run.timesteps, eta=c.sample_eta,
                                 algorithm=c.algorithm, const_weight=c.const_weight, generator=gen,
                                 predict_ref=predictor(run, cond, reference=True) if lam else None,
                                 clip_sample_range=c.clip_sample_range if c.clip_sample else None)
        images = sd_models.decode(models, traj.final_latents)
        futures.append(submit(pool, run.scorer, images, prompts))
        keep = run.timesteps.shape[0] - 1  # the last step (t = 1) is never trained
        item = {"cond": cond, "timesteps": run.timesteps[:keep].expand(per_call, keep),
                "latents": traj.latents[:, :keep], "noises": traj.noises[:, :keep],
                "noise_preds": traj.noise_preds[:, :keep]}
        if ratio:
            item.update(next_latents=traj.latents[:, 1:keep + 1], log_probs=traj.log_probs[:, :keep])
        stored.append(item)
        run.seen_prompts.update(prompts)
    sampled_at = time.time()
    rewards = torch.cat([f.result() for f in futures])
    pool.shutdown()
    table = {k: torch.cat([s[k] for s in stored]) for k in stored[0]}
    return {"table": table, "rewards": rewards, "prompts": expanded, "last_images": images,
            "reward_wait_time_per_epoch": time.time() - sampled_at}


def update(run: Run, table: dict, advantages: torch.Tensor, epoch: int) -> None:
    """Phase 4 (spec §6.2 item 9)."""
    c, budget = run.config, run.budget
    total, steps = advantages.shape[0], budget.train_timesteps
    positions = table["timesteps"].shape[1]  # N − 1
    window, accumulation = budget.accumulation, c.train_gradient_accumulation_steps
    adv = advantages.to(run.device)
    run.models.unet.train()
    for inner in range(c.train_num_inner_epochs):
        gen = seeded_generator(c.seed, run.accelerator.process_index, epoch, TRAIN, inner)
        order = torch.randperm(total, generator=gen)
        times = torch.stack([torch.randperm(positions, generator=gen) for _ in range(total)])  # [S, N−1]
        micro = order.reshape(-1, c.train_batch_size)  # [S / b, b]
        before, stats, passes = run.global_step, [], 0
        for i, samples in enumerate(progress(run, micro, f"epoch {epoch + 1} training")):
            samples_d = samples.to(run.device)
            cond = table["cond"][samples_d]
            for j in range(steps):
                col = times[samples, j].to(run.device)  # this column's time position of each trajectory
                pick = lambda key: table[key][samples_d, col]  # noqa: E731
                x, t = pick("latents"), pick("timesteps")
                eps = training_noise_pred(run, x, t, cond)
                ratio = c.algorithm in RATIO_ALGORITHMS
                rows = row_losses(run, eps, x, t, adv[samples_d], eps_old=None if ratio else pick("noise_preds"),
                                  noise=None if ratio else pick("noises"),
                                  next_latents=pick("next_latents") if ratio else None,
                                  old_log_probs=pick("log_probs") if ratio else None)
                loss = rows.loss.mean()
                backward(run, loss, window)
                entry = {"loss": loss.detach(), "clipfrac": rows.clipped.float().mean()}
                if rows.log_approx_error is not None:
                    entry["log_approx_error"] = rows.log_approx_error.abs().mean()
                if c.algorithm == "ddpo":
                    entry["_ratios"] = [rows.ratio]
                if wants_approx_kl(run, first_of_window=(i % accumulation == 0 and j == 0)):
                    entry["approx_kl"] = approx_kl_rows(run, eps, x, t, cond).mean()
                stats.append(entry)
                passes += 1
                if passes % window == 0:
                    optimizer_step(run, stats, epoch=epoch + 1, inner_epoch=inner)
                    stats = []
        if run.global_step - before != budget.updates_per_epoch:
            raise RuntimeError(f"inner epoch took {run.global_step - before} updates, expected "
                               f"{budget.updates_per_epoch}")


def train_one_epoch(run: Run, epoch: int) -> dict:
    """sample + score -> advantages -> update; returns the phase timings."""
    started = time.time()
    sampled = sample_epoch(run, epoch)                                          # sample + score
    wait = sampled["reward_wait_time_per_epoch"]
    sample_time = time.time() - started - wait
    rewards = sampled["rewards"]
    run.epoch_metrics.update(reward_metrics(run, rewards))
    advantages = block_advantages(rewards, run.config.num_generations_per_prompt)  # advantages
    if epoch % run.config.image_log_freq == 0:
        images = sampled["last_images"]  # the last call's images (upstream's wandb `images`)
        captions = [f"{p[:25]} | {r:.2f}" for p, r in zip(sampled["prompts"][-images.shape[0]:],
                                                             rewards[-images.shape[0]:].tolist())]
        run.logger.log_images(images, captions, f"epoch_{epoch + 1}")
    table = sampled.pop("table")
    del sampled
    update_started = time.time()
    update(run, table, advantages, epoch)                                       # update
    return {"sample_time_per_epoch": sample_time, "reward_wait_time_per_epoch": wait,
            "train_time_per_epoch": time.time() - update_started}


def train(config, accelerator) -> Run:
    return run_epochs(setup(config, accelerator), train_one_epoch)
