"""Qualitative grids of the base model and checkpoints (same prompts, same noise): `python scripts/qualitative.py
--config config/<paper>.yaml --checkpoints <run or checkpoint> ... --prompts "..." --seeds 0 1 --out grid.jpg`.
`--help` lists the flags; the code is sd15fo/qualitative.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the component root

from sd15fo.qualitative import main  # noqa: E402

if __name__ == "__main__":
    main()
