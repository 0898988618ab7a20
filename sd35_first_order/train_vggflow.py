"""VGG-Flow / RSM fine-tuning of SD3.5-Medium with a differentiable reward (paper Figure 5(a, b)).

    torchrun --standalone --nproc_per_node=4 train_vggflow.py --config=config/hpsv2_geneval_ours.py --exp_name=OURS
    torchrun --standalone --nproc_per_node=4 train_vggflow.py --config=config/hpsv2_geneval.py --exp_name=PRUNED_BASELINE
    python train_vggflow.py --config=config/hpsv2_geneval_ours.py --exp_name=OURS --tiny      # the same, tiny, on a CPU

Several nodes: torchrun's own flags instead of --standalone (`--nnodes=2 --node_rank=<r> --master_addr=<node 0>
--master_port=29500`), the same trainer arguments on every node; README.md "More than one node".

Flags: see sd35fo/cli.py and README.md. The loop is sd35fo/trainer.py, one timestep's objective sd35fo/algorithm.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sd35fo package, from any working directory

from sd35fo.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
