"""Per-epoch time split (sampling / reward wait / training / eval) and peak memory of the SD3.5 trainers.

    python bench/bench_epoch.py --tiny --epochs 3                 # CPU, tiny kit (default without CUDA)
    python bench/bench_epoch.py --full-size --epochs 2            # GPU: SD3.5-Medium architecture, random weights
    python bench/bench_epoch.py --tiny --combo "--profile lowsnr2 --sampler branch --reward jpeg_compressibility \
        --loss ppo --reweight tempflow" -- --config.seed=1       # any launcher flags; overrides after --

Each combination is a set of `scripts/single_node/run_sd3.sh` flags; the bench runs the trainer through that
launcher (a subprocess, exactly as a user would) for `--epochs` epochs and reads what the trainer logs to
`<run_dir>/metrics.jsonl` per epoch: `time_per_epoch`, `sample_time_per_epoch` (sampling, not waiting for
rewards), `reward_wait_time_per_epoch` (scoring that did not overlap sampling), `train_time_per_epoch`,
`peak_memory_mib` (+ `peak_memory_kind`: the CUDA allocator peak of that epoch, or the process's max RSS since start on a CPU)
and `eval_time` (the last epoch only: eval/save frequencies are set to `--epochs`). Epoch 1 is reported
alone as the warm-up; the later epochs are averaged. Rows per epoch are the launcher's budget line.

Default combinations: the paper command (lowsnr2, branch, matching, fairclip2), TempFlow-GRPO's baseline
on the same profile (branch, ppo, tempflow), and Flow-GRPO (default sampler, ppo, base) when
`scripts/train_sd3.py` exists. The reward is `jpeg_compressibility` (computed in-process, cheap): the bench
times the trainer, not a reward server.

`--full-size` writes (once, under `--cache-dir`) an SD3.5-Medium transformer + SD3 VAE with random weights
(`full_size_sd35.py`) and random prompt embeddings (`random_embeddings.py`), then runs the paper's epoch:
the GenEval preset's 48 prompts x 4 images (branch) or x 24 (default) per epoch with its KL settings
(beta 0.004, exact denominator, ODE anchors), 512 px, fp16 autocast, on `--num-processes` GPUs.
No timing is asserted anywhere: this prints a table (and `--json` writes the rows).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMPONENT = Path(__file__).resolve().parents[1]
REPO = COMPONENT.parent
sys.path.insert(0, str(COMPONENT))  # sd35zo (embedding writer)
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench's own modules

LAUNCHER = "scripts/single_node/run_sd3.sh"
PAPER = "--profile lowsnr2 --sampler branch --reward jpeg_compressibility --loss matching --reweight fairclip2"
TEMPFLOW = "--profile lowsnr2 --sampler branch --reward jpeg_compressibility --loss ppo --reweight tempflow"
FLOW_GRPO = "--sampler default --reward jpeg_compressibility --loss ppo --reweight base"
DEFAULT_SAMPLER_SCRIPT = COMPONENT / "scripts" / "train_sd3.py"
# The paper's epoch (config/sd3_reward_presets.py, geneval): 48 prompts per epoch and its KL settings; the
# reward itself stays jpeg_compressibility (GenEval needs its server and detector weights).
PAPER_EPOCH = ["--config.sample.num_prompt_per_epoch=48", "--config.train.beta=0.004",
               "--config.train.use_ode_kl_anchor=True", "--config.train.heuristic_kldenom_trick=False"]
FIRST_PORT = 29910  # one port per combination, so a lingering rank of a previous run cannot collide

COLUMNS = ("combination", "epochs", "epoch s", "sampling s", "reward-wait s", "training s", "eval s",
           "peak memory MiB", "rows/epoch", "optimizer steps")
METRIC_OF_COLUMN = {"epoch s": "time_per_epoch", "sampling s": "sample_time_per_epoch",
                    "reward-wait s": "reward_wait_time_per_epoch", "training s": "train_time_per_epoch"}


def default_combinations() -> list[str]:
    combos = [PAPER, TEMPFLOW]
    if DEFAULT_SAMPLER_SCRIPT.is_file():
        combos.append(FLOW_GRPO)
    return combos


def combination_name(flags: list[str]) -> str:
    """The config id the launcher builds from these flags (its defaults where a flag is absent)."""
    values = {"profile": "base", "sampler": "default", "reward": "pickscore", "loss": "ppo", "reweight": "base"}
    for key in values:
        if f"--{key}" in flags:
            at = flags.index(f"--{key}")
            if at + 1 >= len(flags):
                raise SystemExit(f"bench_epoch.py: --combo flag --{key} has no value")
            values[key] = flags[at + 1]
    return "sd3." + ".".join(values.values())


# ------------------------------------------------------------------------------------------------ set-up

def prepare_inputs(args) -> tuple[list[str], list[str]]:
    """(launcher flags that pick the model, trainer overrides that pick the data) for the chosen mode."""
    import torch

    from random_embeddings import SPLIT_SIZES, transformer_widths, write_random_split_files

    cache = Path(args.cache_dir)

    def embeddings_dir(kind, model):  # keyed by the widths, so a rebuilt model never meets stale files
        width, pooled = transformer_widths(model)
        return cache / f"embeddings_{kind}_{width}x{pooled}"

    if args.full_size:
        from full_size_sd35 import write_random_sd3

        model = cache / "sd35_medium_random"
        print(f"model: SD3.5-Medium architecture, random weights, {model} (written once)", flush=True)
        write_random_sd3(model)
        data = write_random_split_files(embeddings_dir("full", model), model, SPLIT_SIZES, dtype=torch.float16)
        return ["--model", str(model)], [f"--config.{k}={v}" for k, v in data.items()] + PAPER_EPOCH
    from rsm_testkit import get_tiny_model

    model = Path(get_tiny_model("sd35"))
    data = write_random_split_files(embeddings_dir("tiny", model), model, {"train": 4, "test": 2})
    return ["--tiny"], [f"--config.{k}={v}" for k, v in data.items()]



def describe_machine(full_size: bool) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"CPU {cpu}, {os.cpu_count()} logical cores visible"
    if full_size:
        text += f"; GPU {torch.cuda.get_device_name(0)}"
    else:
        text += "; trainer subprocesses run with OMP_NUM_THREADS=1"
    return text + f"; torch {torch.__version__}"


# ------------------------------------------------------------------------------------------------ one run

def run_combination(flags: list[str], index: int, model_flags: list[str], overrides: list[str], args,
                    work: Path) -> dict:
    """Launch one combination for `args.epochs` epochs; returns its metrics rows and budget, or `failed`."""
    name = combination_name(flags)
    run_name = f"{index:02d}_{name}"
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PYTHON=sys.executable, ACCELERATE=str(bin_dir / "accelerate"), WANDB_MODE="disabled")
    env["PYTHONPATH"] = str(COMPONENT) + os.pathsep + env.get("PYTHONPATH", "")
    if not args.full_size:
        env["OMP_NUM_THREADS"] = "1"  # tiny tensors: extra intra-op threads only add contention
    epochs = str(args.epochs)
    command = ["bash", LAUNCHER, *flags, *model_flags, "--num-processes", str(args.num_processes),
               "--main-process-port", str(FIRST_PORT + index), "--",
               *overrides, f"--config.save_dir={work}", f"--config.run_name={run_name}",
               f"--config.num_epochs={epochs}", f"--config.eval_freq={epochs}", f"--config.save_freq={epochs}",
               "--config.wandb.mode=disabled", *args.overrides]
    print(f"running {name}: {shlex.join(command)}", flush=True)
    started = time.time()
    try:
        done = subprocess.run(command, cwd=COMPONENT, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"name": name, "failed": f"timed out after {args.timeout} s"}
    wall = time.time() - started
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if "Error" in line or "error" in line), lines[-1] if lines
                      else f"exit status {done.returncode}")
        return {"name": name, "failed": reason.strip()[:200], "log_tail": (done.stderr or done.stdout)[-4000:]}
    metrics_path = work / run_name / "metrics.jsonl"
    if not metrics_path.is_file():
        return {"name": name, "failed": f"{metrics_path}: the run wrote no metrics"}
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    return {"name": name, "rows": rows, "budget": parse_budget(done.stdout), "wall_s": wall}


def parse_budget(stdout: str) -> dict:
    """The launcher's `budget: key=value ...` line (sd35zo.config_check), as a dict of strings."""
    for line in stdout.splitlines():
        if line.startswith("budget:"):
            return dict(item.split("=", 1) for item in line[len("budget:"):].split() if "=" in item)
    return {}


# ------------------------------------------------------------------------------------------------ the table

def summarise(result: dict, epochs: int) -> list[dict]:
    """One table row for epoch 1 (warm-up) and, with more epochs, one for the mean of epochs 2..E."""
    if "failed" in result:
        return [{"combination": result["name"], "failed": result["failed"]}]
    per_epoch = [r for r in result["rows"] if "time_per_epoch" in r]
    if len(per_epoch) != epochs:
        return [{"combination": result["name"], "failed": f"metrics hold {len(per_epoch)} epochs, expected {epochs}"}]
    eval_times = {r["eval_epoch"]: r["eval_time"] for r in result["rows"] if "eval_time" in r}
    spans = [("1 (warm-up)", per_epoch[:1])]
    if epochs > 1:
        spans.append((f"2-{epochs} (mean)" if epochs > 2 else "2", per_epoch[1:]))
    out = []
    for label, chosen in spans:
        row = {"combination": result["name"], "epochs": label}
        for column, key in METRIC_OF_COLUMN.items():
            row[column] = _mean([r[key] for r in chosen])
        evals = [eval_times[r["epoch"]] for r in chosen if r["epoch"] in eval_times]
        row["eval s"] = _mean(evals) if evals else None
        row["peak memory MiB"] = max(r["peak_memory_mib"] for r in chosen)
        row["peak memory kind"] = chosen[-1]["peak_memory_kind"]
        row["rows/epoch"] = int(result["budget"]["rows_per_epoch"]) if "rows_per_epoch" in result["budget"] else None
        row["optimizer steps"] = _mean([r["optimizer_updates_this_epoch"] for r in chosen])
        out.append(row)
    return out


def _mean(values):
    return sum(values) / len(values)


def format_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        if "failed" in row:
            lines.append(f"| {row['combination']} | failed: {row['failed']} |" + " |" * (len(COLUMNS) - 2))
            continue
        cells = []
        for column in COLUMNS:
            value = row.get(column)
            if column == "peak memory MiB":
                cells.append(f"{value:.0f} ({row['peak memory kind']})")
            elif value is None:
                cells.append("-")
            elif isinstance(value, float):
                cells.append(f"{value:.2f}" if column != "optimizer steps" else f"{value:g}")
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main

def parse_args(argv=None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = []
    if "--" in argv:
        at = argv.index("--")
        argv, overrides = argv[:at], argv[at + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s [options] [-- trainer overrides for every combination]")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--tiny", action="store_true", help="tiny kit on the CPU (default without CUDA)")
    mode.add_argument("--full-size", action="store_true",
                      help="SD3.5-Medium architecture with random weights on a GPU (default with CUDA)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per combination; epoch 1 is the warm-up")
    parser.add_argument("--combo", action="append", default=None, metavar="FLAGS",
                        help=f"run_sd3.sh flags of one combination, quoted; repeatable (default: {PAPER!r}, "
                             f"{TEMPFLOW!r}, and {FLOW_GRPO!r} when scripts/train_sd3.py exists)")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--cache-dir", default=str(REPO / ".cache" / "bench_sd35"),
                        help="random model and embeddings, written once (default: %(default)s)")
    parser.add_argument("--work-dir", default=None, help="run folders (default: a temporary directory, removed)")
    parser.add_argument("--timeout", type=int, default=24 * 3600, help="seconds per combination")
    parser.add_argument("--json", default=None, help="also write the table rows to this JSON file")
    args = parser.parse_args(argv)
    args.overrides = overrides
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1 (got {args.epochs})")
    if args.num_processes < 1:
        parser.error(f"--num-processes must be at least 1 (got {args.num_processes})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if args.full_size and not cuda:
        print("bench_epoch.py: --full-size needs a CUDA GPU (torch.cuda.is_available() is False); "
              "use --tiny on a CPU", file=sys.stderr)
        return 2
    args.full_size = args.full_size or (cuda and not args.tiny)
    combos = [shlex.split(c) for c in (args.combo or default_combinations())]
    for flags in combos:
        if "--tiny" in flags or "--model" in flags or "--num-processes" in flags:
            print(f"bench_epoch.py: --combo {shlex.join(flags)!r}: --tiny/--model/--num-processes are set by the "
                  f"bench (--tiny/--full-size, --num-processes)", file=sys.stderr)
            return 2
    model_flags, overrides = prepare_inputs(args)
    machine = describe_machine(args.full_size)
    weights = "SD3.5-Medium architecture, random weights" if args.full_size else "tiny kit (rsm_testkit)"
    with tempfile.TemporaryDirectory(prefix="bench_sd35_") as scratch:
        work = Path(args.work_dir or scratch).resolve()
        results = [run_combination(flags, i, model_flags, overrides, args, work) for i, flags in enumerate(combos)]
    rows = [row for result in results for row in summarise(result, args.epochs)]
    print(f"\nper-epoch time split, {weights}, {args.epochs} epoch(s), {args.num_processes} process(es); {machine}")
    print(format_table(rows), flush=True)
    for result in results:
        if "failed" in result and result.get("log_tail"):
            print(f"\n--- {result['name']} (failed), end of its log:\n{result['log_tail']}", file=sys.stderr)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"machine": machine, "weights": weights, "epochs": args.epochs,
                                               "num_processes": args.num_processes, "rows": rows}, indent=2))
    return 1 if any("failed" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
