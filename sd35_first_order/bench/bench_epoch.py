"""Per-epoch time split (rollout / reward gradients / training / eval) and peak memory of the three objectives.

    python bench/bench_epoch.py --tiny --epochs 3          # CPU, the tiny kit (default without CUDA)
    python bench/bench_epoch.py --full-size --epochs 3     # GPU: SD3.5-Medium + TAESD3 + HPSv2 ViT-H-14, random weights

Each combination runs `train_vggflow.py` as a user would (a subprocess) and reads its `metrics.jsonl` epoch records:
`time_per_epoch` (rollout + training), `sample_time_per_epoch` (rollout: text encoding, the Euler ODE, decoding,
sampling rewards), `reward_grad_time_per_epoch` (every reward-gradient computation: the terminal one at sampling for
ours, one per training timestep for the pruned baseline and the value net), `train_time_per_epoch` (the update phase
without the reward gradients), `eval_time`, `peak_memory_mib` (CUDA allocator peak of the epoch, or the process's max
RSS on a CPU). The three phases are disjoint: they add up to the epoch time. Epoch 1 is shown alone (warm-up), the
later epochs averaged. No timing is asserted anywhere.

Combinations: the pruned baseline (`config/hpsv2_geneval.py`), ours (`config/hpsv2_geneval_ours.py`) and the full
VGG-Flow (`model.use_value_net=True`, upstream's value-net batch: micro-batches of 1). `--full-size` writes the
random-weight models once (bench/full_size.py) and runs the paper's budget (8 trajectories of 20 steps, 1024 px, bf16).
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
sys.path.insert(0, str(COMPONENT))
COMBINATIONS = {
    "pruned": ["--config=config/hpsv2_geneval.py"],
    "ours": ["--config=config/hpsv2_geneval_ours.py"],
    "value_net": ["--config=config/hpsv2_geneval.py", "--config.model.use_value_net=True",
                  "--config.training.batch_size=1", "--config.training.gradient_accumulation_steps={micro}"],
}
COLUMNS = ("combination", "epochs", "epoch s", "rollout s", "reward-grad s", "training s", "eval s", "peak MiB",
           "reward grads (sampling / training)", "steps")


def model_flags(args) -> list:
    if not args.full_size:
        return ["--tiny"]
    from full_size import write_pipeline

    out = Path(args.cache_dir)
    print(f"models: SD3.5-Medium transformer + TAESD3 + HPSv2 ViT-H-14, random weights, in {out} (written once)",
          flush=True)
    write_pipeline(out)
    from sd35fo import tiny

    return [f"--model={out / 'pipeline'}", f"--taesd={out / 'taesd3'}", f"--data_dir={tiny.prompt_data_dir()}",
            f"--config.experiment.reward_options.weights={out / 'hps'}", "--config.logging.use_wandb=False"]


def run(name: str, args, flags: list, work: Path) -> dict:
    micro = "8" if args.full_size else "2"
    extra = [f.replace("{micro}", micro) for f in COMBINATIONS[name]]
    epochs = str(args.epochs)
    command = [sys.executable, "train_vggflow.py", *extra, f"--exp_name=bench_{name}", *flags,
               f"--output_dir={work}", f"--config.training.num_epochs={epochs}", f"--config.logging.save_freq={epochs}",
               *args.overrides]
    if not args.full_size:
        command += [f"--config.eval.every_epochs={epochs}"]  # evaluate the last epoch only
    print(f"running {name}: {shlex.join(command)}", flush=True)
    env = dict(os.environ, WANDB_MODE="disabled")
    if not args.full_size:
        env["OMP_NUM_THREADS"] = "1"
    started = time.time()
    done = subprocess.run(command, cwd=COMPONENT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        return {"name": name, "failed": done.stderr.strip().splitlines()[-1:] or ["?"]}
    run_dir = next(work.glob(f"*_vggflow_bench_{name}_seed0"))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"name": name, "epochs": [r for r in rows if r["kind"] == "epoch"], "wall_s": time.time() - started}


def summarise(result: dict) -> list:
    if "failed" in result:
        return [[result["name"], "failed: " + result["failed"][0]] + [""] * (len(COLUMNS) - 2)]
    epochs = result["epochs"]
    groups = [("1 (warm-up)", epochs[:1])] + ([(f"2-{len(epochs)} (mean)", epochs[1:])] if len(epochs) > 1 else [])
    lines = []
    for label, group in groups:
        def mean(key):
            values = [e[key] for e in group if e.get(key) is not None]
            return sum(values) / len(values) if values else None

        def fmt(value, spec=".2f"):
            return "-" if value is None else format(value, spec)

        kind = group[-1].get("peak_memory_kind", "")
        lines.append([result["name"], label, fmt(mean("time_per_epoch")), fmt(mean("sample_time_per_epoch")),
                      fmt(mean("reward_grad_time_per_epoch")), fmt(mean("train_time_per_epoch")), fmt(mean("eval_time")),
                      f"{fmt(max(e['peak_memory_mib'] for e in group), '.0f')} ({kind})",
                      f"{fmt(mean('reward_grad_calls_sampling'), '.0f')} / {fmt(mean('reward_grad_calls_training'), '.0f')}",
                      fmt(mean("optimizer_updates_this_epoch"), ".0f")])
    return lines


def describe_machine(full_size: bool) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"CPU {cpu}, {os.cpu_count()} logical cores"
    text += f"; GPU {torch.cuda.get_device_name(0)}" if full_size else "; trainer with OMP_NUM_THREADS=1"
    return text + f"; torch {torch.__version__}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--tiny", action="store_true", help="the tiny kit on a CPU (default without CUDA)")
    mode.add_argument("--full-size", action="store_true", help="SD3.5-Medium-sized random models on a GPU")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--combinations", nargs="+", choices=list(COMBINATIONS), default=list(COMBINATIONS))
    parser.add_argument("--cache-dir", default=str(REPO / ".cache" / "bench_sd35fo"))
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("overrides", nargs="*", help="after --: --config.<key>=<value> for every run")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    flags = model_flags(args)
    with tempfile.TemporaryDirectory(prefix="bench_sd35fo_") as work:
        results = [run(name, args, flags, Path(work)) for name in args.combinations]
    rows = [line for r in results for line in summarise(r)]
    print(f"\n{describe_machine(args.full_size)}\n")
    print("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if not any("failed" in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
