"""Pre-compute SD3 prompt embeddings for a train and a test prompt file (spec §1.3, §6.2).

    python -m sd35zo.preprocess_embeddings --output_dir ../cache/sd35_embeddings/geneval \
        --train_prompt_file ../data/geneval/train_metadata.jsonl \
        --test_prompt_file ../data/geneval/test_metadata.jsonl \
        [--pretrained_model stabilityai/stable-diffusion-3.5-medium] [--mixed_precision fp16|bf16|no] [--batch_size 64]

Several processes: `accelerate launch --num_processes P -m sd35zo.preprocess_embeddings ...`. Each
process encodes a contiguous slice of the prompt lines (no padding, so no duplicate index) into
`<split>_rank_<r>.h5`; after a barrier rank 0 encodes the empty prompt, merges the slices into
`<split>_embeddings.h5` (checking every line index appears exactly once) and deletes them. Every file
is written under a temporary name and renamed when complete. Output layout: see sd35zo/embeddings.py.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

logger = logging.getLogger("sd35zo.preprocess_embeddings")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sd35zo.preprocess_embeddings", description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", required=True, help="directory for train_embeddings.h5 and test_embeddings.h5")
    parser.add_argument("--train_prompt_file", required=True, help=".txt (one prompt a line) or GenEval .jsonl")
    parser.add_argument("--test_prompt_file", required=True, help=".txt (one prompt a line) or GenEval .jsonl")
    parser.add_argument("--pretrained_model", default="stabilityai/stable-diffusion-3.5-medium",
                        help="hub id or local directory of an SD3 pipeline")
    parser.add_argument("--mixed_precision", default="fp16", choices=["no", "fp16", "bf16"],
                        help="dtype of the text encoders and of the stored embeddings")
    parser.add_argument("--batch_size", type=int, default=64, help="prompts per encoder call")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch_size must be a positive int, got {args.batch_size}")
    from sd35zo.embeddings import read_prompt_file

    for flag in ("train_prompt_file", "test_prompt_file"):
        if not os.path.isfile(getattr(args, flag)):
            parser.error(f"--{flag}: file not found: {getattr(args, flag)}")
        try:
            read_prompt_file(getattr(args, flag))  # before any model loads: empty files, bad JSON lines
        except ValueError as error:
            parser.error(f"--{flag}: {error}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from accelerate import Accelerator
    from diffusers import StableDiffusion3Pipeline
    from tqdm.auto import tqdm

    from sd35zo.embeddings import STORAGE_DTYPES, precompute_split

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    accelerator = Accelerator()  # only for rank, device and barriers; dtype is set explicitly below
    dtype = STORAGE_DTYPES[args.mixed_precision]
    # Only the tokenizers and text encoders are needed; skipping the transformer and VAE saves memory.
    with warnings.catch_warnings():  # newer diffusers rename torch_dtype to dtype; the old name works everywhere
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        pipeline = StableDiffusion3Pipeline.from_pretrained(args.pretrained_model, transformer=None, vae=None,
                                                            torch_dtype=dtype)
    for encoder in (pipeline.text_encoder, pipeline.text_encoder_2, pipeline.text_encoder_3):
        encoder.to(accelerator.device).eval().requires_grad_(False)
    os.makedirs(args.output_dir, exist_ok=True)

    def progress(batches):
        return tqdm(batches, desc=f"rank {accelerator.process_index}", disable=not accelerator.is_local_main_process)

    for split, prompt_file in (("train", args.train_prompt_file), ("test", args.test_prompt_file)):
        path = precompute_split(pipeline, prompt_file, args.output_dir, split, batch_size=args.batch_size,
                                dtype=dtype, device=accelerator.device, rank=accelerator.process_index,
                                world_size=accelerator.num_processes, barrier=accelerator.wait_for_everyone,
                                progress=progress)
        if accelerator.is_main_process:
            logger.info("%s: wrote %s", split, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
