"""Offline evaluation of checkpoints (the paper's curves for "ours", whose run evaluates only before epoch 0).

    python evaluate.py --config config/simple_res-nabladb_sd_hps_usez0_basesnr.yaml logs/<run> [--base] [--key 0]

`python evaluate.py --help` lists the flags; the code is sd15fo/evaluation.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the component root: the sd15fo package

from sd15fo.evaluation import main  # noqa: E402

if __name__ == "__main__":
    main()
