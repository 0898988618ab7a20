"""What a `--tiny` run reads in place of `<repo>/data/<set>/` and `<repo>/cache/sd35_embeddings/<set>/`: the
test kit's tiny prompt sets (same file names as `scripts/fetch_data.py` writes) and their embeddings by the
tiny SD3 text encoders, built once into the tiny-model cache (keyed by this component's embedding code and
the tiny models it used), so the tiny paper command works on a fresh clone with no download.
"""
from __future__ import annotations

import inspect
import os

__all__ = ["tiny_prompt_files", "tiny_embeddings"]


def tiny_prompt_files(folder: str, train_file: str, test_file: str) -> tuple[str, str]:
    """(train, test) prompt files of the tiny prompt set `folder` (pickscore, ocr, geneval, ...)."""
    from rsm_testkit import get_tiny_model

    root = get_tiny_model("prompt_sets") / folder
    return str(root / train_file), str(root / test_file)


def tiny_embeddings(folder: str, train_file: str, test_file: str) -> tuple[str, str]:
    """(train, test) HDF5 embeddings of the tiny prompt set `folder`, encoded by the tiny SD3 pipeline."""
    from rsm_testkit import cached_artifact, get_tiny_model

    from . import embeddings

    model = get_tiny_model("sd35")
    train_prompts, test_prompts = tiny_prompt_files(folder, train_file, test_file)

    def build(out_dir):
        import torch
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline.from_pretrained(str(model), transformer=None, vae=None)
        for split, prompts in (("train", train_prompts), ("test", test_prompts)):
            embeddings.precompute_split(pipe, prompts, str(out_dir), split, batch_size=8, dtype=torch.float32)

    key = (inspect.getsource(embeddings), model.name, train_prompts, test_prompts)
    out = cached_artifact(f"sd35zo_embeddings_{folder}", key, build)
    return os.path.join(out, "train_embeddings.h5"), os.path.join(out, "test_embeddings.h5")
