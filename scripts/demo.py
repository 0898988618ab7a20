"""`make demo`: the paper's claim on a CPU, in minutes, on the tiny random-weight models.

    python scripts/demo.py --out outputs/demo                  # everything (what `make demo` runs)
    python scripts/demo.py --out outputs/demo --parts sd35_zeroth_order --quick

Parts, each independent (one that fails does not stop the others; the demo then exits 1 naming it):
  <component>  for every component folder with a `demo.json`: its paper baseline and ours commands with
               `--tiny`, trained side by side for the epochs it names, then `scripts/plot_runs.py`'s curves
               of both against samples -> `<out>/<component>/reward_curves.png`
  toy          the Figure 2 study's quick mode -> `<out>/toy/figure2.png`
  rewards      the tiny pipelines' images scored by every reward of the catalogue -> `<out>/rewards/grid.png`
Then `<out>/index.md` lists every figure with one sentence on what it shows.

A component's `demo.json`: {"figure", "title", "sentence", "metric", "x", "epochs", "quick_epochs",
"runs": [{"name", "label", "command": [...]}, ...]}; a command runs in the component folder with `{python}`,
`{save_dir}`, `{name}` and `{epochs}` filled in. The tiny models have random weights: the curves show that the
machinery learns, not the paper's numbers.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RANDOM_WEIGHTS = ("The tiny models have random weights: these curves show that each trainer's machinery learns "
                  "on a CPU in minutes, not the paper's numbers (those need the real models on GPUs).")


def _load_plot_runs():
    spec = importlib.util.spec_from_file_location("plot_runs", REPO / "scripts" / "plot_runs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["plot_runs"] = module
    spec.loader.exec_module(module)
    return module


def components() -> dict[str, dict]:
    """{component: its demo.json}, for the component folders that have one, in name order."""
    found = {}
    for path in sorted(REPO.glob("*/demo.json")):
        found[path.parent.name] = json.loads(path.read_text(encoding="utf-8"))
    return found


def _watch_epochs(metrics: Path, total: int, label: str, stop: threading.Event) -> None:
    """A tqdm bar over the run's epochs, advanced as its metrics.jsonl gains epoch records."""
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=label, unit="epoch", leave=False, dynamic_ncols=True, file=sys.stderr) as bar:
        while not stop.wait(1.0):
            try:
                done = sum('"kind": "epoch"' in line for line in metrics.read_text().splitlines())
            except OSError:
                continue
            bar.update(max(0, min(done, total) - bar.n))


def _fill(part: str, values: dict) -> str:
    """The command part with its `{key}` placeholders filled (other braces, e.g. in `python -c` code, stay)."""
    for key, value in values.items():
        part = part.replace("{" + key + "}", value)
    return part


def run_component(name: str, spec: dict, out: Path, quick: bool) -> list[dict]:
    """Train the component's demo runs one after another, then plot them; returns index entries."""
    folder = out / name
    runs_dir = folder / "runs"
    epochs = int(spec["quick_epochs"] if quick else spec["epochs"])
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    run_dirs, labels = [], []
    for run in spec["runs"]:
        values = {"python": sys.executable, "save_dir": str(runs_dir), "name": run["name"], "epochs": str(epochs)}
        command = [_fill(part, values) for part in run["command"]]
        log = folder / f"{run['name']}.log"
        started = time.time()
        print(f"[{name}] {run['label']}: {epochs} epochs (log {log})", flush=True)
        stop = threading.Event()
        watcher = threading.Thread(target=_watch_epochs, daemon=True,
                                   args=(runs_dir / run["name"] / "metrics.jsonl", epochs, run["name"], stop))
        if sys.stderr.isatty():
            watcher.start()
        with open(log, "w") as handle:
            done = subprocess.run(command, cwd=REPO / name, env=env, stdout=handle, stderr=subprocess.STDOUT)
        stop.set()
        if done.returncode != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"{run['label']} exited {done.returncode}: {' | '.join(tail)}")
        print(f"[{name}] {run['label']}: done in {time.time() - started:.0f} s", flush=True)
        run_dirs.append(runs_dir / run["name"])
        labels.append(run["label"])
    plot_runs = _load_plot_runs()
    metric, x = spec.get("metric", "reward_mean"), spec.get("x", "samples")
    curves = [plot_runs.load_curve(d, x, metric, label) for d, label in zip(run_dirs, labels)]
    figure = folder / "reward_curves.png"
    plot_runs.plot(curves, x, metric, figure, title=f"{spec['title']} (tiny kit, Fig. {spec['figure']})")
    return [{"path": figure.relative_to(out), "title": f"{name}: {spec['title']} (Figure {spec['figure']})",
             "sentence": spec["sentence"],
             "command": f"python scripts/plot_runs.py {' '.join(str(d.relative_to(REPO)) if d.is_relative_to(REPO) else str(d) for d in run_dirs)}"}]


def run_toy(out: Path, quick: bool) -> list[dict]:
    folder = out / "toy"
    print("[toy] Figure 2 quick mode", flush=True)
    done = subprocess.run([sys.executable, "-m", "toy_experiments.run", "--quick", "--out", str(folder)], cwd=REPO,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"toy_experiments.run exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
    return [{"path": (folder / "figure2.png").relative_to(out), "title": "toy_experiments: Figure 2 (quick mode)",
             "sentence": "Value-gradient estimators on the 2-D toy against the analytic guidance: RMSE against the "
                         "number of samples for zeroth- and first-order estimators, lookahead, localisation and "
                         "branching (quick sample counts; `python -m toy_experiments.run` for the full study)."}]


def run_rewards(out: Path, quick: bool) -> list[dict]:
    from rsm_testkit import demo as reward_demo

    print("[rewards] tiny pipelines scored by the reward catalogue", flush=True)
    if reward_demo.main(["--out", str(out)]) != 0:
        raise RuntimeError("rsm_testkit.demo failed")
    return [{"path": Path("rewards") / "grid.png", "title": "shared_rewards: the reward catalogue",
             "sentence": "Images from the tiny SD3.5 and SD1.5 pipelines, each captioned with the score every "
                         "reward of shared_rewards gives it (random weights: the images are noise)."}]


def write_index(out: Path, entries: list[dict], failures: dict[str, str]) -> Path:
    lines = ["# make demo", "", RANDOM_WEIGHTS, ""]
    for entry in entries:
        lines += [f"## {entry['title']}", "", f"![{entry['title']}]({entry['path'].as_posix()})", "",
                  entry["sentence"], ""]
        if entry.get("command"):
            lines += [f"Plot these runs again: `{entry['command']}`", ""]
    if failures:
        lines += ["## Parts that failed", ""] + [f"- {part}: {reason}" for part, reason in failures.items()] + [""]
    path = out / "index.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "demo")
    parser.add_argument("--parts", default=None,
                        help="comma-separated subset of: the components with a demo.json, toy, rewards (default all)")
    parser.add_argument("--quick", action="store_true", help="each component's quick_epochs (CI), not its epochs")
    args = parser.parse_args(argv)
    known = [*components(), "toy", "rewards"]
    args.parts = known if args.parts is None else [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in args.parts if p not in known]
    if unknown:
        parser.error(f"--parts: unknown {', '.join(unknown)}; known: {', '.join(known)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    specs = components()
    entries, failures = [], {}
    started = time.time()
    for part in args.parts:
        try:
            if part in specs:
                entries += run_component(part, specs[part], out, args.quick)
            elif part == "toy":
                entries += run_toy(out, args.quick)
            else:
                entries += run_rewards(out, args.quick)
        except Exception as error:  # noqa: BLE001 - a failed part is reported, the others still run
            failures[part] = " ".join(str(error).split()) or type(error).__name__
            print(f"[{part}] FAILED: {failures[part]}", file=sys.stderr, flush=True)
            if os.environ.get("RSM_DEMO_TRACEBACK"):
                traceback.print_exc()
    index = write_index(out, entries, failures)
    print(f"demo: {len(entries)} figure(s) in {time.time() - started:.0f} s; index {index}", flush=True)
    if failures:
        print(f"demo: {len(failures)} part(s) failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
