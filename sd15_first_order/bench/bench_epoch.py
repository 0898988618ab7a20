"""Per-epoch time split (sampling / reward gradients / training / eval) and peak memory of both paper configs,
and "ours" with the terminal reward gradient cached (default) against recomputed for every transition.

    python bench/bench_epoch.py --tiny --epochs 3                 # CPU, tiny kit (the default without CUDA)
    python bench/bench_epoch.py --full-size --epochs 2            # GPU: SD1.5 architecture + ViT-H-14 HPS, random weights
    python bench/bench_epoch.py --tiny -- --set sample.num_steps=20   # anything after -- goes to every run

Each row runs the training command (`simple_res-nabladb.py`, a subprocess exactly as a user runs it; torchrun when
--num-processes > 1) for --epochs epochs and reads its `<run>/metrics.jsonl`: `time_per_epoch`,
`sample_time_per_epoch` (trajectories + sampling rewards), `reward_grad_time_per_epoch` (Ψ: the lookahead UNet
pass, VAE decode and reward backward; CUDA-synchronised), `train_time_per_epoch` (the rest of the update: both
UNet passes, backward, optimizer), `eval_time` (before epoch 0 only: eval.freq is set past the run) and
`peak_memory_mib` (+ kind: the CUDA allocator's peak of that epoch, or the process's max RSS on a CPU). Epoch 1
is reported alone (warm-up), later epochs averaged. No timing is asserted anywhere.

`--full-size` writes once (under --cache-dir) SD1.5 with random weights and a random ViT-H-14 as the HPS
checkpoint (full_size_sd15.py), then runs the paper configs as they are (bf16, 8 x 8 trajectories per process,
GA 32, K = 11, 512 px) except eval: 2 batches of 8 instead of 64 / 8.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMPONENT = Path(__file__).resolve().parents[1]
REPO = COMPONENT.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

PRUNED, OURS = "config/simple_res-nabladb_sd_hps.yaml", "config/simple_res-nabladb_sd_hps_usez0_basesnr.yaml"
ROWS = [("pruned baseline", PRUNED, []),
        ("ours (Ψ cached per trajectory)", OURS, ["train.cache_z0_reward_grad=true"]),
        ("ours (Ψ recomputed per transition)", OURS, ["train.cache_z0_reward_grad=false"])]
COLUMNS = ("run", "epochs", "epoch s", "sampling s", "reward-grad s", "training s", "eval s", "peak memory MiB",
           "trajectories/epoch", "optimizer steps")
METRIC = {"epoch s": "time_per_epoch", "sampling s": "sample_time_per_epoch",
          "reward-grad s": "reward_grad_time_per_epoch", "training s": "train_time_per_epoch"}


def run_one(label, config, sets, args, out_dir, port, full_paths):
    command = [sys.executable, "simple_res-nabladb.py"]
    if args.num_processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.num_processes),
                   "--master_port", str(port), "simple_res-nabladb.py"]
    command += ["--config", config, "--output-dir", out_dir, "--run-name", f"bench{port}"]
    sets = sets + [f"train.max_epochs={args.epochs}", f"eval.freq={args.epochs + 1}", f"save_freq={args.epochs + 1}",
                   "report_to=none"]
    if args.tiny:
        command.append("--tiny")
    else:
        from rsm_testkit import get_tiny_model

        pipeline, hps = full_paths
        command += ["--model", str(pipeline)]
        sets += [f"reward_fn_kwargs.checkpoint_path={hps}", f"data_dir={get_tiny_model('prompt_sets')}",
                 "eval.num_batches=2"]
    for item in sets + args.extra:
        command += ["--set", item]
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    env.setdefault("OMP_NUM_THREADS", "1")
    started = time.time()
    done = subprocess.run(command, cwd=COMPONENT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{label}: the run failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (Path(out_dir) / f"bench{port}" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    return epochs, time.time() - started


def summarise(label, epochs):
    def mean(key, chosen):
        values = [r[key] for r in chosen if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    out = []
    groups = [("1 (warm-up)", epochs[:1])] + ([(f"2-{len(epochs)} (mean)", epochs[1:])] if len(epochs) > 1 else [])
    for name, chosen in groups:
        row = {"run": label, "epochs": name}
        for column, key in METRIC.items():
            row[column] = mean(key, chosen)
        row["eval s"] = mean("eval_time", chosen)
        row["peak memory MiB"] = f"{max(r['peak_memory_mib'] for r in chosen):.0f} ({chosen[0]['peak_memory_kind']})"
        row["trajectories/epoch"] = chosen[0]["samples_this_epoch"]
        row["optimizer steps"] = chosen[0]["optimizer_updates_this_epoch"]
        out.append(row)
    return out


def table(rows) -> str:
    def cell(value):
        return f"{value:.2f}" if isinstance(value, float) else ("-" if value is None else str(value))

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="the tiny kit on the CPU (default without CUDA)")
    size.add_argument("--full-size", action="store_true", help="SD1.5 + ViT-H-14 architectures, random weights (GPU)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--rows", nargs="*", type=int, help="which rows (0 pruned, 1 ours cached, 2 ours recomputed)")
    parser.add_argument("--cache-dir", default=str(REPO / ".cache" / "bench_sd15"))
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    args.extra = [item[len("--set="):] if item.startswith("--set=") else item for item in extra if item != "--set"]
    if not args.full_size:
        import torch

        args.tiny = args.tiny or not torch.cuda.is_available()
        if not args.tiny:
            args.full_size = True
    full_paths = None
    if args.full_size:
        from full_size_sd15 import build

        full_paths = build(Path(args.cache_dir))
    rows = []
    with tempfile.TemporaryDirectory() as out_dir:
        for index, (label, config, sets) in enumerate(ROWS):
            if args.rows is not None and index not in args.rows:
                continue
            epochs, wall = run_one(label, config, list(sets), args, out_dir, 29950 + index, full_paths)
            rows.extend(summarise(label, epochs))
            print(f"{label}: {wall:.0f} s wall", file=sys.stderr, flush=True)
    kind = "tiny kit, CPU" if args.tiny else "full-size SD1.5 architecture, random weights"
    print(f"# {kind}; {platform.processor() or platform.machine()}; {args.num_processes} process(es); "
          f"{args.epochs} epochs; overrides {args.extra or 'none'}")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
