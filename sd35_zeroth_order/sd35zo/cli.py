"""The command line both trainer scripts share: `--config config/sd3_matrix.py:<id> [--config.key=value ...]`
(ml_collections config flags, as upstream), an Accelerator, then the trainer's `train(config, accelerator)`."""
from __future__ import annotations

import importlib
import logging

EXAMPLE_IDS = {"sd35zo.trainer_default": "sd3.base.default.pickscore.ppo.base",
               "sd35zo.trainer_branch": "sd3.lowsnr2.branch.geneval.matching.fairclip2"}


def run_trainer(trainer_module: str) -> None:
    """Parse the flags and run `trainer_module.train`. Errors in the config surface before any model loads."""
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "config file[:config id]", lock_config=False)

    def main(_argv):
        from accelerate import Accelerator

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        config = flags.FLAGS.config
        if config is None:
            raise app.UsageError(f"--config is required, e.g. --config config/sd3_matrix.py:{EXAMPLE_IDS[trainer_module]}")
        # The loops never call accelerator.backward or accumulate: they divide by the accumulation themselves
        # and sync gradients explicitly, so the Accelerator supplies device, ranks, collectives and autocast.
        accelerator = Accelerator(mixed_precision=config.mixed_precision)
        importlib.import_module(trainer_module).train(config, accelerator)

    app.run(main)
