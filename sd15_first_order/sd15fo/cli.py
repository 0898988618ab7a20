"""The command line of `simple_res-nabladb.py` (the training entry point, upstream's name) and `evaluate.py`.

    python simple_res-nabladb.py --config config/<file>.yaml [--set key=value ...] [--tiny] [--output-dir DIR]
                                 [--model ID_OR_DIR] [--run-name NAME] [--resume CHECKPOINT_OR_RUN]
    torchrun --nproc_per_node=4 --master_port=29501 simple_res-nabladb.py --config config/<file>.yaml

One process runs without torchrun's variables; torchrun starts several (NCCL on GPUs, gloo on CPUs), on one node
or several (`--nnodes`). A user's mistake (a bad value or path, a run folder that holds a run, a checkpoint that
does not fit) and a diverged run end with one line `error: ...` on stderr from each node's first process and exit
status 1 on every process, also when only one node met it; tracebacks are for bugs.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from .config import DEFAULT_CONFIG, ConfigError


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _with_peers() -> bool:
    """Started by torchrun with other processes (on this node or others)."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def fail(message: str) -> None:
    """The error line, once per node (its first process: every node's console says why it stopped), exit 1."""
    if os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) == "0":
        print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help=f"Path to config YAML (default {DEFAULT_CONFIG}, relative to this folder)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.lr=2e-3 (repeatable; value read as YAML)")
    parser.add_argument("--tiny", action="store_true",
                        help="the same run on the tiny test kit (tiny SD1.5 and HPS, its own prompts, CPU, 2 epochs)")
    parser.add_argument("--model", help="model.pretrained: a hub id or a local diffusers SD1.5 folder")


def setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("sd15fo").setLevel(logging.INFO if _is_main() else logging.WARNING)
    for name in ("diffusers", "transformers"):
        try:
            module = __import__(f"{name}.utils.logging", fromlist=["disable_progress_bar"])
            module.disable_progress_bar()
            module.set_verbosity_error()
        except (ImportError, AttributeError):
            pass


def load_config(args):
    from . import config as config_module

    config_path = args.config
    if config_path == DEFAULT_CONFIG and not os.path.isfile(config_path):
        config_path = os.path.join(config_module.COMPONENT_ROOT, DEFAULT_CONFIG)
    return config_module.load(config_path, args.set, tiny=args.tiny, output_dir=getattr(args, "output_dir", None),
                               model=args.model, run_name=getattr(args, "run_name", None),
                               resume=getattr(args, "resume", None))


def train_main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Residual ∇-DB (pruned baseline) / RSM fine-tuning of SD1.5 "
                                                 "with a differentiable reward (Figure 5(c, d)).")
    common_arguments(parser)
    parser.add_argument("--output-dir", help="logging_dir: where run folders go (default logs/ in this folder)")
    parser.add_argument("--run-name", help="run_name: the run folder's name (default resnabladb-db_<reward>_<time>)")
    parser.add_argument("--resume", help="model.resume_from_checkpoint: a checkpoint-<n> folder or a run folder")
    args = parser.parse_args(argv)
    loaded, error = None, None
    try:
        loaded = load_config(args)  # torch-free: a bad value is reported in a blink
    except ConfigError as caught:
        if not _with_peers():
            fail(str(caught))
        error = str(caught)  # still join the others, so a command mistyped on one node ends every node at once
    setup_logging()
    from . import distributed, trainer

    procs = None
    try:
        procs = distributed.start(loaded.values["device"] if loaded is not None else "auto")
        procs.agree(error)
        trainer.train(loaded, procs)
    except (ConfigError, trainer.DivergenceError) as error:
        fail(str(error))
    finally:
        if procs is not None:
            procs.close()
