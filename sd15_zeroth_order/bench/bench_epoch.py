"""Per-epoch time split (sampling / reward wait / training / eval) and peak memory of both SD1.5 trainers, and the
gain of removing upstream's wasted compute (spec §11 items 19-21) against the faithful path.

    python bench/bench_epoch.py --tiny --epochs 3                  # CPU, tiny kit
    python bench/bench_epoch.py --full-size --epochs 2             # GPU: the real SD1.5 architecture, random weights
    python bench/bench_epoch.py --tiny --only grpo_pr -- --set latent_chunk_size=4   # overrides after --

Each row is one trainer run through its entry script (a subprocess, exactly as a user starts it) for `--epochs`
epochs; the numbers are what the trainer writes to `<run>/metrics.jsonl` per epoch: `time_per_epoch`,
`sample_time_per_epoch` (sampling and decoding, not waiting for rewards), `reward_wait_time_per_epoch` (scoring
that did not overlap sampling), `train_time_per_epoch`, `eval_time` (the last epoch: eval/save frequencies are
set to `--epochs`) and `peak_memory_mib` (`cuda_allocated` per epoch on a GPU, the process's max RSS on a CPU).
Epoch 1 is reported alone (warm-up); later epochs are averaged. No timing is asserted anywhere.

Rows ("faithful" = upstream's computation, same numbers):
  grpo              the baseline as configured (train_approx_kl: first_microbatch)
  grpo faithful     train_approx_kl: every_microbatch (2 extra reference UNet passes per micro-step, item 19)
  grpo_pr           ours as configured (efficient_rollout, first_microbatch approx KL, reward_batch_size 64)
  grpo_pr faithful  efficient_rollout: false (k identical predictions per root, identical roots recomputed, padded
                    chunks, item 20), every_microbatch approx KL (item 19), reward_batch_size: null (item 21)

`--full-size` writes once (bench/full_size_sd15.py) SD1.5 with random weights and runs the paper presets' epochs
(8 prompts, 16 trajectories | 5 roots x 20 branches each, 50 steps, fp16 autocast), with the kit's prompts and its
tiny HPS reward (the bench times the trainer, not the ViT-H reward; reward_batch_size matters for its memory).
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

SCRIPTS = {"grpo": "train_grpo.py", "grpo_pr": "train_grpo_pr.py"}
ROWS = {  # name -> (trainer, overrides)
    "grpo": ("grpo", []),
    "grpo faithful": ("grpo", ["train_approx_kl=every_microbatch"]),
    "grpo_pr": ("grpo_pr", []),
    "grpo_pr faithful": ("grpo_pr", ["efficient_rollout=false", "train_approx_kl=every_microbatch",
                                     "reward_batch_size=null"]),
}
COLUMNS = ("run", "epochs", "epoch s", "sampling s", "reward-wait s", "training s", "eval s", "peak MiB",
           "rewards/epoch", "updates")
METRIC = {"epoch s": "time_per_epoch", "sampling s": "sample_time_per_epoch",
          "reward-wait s": "reward_wait_time_per_epoch", "training s": "train_time_per_epoch"}


def run_one(name: str, epochs: int, out: Path, full_size: Path | None, extra: list[str]) -> list[dict]:
    trainer, overrides = ROWS[name]
    run_name = name.replace(" ", "_")
    command = [sys.executable, SCRIPTS[trainer], "--output-dir", str(out), "--set", f"run_name={run_name}",
               "--set", f"num_train_epochs={epochs}", "--set", f"eval_freq={epochs}", "--set", f"save_freq={epochs}"]
    if full_size is None:
        command.append("--tiny")
    else:
        from rsm_testkit import get_tiny_model, tiny_reward_options

        command += ["--model", str(full_size), "--set",
                    f"prompt_file={get_tiny_model('prompt_sets') / 'dancegrpo' / 'prompts.txt'}",
                    "--set", f"reward_options.hps_v2.weights={tiny_reward_options('hpsv2')['weights']}"]
    for item in overrides + extra:
        command += ["--set", item]
    env = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"))
    done = subprocess.run(command, cwd=COMPONENT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name}: the trainer failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / run_name / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "epoch"]


def summarise(name: str, epochs: list[dict]) -> list[list[str]]:
    def fmt(value, spec=".2f"):
        return "-" if value is None else format(value, spec)

    out = []
    groups = [("1 (warm-up)", epochs[:1])] + ([(f"2-{len(epochs)} (mean)", epochs[1:])] if len(epochs) > 1 else [])
    for label, group in groups:
        row = [name, label]
        for column in ("epoch s", "sampling s", "reward-wait s", "training s"):
            row.append(fmt(sum(r[METRIC[column]] for r in group) / len(group)))
        row.append(fmt(group[-1].get("eval_time")) if group[-1] is epochs[-1] else "-")
        peak = max(r["peak_memory_mib"] for r in group)
        row.append(f"{peak:.0f} ({group[0]['peak_memory_kind']})")
        row.append(str(group[0]["samples_this_epoch"]))
        row.append(str(group[0]["optimizer_updates_this_epoch"]))
        out.append(row)
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        extra = [a.split("--set", 1)[-1].strip() for a in argv[argv.index("--") + 1:] if a != "--set"]
        argv = argv[:argv.index("--")]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="the tiny kit on a CPU (default)")
    size.add_argument("--full-size", action="store_true", help="SD1.5's architecture with random weights (a GPU)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--only", action="append", choices=list(ROWS), help="rows to run (repeatable)")
    parser.add_argument("--cache-dir", default=str(REPO / ".cache" / "bench_sd15"))
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    full = None
    if args.full_size:
        from full_size_sd15 import build

        full = build(Path(args.cache_dir) / "sd15_random")
    rows = []
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or list(ROWS):
            rows += summarise(name, run_one(name, args.epochs, Path(tmp), full, extra))
    print(f"# {'full-size SD1.5 (random weights)' if full else 'tiny kit'}, {args.epochs} epochs, "
          f"{platform.machine()}, {time.time() - started:.0f} s")
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps([dict(zip(COLUMNS, r)) for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
