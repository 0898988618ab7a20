"""Reward curves of training runs, from any component's run folders (their `metrics.jsonl`).

    python scripts/plot_runs.py RUN_DIR [RUN_DIR ...] [--x samples|epoch|hours] [--metric reward_mean]
        [--label NAME ...] [--smooth N] [--out curves.png] [--svg] [--title TEXT]

One line per run: the metric of each `"kind": "epoch"` record against `samples` (images scored so far, the
compute axis of the paper's comparisons), `epoch` or `hours` (elapsed_s / 3600), with a ±std band when the run
logs the matching `_std` key (reward_mean -> reward_std). Lines are labelled with `--label` (one per run, in
order) or the run's config id from its run.json. `--smooth N` averages over a trailing window of N epochs. A run
that is still writing is read up to its last complete line. A missing or malformed file, or a metric no record
has, is one line naming the file and record.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

X_AXES = {"samples": ("samples", "images scored"), "epoch": ("epoch", "epoch"), "hours": ("elapsed_s", "hours")}


class RunError(ValueError):
    """A run folder that cannot be plotted; the message is one line naming the file and record."""


@dataclass
class Curve:
    label: str
    x: list[float]
    y: list[float]
    std: list[float] | None  # the band's half-width per point, or None when the run logs no std


def read_epoch_records(run_dir: Path) -> list[dict]:
    """The `"kind": "epoch"` records of `<run_dir>/metrics.jsonl`, in order. The last line is skipped when it
    has no newline yet (the run is writing it); any other line that is not a JSON object is an error."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise RunError(f"{path}: not found (is {run_dir} a run folder?)")
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    complete = lines[:-1]  # after the last "\n": an unfinished line, or "" when the file ends cleanly
    records = []
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise RunError(f"{path}: record {number} is not JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict):
            raise RunError(f"{path}: record {number} is not a JSON object")
        if record.get("kind") == "epoch":
            records.append(record)
    return records


def run_label(run_dir: Path) -> str:
    """The config id from run.json (or config.json), else the folder name."""
    for name in ("run.json", "config.json"):
        try:
            value = json.loads((Path(run_dir) / name).read_text(encoding="utf-8")).get("config_id")
        except (OSError, ValueError, AttributeError):
            continue
        if value:
            return str(value)
    return Path(run_dir).name


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _smooth(values: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1):i + 1] if math.isfinite(v)]
        out.append(sum(chunk) / len(chunk) if chunk else math.nan)
    return out


def load_curve(run_dir: Path, x: str = "samples", metric: str = "reward_mean", label: str | None = None,
               smooth: int = 1) -> Curve:
    """The plotted data of one run: x values, metric values and the ±std band (smoothed alike)."""
    if x not in X_AXES:
        raise RunError(f"--x {x!r}: choose one of {', '.join(X_AXES)}")
    records = read_epoch_records(run_dir)
    path = Path(run_dir) / "metrics.jsonl"
    if not records:
        raise RunError(f"{path}: no epoch record yet")
    with_metric = [r for r in records if metric in r]
    if not with_metric:
        keys = sorted({k for r in records for k, v in r.items() if isinstance(v, (int, float)) and k != "step"})
        raise RunError(f"{path}: no epoch record has {metric!r}; available: {', '.join(keys)}")
    key, _ = X_AXES[x]
    missing = next((i for i, r in enumerate(with_metric, start=1) if key not in r), None)
    if missing is not None:
        raise RunError(f"{path}: epoch record {missing} has no {key!r} for --x {x}")
    xs = [_number(r[key]) / (3600.0 if x == "hours" else 1.0) for r in with_metric]
    ys = [_number(r[metric]) for r in with_metric]
    std_key = metric[:-len("_mean")] + "_std" if metric.endswith("_mean") else None
    std = [_number(r.get(std_key)) for r in with_metric] if std_key and any(std_key in r for r in with_metric) else None
    if smooth > 1:
        ys = _smooth(ys, smooth)
        std = _smooth(std, smooth) if std else None
    return Curve(label or run_label(run_dir), xs, ys, std)


def plot(curves: list[Curve], x: str, metric: str, out: Path, svg: bool = False, title: str | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for curve in curves:
        (line,) = ax.plot(curve.x, curve.y, marker="o", markersize=3, label=curve.label)
        if curve.std:
            low = [y - s for y, s in zip(curve.y, curve.std)]
            high = [y + s for y, s in zip(curve.y, curve.std)]
            ax.fill_between(curve.x, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xlabel(X_AXES[x][1])
    ax.set_ylabel(metric + (" (± std)" if any(c.std for c in curves) else ""))
    if title:
        import textwrap

        ax.set_title("\n".join(textwrap.wrap(title, 70)), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    written = [out]
    fig.savefig(out)
    if svg:
        written.append(out.with_suffix(".svg"))
        fig.savefig(written[-1])
    plt.close(fig)
    return written


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run folders (<save_dir>/<run_name>)")
    parser.add_argument("--x", default="samples", choices=list(X_AXES), help="x-axis (default: samples)")
    parser.add_argument("--metric", default="reward_mean", help="epoch-record key to plot (default: reward_mean)")
    parser.add_argument("--label", action="append", default=[], help="a line's label, one per run, in order")
    parser.add_argument("--smooth", type=int, default=1, help="trailing moving average over N epochs")
    parser.add_argument("--out", type=Path, default=Path("reward_curves.png"), help="PNG to write")
    parser.add_argument("--svg", action="store_true", help="also write an SVG beside the PNG")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    if args.label and len(args.label) != len(args.runs):
        parser.error(f"--label given {len(args.label)} times for {len(args.runs)} runs; give one per run or none")
    if args.smooth < 1:
        parser.error(f"--smooth must be >= 1, got {args.smooth}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    labels = args.label or [None] * len(args.runs)
    try:
        curves = [load_curve(run, args.x, args.metric, label, args.smooth) for run, label in zip(args.runs, labels)]
    except RunError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path in plot(curves, args.x, args.metric, args.out, args.svg, args.title):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
