"""Per-update diagnostics and the adaptive clipping threshold (spec §5.7 step 4).

Each training timestep records scalars (`loss_raw`, `loss`, `transition_drift`, ...) and the per-sample reward
gradient norms `[B_t]`. At an optimizer step the window's records are reduced over micro-steps and processes:

* keys with `_min` / `_max`: global min / max; other scalars: the mean over processes of per-process means;
* the norms: `rgrad_mean` (mean), `rgrad_min`, `rgrad_max`, and `rgrad_median`, `rgrad_08quantile`, `rgrad_std`.

Faithful (`quirks.single_rank_quantile`, spec §10 N2): upstream's all-gather wrote every rank's matrix of norms
into one aliased buffer, so every rank computed the statistics of the *last* rank's norms, then divided them by W
like the summed keys. Fixed: the statistics of all processes' norms, not divided. The new threshold tau is
`rgrad_08quantile`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

NORM_STATS = ("rgrad_median", "rgrad_08quantile", "rgrad_std")


def norm_records(norm: torch.Tensor) -> dict:
    """The per-timestep records of a norm vector `[B_t]` (upstream's keys)."""
    return {"rgrad_mean": norm.mean(), "rgrad_min": norm.min(), "rgrad_max": norm.max()}


def local_summary(window: Sequence[dict]) -> tuple[dict, torch.Tensor]:
    """(scalars reduced over this process's micro-steps, norms matrix `[steps, B_t]`)."""
    keys = sorted({k for record in window for k in record if k != "rgrad_norm"})
    summary = {}
    for key in keys:
        values = torch.stack([record[key].detach().double() for record in window if key in record])
        summary[key] = values.min() if "_min" in key else values.max() if "_max" in key else values.mean()
    norms = torch.stack([record["rgrad_norm"].detach().double() for record in window])  # [steps, B_t]
    return summary, norms


def norm_statistics(norms: torch.Tensor) -> dict:
    """Median (lower middle value, as torch.median), 0.8-quantile (linear) and unbiased std of a matrix of norms."""
    flat = norms.reshape(-1).double()
    return {"rgrad_median": flat.median(), "rgrad_08quantile": torch.quantile(flat, 0.8),
            "rgrad_std": flat.std() if flat.numel() > 1 else torch.zeros((), dtype=flat.dtype)}


def aggregate(window: Sequence[dict], world_size: int = 1, gather: Callable | None = None,
              single_rank_quantile: bool = True) -> dict:
    """The update's diagnostics (python floats) from this process's window; `gather(tensor [n]) -> [W, n]`
    all-gathers a flat vector (one collective per update; None on one process)."""
    summary, norms = local_summary(window)
    keys = list(summary)
    flat = torch.cat([torch.stack([summary[k] for k in keys]) if keys else torch.zeros(0, dtype=torch.float64),
                      norms.reshape(-1)])
    everyone = gather(flat) if (gather is not None and world_size > 1) else flat[None]  # [W, n]
    everyone = everyone.cpu().double()
    scalars, all_norms = everyone[:, :len(keys)], everyone[:, len(keys):].reshape(everyone.shape[0], *norms.shape)
    out = {}
    for i, key in enumerate(keys):
        column = scalars[:, i]
        out[key] = column.min() if "_min" in key else column.max() if "_max" in key else column.mean()
    if single_rank_quantile:
        stats = {k: v / world_size for k, v in norm_statistics(all_norms[-1]).items()}
    else:
        stats = norm_statistics(all_norms)
    out.update(stats)
    return {k: float(v) for k, v in out.items()}
