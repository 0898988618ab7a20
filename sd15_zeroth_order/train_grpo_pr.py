"""Entry point of ours, RSM's branching trainer (Figure 4(b)); from sd15_zeroth_order/:

    accelerate launch train_grpo_pr.py --config configs/train/base_grpo_pr_uwsigma_lora10.yaml [--set key=value ...]

`--tiny` runs the same command on the tiny test kit on a CPU; `--help` lists every flag. The loop is
sd15zo/trainer_grpo_pr.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the component root: sd15zo

from sd15zo.cli import run_trainer  # noqa: E402

if __name__ == "__main__":
    run_trainer("grpo_pr")
