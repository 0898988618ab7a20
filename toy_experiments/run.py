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

    @classmethod
    def quick(cls) -> "Config":
        return cls(base_steps=60, ft_steps=30, batch_size=128, log2_n=(4, 6, 8), exact_points=2,
                   learned_points=1, learned_max_log2_n=6, quadrature_order=8)

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
    ab_t, ab_1 = schedule.ab(t), schedule.ab(ddpm.prev_t(t))
    sigma, omega = ddpm.posterior_std(ab_t, ab_1), ddpm.guidance_scale(ab_t, ab_1)
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
        mixed_target = est.mixed_limit(eps, schedule, x_t, t, cfg.quadrature_order)

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
    nfe_ratio = {}
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
            curves.add("branch_zeroth_branchgrpo", f"#split={n_split}, #branch={n_branch}", x, m,
                       group_rmse(zo(r_tree, tree.xi_first, 2**m, True), psi))
    return {"mixed_limit_vs_psi": (mixed_target - psi).pow(2).mean().sqrt().item(), "nfe_ratio": nfe_ratio}


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
    }
    log.info("%s: %s", name, json.dumps(summary))
    return curves, summary


def rows_of(denoiser: str, curves: Curves) -> list[dict]:
    rows = []
    for (panel, name, x, m), vals in sorted(curves.values.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][3])):
        mean = sum(vals) / len(vals)
        sem = (sum((v - mean) ** 2 for v in vals) / max(len(vals) - 1, 1) / len(vals)) ** 0.5
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


def plot(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig_all, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    axes = axes.ravel()
    axes[-1].axis("off")  # five panels on a 2×3 grid
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
    fig_all.tight_layout()
    path = out / "figure2.png"
    fig_all.savefig(path, dpi=150)
    plt.close(fig_all)
    written.append(path)
    return written


def write_tables(rows: list[dict], summaries: dict, out: Path) -> None:
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = ["# Figure 2 toy: RMSE of value-gradient estimators at alpha_bar_t = 0.01", ""]
    for denoiser, s in summaries.items():
        lines.append(f"- **{denoiser}** denoiser: {s['points']} test points, N up to 2^{s['max_log2_n']}; "
                     f"mean |Psi| (RMS over coords) {s['psi_rms']:.4f}; SDE&ODE-mixed limit vs Psi (RMSE) "
                     f"{s['mixed_limit_vs_psi']:.4f}; exact grad E_p*[r(x0)|x_t] vs Psi (RMSE) "
                     f"{s['reward_gradient_limit_vs_psi']:.4f}; DPS {s['dps_rmse']:.4f}, SQDF {s['sqdf_rmse']:.4f} "
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
            lines += equal_compute_table(sel, list(summaries))
    (out / "results.md").write_text("\n".join(lines))


def equal_compute_table(rows: list[dict], denoisers: list[str]) -> list[str]:
    """Branching configurations at equal compute: RMSE interpolated (linearly in log2 RMSE vs log2 NFE) at
    integer x = log2(NFE / NFE of one unbranched path), so configurations with different NFE per end point line up."""
    lines = ["### branch_zeroth_branchgrpo at equal compute (interpolated)", ""]
    xs = list(range(4, 17, 2))
    lines += ["| configuration | denoiser | " + " | ".join(f"x={x}" for x in xs) + " |", "|---|---|" + "---|" * len(xs)]
    for name in dict.fromkeys(r["estimator"] for r in rows):
        for denoiser in denoisers:
            pts = sorted((r["x"], math.log2(r["rmse"])) for r in rows if r["estimator"] == name and r["denoiser"] == denoiser)
            if len(pts) < 2:
                continue
            cells = []
            for x in xs:
                seg = [(a, b) for a, b in zip(pts, pts[1:]) if a[0] <= x <= b[0]]
                if not seg:
                    cells.append("")
                    continue
                (x0, y0), (x1, y1) = seg[0]
                cells.append(f"{2 ** (y0 + (y1 - y0) * (x - x0) / (x1 - x0)):.4f}")
            lines.append(f"| {name} | {denoiser} | " + " | ".join(cells) + " |")
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
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    cfg = Config.quick() if args.quick else Config()
    for key in ("exact_points", "learned_points", "learned_max_log2_n"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    for key in ("exact_points", "learned_points"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key}={getattr(cfg, key)} must be >= 1")
    if cfg.learned_max_log2_n < min(cfg.log2_n):
        raise ValueError(f"learned_max_log2_n={cfg.learned_max_log2_n} must be >= the smallest log2_n {min(cfg.log2_n)}")
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
    write_tables(rows, summaries, out)
    pngs = plot(rows, out)
    timings["total_s"] = time.perf_counter() - start
    record = {"config": dataclasses.asdict(cfg), "quick": args.quick, "threads": torch.get_num_threads(),
              "training": train_info, "timings": timings, "summaries": summaries}
    (out / "run.json").write_text(json.dumps(record, indent=2, default=str))
    log.info("wrote %s and %d plots to %s in %.1f s", "results.csv/results.md/run.json", len(pngs), out, timings["total_s"])
    return record


if __name__ == "__main__":
    main()
