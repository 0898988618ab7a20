"""The command line both trainer scripts share (upstream's `--config PATH`, plus what users lack):

    accelerate launch train_grpo.py    --config configs/train/hpsv2_1_lora_grpo.yaml
    accelerate launch train_grpo_pr.py --config configs/train/base_grpo_pr_uwsigma_lora10.yaml
    python train_grpo_pr.py --tiny                                        # the same run on the tiny kit, CPU
    torchrun --nproc_per_node 2 train_grpo_pr.py --tiny                   # two CPU processes (gloo)
    python train_grpo.py --config ... --set learning_rate=1e-4 --set run_name=a --output-dir runs --model <dir>

A user's mistake (a bad value or path, a run folder that already holds a run, a checkpoint that does not fit) and
a diverged run end with one line `error: ...` on stderr (from the main process, global rank 0, also when another
node found the mistake) and exit status 1 on every process; tracebacks are left for bugs. Only the main process
logs at INFO. The same command runs on several nodes under `accelerate launch --num_machines ...` or `torchrun
--nnodes ...` (README "More than one node").
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from .config import PRESETS, TRAINER_SCRIPTS, ConfigError, load_config


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"  # the global rank (torchrun, accelerate), not LOCAL_RANK


def _fail(message: str) -> None:
    if _is_main_process():
        print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def build_parser(trainer: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=TRAINER_SCRIPTS[trainer], description=(
        "PCPO baseline (full trajectories)" if trainer == "grpo" else "RSM: PCPO's loss on per-step branches"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None,
                        help=f"YAML config (default: the paper preset {PRESETS[trainer]}); relative to where you are")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key (value read as YAML: null, true, 1e-4, [4, 0, 0]); repeatable; "
                             "reward_options.<option>=value sets one reward option")
    parser.add_argument("--output-dir", default=None, help="where run folders go (config logging_dir)")
    parser.add_argument("--model", default=None,
                        help="SD1.5: a hub id or a local diffusers folder (config pretrained_model)")
    parser.add_argument("--tiny", action="store_true",
                        help="the same run on the tiny test kit: tiny SD1.5 and HPS, the kit's prompts, a few rows an "
                             "epoch, 2 epochs, fp32 on the CPU")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (implied by --tiny)")
    return parser


def run_trainer(trainer: str, argv=None) -> None:
    """Parse the flags, build the config (every value checked before any model loads), start the Accelerator and
    run the trainer. One-line errors for config problems and divergence."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("sd15zo").setLevel(logging.INFO if _is_main_process() else logging.WARNING)
    args = build_parser(trainer).parse_args(argv)
    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    from accelerate import Accelerator

    from .distributed import together
    from .trainer_common import DivergenceError

    # mixed precision is the trainers' own autocast and grad scaler: the Accelerator gives devices and collectives.
    # It starts first (it only joins the process group) so that a config that fails on one node alone (a --config
    # path missing there) ends every node with its line instead of leaving the others waiting for it.
    accelerator = Accelerator(cpu=args.cpu or args.tiny)
    try:
        with together(accelerator):
            config = load_config(trainer, args.config, args.set, tiny=args.tiny, model=args.model,
                                 output_dir=args.output_dir)
        module = importlib.import_module(f"sd15zo.trainer_{trainer}")
        module.train(config, accelerator)
    except (ConfigError, DivergenceError) as error:
        _fail(str(error))
