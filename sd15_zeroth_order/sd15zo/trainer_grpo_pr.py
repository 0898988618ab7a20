"""Ours, the RSM trainer (`train_grpo_pr.py`; spec §7, §9; Figure 4(b)).

    per epoch e:  rollouts (branching) -> score every branch -> advantages (prompt|t groups, pooled over
                  processes) -> rows, masks, anchors -> update -> log/eval/save

Relative to the baseline (trainer_grpo.py) it changes the sampler (branching.py: a deterministic root, k one-step
SDE branches at the scheduled steps, each finished by ODE and scored: one reward per transition), the training unit
(a transition row, micro-batches of policy_update_row_batch_size rows from a random permutation of the epoch's
rows, accumulation = micro-batches / updates_per_epoch with no carry-over), the advantages (advantages.py) and adds
the RSM pieces of rsm.py: row masks, κ = k̄/k weights, padding, the ODE KL anchor. The per-row surrogate is the
baseline's (losses.py), unchanged.
"""
from __future__ import annotations

import logging
import random
import time

import torch

from . import models as sd_models, rsm
from .advantages import local_slice, rsm_advantages, seed_ids
from .branching import sample_branches
from .config import normalize_schedule
from .losses import RATIO_ALGORITHMS, gaussian_kl_rows
from .rewards import reward_pool, submit
from .sampling import call_latents, initial_latent_plan
from .trainer_common import (Run, approx_kl_rows, backward, encode, epoch_prompts, gather_cat, gather_objects,
                             loss_weight, optimizer_step, predictor, progress, reward_metrics, row_losses, run_epochs,
                             seeded_generator, setup, training_noise_pred, wants_approx_kl)

logger = logging.getLogger("sd15zo.trainer_grpo_pr")
SAMPLE, TRAIN, ANCHOR = 1, 2, 3  # generator purposes
IMAGES_LOGGED = 15  # upstream: 15 random images of the first rollout call


def sample_epoch(run: Run, epoch: int) -> dict:
    """Phases 1-2: the epoch's rollout calls of collection_batch_size roots each, every branch image scored on a
    worker thread while the next call samples."""
    c, models, acc = run.config, run.models, run.accelerator
    expanded = epoch_prompts(run, epoch)
    per_call, calls, steps = c.collection_batch_size, run.budget.calls_per_epoch, run.budget.train_timesteps
    schedule = normalize_schedule(c.exploration_k, c.sample_num_steps)
    gen = seeded_generator(c.seed, acc.process_index, epoch, SAMPLE, device=run.device)
    plan = initial_latent_plan(calls, c.shared_initial_noise, models.latent_shape, gen, run.device)
    lam = "lambda" in c.algorithm
    use_anchor = c.use_ode_kl_anchor
    zero_nonterminal = sum(1 for i, k in enumerate(schedule[:steps]) if k == 0 and i < c.sample_num_steps - 1)
    pool, futures, calls_out = reward_pool(), [], []
    useful = processed = 0
    first = None
    models.unet.eval()
    for i in progress(run, range(calls), f"epoch {epoch + 1} sampling"):
        prompts = expanded[i * per_call:(i + 1) * per_call]
        ids, cond = encode(run, prompts)
        x = call_latents(plan[i], per_call, models.latent_shape, gen, run.device)
        # roots with the same prompt from the same shared latent follow the same deterministic trajectory
        groups = prompts if plan[i] is not None else None
        rollout = sample_branches(predictor(run, cond), x, models.alphas_cumprod, run.timesteps, schedule,
                                  eta=c.sample_eta, algorithm=c.algorithm, const_weight=c.const_weight,
                                  latent_chunk_size=c.latent_chunk_size, collect_anchor_rows=use_anchor,
                                  generator=gen, predict_ref=predictor(run, cond, reference=True) if lam else None,
                                  root_groups=groups, efficient=c.efficient_rollout,
                                  clip_sample_range=c.clip_sample_range if c.clip_sample else None)
        useful += rollout.useful_row_steps_2b
        processed += rollout.processed_row_steps_2b
        rollout = rollout.rows_below(steps)
        if rollout.num_rows != per_call * sum(schedule[:steps]):
            raise RuntimeError(f"rollout has {rollout.num_rows} trained rows, expected {per_call * sum(schedule[:steps])}")
        if rollout.kl_row_step_idx.shape[0] != (per_call * zero_nonterminal if use_anchor else 0):
            raise RuntimeError("rollout anchor rows do not match the schedule")
        _check_finite(c.algorithm, rollout)
        images = sd_models.decode(models, rollout.row_final_latents, c.latent_chunk_size)
        roots = rollout.row_sample_idx.cpu().tolist()
        row_prompts = [prompts[j] for j in roots]
        futures.append(submit(pool, run.scorer, images, row_prompts))
        if first is None:
            first = (images, row_prompts)
        calls_out.append({"rollout": rollout, "cond": cond, "prompt_ids": ids, "prompts": prompts,
                          "seed_ids": seed_ids(prompts, epoch * calls + i, acc.process_index)})
    sampled_at = time.time()
    rewards = [f.result() for f in futures]
    pool.shutdown()
    return {"calls": calls_out, "rewards": rewards, "first": first, "useful": useful, "processed": processed,
            "reward_wait_time_per_epoch": time.time() - sampled_at}


def _check_finite(algorithm: str, rollout) -> None:
    tensors = {"row_latents": rollout.row_latents, "row_next_latents": rollout.row_next_latents,
               "kl_row_latents": rollout.kl_row_latents}
    if algorithm in RATIO_ALGORITHMS:
        tensors["row_log_probs"] = rollout.row_log_probs
    else:
        tensors.update(row_noises=rollout.row_noises, row_noise_preds=rollout.row_noise_preds)
    for name, value in tensors.items():
        if value.numel() and not bool(torch.isfinite(value).all()):
            raise RuntimeError(f"rollout {name} holds non-finite values (sample_eta, exploration_k, learning_rate?)")


def build_rows(sampled: dict) -> tuple[dict, dict, dict]:
    """One table of the epoch's transition rows, one of its anchor rows, and per-root tables (prompt embeddings,
    token ids, prompts, seed ids); rows point at their root with `root`."""
    rows, anchors, roots = {}, {}, {"cond": [], "prompt_ids": [], "prompts": [], "seed_ids": []}
    offset = 0
    for call in sampled["calls"]:
        r = call["rollout"]
        for key, value in (("step", r.row_step_idx), ("k", r.row_exploration_k), ("t", r.row_timesteps),
                           ("latents", r.row_latents), ("next_latents", r.row_next_latents),
                           ("log_probs", r.row_log_probs), ("noises", r.row_noises), ("noise_preds", r.row_noise_preds),
                           ("root", r.row_sample_idx + offset)):
            rows.setdefault(key, []).append(value)
        for key, value in (("step", r.kl_row_step_idx), ("t", r.kl_row_timesteps), ("latents", r.kl_row_latents),
                           ("root", r.kl_row_sample_idx + offset)):
            anchors.setdefault(key, []).append(value)
        roots["cond"].append(call["cond"])
        roots["prompt_ids"].append(call["prompt_ids"])
        roots["prompts"] += call["prompts"]
        roots["seed_ids"] += call["seed_ids"]
        offset += call["cond"].shape[0]
    rows = {k: torch.cat(v) for k, v in rows.items()}
    anchors = {k: torch.cat(v) for k, v in anchors.items()}
    roots["cond"], roots["prompt_ids"] = torch.cat(roots["cond"]), torch.cat(roots["prompt_ids"])
    rows["reward"] = torch.cat(sampled["rewards"]).to(rows["latents"].device)
    return rows, anchors, roots


def compute_advantages(run: Run, rows: dict, roots: dict) -> tuple[torch.Tensor, dict]:
    """Phase 3 (spec §7.3): advantages of every process's rows pooled, this process's slice [R] (float32)."""
    c, acc = run.config, run.accelerator
    root = rows["root"].cpu()
    if c.prompt_group_key == "decoded":  # upstream: the CLIP tokenizer's decoding (lower-cased, truncated)
        texts = run.models.tokenizer.batch_decode(roots["prompt_ids"].cpu(), skip_special_tokens=True)
    else:
        texts = roots["prompts"]
    local_keys = [texts[j] for j in root.tolist()]
    local_seeds = [roots["seed_ids"][j] for j in root.tolist()]
    rewards = gather_cat(run, rows["reward"].float()).double().cpu().numpy()
    prompt_labels = gather_objects(run, local_keys)
    seeds = gather_objects(run, local_seeds) if c.group_strategy == "seed" else [0] * len(prompt_labels)
    timesteps = gather_cat(run, rows["t"]).cpu().tolist()
    run.seen_prompts.update(prompt_labels)
    pooled, stats = rsm_advantages(c.group_strategy, rewards, prompt_labels, seeds, timesteps)
    advantages = local_slice(torch.from_numpy(pooled).float(), acc.num_processes, acc.process_index)
    if not bool(torch.isfinite(advantages).all()):
        raise RuntimeError("non-finite advantages")
    metrics = {"group_strategy": c.group_strategy, "trained_prompt_num": len(run.seen_prompts),
               "advantage_abs_mean": float(advantages.abs().mean())}
    if stats is not None:
        metrics.update(group_size=stats.group_size, group_count=stats.group_count,
                       zero_std_ratio=stats.zero_std_ratio, reward_std_mean=stats.reward_std_mean)
    return advantages, metrics


def select_anchors(run: Run, anchors: dict, num_rows: int, epoch: int) -> tuple[dict, dict]:
    """The ODE anchor rows kept this epoch (at most ⌊rows × anchor_row_max_ratio⌋, spec §7.2 item 12)."""
    c = run.config
    raw = anchors["latents"].shape[0]
    target = rsm.anchor_target(num_rows, raw, c.anchor_row_max_ratio) if c.use_ode_kl_anchor else 0
    if c.use_ode_kl_anchor:
        keep = rsm.subsample_anchors(raw, target, seeded_generator(c.seed, run.accelerator.process_index, epoch, ANCHOR))
        if keep is not None:
            anchors = {k: v[keep.to(v.device)] for k, v in anchors.items()}
    kept = anchors["latents"].shape[0]
    return anchors, {"raw_kl_anchor_rows": raw, "effective_kl_anchor_rows": kept, "anchor_row_target": target,
                     "effective_anchor_to_transition_ratio": kept / num_rows if num_rows else 0.0}


def update(run: Run, rows: dict, anchors: dict, roots: dict, advantages: torch.Tensor, epoch: int) -> None:
    """Phase 4 (spec §7.2 item 15): per inner epoch a random permutation of the padded rows in M micro-batches, the
    anchor rows spread over them; loss = Σ κ·L·m / max(1, Σ m) + β·KL_anchor; an update every M / U micro-batches."""
    c, budget, device = run.config, run.budget, run.device
    num_rows = rows["latents"].shape[0]
    per, micro, accumulation = c.policy_update_row_batch_size, budget.microbatches_per_epoch, budget.accumulation
    index, not_padding = rsm.pad_to_microbatches(num_rows, per)
    if index.shape[0] // per != micro:
        raise RuntimeError(f"{num_rows} rows make {index.shape[0] // per} micro-batches, start-up predicted {micro} "
                           "(no-carry invariant)")
    valid = rsm.row_mask(advantages)
    kappa = rsm.exploration_weights(rows["k"].cpu(), budget.mean_active_k)
    active_t = sorted({int(t) for t in rows["t"].tolist()}, reverse=True)
    n_active = sum(1 for k in normalize_schedule(c.exploration_k, c.sample_num_steps)[:budget.train_timesteps] if k > 0)
    if len(active_t) != n_active:
        raise RuntimeError(f"{len(active_t)} distinct trained timesteps, the schedule has {n_active}")
    run.epoch_metrics.update({
        "rollout_latent_chunk_size": c.latent_chunk_size, "policy_update_batch_size": per,
        "actual_num_rollout_chunks_by_latent_chunk": -(-num_rows // c.latent_chunk_size),
        "actual_num_policy_chunks_by_policy_batch": -(-num_rows // per), "selected_transition_rows": int(valid.sum()),
        "actual_transition_rows": num_rows, "actual_kl_anchor_rows": anchors["latents"].shape[0],
        "actual_policy_units": num_rows, "actual_num_policy_batches": micro, "padded_policy_units": index.shape[0] - num_rows,
        "expected_microbatches_per_epoch": micro, "actual_microbatches_per_epoch": index.shape[0] // per})
    ratio = c.algorithm in RATIO_ALGORITHMS
    t_device = {t: torch.tensor(t, device=device) for t in active_t}
    run.models.unet.train()
    for inner in range(c.train_num_inner_epochs):
        gen = seeded_generator(c.seed, run.accelerator.process_index, epoch, TRAIN, inner)
        order = torch.randperm(index.shape[0], generator=gen)
        parts = rsm.split_anchors(anchors["latents"].shape[0], micro, gen)
        before, stats = run.global_step, []
        for i in progress(run, range(micro), f"epoch {epoch + 1} training"):
            pos = order[i * per:(i + 1) * per]
            idx = index[pos]
            mask = (valid[idx] & not_padding[pos]).to(device)
            idx_d = idx.to(device)
            pick = lambda key: rows[key][idx_d]  # noqa: E731
            x, t = pick("latents"), pick("t")
            cond = roots["cond"][pick("root")]
            eps = training_noise_pred(run, x, t, cond)
            out = row_losses(run, eps, x, t, advantages[idx].to(device), eps_old=None if ratio else pick("noise_preds"),
                             noise=None if ratio else pick("noises"), next_latents=pick("next_latents") if ratio else None,
                             old_log_probs=pick("log_probs") if ratio else None)
            loss = rsm.masked_policy_loss(out.loss, kappa[idx].to(device), mask)
            entry = {"policy_loss": loss.detach(), "clipfrac": rsm.masked_mean(out.clipped.float(), mask)}
            if c.use_ode_kl_anchor:
                kl = anchor_kl(run, anchors, roots, parts[i].to(device))
                loss = loss + c.ode_kl_anchor_beta * kl
                entry["kl_anchor_loss"] = kl.detach()
            backward(run, loss, accumulation)
            entry["loss"] = loss.detach()
            m = mask.float()
            for value in active_t:
                at = m * (t == t_device[value]).float()
                entry[f"clipfrac_timestep_{value}"] = (out.clipped.float() * at).sum() / at.sum().clamp(min=1.0)
            if out.log_approx_error is not None:
                entry["log_approx_error"] = rsm.masked_mean(out.log_approx_error.abs(), mask)
            if c.algorithm == "ddpo":
                entry["_ratios"] = [out.ratio[mask]]
            if wants_approx_kl(run, first_of_window=(i % accumulation == 0)):
                entry["approx_kl"] = rsm.masked_mean(approx_kl_rows(run, eps, x, t, cond), mask)
            stats.append(entry)
            if (i + 1) % accumulation == 0:
                optimizer_step(run, stats, epoch=epoch + 1, inner_epoch=inner)
                stats = []
        if run.global_step - before != budget.updates_per_epoch:
            raise RuntimeError(f"inner epoch took {run.global_step - before} updates, expected "
                               f"{budget.updates_per_epoch} (no-carry invariant)")


def anchor_kl(run: Run, anchors: dict, roots: dict, chosen: torch.Tensor) -> torch.Tensor:
    """KL_anchor of one micro-batch (spec §7.4): mean over its anchor rows of ½ mean(ω_a²(ε_θ − ε_ref)²) at the ODE
    root state, ω_a = const_weight (not divided by weight_scale_factor) or w(t); 0 without anchor rows."""
    if chosen.numel() == 0:
        return torch.zeros((), device=run.device)
    x, t = anchors["latents"][chosen], anchors["t"][chosen]
    cond = roots["cond"][anchors["root"][chosen]]
    eps = training_noise_pred(run, x, t, cond)
    eps_ref = training_noise_pred(run, x, t, cond, reference=True)
    return gaussian_kl_rows(eps, eps_ref, loss_weight(run, t)).mean()


def train_one_epoch(run: Run, epoch: int) -> dict:
    """rollouts + scores -> advantages -> rows, masks, anchors -> update; returns the phase timings."""
    c = run.config
    started = time.time()
    sampled = sample_epoch(run, epoch)                                         # rollouts + scores
    wait = sampled["reward_wait_time_per_epoch"]
    rows, anchors, roots = build_rows(sampled)
    useful, processed = sampled["useful"], sampled["processed"]
    metrics = reward_metrics(run, rows["reward"])
    metrics.update({"reward_avg_mean": metrics["reward_mean"], "reward_avg_std": metrics["reward_std"],
                    "reward_ori_avg_mean": metrics["reward_mean"], "reward_ori_avg_std": metrics["reward_std"],
                    "2b_useful_row_steps": useful, "2b_processed_row_steps": processed,
                    "2b_padded_row_steps": processed - useful,
                    "2b_padding_ratio": (processed - useful) / processed if processed else 0.0})
    run.epoch_metrics.update(metrics)
    advantages, adv_metrics = compute_advantages(run, rows, roots)            # advantages
    run.epoch_metrics.update(adv_metrics)
    anchors, anchor_metrics = select_anchors(run, anchors, rows["latents"].shape[0], epoch)
    run.epoch_metrics.update(anchor_metrics)
    if epoch % c.image_log_freq == 0:
        images, prompts = sampled["first"]
        scores = sampled["rewards"][0]
        chosen = random.Random(c.seed * 1_000_003 + epoch).sample(range(images.shape[0]),
                                                                  min(IMAGES_LOGGED, images.shape[0]))
        run.logger.log_images(images[chosen], [f"{prompts[j][:25]} | {float(scores[j]):.2f}" for j in chosen],
                              f"epoch_{epoch + 1}")
    del sampled
    update_started = time.time()
    update(run, rows, anchors, roots, advantages, epoch)                       # update
    train_time = time.time() - update_started
    return {"sample_time_per_epoch": update_started - started - wait, "reward_wait_time_per_epoch": wait,
            "train_time_per_epoch": train_time, "policy_update_time_per_epoch": train_time,
            "optimizer_updates_target_per_epoch": run.budget.updates_per_epoch * c.train_num_inner_epochs}


def train(config, accelerator) -> Run:
    return run_epochs(setup(config, accelerator), train_one_epoch)


__all__ = ["train", "sample_epoch", "build_rows", "compute_advantages", "select_anchors", "update", "anchor_kl"]
