"""The trainers' reward path alone: R rollouts of B images submitted while the next rollout "samples", as
`sd35zo.trainer_branch.sample_epoch` does, timed for the path before and after issue 9's changes.

    python bench/bench_reward_path.py --tiny                       # CPU, tiny reward backbones
    python bench/bench_reward_path.py --rollouts 12 --images 120 --sample-seconds 2.0 --device cuda  # GPU, real weights

Sampling is stood in for by a sleep of `--sample-seconds` per rollout in the main thread (on a GPU the main
thread mostly waits for kernels, releasing the GIL as a sleep does). Two paths:

    one-thread   rewards on one worker thread, each part of the mix converting the batch itself (the path before)
    shared       `sd35zo.rewards.reward_pool()` threads, the mix converting the batch once (`shared_conversions`)

Columns: the epoch's wall time, the reward wait (time from the last submit until every score is in: scoring
that did not overlap sampling), and the number of device-to-uint8 conversions of a batch. No timing is
asserted anywhere; scores of both paths are checked equal.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # sd35zo


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rollouts", type=int, default=4, help="rollouts per epoch (default 4)")
    parser.add_argument("--images", type=int, default=60, help="images per rollout (a lowsnr2 rollout of 2 noises: 60)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (the paper: 512)")
    parser.add_argument("--sample-seconds", type=float, default=0.5, help="stand-in sampling time per rollout")
    parser.add_argument("--reward", action="append", default=[], metavar="NAME=WEIGHT",
                        help="a part of the reward mix (default: jpeg_compressibility=1 and aesthetic=0 on the "
                             "aesthetic preset's PIL path: two parts that each read the batch as uint8)")
    parser.add_argument("--tiny", action="store_true", help="tiny reward backbones from rsm_testkit")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="epochs per path; the table shows the median")
    args = parser.parse_args(argv)
    for name in ("rollouts", "images", "size", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    return args


def build_mix(args):
    """The mix with the options the SD3.5 trainers give each reward (config/sd3_reward_presets.py)."""
    import importlib.util

    from shared_rewards import load_reward

    spec = importlib.util.spec_from_file_location("sd3_presets", Path(__file__).resolve().parents[1] / "config" /
                                                  "sd3_reward_presets.py")
    presets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(presets)
    parts = args.reward or ["jpeg_compressibility=1", "aesthetic=0"]
    weights, options = {}, {}
    for part in parts:
        name, _, weight = part.partition("=")
        weights[name] = float(weight or 1.0)
        options[name] = dict(presets.reward_options(name))
        if args.tiny:
            from rsm_testkit import tiny_reward_options

            options[name].update(tiny_reward_options(name))
    return load_reward(weights, device=args.device, **{k: v for k, v in options.items() if v})


class ConversionCounter:
    """Counts batch conversions to uint8 on the host (what every PIL/JPEG/server reward starts with)."""

    def __init__(self):
        self.count = 0
        self._original = torch.Tensor.cpu

    def __enter__(self):
        counter = self

        def cpu(tensor, *args, **kwargs):
            if tensor.dtype == torch.uint8 and tensor.dim() == 4:
                counter.count += 1
            return counter._original(tensor, *args, **kwargs)

        torch.Tensor.cpu = cpu
        return self

    def __exit__(self, *exc):
        torch.Tensor.cpu = self._original


def one_epoch(mix, batches, prompts, sample_seconds, pool, share):
    from shared_rewards import preprocess

    from sd35zo.rewards import submit_scores

    shared = preprocess.shared_conversions
    if not share:  # the path before: every part converts the batch itself
        preprocess.shared_conversions = contextlib.nullcontext
        import shared_rewards.multi as multi
        multi.shared_conversions = contextlib.nullcontext
    try:
        with ConversionCounter() as counter:
            started = time.perf_counter()
            futures = []
            for images in batches:
                time.sleep(sample_seconds)  # the rollout's sampling
                futures.append(submit_scores(pool, mix, images, prompts, [{}] * len(prompts)))
            submitted = time.perf_counter()
            scores = [f.result() for f in futures]
            done = time.perf_counter()
    finally:
        preprocess.shared_conversions = shared
        import shared_rewards.multi as multi
        multi.shared_conversions = shared
    return {"epoch_s": done - started, "wait_s": done - submitted, "conversions": counter.count, "scores": scores}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    from sd35zo.rewards import REWARD_THREADS, reward_pool

    mix = build_mix(args)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.rand(args.images, 3, args.size, args.size, generator=gen).to(args.device)
               for _ in range(args.rollouts)]
    prompts = [f"a photo number {i}" for i in range(args.images)]
    paths = {"one-thread": (lambda: ThreadPoolExecutor(max_workers=1), False),
             f"shared ({REWARD_THREADS} threads)": (reward_pool, True)}
    rows, reference = [], None
    for label, (make_pool, share) in paths.items():
        runs = []
        for _ in range(args.repeats):
            with make_pool() as pool:
                runs.append(one_epoch(mix, batches, prompts, args.sample_seconds, pool, share))
        for run in runs:
            if reference is None:
                reference = run["scores"]
            for a, b in zip(run["scores"], reference):
                if not all(torch.equal(a[k], b[k]) for k in a):
                    raise SystemExit(f"{label}: scores differ from the first path's")
        median = lambda key: sorted(r[key] for r in runs)[len(runs) // 2]  # noqa: E731
        rows.append((label, median("epoch_s"), median("wait_s"), runs[0]["conversions"]))
    print(f"reward mix: {mix.name}; {args.rollouts} rollouts x {args.images} images of {args.size} px; sampling "
          f"stand-in {args.sample_seconds} s/rollout; device {args.device}; median of {args.repeats}")
    print("| path | epoch s | reward wait s | uint8 conversions |")
    print("|---|---|---|---|")
    for label, epoch_s, wait_s, conversions in rows:
        print(f"| {label} | {epoch_s:.2f} | {wait_s:.2f} | {conversions} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
