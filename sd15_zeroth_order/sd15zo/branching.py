"""The RSM trainer's branching sampler (spec §4.3; upstream `reverse_pipeline_perstep.pipeline_with_logprob`).

    pass 1   deterministic root:   R_0 = x_T -> R_1 -> ... -> R_N            (DDIM with η = 0)
    pass 2a  at each step s with k_s > 0, k_s one-step branches per root:
             x'_s = μ(R_s, t_s) + σ_s ξ                                       (η = sample_eta)
             -> one *transition row* (step s, root, k_s, t_s, R_s, x'_s, ℓ, ξ, ε̂) per branch
             at steps with k_s = 0 (not the last): one *anchor row* per root (R_s, t_s) when collected
    pass 2b  every branch finished deterministically from x'_s to x_0, one step per round for all rows at once
             (each at its own position), in chunks of `latent_chunk_size` rows -> one image, one reward per row

Rows are ordered by step, then root, then branch; anchor rows by step, then root. The root itself is never
decoded. With η = 0 every branch reproduces its root (a test).

Noise: the k_s·B branch noises of a step are drawn in one call, so the results do not depend on the chunk size
(spec §12 item 21). `efficient=True` (the default, config `efficient_rollout`) removes upstream's repeated work
(spec §11 item 20) without changing the math: the k branches of a root share one UNet prediction (upstream ran
the same input k times), identical roots (same prompt and initial latent, `root_groups`) run pass 1 and 2a once,
pass 2b's last chunk is not padded, and for `uw-lambda` the deterministic passes, where λ = 0 makes
ε̃ = ε_ref, skip the policy forward. `efficient=False` is upstream's call pattern, for the benchmark.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable, Optional, Sequence

import torch

from .ddim import ddim_step_with_logprob

Predict = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


@dataclass
class BranchRollout:
    row_step_idx: torch.Tensor        # [R] long   step index s
    row_sample_idx: torch.Tensor      # [R] long   root index within the call
    row_exploration_k: torch.Tensor   # [R] float  k_s
    row_timesteps: torch.Tensor       # [R] long   t_s
    row_next_timesteps: torch.Tensor  # [R] long   t_{min(s+1, N-1)}
    row_latents: torch.Tensor         # [R, C, h, w] root latent R_s
    row_next_latents: torch.Tensor    # [R, C, h, w] branch latent x'_s
    row_log_probs: torch.Tensor       # [R]   ℓ of the branch step
    row_noises: torch.Tensor          # [R, C, h, w] ξ of the branch step
    row_noise_preds: torch.Tensor     # [R, C, h, w] the policy's guided ε̂ at (R_s, t_s)
    row_final_latents: torch.Tensor   # [R, C, h, w] the branch finished by ODE (decoded and scored)
    kl_row_step_idx: torch.Tensor     # [A] long
    kl_row_sample_idx: torch.Tensor   # [A] long
    kl_row_timesteps: torch.Tensor    # [A] long
    kl_row_next_timesteps: torch.Tensor  # [A] long
    kl_row_latents: torch.Tensor      # [A, C, h, w] root latent at the anchor step
    root_latents: torch.Tensor        # [B, N+1, C, h, w] the deterministic roots
    useful_row_steps_2b: int = 0      # Σ_rows (N − s − 1)
    processed_row_steps_2b: int = 0   # rows the UNet ran in pass 2b (padding included)

    @property
    def padded_row_steps_2b(self) -> int:
        return self.processed_row_steps_2b - self.useful_row_steps_2b

    @property
    def num_rows(self) -> int:
        return self.row_step_idx.shape[0]

    def rows_below(self, num_steps: int) -> "BranchRollout":
        """Only the transition and anchor rows of steps < num_steps (the trained steps)."""
        keep = self.row_step_idx < num_steps
        keep_anchor = self.kl_row_step_idx < num_steps
        changes = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("row_"):
                changes[f.name] = value[keep]
            elif f.name.startswith("kl_row_"):
                changes[f.name] = value[keep_anchor]
        return replace(self, **changes)


def _groups(root_groups: Optional[Sequence], batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(representative root of each distinct group [G], group of each root [B]) in order of first appearance."""
    keys = list(range(batch)) if root_groups is None else list(root_groups)
    first, inverse = {}, []
    for i, key in enumerate(keys):
        inverse.append(first.setdefault(key, len(first)))
    rep = [0] * len(first)
    for i, g in reversed(list(enumerate(inverse))):
        rep[g] = i
    return torch.tensor(rep, device=device), torch.tensor(inverse, device=device)


def _in_chunks(fn, n: int, chunk: int):
    """Concatenate fn(start, end) over [0, n) in chunks."""
    outs = [fn(start, min(start + chunk, n)) for start in range(0, n, chunk)]
    return tuple(torch.cat(parts) if parts[0] is not None else None for parts in zip(*outs))


@torch.no_grad()
def sample_branches(predict: Predict, x_T: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor,
                    schedule: Sequence[int], *, eta: float, algorithm: str, const_weight=None, latent_chunk_size: int,
                    collect_anchor_rows: bool, generator: Optional[torch.Generator] = None,
                    predict_ref: Optional[Predict] = None, root_groups: Optional[Sequence] = None,
                    efficient: bool = True, clip_sample_range: Optional[float] = None) -> BranchRollout:
    """Branch rollouts of the B roots x_T [B, C, h, w] (spec §4.3). `predict(x, t, rows)` gives the policy's guided
    ε̂ for latents x [n], per-row timesteps t [n] and the rows' root indices [n] (their prompts); `predict_ref`
    the reference's (needed by `uw-lambda`). `schedule`: k_s for each of the N steps. `root_groups`: equal keys
    mark roots with the same prompt and initial latent (identical deterministic roots)."""
    if latent_chunk_size < 1:
        raise ValueError(f"latent_chunk_size must be >= 1, got {latent_chunk_size}")
    n_steps, batch, device = timesteps.shape[0], x_T.shape[0], x_T.device
    if len(schedule) != n_steps:
        raise ValueError(f"the schedule has {len(schedule)} entries for {n_steps} steps")
    if not any(k > 0 for k in schedule):
        raise ValueError("exploration_k is 0 at every step: no branch, no transition row")
    lam = "lambda" in algorithm
    if lam and predict_ref is None:
        raise ValueError(f"algorithm={algorithm!r} needs the reference predictor")
    step_kw = dict(num_inference_steps=n_steps, algorithm=algorithm, const_weight=const_weight,
                   clip_sample_range=clip_sample_range)

    def predictions(x, t, rows, deterministic):
        """(ε̂ of the policy, ε̂ of the reference or None)."""
        if not lam:
            return predict(x, t, rows), None
        ref = predict_ref(x, t, rows)
        if deterministic and efficient:  # λ = 0 at η = 0: ε̃ = ε_ref, the policy's value is multiplied by 0
            return ref, ref
        return predict(x, t, rows), ref

    def ode(x, t, rows):
        eps, ref = predictions(x, t, rows, deterministic=True)
        return ddim_step_with_logprob(alphas_cumprod, eps, t, x, eta=0.0, model_output_ref=ref, **step_kw).prev_sample

    # pass 1: the deterministic roots (upstream: all B rows in one call; efficient: one row per distinct root)
    rep, inverse = _groups(root_groups, batch, device) if efficient else (torch.arange(batch, device=device),) * 2
    x = x_T[rep]
    roots = [x]
    for t in timesteps:
        x = ode(x, t.expand(x.shape[0]), rep)
        roots.append(x)
    root_latents = torch.stack(roots, dim=1)[inverse]  # [B, N+1, C, h, w]

    # pass 2a: one stochastic step per branch
    rows = {key: [] for key in ("step", "sample", "k", "t", "t_next", "latents", "next", "log_probs", "noises",
                                "preds")}
    anchors = {key: [] for key in ("step", "sample", "t", "t_next", "latents")}
    arange = torch.arange(batch, device=device)
    for s, k in enumerate(schedule):
        t_s = timesteps[s]
        state = root_latents[:, s]  # [B, C, h, w]
        if k == 0:
            if collect_anchor_rows and s < n_steps - 1:
                anchors["step"].append(torch.full((batch,), s, device=device, dtype=torch.long))
                anchors["sample"].append(arange)
                anchors["t"].append(t_s.expand(batch).clone())
                anchors["t_next"].append(timesteps[s + 1].expand(batch).clone())
                anchors["latents"].append(state.clone())
            continue
        expanded = arange.repeat_interleave(k)  # [B·k] root of each branch
        count = expanded.shape[0]
        noise = torch.randn((count, *state.shape[1:]), generator=generator, device=device, dtype=state.dtype)
        if efficient:
            unique_rows = rep
            eps_u, ref_u = _in_chunks(lambda a, b: predictions(state[unique_rows[a:b]], t_s.expand(b - a),
                                                               unique_rows[a:b], False),
                                      unique_rows.shape[0], latent_chunk_size)
            pick = inverse[expanded]
            eps, ref = eps_u[pick], (ref_u[pick] if ref_u is not None else None)
            step = ddim_step_with_logprob(alphas_cumprod, eps, t_s.expand(count), state[expanded], eta=eta,
                                          model_output_ref=ref, noise=noise, **step_kw)
            nxt, logp = step.prev_sample, _log_prob_or_nan(step, count)
        else:  # upstream: chunks of L rows, a short last chunk padded with copies of its first row
            parts = []
            for start in range(0, count, latent_chunk_size):
                ids = expanded[start:start + latent_chunk_size]
                xi = noise[start:start + latent_chunk_size]
                real = ids.shape[0]
                if real < latent_chunk_size:
                    ids = torch.cat([ids, ids[:1].repeat(latent_chunk_size - real)])
                    xi = torch.cat([xi, xi[:1].repeat(latent_chunk_size - real, 1, 1, 1)])
                e, r = predictions(state[ids], t_s.expand(ids.shape[0]), ids, False)
                st = ddim_step_with_logprob(alphas_cumprod, e, t_s.expand(ids.shape[0]), state[ids], eta=eta,
                                            model_output_ref=r, noise=xi, **step_kw)
                parts.append((st.prev_sample[:real], _log_prob_or_nan(st, ids.shape[0])[:real], e[:real]))
            nxt, logp, eps = (torch.cat(p) for p in zip(*parts))
        rows["step"].append(torch.full((count,), s, device=device, dtype=torch.long))
        rows["sample"].append(expanded)
        rows["k"].append(torch.full((count,), float(k), device=device, dtype=torch.float32))
        rows["t"].append(t_s.expand(count).clone())
        rows["t_next"].append(timesteps[min(s + 1, n_steps - 1)].expand(count).clone())
        rows["latents"].append(state[expanded])
        rows["next"].append(nxt)
        rows["log_probs"].append(logp)
        rows["noises"].append(noise)
        rows["preds"].append(eps)
    cat = {key: torch.cat(value) for key, value in rows.items()}

    # pass 2b: every branch finished deterministically, one step per round for all rows at once
    final, useful, processed = _continue_rows(ode, cat["step"], cat["sample"], cat["next"], timesteps,
                                              latent_chunk_size, pad=not efficient)
    latent_shape = x_T.shape[1:]
    empty_long = torch.zeros(0, dtype=torch.long, device=device)
    anchor = {key: torch.cat(value) for key, value in anchors.items()} if anchors["step"] else {
        "step": empty_long, "sample": empty_long, "t": empty_long, "t_next": empty_long,
        "latents": torch.zeros((0, *latent_shape), device=device, dtype=x_T.dtype)}
    return BranchRollout(cat["step"], cat["sample"], cat["k"], cat["t"], cat["t_next"], cat["latents"], cat["next"],
                         cat["log_probs"], cat["noises"], cat["preds"], final, anchor["step"], anchor["sample"],
                         anchor["t"], anchor["t_next"], anchor["latents"], root_latents, useful, processed)


def _log_prob_or_nan(step, count: int) -> torch.Tensor:
    """ℓ of a branch step; NaN (undefined) with η = 0, where the branch is deterministic."""
    if step.log_prob is not None:
        return step.log_prob
    return torch.full((count,), float("nan"), device=step.prev_sample.device)


def _continue_rows(ode, step_idx: torch.Tensor, sample_idx: torch.Tensor, next_latents: torch.Tensor,
                   timesteps: torch.Tensor, chunk: int, pad: bool) -> tuple[torch.Tensor, int, int]:
    """Pass 2b: rows advance together, one step per round, each at its own position p (from s + 1 on), in chunks
    of `chunk` rows (`pad`: a short chunk is padded with copies of its first row, as upstream). Returns (final
    latents [R, ...], useful row-steps, processed row-steps); checks every row ran exactly its remaining steps."""
    n_steps = timesteps.shape[0]
    remaining = torch.clamp(n_steps - (step_idx + 1), min=0)
    final = next_latents.clone()
    executed = torch.zeros_like(remaining)
    active = torch.nonzero(remaining > 0).flatten()
    position = step_idx[active] + 1
    left = remaining[active]
    processed = 0
    while active.numel():
        for start in range(0, active.shape[0], chunk):
            ids, pos = active[start:start + chunk], position[start:start + chunk]
            real = ids.shape[0]
            if pad and real < chunk:
                ids_model = torch.cat([ids, ids[:1].repeat(chunk - real)])
                pos = torch.cat([pos, pos[:1].repeat(chunk - real)])
            else:
                ids_model = ids
            processed += ids_model.shape[0]
            out = ode(final[ids_model], timesteps[pos], sample_idx[ids_model])
            final[ids] = out[:real]
            executed[ids] += 1
        position, left = position + 1, left - 1
        keep = left > 0
        active, position, left = active[keep], position[keep], left[keep]
    if not torch.equal(executed, remaining):
        raise RuntimeError("pass 2b: a row did not run exactly its remaining steps")
    return final, int(remaining.sum()), processed
