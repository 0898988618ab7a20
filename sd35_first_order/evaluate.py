"""Offline evaluation: checkpoints x prompts -> rewards (TAESD3 or the full SD3 VAE decode).

    python evaluate.py --run saved_models/hpscore_vggflow_OURS_seed0 --prompt_fn=from_jsonl \
        --prompt_fn_kwargs='{"path": "geneval/test_metadata.jsonl"}' --decoder=vae

Flags: `python evaluate.py --help`; the code is sd35fo/evaluation.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sd35fo.evaluation import evaluate_main  # noqa: E402

if __name__ == "__main__":
    evaluate_main()
