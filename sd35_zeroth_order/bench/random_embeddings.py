"""Random prompt embeddings in the trainer's HDF5 layout, written by `sd35zo.embeddings`' own writer.

A benchmark needs the shapes of SD3's text conditioning, not its meaning: `RandomTextEncoders` stands in
for the pipeline that `sd35zo.embeddings.precompute_split` encodes with (the same `encode_prompt` /
`tokenizer` calls), so the files come out of the real writer (groups, negative prompt, attributes,
atomic rename) and the real reader accepts them, without loading CLIP-L, CLIP-G or T5-XXL.

Shapes follow the model's transformer config: `[77 + 128, joint_attention_dim]` prompt embeddings
(CLIP's 77 tokens, then `sd35zo.embeddings.T5_MAX_LENGTH` T5 tokens) and `[pooled_projection_dim]` pooled.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch

CLIP_TOKENS = 77  # both CLIP encoders' context length; the pipeline stacks them before T5's tokens
SPLIT_SIZES = {"train": 64, "test": 16}  # full size: 48 prompts per epoch draw from 64; one eval batch of 16


class RandomTextEncoders:
    """The two calls `sd35zo.embeddings.encode_prompts` makes on a StableDiffusion3Pipeline, answered with
    seeded random tensors of the right shapes (a new draw per call, reproducible from `seed`)."""

    def __init__(self, width: int, pooled_width: int, seed: int = 0):
        self.width, self.pooled_width = width, pooled_width
        self.generator = torch.Generator().manual_seed(seed)
        self.tokenizer = self._tokenize

    def encode_prompt(self, prompt, max_sequence_length, **_unused):
        batch = len(prompt)
        embeds = torch.randn(batch, CLIP_TOKENS + max_sequence_length, self.width, generator=self.generator)
        pooled = torch.randn(batch, self.pooled_width, generator=self.generator)
        return embeds, None, pooled, None  # (prompt_embeds, negative, pooled, negative pooled)

    @staticmethod
    def _tokenize(prompts, max_length, **_unused):
        return SimpleNamespace(input_ids=torch.zeros(len(prompts), max_length, dtype=torch.int64))


def transformer_widths(model_dir: Path) -> tuple[int, int]:
    """(joint_attention_dim, pooled_projection_dim) of `<model_dir>/transformer/config.json`."""
    path = Path(model_dir) / "transformer" / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no transformer config (expected a diffusers SD3 directory)")
    config = json.loads(path.read_text())
    return int(config["joint_attention_dim"]), int(config["pooled_projection_dim"])


def write_random_split_files(out_dir: Path, model_dir: Path, sizes: dict = SPLIT_SIZES,
                             dtype: torch.dtype = torch.float32) -> dict:
    """`<split>.txt` prompt files and `<split>_embeddings.h5` for each split of `sizes` under `out_dir`,
    widths read from `model_dir`; reused when already there. Returns the trainer's four path overrides."""
    from sd35zo.embeddings import precompute_split

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    width, pooled_width = transformer_widths(model_dir)
    paths = {}
    for index, (split, count) in enumerate(sizes.items()):
        prompts = out_dir / f"{split}.txt"
        embeddings = out_dir / f"{split}_embeddings.h5"
        if not embeddings.is_file():  # the writer renames into place only when complete
            prompts.write_text("".join(f"benchmark prompt {split} {i}\n" for i in range(count)))
            precompute_split(RandomTextEncoders(width, pooled_width, seed=index), str(prompts), str(out_dir),
                             split, batch_size=16, dtype=dtype)
        paths[f"{split}_hdf5_path"] = str(embeddings)
        paths[f"{split}_prompt_file_path"] = str(prompts)
    return paths
