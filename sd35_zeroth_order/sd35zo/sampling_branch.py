"""The `branch` sampler: trajectory branching off a deterministic backbone (spec §3.5).

TempFlow-GRPO-style credit assignment (He et al. 2025, TempFlow-GRPO): instead of one reward per whole SDE
trajectory, each prompt/noise pair gets one ODE backbone, and at a chosen step i it forks k_i single SDE steps
from the backbone state x_i; every fork is then finished deterministically, so the reward differences between
forks of the same (sample, step) are caused by that one stochastic transition alone.

    pass 1   ODE backbone x_0 .. x_{N-1} per sample (the last step to σ = 0 is not needed)
    pass 2a  for each step i with k_i > 0: k_i SDE steps from x_i -> x'_{i+1}, with log-probs
    pass 2b  ODE completion of every branch from x'_{i+1} to σ = 0, rows of all steps batched together
             in chunks of exactly `latent_chunk_size` rows (the last one padded, padding discarded)

Pass 2a uses the velocity pass 1 already computed at (x_i, t_i): every branch of a (sample, step) shares x_i,
so it shares v_i and μ_i and differs only in ε (upstream evaluates the transformer again on repeated rows,
which gives the same v up to batch-dependent rounding). Noise for all branches of a step is drawn in one call,
so the result does not depend on how rows are chunked. Images: `sampling.decode_latents(vae,
rows.row_final_latents, chunk_size=latent_chunk_size)`, one per row, in row order.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from .config_check import normalize_exploration_schedule
from .sampling import Velocity, _sigma_at_one
from .sde import ode_step, sde_step_with_logprob, timesteps_from_sigmas

__all__ = ["BranchRows", "sample_branches", "complete_rows_by_ode", "mean_active_k", "exploration_weights"]


@dataclass
class BranchRows:
    """The packed rollout of the branch sampler (spec §3.5 table).

    R transition rows, ordered by increasing step, then sample-major, the k_i branches of a sample consecutive.
    K = B·#{i: k_i = 0} KL-anchor rows (only when requested), ordered the same way.
    """

    row_step_idx: torch.Tensor  # [R] int64 branching step i
    row_sample_idx: torch.Tensor  # [R] int64 sample (prompt/noise) index in 0..B-1
    row_exploration_k: torch.Tensor  # [R] float32 k_i of the row's step
    row_timesteps: torch.Tensor  # [R] t_i
    row_next_timesteps: torch.Tensor  # [R] t_{i+1} (0 for the step to σ = 0)
    row_latents: torch.Tensor  # [R, C, H, W] backbone x_i
    row_next_latents: torch.Tensor  # [R, C, H, W] fp32 branch sample x'_{i+1}
    row_log_probs: torch.Tensor  # [R] fp32 log p(x'_{i+1} | x_i) at sampling time
    row_final_latents: torch.Tensor  # [R, C, H, W] x'_{i+1} integrated by ODE to σ = 0: decode and reward these
    backbone_latents: torch.Tensor  # [B, N, C, H, W] x_0..x_{N-1} of pass 1
    kl_row_step_idx: torch.Tensor  # [K] int64
    kl_row_sample_idx: torch.Tensor  # [K] int64
    kl_row_timesteps: torch.Tensor  # [K] t_i
    kl_row_next_timesteps: torch.Tensor  # [K] t_{i+1}
    kl_row_latents: torch.Tensor  # [K, C, H, W] backbone x_i at the steps without branches
    useful_row_steps_2b: int  # Σ_rows (N − i − 1): ODE steps the branches needed
    processed_row_steps_2b: int  # rows pushed through the model in pass 2b, padding included
    row_prev_sample_mean: Optional[torch.Tensor] = None  # [R, C, H, W] fp32 μ_i (matching or grpo_guard)
    row_noises: Optional[torch.Tensor] = None  # [R, C, H, W] fp32 ε with x'_{i+1} = μ_i + σ_t ε (matching)
    row_noise_preds: Optional[torch.Tensor] = None  # [R, C, H, W] v_i^old, embedding dtype (matching)

    @property
    def padded_row_steps_2b(self) -> int:
        return self.processed_row_steps_2b - self.useful_row_steps_2b

    @property
    def num_rows(self) -> int:
        return int(self.row_step_idx.shape[0])

    def steps_below(self, num_train_steps: int) -> "BranchRows":
        """Only the rows (and anchor rows) of steps i < T, the transitions the trainer trains (spec §3.5).

        The 2b accounting is kept: the dropped rows were still sampled.
        """
        keep = self.row_step_idx < num_train_steps  # [R]
        keep_kl = self.kl_row_step_idx < num_train_steps  # [K]
        changes = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name.startswith("row_") and value is not None:
                changes[field.name] = value[keep]
            elif field.name.startswith("kl_row_"):
                changes[field.name] = value[keep_kl]
        return dataclasses.replace(self, **changes)


def mean_active_k(schedule: Sequence[int]) -> float:
    """k̄: mean of the positive branch counts of the training schedule (7.5 for lowsnr2, spec §4.6)."""
    active = [k for k in schedule if k > 0]
    if not active:
        raise ValueError(f"exploration schedule {list(schedule)} has no step with k > 0")
    return sum(active) / len(active)


def exploration_weights(row_exploration_k: torch.Tensor, schedule: Sequence[int]) -> torch.Tensor:
    """Per-row loss weight k̄ / k_row `[R]`: the k_i branches of one trajectory's step together weigh k̄.

    Without it a step with 10 branches would pull 10/6 times harder than one with 6; with it every active
    step of a trajectory counts the same (spec §4.6; k clamped to 1 as upstream, for anchor-like rows).
    """
    k = row_exploration_k.to(torch.float32).clamp_min(1.0)  # [R]
    return mean_active_k(schedule) / k


def complete_rows_by_ode(velocity: Velocity, latents: torch.Tensor, start_positions: torch.Tensor,
                         sample_idx: torch.Tensor, sigmas: torch.Tensor,
                         latent_chunk_size: int) -> tuple[torch.Tensor, int, int]:
    """Integrate each row by Euler ODE steps from its own position p_r to σ = 0 (pass 2b).

    latents `[R, C, H, W]` at positions p_r (`[R]` int64, row r is at σ_{p_r}); sample_idx `[R]` selects each
    row's prompt. Rounds: every still-active row (in packed order) takes one step; the active rows go through
    `velocity` in chunks of exactly L rows, the last chunk padded with copies of its first row whose outputs
    are dropped, so the model always sees the batch size the trainer uses. Returns
    (final latents `[R, C, H, W]`, useful row-steps, processed row-steps).
    """
    if latent_chunk_size < 1:
        raise ValueError(f"latent_chunk_size must be >= 1, got {latent_chunk_size}")
    num_steps = sigmas.shape[0] - 1
    timesteps = timesteps_from_sigmas(sigmas).to(latents.device)  # [N]
    sigmas = sigmas.to(latents.device)
    x = latents.clone()  # [R, C, H, W]
    position = start_positions.to(device=latents.device, dtype=torch.long).clone()  # [R]
    remaining = (num_steps - position).clamp_min(0)
    useful = int(remaining.sum())
    processed = 0
    taken = torch.zeros_like(position)  # steps each row actually took, checked below
    while True:
        active = torch.nonzero(position < num_steps).flatten()  # [A] packed order
        if active.numel() == 0:
            break
        for start in range(0, active.numel(), latent_chunk_size):
            ids = active[start:start + latent_chunk_size]  # [n <= L]
            pad = latent_chunk_size - ids.numel()
            model_ids = torch.cat([ids, ids[:1].expand(pad)]) if pad else ids  # [L]
            pos = position[model_ids]  # [L]
            v = velocity(x[model_ids], timesteps[pos], sample_idx[model_ids])  # [L, C, H, W]
            stepped = ode_step(v, sigmas[pos], sigmas[pos + 1], x[model_ids])  # [L, C, H, W]
            x[ids] = stepped[:ids.numel()].to(x.dtype)
            processed += latent_chunk_size
        position[active] += 1
        taken[active] += 1
    if not torch.equal(taken, remaining):
        raise RuntimeError("ODE completion: some row did not take exactly its remaining number of steps")
    return x, useful, processed


@torch.no_grad()
def sample_branches(velocity: Velocity, latents: torch.Tensor, sigmas: torch.Tensor,
                    exploration_k: Union[int, Sequence[int]], *, latent_chunk_size: int = 12,
                    noise_level: float = 0.7, generator: Optional[torch.Generator] = None,
                    return_prev_sample_mean: bool = False, collect_matching_aux: bool = False,
                    collect_kl_anchor_rows: bool = False) -> BranchRows:
    """Branch rollout of B samples: ODE backbone, k_i SDE branches at step i, ODE completion of each branch.

    latents: x_0 `[B, C, H, W]` (row b uses prompt b); sigmas `[N+1]` from `sde.flow_sigmas(N)`; exploration_k:
    an int >= 1 (every transition) or a list of N−1 or N non-negative ints (the N-th, the step to σ = 0, has no
    ODE step after it and is dropped), normalised by `config_check.normalize_exploration_schedule`.
    latent_chunk_size L = 12 and noise_level a = 0.7 are the upstream branch-config values (spec §2.4, §3.5).
    """
    if latent_chunk_size < 1:
        raise ValueError(f"latent_chunk_size must be >= 1, got {latent_chunk_size}")
    num_steps = sigmas.shape[0] - 1
    schedule = normalize_exploration_schedule(exploration_k, num_steps)  # [N-1] k_i per transition i
    if not any(k > 0 for k in schedule):
        raise ValueError(f"exploration_k {exploration_k!r} gives no step with k > 0: there is nothing to branch")
    batch = latents.shape[0]
    device = latents.device
    samples = torch.arange(batch, device=device)  # [B]
    timesteps = timesteps_from_sigmas(sigmas).to(device)  # [N]
    next_timesteps = torch.cat([timesteps[1:], timesteps.new_zeros(1)])  # [N] t_{i+1}
    sigma_max = _sigma_at_one(sigmas)

    # Pass 1: the shared ODE prefix x_0..x_{N-1} and the velocity at each of its states.
    backbone, backbone_v = [latents], []
    for i in range(num_steps - 1):
        v = velocity(backbone[i], timesteps[i].expand(batch), samples)  # [B, C, H, W]
        backbone_v.append(v)
        backbone.append(ode_step(v, sigmas[i], sigmas[i + 1], backbone[i]).to(latents.dtype))

    # Pass 2a: k_i SDE branches per sample at every active step; anchors at the others.
    rows = {name: [] for name in ("step", "sample", "k", "t", "t_next", "x", "x_next", "log_prob", "mean",
                                  "noise", "v")}
    anchors = {name: [] for name in ("step", "sample", "t", "t_next", "x")}
    for i, k in enumerate(schedule):
        if k == 0:
            if collect_kl_anchor_rows:
                anchors["step"].append(torch.full((batch,), i, dtype=torch.long, device=device))
                anchors["sample"].append(samples)
                anchors["t"].append(timesteps[i].expand(batch))
                anchors["t_next"].append(next_timesteps[i].expand(batch))
                anchors["x"].append(backbone[i])
            continue
        sample_of_row = samples.repeat_interleave(k)  # [B·k] sample-major, branches consecutive
        x_i = backbone[i][sample_of_row]  # [B·k, C, H, W]
        v_i = backbone_v[i][sample_of_row]  # [B·k, C, H, W]
        step = sde_step_with_logprob(v_i, sigmas[i], sigmas[i + 1], x_i, noise_level=noise_level,
                                     generator=generator, sigma_max=sigma_max)
        rows["step"].append(torch.full_like(sample_of_row, i))
        rows["sample"].append(sample_of_row)
        rows["k"].append(torch.full((batch * k,), float(k), dtype=torch.float32, device=device))
        rows["t"].append(timesteps[i].expand(batch * k))
        rows["t_next"].append(next_timesteps[i].expand(batch * k))
        rows["x"].append(x_i)
        rows["x_next"].append(step.prev_sample)
        rows["log_prob"].append(step.log_prob)
        rows["mean"].append(step.prev_sample_mean)
        rows["noise"].append(step.noise)
        rows["v"].append(v_i)
    packed = {name: torch.cat(items) for name, items in rows.items()}
    latent_shape = latents.shape[1:]
    if anchors["step"]:
        kl = {name: torch.cat(items) for name, items in anchors.items()}
    else:
        kl = {"step": samples.new_zeros(0), "sample": samples.new_zeros(0), "t": timesteps.new_zeros(0),
              "t_next": timesteps.new_zeros(0), "x": latents.new_zeros((0, *latent_shape))}

    # Pass 2b: finish every branch from x'_{i+1} (position i+1) to σ = 0.
    final, useful, processed = complete_rows_by_ode(
        velocity, packed["x_next"].to(latents.dtype), packed["step"] + 1, packed["sample"], sigmas,
        latent_chunk_size)

    return BranchRows(
        row_step_idx=packed["step"], row_sample_idx=packed["sample"], row_exploration_k=packed["k"],
        row_timesteps=packed["t"].clone(), row_next_timesteps=packed["t_next"].clone(),
        row_latents=packed["x"], row_next_latents=packed["x_next"], row_log_probs=packed["log_prob"],
        row_final_latents=final, backbone_latents=torch.stack(backbone, dim=1),
        kl_row_step_idx=kl["step"], kl_row_sample_idx=kl["sample"], kl_row_timesteps=kl["t"].clone(),
        kl_row_next_timesteps=kl["t_next"].clone(), kl_row_latents=kl["x"],
        useful_row_steps_2b=useful, processed_row_steps_2b=processed,
        row_prev_sample_mean=packed["mean"] if return_prev_sample_mean or collect_matching_aux else None,
        row_noises=packed["noise"] if collect_matching_aux else None,
        row_noise_preds=packed["v"] if collect_matching_aux else None,
    )
