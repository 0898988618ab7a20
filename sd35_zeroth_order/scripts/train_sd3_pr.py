"""Branch trainer entry point (paper Figure 4a): `accelerate launch scripts/train_sd3_pr.py --config
config/sd3_matrix.py:<id> [--config.key=value ...]`. Thin: parse the config flag, build the Accelerator,
hand over to `sd35zo.trainer_branch.train` (the loop lives there). Usually started by
scripts/single_node/run_sd3.sh --sampler branch.
"""
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the component root

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "config file[:config id]", lock_config=False)
FLAGS = flags.FLAGS


def main(_argv):
    from accelerate import Accelerator

    from sd35zo.trainer_branch import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = FLAGS.config
    if config is None:
        raise app.UsageError("--config is required, e.g. --config config/sd3_matrix.py:sd3.lowsnr2.branch.geneval.matching.fairclip2")
    # The loop never calls accelerator.backward or accumulate: it divides by the accumulation itself and
    # syncs gradients explicitly, so the Accelerator only supplies device, ranks and collectives.
    accelerator = Accelerator(mixed_precision=config.mixed_precision if config.mixed_precision != "no" else "no")
    train(config, accelerator)


if __name__ == "__main__":
    app.run(main)
