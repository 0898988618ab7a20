"""The command line both trainer scripts share: `--config config/sd3_matrix.py:<id> [--config.key=value ...]`
(ml_collections config flags, as upstream), an Accelerator, then the trainer's `train(config, accelerator)`.

A user's mistake (a bad value or path, a run folder that already holds a run, a checkpoint that does not fit)
and a diverged run end with one line on stderr and exit status 1 (printed by the main process only);
tracebacks are left for bugs. Only the main process logs at INFO.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys

EXAMPLE_IDS = {"sd35zo.trainer_default": "sd3.base.default.pickscore.ppo.base",
               "sd35zo.trainer_branch": "sd3.lowsnr2.branch.geneval.matching.fairclip2"}


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _fail(message: str) -> None:
    if _is_main_process():
        print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def run_trainer(trainer_module: str) -> None:
    """Parse the flags and run `trainer_module.train`. Errors in the config surface before any model loads."""
    from absl import flags
    from ml_collections import config_flags

    from .config_check import ConfigError, _root_message
    from .trainer_common import DivergenceError

    logging.basicConfig(level=logging.INFO if _is_main_process() else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    config_flags.DEFINE_config_file("config", None, "config file[:config id]", lock_config=False)
    try:
        flags.FLAGS(sys.argv)
        config = flags.FLAGS.config
    except Exception as error:  # noqa: BLE001 - absl wraps errors raised in get_config and in overrides
        _fail(_root_message(error))
    if config is None:
        _fail(f"--config is required, e.g. --config config/sd3_matrix.py:{EXAMPLE_IDS[trainer_module]}")
    from accelerate import Accelerator

    # The loops never call accelerator.backward or accumulate: they divide by the accumulation themselves
    # and sync gradients explicitly, so the Accelerator supplies device, ranks, collectives and autocast.
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    try:
        importlib.import_module(trainer_module).train(config, accelerator)
    except (ConfigError, DivergenceError) as error:
        _fail(str(error))
