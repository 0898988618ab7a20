"""Figure 2 of the paper on a CPU: every value-gradient estimator against the analytic Ψ at ᾱ_t ≈ 0.01.

    python -m toy_experiments.run              # full run (see README for its size and time)
    python -m toy_experiments.run --quick      # seconds; what CI runs
    python -m toy_experiments.run --out DIR --cache-dir DIR --threads 1

Writes to --out: one PNG per panel, figure2.png (all panels), results.csv, results.md, run.json.

Every panel is computed twice, with two denoisers for the rollouts:
  learned  the toy's set-up: a DDPM trained on p, then fine-tuned on samples of p* ("model_ft", spec §7.1);
  exact    the ideal ε of p*, i.e. what model_ft approximates; cheap, so it affords the toy's full sample
           counts on a CPU, and it separates what an estimator does from what model error does.
RMSE against a reference, per estimate = √(mean over the 2 coordinates of the squared error); with S samples
drawn per test point, the S samples are cut into S/N disjoint groups of N, each group gives one estimate, and
the RMSE is averaged over groups and then over test points (mean ± s.e.m. over points).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from . import ddpm, estimators as est
from .problem import (exact_eps, expected_reward_gradient, reference_mixture, reward, tilted_mixture,
                      value_gradient)

log = logging.getLogger("toy_experiments")


@dataclass
class Config:
    seed: int = 42  # the toy draws its test points with seed 42 (spec §7.1)
    # Training of the two DDPMs (our choice; the toy's recipe is not recorded, spec §7.1).
    base_steps: int = 2000
    ft_steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    # Estimators.
    log2_n: tuple[int, ...] = (4, 6, 8, 10, 12, 14, 16)  # N = 2^m, m = 4, 6, …, 16 (spec §7.1)
    exact_points: int = 50  # script 1 of the toy uses 50 test points, scripts 2–3 use 100 (spec §7.1)
    learned_points: int = 4
    learned_max_log2_n: int = 14  # learned rollouts cost ~1000× the exact ones on a CPU
    lookahead_ratios: tuple[float, ...] = (0.9, 0.8, 0.5)  # ρ = t_j/t_i (spec §7.1)
    branch_configs: tuple[tuple[int, int], ...] = ((1, 1), (2, 2), (3, 2), (4, 2), (2, 4))  # (#split, #branch), spec §4.3
    sqdf_mid: int = 195  # SQDF's DDIM jump 389 → 195 (spec §7.1)
    quadrature_order: int = 48  # Gauss–Hermite nodes per axis for the SDE&ODE-mixed limit
    block: int = 1024  # samples per autograd block for learned first-order lookahead (memory)
    # ω of the zeroth-order estimators (ddpm.credited_guidance_scale): "jump", the stride-10 step that is
    # credited (mean = Ψ on a Gaussian), or "single-step", the toy scripts' one-index step (ω 0.988 vs 0.887).
    omega: str = "jump"
    # Branching mechanism (exact denoiser): path pairs per test point for f(s), and the N at which the variance
    # of the tree estimates is compared with independent paths (capped so that there are >= 4 groups).
    prefix_pairs: int = 8192
    variance_log2_n: int = 8

    @classmethod
    def quick(cls) -> "Config":
        return cls(base_steps=60, ft_steps=30, batch_size=128, log2_n=(4, 6, 8), exact_points=2,
                   learned_points=1, learned_max_log2_n=6, quadrature_order=8, prefix_pairs=256)

    def validate(self) -> None:
        if self.omega not in ddpm.OMEGA_CHOICES:
            raise ValueError(f"omega={self.omega!r}: choose one of {', '.join(ddpm.OMEGA_CHOICES)}")
        for key in ("exact_points", "learned_points", "prefix_pairs"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 1")
        if self.learned_max_log2_n < min(self.log2_n):
            raise ValueError(f"learned_max_log2_n={self.learned_max_log2_n} must be >= the smallest log2_n "
                             f"{min(self.log2_n)}")

    def training(self) -> dict:
        return {"base_steps": self.base_steps, "ft_steps": self.ft_steps, "batch_size": self.batch_size,
                "lr": self.lr, "seed": self.seed}


# ---------------------------------------------------------------------------------------------------------
# setup: the two DDPMs, cached as safetensors keyed by their training settings.

def _key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def setup_models(cfg: Config, schedule: ddpm.Schedule, cache_dir: Path) -> tuple[ddpm.EpsMLP, ddpm.EpsMLP, dict]:
    """model_base: DDPM trained on p. model_ft: model_base trained further on p* with the same loss (our reading
    of "fine-tuned"; the toy's checkpoint provenance is not recorded). Returns both and their final losses."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    settings = {"arch": "toy_eps_mlp_v1", "T": ddpm.NUM_TIMESTEPS, "betas": [ddpm.BETA_START, ddpm.BETA_END],
                **cfg.training()}
    info = {}
    models = {}
    for role, data, steps in (("base", reference_mixture(), cfg.base_steps), ("ft", tilted_mixture(), cfg.ft_steps)):
        path = cache_dir / f"eps_mlp_{role}_{_key({**settings, 'role': role})}.safetensors"
        torch.manual_seed(cfg.seed)  # initial weights (ft starts from base and only uses the seed for dropout)
        model = ddpm.EpsMLP()
        if path.exists():
            model.load_state_dict(load_file(path))
            info[role] = {"checkpoint": str(path), "cached": True}
        else:
            if role == "ft":
                model.load_state_dict(models["base"].state_dict())
            gen = torch.Generator().manual_seed(cfg.seed + (0 if role == "base" else 1))
            start = time.perf_counter()
            losses = ddpm.train_eps_model(model, lambda n: data.sample(n, gen), schedule, steps=steps,
                                          batch_size=cfg.batch_size, lr=cfg.lr, generator=gen)
            tail = losses[-max(1, steps // 10):]
            info[role] = {"checkpoint": str(path), "cached": False, "seconds": time.perf_counter() - start,
                          "final_loss": sum(tail) / len(tail)}
            tmp = path.with_suffix(".tmp")
            save_file(model.state_dict(), str(tmp), metadata={"settings": json.dumps({**settings, "role": role})})
            os.replace(tmp, path)
        model.eval()
        models[role] = model
    return models["base"], models["ft"], info


# ---------------------------------------------------------------------------------------------------------
# The experiment.

@dataclass
class Curves:
    """RMSE per (panel, estimator, x) for one denoiser, one list entry per test point."""

    values: dict = field(default_factory=dict)

    def add(self, panel: str, name: str, x: float, log2_n: int, rmse: float) -> None:
        self.values.setdefault((panel, name, x, log2_n), []).append(rmse)


def branch_name(n_split: int, n_branch: int) -> str:
    return f"#split={n_split}, #branch={n_branch}"


UNBRANCHED = branch_name(1, 1)


def mean_sem(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (over test points)."""
    mean = sum(values) / len(values)
    return mean, (sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1) / len(values)) ** 0.5


def ratio_of_sums(num: list[float], den: list[float]) -> tuple[float, float]:
    """R = Σ num / Σ den over test points, with its delta-method standard error (per-point terms num − R·den)."""
    ratio = sum(num) / sum(den)
    _, se = mean_sem([a - ratio * b for a, b in zip(num, den)])
    return ratio, se * len(den) / sum(den)


def group_rmse(estimates: torch.Tensor, target: torch.Tensor) -> float:
    """estimates: [G, 2] (one per group of N samples), target: [2] → mean over groups of the per-estimate RMSE."""
    return (estimates - target).pow(2).mean(-1).sqrt().mean().item()


def test_points(cfg: Config, schedule: ddpm.Schedule, n: int) -> torch.Tensor:
    """x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε with x0 ~ p* (spec §7.1).  → [n, 2] float32"""
    gen = torch.Generator().manual_seed(cfg.seed)
    x0 = tilted_mixture().sample(n, gen)
    ab = schedule.ab(ddpm.TEST_T)
    noise = torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
    return (math.sqrt(ab) * x0 + math.sqrt(1 - ab) * noise).float()


def run_point(eps: ddpm.Denoiser, schedule: ddpm.Schedule, cfg: Config, x_t: torch.Tensor, psi: torch.Tensor,
              log2_n: list[int], gen: torch.Generator, curves: Curves, block: int) -> dict:
    """Every Monte-Carlo panel at one test point x_t [2] with S = 2^max(log2_n) samples per estimator."""
    t = ddpm.TEST_T
    S = 2 ** max(log2_n)
    sigma = ddpm.posterior_std(schedule.ab(t), schedule.ab(ddpm.prev_t(t)))  # σ_1 of the stride-10 first step
    omega = ddpm.credited_guidance_scale(schedule, t, cfg.omega)
    steps = len(ddpm.sampling_grid(t))

    def zo(r: torch.Tensor, xi: torch.Tensor, n: int, cv: bool) -> torch.Tensor:
        return est.zeroth_order(r.view(-1, n), xi.view(-1, n, 2), sigma, omega, cv)  # [S/n, 2]

    # One set of independent stochastic paths serves ZO with/without CV, ZO lookahead (x̂0 at the stop state)
    # and the first-order lookahead (same noise, re-run with autograd).
    stops = {rho: est.lookahead_stop(t, rho) for rho in cfg.lookahead_ratios}
    noise = torch.randn(steps, S, 2, generator=gen)
    with torch.no_grad():
        paths = ddpm.rollout(eps, schedule, x_t.expand(S, -1), t, noise, record=tuple(stops.values()))
    r_end = reward(paths.x0)
    r_stop = {rho: reward(paths.x0_hat[s]) for rho, s in stops.items()}
    fo_grads = {}
    for rho, s in stops.items():
        fo_grads[rho] = torch.cat([est.first_order_lookahead(eps, schedule, x_t, t, s, noise[:, b])
                                   for b in ddpm.iterate_blocks(S, block)])
    with torch.no_grad():
        mixed = ddpm.rollout(eps, schedule, x_t.expand(S, -1), t, noise, stochastic_after_first=False)
        r_mixed = reward(mixed.x0)
        mixed_target = est.mixed_limit(eps, schedule, x_t, t, cfg.quadrature_order, omega)

    for m in log2_n:
        n = 2**m
        curves.add("value_gradient_estimate", "ZO w/o control variate", m, m, group_rmse(zo(r_end, paths.xi_first, n, False), psi))
        curves.add("value_gradient_estimate", "ZO w/ control variate", m, m, group_rmse(zo(r_end, paths.xi_first, n, True), psi))
        curves.add("lookahead_zeroth", "rho=0.00 (full trajectory, GRPO)", m, m, group_rmse(zo(r_end, paths.xi_first, n, True), psi))
        curves.add("branch_zeroth_tempflowgrpo", "SDE (vs analytic Psi)", m, m, group_rmse(zo(r_end, paths.xi_first, n, True), psi))
        curves.add("branch_zeroth_tempflowgrpo", "SDE&ODE mixed (vs its own limit)", m, m,
                   group_rmse(zo(r_mixed, paths.xi_first, n, True), mixed_target))
        for rho in cfg.lookahead_ratios:
            curves.add("lookahead_zeroth", f"rho={rho:.2f}", m, m, group_rmse(zo(r_stop[rho], paths.xi_first, n, True), psi))
            curves.add("lookahead_first", f"rho={rho:.2f}", m, m, group_rmse(fo_grads[rho].view(-1, n, 2).mean(1), psi))

    # Branch-GRPO trees: S end points per configuration; groups of N end points are N/B whole trees.
    nfe_full = steps  # one unbranched path costs `steps` denoiser calls
    nfe_ratio, tree_variance = {}, {}
    m_var = variance_log2_n(cfg, log2_n)
    for n_split, n_branch in cfg.branch_configs:
        leaves = n_branch**n_split
        with torch.no_grad():
            tree, nfe = ddpm.tree_rollout(eps, schedule, x_t.expand(S // leaves, -1).clone(), t,
                                          est.branch_splits(t, n_split), n_branch, gen)
        ratio = nfe / S / nfe_full  # NFE per end point relative to an unbranched path
        nfe_ratio[(n_split, n_branch)] = ratio
        r_tree = reward(tree.x0)
        for m in log2_n:
            if 2**m < leaves:
                continue
            x = m + math.log2(ratio)
            curves.add("branch_zeroth_branchgrpo", branch_name(n_split, n_branch), x, m,
                       group_rmse(zo(r_tree, tree.xi_first, 2**m, True), psi))
        # Variance of the estimates at one N (trace of their covariance over the S/N groups), for the mechanism.
        tree_variance[(n_split, n_branch)] = zo(r_tree, tree.xi_first, 2**m_var, True).var(0).sum().item()
    return {"mixed_limit_vs_psi": (mixed_target - psi).pow(2).mean().sqrt().item(), "nfe_ratio": nfe_ratio,
            "tree_variance": tree_variance}


def variance_log2_n(cfg: Config, log2_n: list[int]) -> int:
    """The N = 2^m at which tree and path estimates are compared: cfg.variance_log2_n, lowered to leave >= 4
    groups of N in the S = 2^max(log2_n) samples (never below the largest tree)."""
    return max(min(cfg.variance_log2_n, max(log2_n) - 2),
               max(math.ceil(math.log2(b**s)) for s, b in cfg.branch_configs))


def run_denoiser(name: str, eps: ddpm.Denoiser, schedule: ddpm.Schedule, cfg: Config, points: torch.Tensor,
                 all_points: torch.Tensor, log2_n: list[int], block: int, bar: tqdm) -> tuple[Curves, dict]:
    """Every panel for one denoiser on `points`; the cheap first-order current-state estimators also on all_points."""
    t = ddpm.TEST_T
    psi_all = value_gradient(all_points.double(), schedule.ab(t)).float()
    psi = value_gradient(points.double(), schedule.ab(t)).float()  # [P, 2]
    curves = Curves()
    # First-order current-state estimators: deterministic, one call for all points.
    dps = est.first_order_current_state(eps, schedule, points, t)
    sqdf = est.first_order_sqdf(eps, schedule, points, t, cfg.sqdf_mid)
    per_point_rmse = lambda e: (e - psi).pow(2).mean(-1).sqrt()  # noqa: E731
    for i in range(len(points)):
        for m in log2_n:
            curves.add("value_gradient_estimate", "FO grad r(x0|t) (DPS)", m, m, per_point_rmse(dps)[i].item())
            curves.add("value_gradient_estimate", "FO SQDF 2-step ODE", m, m, per_point_rmse(sqdf)[i].item())
            curves.add("lookahead_first", "rho=1.00 (current state, DPS)", m, m, per_point_rmse(dps)[i].item())
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    extras = []
    for i in range(len(points)):
        extras.append(run_point(eps, schedule, cfg, points[i], psi[i], log2_n, gen, curves, block))
        bar.update(1)
    summary = {
        "points": len(points),
        "max_log2_n": max(log2_n),
        "psi_rms": psi.pow(2).mean(-1).sqrt().mean().item(),
        "dps_rmse": per_point_rmse(dps).mean().item(),
        "sqdf_rmse": per_point_rmse(sqdf).mean().item(),
        "all_points": len(all_points),
        "dps_rmse_all_points": (est.first_order_current_state(eps, schedule, all_points, t) - psi_all)
        .pow(2).mean(-1).sqrt().mean().item(),
        "sqdf_rmse_all_points": (est.first_order_sqdf(eps, schedule, all_points, t, cfg.sqdf_mid) - psi_all)
        .pow(2).mean(-1).sqrt().mean().item(),
        "mixed_limit_vs_psi": sum(e["mixed_limit_vs_psi"] for e in extras) / len(extras),
        # The value every reward-linear estimator shares in the limit of an exact model and N → ∞.
        "reward_gradient_limit_vs_psi": per_point_rmse(
            expected_reward_gradient(tilted_mixture(), points.double(), schedule.ab(t)).float()).mean().item(),
        "branch_nfe_ratio": {f"{k[0]}x{k[1]}": v for k, v in extras[0]["nfe_ratio"].items()},
        "omega": ddpm.credited_guidance_scale(schedule, t, cfg.omega),
        # The zeroth-order estimators' N → ∞ value on an exact model: the jump's ω gives ∇E_{p*}[r(x0)|x_t]
        # (up to the O(ᾱ) step discretisation); another ω scales it by ω/ω_jump.
        "zeroth_order_limit_vs_psi": per_point_rmse(
            ddpm.credited_guidance_scale(schedule, t, cfg.omega) / ddpm.credited_guidance_scale(schedule, t, "jump")
            * expected_reward_gradient(tilted_mixture(), points.double(), schedule.ab(t)).float()).mean().item(),
        "branch_equal_compute": equal_compute(curves, list(range(4, max(log2_n) + 1, 2))),
        "branch_measured_ratio": measured_branch_ratios(cfg, extras, variance_log2_n(cfg, log2_n)),
    }
    log.info("%s: %s", name, json.dumps(summary))
    return curves, summary


def equal_compute(curves: Curves, xs: list[int]) -> dict:
    """Branching configurations at equal compute. Per test point, log2 RMSE is interpolated linearly along its
    curve at each integer x = log2(NFE / NFE of one unbranched path) in xs; then mean ± s.e.m. over points of
    the RMSE and of the paired ratio to the unbranched configuration at the same x (same points, same x)."""
    curves_by_name = {}
    for (panel, name, x, _), vals in curves.values.items():
        if panel == "branch_zeroth_branchgrpo":
            curves_by_name.setdefault(name, []).append((x, vals))
    per_point = {}
    for name, curve in curves_by_name.items():
        curve.sort(key=lambda c: c[0])
        per_point[name] = {}
        for target in xs:
            seg = next(((a, b) for a, b in zip(curve, curve[1:]) if a[0] <= target <= b[0]), None)
            if seg is not None:
                (x0, v0), (x1, v1) = seg
                w = (target - x0) / (x1 - x0)
                per_point[name][target] = [2 ** ((1 - w) * math.log2(a) + w * math.log2(b)) for a, b in zip(v0, v1)]
    base = per_point.get(UNBRANCHED, {})
    out = {}
    for name, table in per_point.items():
        out[name] = {x: {"rmse": mean_sem(v),
                         "ratio": mean_sem([a / b for a, b in zip(v, base[x])]) if x in base else None}
                     for x, v in table.items()}
    return out


def measured_branch_ratios(cfg: Config, extras: list[dict], m: int) -> dict:
    """Equal-compute RMSE ratio of each tree to independent paths from the variance of the estimates at N = 2^m:
    √(Σ_points Var_tree · cost / Σ_points Var_paths) (± its delta-method s.e.), to set beside the prediction
    √(variance factor · cost) of the mechanism table."""
    base = [e["tree_variance"][(1, 1)] for e in extras]
    out = {}
    for key in cfg.branch_configs:
        cost = extras[0]["nfe_ratio"][key]
        ratio, se = ratio_of_sums([e["tree_variance"][key] * cost for e in extras], base)
        out[branch_name(*key)] = {"log2_n": m, "ratio": ratio**0.5, "se": se / (2 * ratio**0.5)}
    return out


def branch_mechanism(eps: ddpm.Denoiser, schedule: ddpm.Schedule, cfg: Config, points: torch.Tensor,
                     gen: torch.Generator) -> dict:
    """Why a tree does not beat independent paths for this estimator: f(s) = Var(E[r | x_s]) / Var(r) pooled over
    test points (Σ Cov / Σ Var, est.shared_prefix_fraction), each tree's per-end-point variance factor and cost
    and the equal-compute RMSE ratio they predict, and the sweep over one split at every state s."""
    t = ddpm.TEST_T
    shares = [est.shared_prefix_fraction(eps, schedule, x, t, cfg.prefix_pairs, gen) for x in points]
    states = shares[0].states
    var = sum(sh.var for sh in shares)
    f = sum(sh.cov for sh in shares) / var
    f_se = sum(sh.cov_se.pow(2) for sh in shares).sqrt() / var
    fraction = dict(zip(states, f.tolist()))
    configs = {}
    for n_split, n_branch in cfg.branch_configs:
        splits = est.branch_splits(t, n_split)
        cost = est.tree_cost(t, splits, n_branch)
        factor = est.tree_variance_factor(t, splits, n_branch, fraction)
        configs[branch_name(n_split, n_branch)] = {"splits": splits, "cost": cost, "variance_factor": factor,
                                                   "predicted_ratio": (factor * cost) ** 0.5}
    sweep = {b: [est.tree_variance_factor(t, [s], b, fraction) * est.tree_cost(t, [s], b) for s in states]
             for b in (2, 4)}
    sweep_se = {b: [(b - 1) * se * est.tree_cost(t, [s], b) for s, se in zip(states, f_se.tolist())] for b in (2, 4)}
    return {"points": len(points), "pairs": cfg.prefix_pairs, "states": states,
            "alpha_bar": [schedule.ab(s) for s in states], "f": f.tolist(), "f_se": f_se.tolist(),
            "configs": configs, "single_split_variance_x_cost": sweep, "single_split_se": sweep_se}


def rows_of(denoiser: str, curves: Curves) -> list[dict]:
    rows = []
    for (panel, name, x, m), vals in sorted(curves.values.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][3])):
        mean, sem = mean_sem(vals)
        rows.append({"denoiser": denoiser, "panel": panel, "estimator": name, "log2_n": m, "x": round(x, 4),
                     "rmse": mean, "sem": sem, "points": len(vals)})
    return rows


# ---------------------------------------------------------------------------------------------------------
# Outputs.

PANELS = {
    "value_gradient_estimate": ("log2 N (samples per estimate)", "ZO with/without control variate vs first-order current state"),
    "lookahead_first": ("log2 N (samples per estimate)", "First-order lookahead, rho = t_j/t_i"),
    "lookahead_zeroth": ("log2 N (samples per estimate)", "Zeroth-order lookahead, rho = t_j/t_i"),
    "branch_zeroth_branchgrpo": ("log2 (NFE / NFE of one unbranched path)", "Branching (Branch-GRPO), GRPO-style estimator"),
    "branch_zeroth_tempflowgrpo": ("log2 N (samples per estimate)", "Stochasticity localisation (TempFlow-GRPO)"),
}


def plot_mechanism(ax, mech: dict) -> None:
    states = mech["states"]
    ax.plot(states, mech["f"], "o-", ms=2.5, color="C0", label="f(s) = Var(E[r|x_s]) / Var(r)")
    for b, color in ((2, "C1"), (4, "C2")):
        ax.plot(states, mech["single_split_variance_x_cost"][b], "s-", ms=2.5, color=color,
                label=f"one {b}-way split at s: variance x cost")
    ax.axhline(1.0, color="0.4", lw=1, ls=":")
    ax.axvline(189, color="0.6", lw=0.8, ls="--")
    ax.text(189, 0.02, "second split of (2,2), (2,4) ", fontsize=5.5, color="0.4", ha="right")
    ax.set_xlim(max(states) + 5, min(states) - 5)  # sampling runs left to right
    ax.set_ylim(0, 1.4 * max(mech["single_split_variance_x_cost"][4]))
    ax.set_xlabel("split state s (grid index; x_t at 389)")
    ax.set_title("Branching: what a shared prefix up to x_s costs (exact denoiser)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=5.5, loc="upper center")


def plot(rows: list[dict], mechanism: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig_all, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    axes = axes.ravel()
    plot_mechanism(axes[-1], mechanism)  # the sixth cell of the 2×3 grid
    for ax_all, (panel, (xlabel, title)) in zip(axes, PANELS.items()):
        fig, ax = plt.subplots(figsize=(5, 3.6))
        names = list(dict.fromkeys(r["estimator"] for r in rows if r["panel"] == panel))
        for target in (ax, ax_all):
            for k, name in enumerate(names):
                for denoiser, style in (("exact", "-"), ("learned", "--")):
                    sel = [r for r in rows if r["panel"] == panel and r["estimator"] == name and r["denoiser"] == denoiser]
                    if not sel:
                        continue
                    target.errorbar([r["x"] for r in sel], [r["rmse"] for r in sel], yerr=[r["sem"] for r in sel],
                                    fmt=style + "o", ms=3, color=f"C{k}", capsize=2,
                                    label=f"{name} [{denoiser}]")
            target.set_xlabel(xlabel)
            target.set_ylabel("RMSE (alpha_bar_t = 0.01)")
            target.set_yscale("log")
            target.set_title(title, fontsize=8)
            target.grid(alpha=0.3)
        ax.legend(fontsize=5.5)
        ax_all.legend(fontsize=5)
        fig.tight_layout()
        path = out / f"{panel}.png"
        fig.savefig(path, dpi=150)
        plt.close(fig)
        written.append(path)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    plot_mechanism(ax, mechanism)
    fig.tight_layout()
    path = out / "branch_mechanism.png"
    fig.savefig(path, dpi=150)
    plt.close(fig)
    written.append(path)
    fig_all.tight_layout()
    path = out / "figure2.png"
    fig_all.savefig(path, dpi=150)
    plt.close(fig_all)
    written.append(path)
    return written


def write_tables(rows: list[dict], summaries: dict, mechanism: dict, cfg: Config, out: Path) -> None:
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = ["# Figure 2 toy: RMSE of value-gradient estimators at alpha_bar_t = 0.01", "",
             f"Zeroth-order scale: --omega {cfg.omega} (omega = {next(iter(summaries.values()))['omega']:.4f}).", ""]
    for denoiser, s in summaries.items():
        lines.append(f"- **{denoiser}** denoiser: {s['points']} test points, N up to 2^{s['max_log2_n']}; "
                     f"mean |Psi| (RMS over coords) {s['psi_rms']:.4f}; SDE&ODE-mixed limit vs Psi (RMSE) "
                     f"{s['mixed_limit_vs_psi']:.4f}; exact grad E_p*[r(x0)|x_t] vs Psi (RMSE) "
                     f"{s['reward_gradient_limit_vs_psi']:.4f}, times omega/omega_jump (the zeroth-order limit) "
                     f"{s['zeroth_order_limit_vs_psi']:.4f}; DPS {s['dps_rmse']:.4f}, SQDF {s['sqdf_rmse']:.4f} "
                     f"(on all {s['all_points']} points: DPS {s['dps_rmse_all_points']:.4f}, "
                     f"SQDF {s['sqdf_rmse_all_points']:.4f})")
    lines.append("")
    for panel in PANELS:
        sel = [r for r in rows if r["panel"] == panel]
        ms = sorted({r["log2_n"] for r in sel})
        lines += [f"## {panel}", "", "| estimator | denoiser | " + " | ".join(f"N=2^{m}" for m in ms) + " |",
                  "|---|---|" + "---|" * len(ms)]
        for name in dict.fromkeys(r["estimator"] for r in sel):
            for denoiser in summaries:
                cells = {r["log2_n"]: r for r in sel if r["estimator"] == name and r["denoiser"] == denoiser}
                if cells:
                    lines.append(f"| {name} | {denoiser} | " + " | ".join(
                        f"{cells[m]['rmse']:.4f}" if m in cells else "" for m in ms) + " |")
        lines.append("")
        if panel == "branch_zeroth_branchgrpo":
            lines += equal_compute_table(summaries) + mechanism_table(mechanism, summaries)
    (out / "results.md").write_text("\n".join(lines))


def equal_compute_table(summaries: dict) -> list[str]:
    """RMSE ± s.e.m. over points at equal compute, and the paired ratio to the unbranched configuration."""
    xs = sorted({x for s in summaries.values() for c in s["branch_equal_compute"].values() for x in c})
    lines = ["### branch_zeroth_branchgrpo at equal compute", "",
             "x = log2(denoiser calls per estimate / calls of one unbranched path); each test point's curve is "
             "interpolated (log2 RMSE linear in x), then mean ± s.e.m. over points. Second line: the ratio to "
             "'#split=1, #branch=1' at the same x, paired over the same points (mean ± s.e.m.).", "",
             "| configuration | denoiser | " + " | ".join(f"x={x}" for x in xs) + " |", "|---|---|" + "---|" * len(xs)]
    for name in summaries[next(iter(summaries))]["branch_equal_compute"]:
        for denoiser, s in summaries.items():
            cells = s["branch_equal_compute"].get(name, {})
            lines.append(f"| {name} | {denoiser} | " + " | ".join(
                "{:.4f} ± {:.4f}".format(*cells[x]["rmse"]) if x in cells else "" for x in xs) + " |")
            if name != UNBRANCHED:
                lines.append(f"| ratio to unbranched | {denoiser} | " + " | ".join(
                    "{:.3f} ± {:.3f}".format(*cells[x]["ratio"]) if x in cells and cells[x]["ratio"] else ""
                    for x in xs) + " |")
    return lines + [""]


def mechanism_table(mech: dict, summaries: dict) -> list[str]:
    lines = ["### branching mechanism: what a shared prefix costs", "",
             f"f(s) = Var(E[r | x_s]) / Var(r): correlation of the end rewards of two paths from x_t that share the "
             f"path up to state s (exact denoiser, {mech['points']} test points x {mech['pairs']} path pairs, "
             f"pooled: sum of covariances / sum of variances). A tree's end points are averaged with variance "
             f"factor/N (factor = 1 + sum_j (b-1) b^(m-1-j) f(s_j)) at cost 'cost' per end point, so at equal "
             f"compute its RMSE is sqrt(factor x cost) times that of independent paths (variance-dominated "
             f"regime). Measured: sqrt(Var_tree x cost / Var_paths) of the estimates at the N given, summed over "
             f"points (± delta-method s.e.).", "",
             "| configuration | split states | cost per end point | variance factor | predicted RMSE ratio | "
             + " | ".join(f"measured, {d}" for d in summaries) + " |",
             "|---|---|---|---|---|" + "---|" * len(summaries)]
    for name, c in mech["configs"].items():
        measured = [summaries[d]["branch_measured_ratio"][name] for d in summaries]
        lines.append(f"| {name} | {', '.join(map(str, c['splits']))} | {c['cost']:.3f} | {c['variance_factor']:.3f} | "
                     f"{c['predicted_ratio']:.3f} | " + " | ".join(
                         f"{m['ratio']:.3f} ± {m['se']:.3f} (N=2^{m['log2_n']})" for m in measured) + " |")
    sweep, se = mech["single_split_variance_x_cost"], mech["single_split_se"]
    lines += ["", "One split at state s into b branches (no other split): variance factor x cost per end point "
              "(1 + (b-1) f(s)) x cost(s); below 1 a split would beat independent paths at equal compute.", "",
              "| split state s | alpha_bar_s | f(s) | b=2: variance x cost | b=4: variance x cost |", "|---|---|---|---|---|"]
    for j, s in enumerate(mech["states"]):
        lines.append(f"| {s} | {mech['alpha_bar'][j]:.4f} | {mech['f'][j]:.4f} ± {mech['f_se'][j]:.4f} | "
                     f"{sweep[2][j]:.4f} ± {se[2][j]:.4f} | {sweep[4][j]:.4f} ± {se[4][j]:.4f} |")
    lines.append(f"\nSmallest: b=2 {min(sweep[2]):.4f} at s={mech['states'][sweep[2].index(min(sweep[2]))]}, "
                 f"b=4 {min(sweep[4]):.4f} at s={mech['states'][sweep[4].index(min(sweep[4]))]}.")
    return lines + [""]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny training and sample counts (CI)")
    ap.add_argument("--out", type=Path, default=Path("outputs/toy_experiments"))
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="checkpoint cache (default $RSM_TOY_CACHE or ~/.cache/rsm_toy_experiments)")
    # One thread by default: on this project's shared 2-core machines two torch threads ran 2-8x slower than one
    # (measured, training and rollouts) whenever another job held a core; on idle cores try --threads 2.
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--exact-points", type=int, default=None)
    ap.add_argument("--learned-points", type=int, default=None)
    ap.add_argument("--learned-max-log2-n", type=int, default=None)
    ap.add_argument("--omega", choices=ddpm.OMEGA_CHOICES, default="jump",
                    help="ω of the zeroth-order estimators: jump (the credited stride-10 step, 0.887; default) or "
                         "single-step (the toy scripts' one-index step, 0.988)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    cfg = Config.quick() if args.quick else Config()
    for key in ("exact_points", "learned_points", "learned_max_log2_n"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    cfg.omega = args.omega
    cfg.validate()
    cache = args.cache_dir or Path(os.environ.get("RSM_TOY_CACHE", Path.home() / ".cache" / "rsm_toy_experiments"))
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    schedule = ddpm.linear_schedule()
    _, model_ft, train_info = setup_models(cfg, schedule, cache)
    t_train = time.perf_counter() - start

    points = test_points(cfg, schedule, max(cfg.exact_points, cfg.learned_points))
    jobs = {
        "exact": (exact_eps(tilted_mixture(torch.float32), schedule.alphas_bar), cfg.exact_points,
                  list(cfg.log2_n), 1 << 16),
        "learned": (ddpm.denoiser(model_ft), cfg.learned_points,
                    [m for m in cfg.log2_n if m <= cfg.learned_max_log2_n], cfg.block),
    }
    rows, summaries, timings = [], {}, {"training_s": t_train}
    with tqdm(total=sum(j[1] for j in jobs.values()), desc="test points", unit="pt") as bar:
        for name, (eps, n_points, log2_n, block) in jobs.items():
            t0 = time.perf_counter()
            curves, summaries[name] = run_denoiser(name, eps, schedule, cfg, points[:n_points], points, log2_n,
                                                   block, bar)
            timings[f"{name}_s"] = time.perf_counter() - t0
            rows += rows_of(name, curves)
    t0 = time.perf_counter()
    mechanism = branch_mechanism(jobs["exact"][0], schedule, cfg, points[:cfg.exact_points],
                                 torch.Generator().manual_seed(cfg.seed + 11))
    timings["mechanism_s"] = time.perf_counter() - t0
    log.info("branching mechanism: f(189) = %s; predicted equal-compute RMSE ratios %s",
             dict(zip(mechanism["states"], mechanism["f"])).get(189),
             json.dumps({k: round(v["predicted_ratio"], 4) for k, v in mechanism["configs"].items()}))
    write_tables(rows, summaries, mechanism, cfg, out)
    pngs = plot(rows, mechanism, out)
    timings["total_s"] = time.perf_counter() - start
    record = {"config": dataclasses.asdict(cfg), "quick": args.quick, "threads": torch.get_num_threads(),
              "training": train_info, "timings": timings, "summaries": summaries, "branch_mechanism": mechanism}
    (out / "run.json").write_text(json.dumps(record, indent=2, default=str))
    log.info("wrote %s and %d plots to %s in %.1f s", "results.csv/results.md/run.json", len(pngs), out, timings["total_s"])
    return record


if __name__ == "__main__":
    main()
