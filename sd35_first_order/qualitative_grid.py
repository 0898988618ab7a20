"""Qualitative grid: the base model and each checkpoint (rows) on prompts x seeds (columns), one labelled image.

    python qualitative_grid.py --run saved_models/hpscore_vggflow_OURS_seed0 --prompts "a photo of a dog" \
        "a red car" --seeds 0 1 --checkpoints 1,51,201

Flags: `python qualitative_grid.py --help`; the code is sd35fo/evaluation.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sd35fo.evaluation import grid_main  # noqa: E402

if __name__ == "__main__":
    grid_main()
