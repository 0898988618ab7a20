"""The branch trainer (paper Figure 4a; spec §7.9 "train_sd3_pr.py"): one loop over named phases.

    per epoch e:   sample (branch rollouts) -> score -> advantages (seed|t groups) -> update -> log/eval/checkpoint

What is particular to branching lives here: rollouts (`sampling_branch`), `seed|t` grouping of the
advantages, row masks, exploration weights k̄/k and the padding of rows into microbatches (spec §4.6). The
row loss (`rsm_loss` / `ppo_loss` + KL), set-up, evaluation and checkpoints are `trainer_common`'s, shared
with the default trainer.
"""
from __future__ import annotations

import math
import time

import torch

from .advantages import (gather_group_advantages, grouping_labels, mean_group_size, mean_group_std,
                         rollout_seed_ids, zero_std_ratio)
from .prompt_samplers import BranchPromptSampler, branch_counter
from .rewards import reward_pool, submit_scores
from .sampling import decode_latents, initial_latents
from .sampling_branch import exploration_weights, mean_active_k, sample_branches
from .trainer_common import (IMAGE_LOG_EVERY, Run, add_lora, collate, count_inner_epoch_updates, ema_step,
                             optimizer_step, policy_velocity, progress, reward_statistics, rows_loss, run_epochs,
                             save_checkpoint, seeded_generator, setup as setup_common)

__all__ = ["setup", "train", "add_lora", "save_checkpoint"]


def _branch_sampler(config, num_prompts, accelerator):
    return BranchPromptSampler(num_prompts, config.sample.collection_batch_size, config.sample.num_image_per_prompt,
                               accelerator.num_processes, accelerator.process_index, seed=config.seed)


def _branch_eval_kl_weights(schedule):
    """The eval KL probe visits the branching steps (k_j > 0), weighted k̄/k_j (spec §8.1)."""
    k_bar = mean_active_k(schedule)
    return [k_bar / k if k > 0 else 0.0 for k in schedule]


def setup(config, accelerator) -> Run:
    return setup_common(config, accelerator, "sde_branching", _branch_sampler, _branch_eval_kl_weights)


# ------------------------------------------------------------------------------------------------ phases

def sample_epoch(run: Run, epoch: int) -> dict:
    """Phase 1+2: `num_batches_per_epoch` branch rollouts on this rank, rewards submitted as they finish."""
    config, acc = run.config, run.accelerator
    device, rank = acc.device, acc.process_index
    use_anchor = config.train.use_ode_kl_anchor and config.train.beta > 0
    matching = config.train.loss_type == "matching"
    steps = run.budget.train_steps
    rollouts, futures, row_meta = [], [], []
    stats = {"useful": 0, "processed": 0}
    pool = reward_pool()
    run.transformer.eval()
    for b in progress(run, range(run.budget.rollouts_per_epoch), f"epoch {epoch + 1} sampling"):
        counter = branch_counter(epoch, b, run.budget.rollouts_per_epoch)
        batch = collate(run.train_set, run.sampler.batch_for(counter))
        run.sampler.set_counter(counter + 1)
        embeds = batch["prompt_embeds"].to(device)  # [B, S, D]
        pooled = batch["pooled_prompt_embeds"].to(device)  # [B, Dp]
        velocity = policy_velocity(run, embeds, pooled)
        gen = seeded_generator(config.seed, rank, epoch, b, device=device)
        x0 = initial_latents(embeds.shape[0], config.resolution, generator=gen, device=device)  # [B, C, h, w]
        rows = sample_branches(velocity, x0, run.sigmas, list(config.sample.exploration_k),
                               latent_chunk_size=config.latent_chunk_size, noise_level=config.sample.noise_level,
                               generator=gen, return_prev_sample_mean=config.train.reweight_type == "grpo_guard",
                               collect_matching_aux=matching, collect_kl_anchor_rows=use_anchor)
        stats["useful"] += rows.useful_row_steps_2b
        stats["processed"] += rows.processed_row_steps_2b
        rows = rows.steps_below(steps)
        expected = embeds.shape[0] * sum(run.schedule)
        if rows.num_rows != expected:
            raise RuntimeError(f"rollout has {rows.num_rows} trained rows, expected B x sum(k) = {expected}")
        images = decode_latents(run.vae, rows.row_final_latents, chunk_size=config.latent_chunk_size)
        sample_of_row = rows.row_sample_idx.cpu().tolist()
        prompts = [batch["prompts"][s] for s in sample_of_row]
        metadata = [batch["metadatas"][s] for s in sample_of_row]
        futures.append(submit_scores(pool, run.reward, images, prompts, metadata))
        if b == 0:
            first = (images, prompts)  # the training images logged every IMAGE_LOG_EVERY epochs (spec §7.7)
        seeds = rollout_seed_ids(batch["prompts"], counter, rank)  # [B]
        rollouts.append((rows, embeds, pooled))
        row_meta.append((prompts, seeds[rows.row_sample_idx.cpu()]))
        run.seen_prompts.update(batch["prompts"])
    sampled_at = time.time()
    scores = [f.result() for f in futures]
    pool.shutdown()
    stats["reward_wait_time"] = time.time() - sampled_at  # scoring that did not overlap with sampling
    return {"rollouts": rollouts, "scores": scores, "meta": row_meta, "stats": stats, "first_rollout": first}


def build_rows(run: Run, sampled: dict) -> tuple[dict, dict, dict]:
    """Flatten the rollouts into one table of training rows, one of KL-anchor rows, and the prompt
    embeddings of the epoch's samples (`prompt_embeds` [S, ...], `pooled` [S, ...]); rows refer to their
    sample by `sample` (an index into those), so an embedding is stored once, not once per branch."""
    table, anchors, prompts = {}, {}, {}

    def put(store, key, value):
        store.setdefault(key, []).append(value)

    offset = 0
    for rows, embeds, pooled in sampled["rollouts"]:
        put(prompts, "prompt_embeds", embeds)
        put(prompts, "pooled", pooled)
        put(table, "latents", rows.row_latents)
        put(table, "next_latents", rows.row_next_latents)
        put(table, "log_probs", rows.row_log_probs)
        put(table, "timesteps", rows.row_timesteps)
        put(table, "step", rows.row_step_idx)
        put(table, "k", rows.row_exploration_k)
        put(table, "sample", rows.row_sample_idx + offset)
        for key, value in (("mean_old", rows.row_prev_sample_mean), ("noises", rows.row_noises),
                           ("v_old", rows.row_noise_preds)):
            if value is not None:
                put(table, key, value)
        if rows.kl_row_latents.shape[0]:
            put(anchors, "latents", rows.kl_row_latents)
            put(anchors, "timesteps", rows.kl_row_timesteps)
            put(anchors, "step", rows.kl_row_step_idx)
            put(anchors, "sample", rows.kl_row_sample_idx + offset)
        offset += embeds.shape[0]
    cat = lambda store: {k: torch.cat(v) for k, v in store.items()}  # noqa: E731
    return cat(table), cat(anchors), cat(prompts)


def compute_advantages(run: Run, sampled: dict, epoch: int) -> tuple[torch.Tensor, dict]:
    """Phase 3: group-normalised advantages over all ranks' rows (spec §4.5), this rank's slice `[R]`."""
    config = run.config
    rewards = {k: torch.cat([s[k] for s in sampled["scores"]]) for k in sampled["scores"][0]}
    prompts = [p for meta in sampled["meta"] for p in meta[0]]
    seeds = torch.cat([meta[1] for meta in sampled["meta"]])
    timesteps = torch.cat([r[0].row_timesteps for r in sampled["rollouts"]]).cpu()
    labels = grouping_labels(config.sample.group_strategy, prompts=prompts, seed_ids=seeds, timesteps=timesteps)
    gathered = gather_group_advantages(rewards["avg"], labels, adv_clip=float(config.train.adv_clip_max),
                                       global_std=config.sample.global_std)
    metrics = {"group_strategy": config.sample.group_strategy,
               "group_size": mean_group_size(gathered.all_labels),
               "zero_std_ratio": zero_std_ratio(gathered.all_rewards, gathered.all_labels),
               "reward_std_mean": mean_group_std(gathered.all_rewards, gathered.all_labels),
               "trained_prompt_num": len(run.seen_prompts)}
    metrics.update(reward_statistics(run, rewards))
    return gathered.local, metrics


def pad_to_microbatches(run: Run, num_rows: int, advantages: torch.Tensor):
    """Row mask (A != 0, or all rows if every A is 0), exploration weights, and padding to whole
    microbatches of U = latent_chunk_size x T rows (spec §4.6). Returns (row index [P], mask [P])."""
    unit = run.budget.microbatch_rows
    mask = advantages != 0  # [R]
    if not bool(mask.any()):
        mask = torch.ones_like(mask)
    micro = math.ceil(num_rows / unit)
    if micro != run.budget.microbatches_per_epoch:
        raise RuntimeError(f"{num_rows} rows make {micro} microbatches, start-up predicted "
                           f"{run.budget.microbatches_per_epoch} (no-carry invariant)")
    pad = micro * unit - num_rows
    index = torch.cat([torch.arange(num_rows), torch.zeros(pad, dtype=torch.long)])  # padding = copies of row 0
    mask = torch.cat([mask.cpu(), torch.zeros(pad, dtype=torch.bool)])
    return index, mask


def update(run: Run, table: dict, anchors: dict, prompts: dict, advantages: torch.Tensor, epoch: int) -> None:
    """Phase 4: `num_inner_epochs` passes over shuffled microbatches; exactly `updates_per_epoch` optimizer
    steps per pass, each accumulating `gradient_accumulation` microbatches (spec §4.6)."""
    config, budget = run.config, run.budget
    num_rows = table["latents"].shape[0]
    index, mask = pad_to_microbatches(run, num_rows, advantages.cpu())  # [P] row ids, [P] bool
    weight = exploration_weights(table["k"].cpu(), run.schedule)[index]  # [P] k̄/k
    adv = advantages.cpu()[index]
    unit, accum = budget.microbatch_rows, budget.gradient_accumulation
    run.epoch_metrics.update({"actual_transition_rows": num_rows, "selected_transition_rows": int(mask.sum()),
                              "actual_kl_anchor_rows": anchors["latents"].shape[0] if anchors else 0,
                              "padded_policy_units": len(index) - num_rows,
                              "actual_microbatches_per_epoch": len(index) // unit,
                              "expected_microbatches_per_epoch": budget.microbatches_per_epoch})
    run.transformer.train()
    for inner in range(config.train.num_inner_epochs):
        gen = seeded_generator(config.seed, run.accelerator.process_index, epoch, inner, 7)
        order = torch.randperm(len(index), generator=gen)  # positions into the padded list
        num_anchor = anchors["latents"].shape[0] if anchors else 0
        anchor_chunks = torch.randperm(num_anchor, generator=gen).tensor_split(budget.microbatches_per_epoch)
        steps_before, window = run.global_step, []
        microbatches = progress(run, range(budget.microbatches_per_epoch), f"epoch {epoch + 1} training")
        for j in microbatches:
            pos = order[j * unit:(j + 1) * unit]
            loss, stats = rows_loss(run, table, anchors, prompts, index[pos], anchor_chunks[j], adv[pos], mask[pos],
                                    weight[pos])
            (loss / accum).backward()
            window.append(stats)
            if (j + 1) % accum == 0:
                optimizer_step(run, window, epoch=epoch + 1, inner_epoch=inner)
                window = []
            ema_step(run)  # after every microbatch, as upstream (spec §7.3), unless train.ema_once_per_step
        count_inner_epoch_updates(run, steps_before)


# ------------------------------------------------------------------------------------------------ the loop

def train_one_epoch(run: Run, epoch: int) -> dict:
    """sample + score -> advantages -> rows -> update; returns the phase timings."""
    started = time.time()
    sampled = sample_epoch(run, epoch)                                   # sample + score
    stats = sampled["stats"]
    run.epoch_metrics.update({"2b_useful_row_steps": stats["useful"], "2b_processed_row_steps": stats["processed"],
                              "2b_padded_row_steps": stats["processed"] - stats["useful"],
                              "2b_padding_ratio": (stats["processed"] - stats["useful"]) / max(stats["processed"], 1)})
    sample_time = time.time() - started - stats["reward_wait_time"]
    advantages, adv_metrics = compute_advantages(run, sampled, epoch)   # advantages
    run.epoch_metrics.update(adv_metrics)
    if epoch % IMAGE_LOG_EVERY == 0:
        images, prompts = sampled["first_rollout"]
        run.logger.log_images(images, prompts, sampled["scores"][0]["avg"], epoch)
    table, anchors, prompts = build_rows(run, sampled)
    del sampled
    update_started = time.time()
    update(run, table, anchors, prompts, advantages, epoch)             # update
    return {"sample_time_per_epoch": sample_time, "reward_wait_time_per_epoch": stats["reward_wait_time"],
            "train_time_per_epoch": time.time() - update_started,
            "optimizer_updates_target_per_epoch": run.budget.updates_per_epoch * run.config.train.num_inner_epochs}


def train(config, accelerator) -> Run:
    """Epochs until num_epochs; evaluate/save when the trained epoch count hits eval_freq / save_freq, and
    always after the last one."""
    return run_epochs(setup(config, accelerator), train_one_epoch)
