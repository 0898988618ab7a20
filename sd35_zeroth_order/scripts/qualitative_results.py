"""Qualitative results: the same prompts and seeds through several checkpoints, one image per (prompt, seed,
epoch) and one grid per prompt (rows = epochs, columns = seeds). The flags of upstream's
scripts/qualitative_results_tempflowgrpo.py (spec §1.4), plus repeatable --prompt and --prompt-file.

    python scripts/qualitative_results.py --checkpoint-root <save_dir>/<run_name>/checkpoints \\
        --checkpoint-epochs 0 100 200 --prompt "a photo of a cat and a dog" --output-dir outputs/qualitative/cat

The base model is the run's own (its config.json) unless --pretrained-model names one; --tiny renders a run
trained with --tiny on the tiny test model. Grids carry their labels: epochs down the left, seeds across the top.

Thin: argparse here, the work in sd35zo.qualitative.
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the component root

from sd35zo.qualitative import QualitativeError, run  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--checkpoint-epochs", "--checkpoint_epochs", dest="checkpoint_epochs", type=int, nargs="+", required=True,
        help="epochs to load as <checkpoint-root>/checkpoint-<epoch>; 0 = the base model without LoRA")
    add("--checkpoint-root", "--checkpoint_root", dest="checkpoint_root", default=None,
        help="folder holding the checkpoint-<epoch> folders (a run's <save_dir>/<run_name>/checkpoints); "
             "required unless every epoch is 0")
    add("--pretrained-model", default=None,
        help="base pipeline: hub id or local diffusers folder (default: the run's own, read from the config.json "
             "beside --checkpoint-root; else stabilityai/stable-diffusion-3.5-medium)")
    add("--tiny", action="store_true",
        help="the tiny test SD3.5 (rsm_testkit) as base model, 64 px, 2 seeds: for runs trained with --tiny")
    add("--prompt", action="append", default=[], help="a prompt; repeat for several")
    add("--prompt-file", action="append", default=[],
        help="one prompt per line (.txt) or a GenEval metadata .jsonl; repeatable")
    add("--images-per-prompt", "--images_per_prompt", dest="images_per_prompt", type=int, default=None,
        help="seeds seed, seed+1, ... (the grid's columns; default 8, 2 with --tiny)")
    add("--image-batch-size", "--image_batch_size", dest="image_batch_size", type=int, default=2,
        help="images per pipeline call")
    add("--num-inference-steps", type=int, default=40)
    add("--guidance-scale", type=float, default=4.5)
    add("--height", type=int, default=None, help="default 512 (64 with --tiny)")
    add("--width", type=int, default=None, help="default 512 (64 with --tiny)")
    add("--attention-slicing", choices=["auto", "off"], default="auto",
        help="auto: enable diffusers attention slicing where the pipeline supports it")
    add("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="forced to fp32 on CPU")
    add("--device", default=None, help="default: cuda if available, else cpu")
    add("--negative-prompt", default="", help="passed to the pipeline only if non-empty")
    add("--seed", type=int, default=42, help="global seeding and the first per-image seed")
    add("--output-dir", "--output_dir", dest="output_dir", default=None,
        help="default: <component>/outputs/qualitative/<timestamp>")
    add("--save-images", action="store_true", help="accepted for upstream compatibility; images are always saved")
    return parser


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        output_dir = run(args)
    except QualitativeError as err:
        parser.exit(2, f"error: {err}\n")
    print(output_dir)


if __name__ == "__main__":
    main()
