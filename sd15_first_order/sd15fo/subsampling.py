"""Which transitions of each trajectory train, and in which micro-batches (spec §5.2).

K = ⌊N·f⌋ transitions per trajectory, plus one when ⌊N·f⌋ ≠ N: the final transition (step N-1, t = 1 -> 0)
always trains, followed by transitions drawn from the rest of the trajectory. With low-variance subsampling
the steps are split into n = ⌊N·f⌋ contiguous trunks (trunk 0 = the noisiest steps) and a row of step indices
is [N-1] followed by passes over the trunks n-1, n-2, ..., 0, one uniformly drawn step from each; only the
first K entries of a row train, i.e. the final step and one step from every trunk, from low noise to high.

Parity (spec §9 item 27): the draw from the last trunk may pick step N-1 again, so the final transition can
train twice in a row; `dedupe_final=True` (clean mode) draws that first pick among the trunk's other steps.

Randomness comes from one explicit generator, in the reference's call order on a CPU (one `randperm` over the
trajectories, then one `randint` per pick), so a generator seeded like the reference's global RNG gives the
reference's rows.
"""
from __future__ import annotations

from typing import Optional

import torch


def num_train_timesteps(num_steps: int, timestep_fraction: float) -> int:
    """K: ⌊N·f⌋, plus the final step when ⌊N·f⌋ ≠ N (K = 11 for N = 50, f = 0.2)."""
    n = int(num_steps * timestep_fraction)
    return n if n == num_steps else n + 1


def timestep_rows(num_rows: int, num_steps: int, timestep_fraction: float, low_var: bool,
                  generator: Optional[torch.Generator] = None, dedupe_final: bool = False) -> torch.Tensor:
    """Step-index rows [num_rows, L] (int64, CPU): L = N + 1 with low-variance subsampling and f < 1, else N."""
    if timestep_fraction >= 1.0:
        return torch.stack([torch.randperm(num_steps, generator=generator) for _ in range(num_rows)])
    if not low_var:
        rest = torch.stack([torch.randperm(num_steps - 1, generator=generator) for _ in range(num_rows)])
        return torch.cat([torch.full((num_rows, 1), num_steps - 1, dtype=torch.long), rest], dim=1)
    n_trunks = int(num_steps * timestep_fraction)
    if n_trunks < 1 or num_steps % n_trunks:
        raise ValueError(f"low-variance subsampling needs 1 <= int(N*f) = {n_trunks} dividing N = {num_steps}")
    size = num_steps // n_trunks
    trunks = torch.arange(num_steps).view(n_trunks, size)  # [n, m]; trunk 0 = steps 0..m-1 (noisiest)
    order = list(reversed(range(n_trunks))) * size  # m passes over the trunks, last trunk first
    rows = []
    for _ in range(num_rows):
        picks = []
        for position, trunk in enumerate(order):
            if dedupe_final and position == 0 and trunk == n_trunks - 1 and size > 1:
                picks.append(trunks[trunk][torch.randint(0, size - 1, (1,), generator=generator)])  # not N-1
            else:
                picks.append(trunks[trunk][torch.randint(0, size, (1,), generator=generator)])
        rows.append(torch.cat([torch.tensor([num_steps - 1]), torch.cat(picks)]))
    return torch.stack(rows)


def shuffle_and_batch(samples: dict, *, batch_size: int, num_steps: int, timestep_fraction: float, low_var: bool,
                      generator: Optional[torch.Generator] = None, dedupe_final: bool = False,
                      keep_columns: Optional[int] = None) -> tuple[list[dict], torch.Tensor]:
    """Shuffle an epoch's trajectories, choose each one's training columns, and cut micro-batches of
    `batch_size` trajectories (spec §5.2).

    `samples`: per-trajectory tensors with M rows — `timesteps` [M, N], and the per-step keys `latents`
    [M, N+1, ...] (x before each step, then z0: next_latents are columns 1..N), `noise_preds` [M, N, ...] — plus
    any other tensors [M, ...] and lists (`prompts`, `prompt_metadata`) of length M, reordered alike. Returns
    the micro-batches (dicts with `timesteps`, `latents`, `next_latents`, `noise_preds` gathered to the first
    `keep_columns` columns of each row, default all) and the full column matrix [M, L] (its width L sets the
    legacy helper stride, spec §4.6). Every gathered (x_t, x_t', t, ε_old) stays one real transition."""
    timesteps = samples["timesteps"]
    total, steps = timesteps.shape
    if steps != num_steps:
        raise ValueError(f"samples hold {steps} steps per trajectory, expected {num_steps}")
    if total % batch_size:
        raise ValueError(f"{total} trajectories do not split into micro-batches of {batch_size}")
    perm = torch.randperm(total, generator=generator)
    columns = timestep_rows(total, num_steps, timestep_fraction, low_var, generator, dedupe_final)  # [M, L]
    kept = columns[:, :keep_columns] if keep_columns else columns

    def gather(values, offset=0):  # values [M, S, ...] -> rows of perm, columns kept (+offset) -> [M, K, ...]
        index_rows, index_cols = perm[:, None].expand_as(kept), kept + offset
        return values[index_rows.to(values.device), index_cols.to(values.device)]

    shuffled = {}
    for key, value in samples.items():
        if key in ("timesteps", "latents", "noise_preds"):
            continue
        if isinstance(value, torch.Tensor):
            shuffled[key] = value[perm.to(value.device)]
        else:
            shuffled[key] = [value[i] for i in perm.tolist()]
    shuffled["timesteps"] = gather(timesteps)
    shuffled["latents"] = gather(samples["latents"])
    shuffled["next_latents"] = gather(samples["latents"], offset=1)
    shuffled["noise_preds"] = gather(samples["noise_preds"])
    batches = []
    for start in range(0, total, batch_size):
        batches.append({key: value[start:start + batch_size] for key, value in shuffled.items()})
    return batches, columns
