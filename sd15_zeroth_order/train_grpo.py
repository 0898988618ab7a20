"""Entry point of the PCPO baseline (Figure 4(b, c)); from sd15_zeroth_order/:

    accelerate launch train_grpo.py --config configs/train/hpsv2_1_lora_grpo.yaml [--set key=value ...]

`--tiny` runs the same command on the tiny test kit on a CPU; `--help` lists every flag. The loop is
sd15zo/trainer_grpo.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the component root: sd15zo

from sd15zo.cli import run_trainer  # noqa: E402

if __name__ == "__main__":
    run_trainer("grpo")
