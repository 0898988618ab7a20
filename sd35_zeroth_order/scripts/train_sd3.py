"""Default-sampler trainer entry point (Flow-GRPO baseline): `accelerate launch scripts/train_sd3.py --config
config/sd3_matrix.py:<id> [--config.key=value ...]`. The loop is `sd35zo/trainer_default.py`. Usually
started by scripts/single_node/run_sd3.sh --sampler default.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the component root

from sd35zo.cli import run_trainer  # noqa: E402

if __name__ == "__main__":
    run_trainer("sd35zo.trainer_default")
