"""Qualitative results: checkpoints x seeds grids for given prompts (sd15zo/qualitative.py does the work).

    python scripts/qualitative_results.py --run logs/<run_name> --epochs 0 100 200 300 \
        --prompt "a photo of an astronaut riding a horse" --images-per-prompt 4 --output-dir outputs/qualitative
    python scripts/qualitative_results.py --run logs/tiny/<run_name> --tiny --epochs 0 1 2 --prompt "a cat" --steps 10
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the component root

from sd15zo.qualitative import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
