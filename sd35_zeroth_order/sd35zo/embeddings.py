"""Prompt embeddings computed once, stored in HDF5, read back by the trainers (spec §6.1-6.3, §1.3).

SD3's three text encoders are frozen, so every prompt is encoded once ahead of training with the
diffusers pipeline's own `encode_prompt` (CLIP-L and CLIP-G penultimate hidden states, zero-padded on
channels to T5's width and stacked on the sequence axis with T5-XXL's 128 tokens; pooled = the two
CLIP projections concatenated):

    prompt_embeds        [77 + 128, 4096] = [205, 4096]   (tiny test model: [205, 64])
    pooled_prompt_embeds [2048]                           (tiny test model: [48])
    prompt_ids           [256] int64, CLIP-L tokenizer ids (only used to decode text for logs/grouping)

File layout, `<split>_embeddings.h5`: group "negative" (the empty prompt, with a leading batch axis of
1) and one group "<k>" per non-blank line k of the prompt file (lines are stripped and blank lines
skipped, the same rule on both sides, so group k <-> the k-th non-blank line). Stored dtype = the
--mixed_precision dtype; bf16 (which HDF5 cannot hold) is stored as its int16 bit pattern and the root
attribute `torch_dtype` says how to read it back. Each group also carries its prompt text (attribute
"prompt") and the root `num_prompts`, so a dataset paired with the wrong prompt file fails loudly.

Files appear atomically: they are written under a temporary name in the same directory and renamed
only once complete, so an interrupted run never leaves a file that later loads.
"""
from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "STORAGE_DTYPES",
    "read_prompt_file",
    "encode_prompts",
    "shard_range",
    "write_shard",
    "merge_shards",
    "precompute_split",
    "open_embeddings",
    "read_negative",
    "PrecomputedEmbeddingDataset",
]

T5_MAX_LENGTH = 128  # upstream preprocessing: max_sequence_length=128
PROMPT_ID_LENGTH = 256  # upstream preprocessing: CLIP-L ids padded/truncated to 256
FORMAT = "sd35zo-prompt-embeddings/1"
EMBED_KEYS = ("prompt_embeds", "pooled_prompt_embeds", "prompt_ids")
STORAGE_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # --mixed_precision


# ----------------------------------------------------------------------------------------- prompts

def read_prompt_file(path: str) -> Tuple[List[str], List[dict]]:
    """Non-blank, stripped prompts of a .txt (metadata {}) or GenEval .jsonl (metadata = the whole object)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file not found: {path}")
    prompts, metadatas = [], []
    is_jsonl = path.endswith(".jsonl")
    with open(path, encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.strip()
            if not line:
                continue
            if not is_jsonl:
                prompts.append(line)
                metadatas.append({})
                continue
            try:
                item = json.loads(line)
                text = item["prompt"]
            except (json.JSONDecodeError, TypeError, KeyError) as err:
                raise ValueError(f"{path}:{lineno}: expected a JSON object with a 'prompt' key ({err})") from None
            prompts.append(text)
            metadatas.append(item)
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts (empty or only blank lines)")
    return prompts, metadatas


# ----------------------------------------------------------------------------------------- encoding

@torch.no_grad()
def encode_prompts(pipeline, prompts: Sequence[str], device: Optional[torch.device] = None,
                   max_sequence_length: int = T5_MAX_LENGTH) -> Dict[str, torch.Tensor]:
    """The three-encoder SD3 conditioning of `prompts`, via the pipeline's own `encode_prompt`."""
    prompts = list(prompts)
    embeds, _, pooled, _ = pipeline.encode_prompt(
        prompt=prompts, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
        do_classifier_free_guidance=False, max_sequence_length=max_sequence_length)
    ids = pipeline.tokenizer(prompts, padding="max_length", max_length=PROMPT_ID_LENGTH, truncation=True,
                             return_tensors="pt").input_ids
    return {
        "prompt_embeds": embeds,  # [B, 77 + max_sequence_length, D_t5]
        "pooled_prompt_embeds": pooled,  # [B, D_clipL + D_clipG]
        "prompt_ids": ids.to(torch.int64),  # [B, 256]
    }


def _to_numpy(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    if t.is_floating_point():
        t = t.detach().to("cpu", dtype)
        return t.view(torch.int16).numpy() if dtype == torch.bfloat16 else t.numpy()
    return t.detach().cpu().numpy()


def _from_numpy(arr: np.ndarray, torch_dtype: str) -> torch.Tensor:
    t = torch.from_numpy(arr)
    if torch_dtype == "bfloat16" and t.dtype == torch.int16:
        return t.view(torch.bfloat16)
    return t


def _write_group(h5: h5py.File, name: str, tensors: Dict[str, torch.Tensor], dtype: torch.dtype,
                 prompt: Optional[str] = None) -> None:
    group = h5.create_group(name)
    for key in EMBED_KEYS:
        group.create_dataset(key, data=_to_numpy(tensors[key], dtype))
    if prompt is not None:
        group.attrs["prompt"] = prompt


@contextmanager
def _atomic_h5(path: str) -> Iterator[h5py.File]:
    """An HDF5 file open for writing that appears at `path` only if the block finishes."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial"  # same directory, so the rename is atomic
    try:
        with h5py.File(tmp, "w") as h5:
            yield h5
        os.replace(tmp, path)  # atomic on POSIX within one filesystem
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def shard_range(num_items: int, rank: int, world_size: int) -> range:
    """Contiguous, non-overlapping slice of range(num_items) for `rank`; no padding, so no duplicate index."""
    return range(num_items * rank // world_size, num_items * (rank + 1) // world_size)


def write_shard(pipeline, prompts: Sequence[str], indices: Sequence[int], path: str, batch_size: int,
                dtype: torch.dtype, device: Optional[torch.device] = None,
                progress: Optional[Callable] = None) -> None:
    """Encode `prompts[i]` for i in `indices`, `batch_size` at a time, into groups "<i>" of `path`."""
    indices = list(indices)
    with _atomic_h5(path) as h5:
        starts = range(0, len(indices), batch_size)
        for start in (progress(starts) if progress else starts):
            chunk = indices[start:start + batch_size]
            encoded = encode_prompts(pipeline, [prompts[i] for i in chunk], device=device)
            for row, index in enumerate(chunk):
                _write_group(h5, str(index), {k: v[row] for k, v in encoded.items()}, dtype, prompts[index])


def merge_shards(shard_paths: Sequence[str], final_path: str, negative: Dict[str, torch.Tensor],
                 num_prompts: int, dtype: torch.dtype, remove_shards: bool = True) -> None:
    """Join the rank shards and the `negative` group into `final_path`; every index 0..n-1 exactly once."""
    with _atomic_h5(final_path) as out:
        out.attrs["format"] = FORMAT
        out.attrs["num_prompts"] = num_prompts
        out.attrs["torch_dtype"] = str(dtype).replace("torch.", "")
        _write_group(out, "negative", negative, dtype)  # [1, ...] batch axis kept, as upstream
        for shard in shard_paths:
            with h5py.File(shard, "r") as src:
                for name in src:
                    if name in out:
                        raise ValueError(f"{shard}: prompt index {name} already written by another shard")
                    src.copy(src[name], out, name=name)
        missing = [k for k in range(num_prompts) if str(k) not in out]
        if missing or len(out) != num_prompts + 1:
            raise ValueError(f"{final_path}: shards hold {len(out) - 1} prompts, expected {num_prompts} "
                             f"(first missing index: {missing[0] if missing else 'none'})")
    if remove_shards:
        for shard in shard_paths:
            os.remove(shard)


def precompute_split(pipeline, prompt_file: str, output_dir: str, split: str, batch_size: int = 64,
                     dtype: torch.dtype = torch.float16, device: Optional[torch.device] = None,
                     rank: int = 0, world_size: int = 1, barrier: Callable[[], None] = lambda: None,
                     progress: Optional[Callable] = None) -> str:
    """Encode one split; every rank writes `<split>_rank_<r>.h5`, then rank 0 merges them into
    `<split>_embeddings.h5` and deletes the shards. Returns the final path (valid after the last barrier)."""
    prompts, _ = read_prompt_file(prompt_file)
    shard_path = lambda r: os.path.join(output_dir, f"{split}_rank_{r}.h5")  # noqa: E731
    write_shard(pipeline, prompts, shard_range(len(prompts), rank, world_size), shard_path(rank),
                batch_size, dtype, device, progress)
    barrier()
    final_path = os.path.join(output_dir, f"{split}_embeddings.h5")
    if rank == 0:
        negative = encode_prompts(pipeline, [""], device=device)  # [1, ...] each
        merge_shards([shard_path(r) for r in range(world_size)], final_path, negative, len(prompts), dtype)
    barrier()
    return final_path


# ----------------------------------------------------------------------------------------- reading

def open_embeddings(path: str) -> h5py.File:
    """Open a finished embeddings file read-only; one-line errors name the path."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"embeddings file not found: {path} (run python -m sd35zo.preprocess_embeddings)")
    try:
        h5 = h5py.File(path, "r")
    except OSError as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{path}: not a readable HDF5 embeddings file ({reason})") from None
    if "negative" not in h5:
        h5.close()
        raise ValueError(f"{path}: no 'negative' group, not an embeddings file written by sd35zo.preprocess_embeddings")
    return h5


def _read_group(h5: h5py.File, name: str) -> Dict[str, torch.Tensor]:
    torch_dtype = h5.attrs.get("torch_dtype", "")
    return {key: _from_numpy(h5[name][key][()], torch_dtype) for key in EMBED_KEYS}


def read_negative(path: str, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Empty-prompt conditioning for CFG, repeated to `batch_size`: ([B, 205, 4096], [B, 2048])."""
    with open_embeddings(path) as h5:
        neg = _read_group(h5, "negative")
    return (neg["prompt_embeds"].expand(batch_size, -1, -1).contiguous(),
            neg["pooled_prompt_embeds"].expand(batch_size, -1).contiguous())


class PrecomputedEmbeddingDataset(Dataset):
    """Item k = the k-th non-blank prompt line with its stored embeddings (spec §6.3).

    The HDF5 file is opened once per process (lazily, so DataLoader workers get their own handle).
    """

    def __init__(self, hdf5_path: str, prompt_file_path: str):
        self.hdf5_path = hdf5_path
        self.prompt_file_path = prompt_file_path
        self.prompts, self.metadatas = read_prompt_file(prompt_file_path)
        with open_embeddings(hdf5_path) as h5:
            stored = h5.attrs.get("num_prompts", len(h5) - 1)
        if stored != len(self.prompts):
            raise ValueError(f"{hdf5_path} holds {stored} prompts but {prompt_file_path} has {len(self.prompts)} "
                             f"non-blank lines; re-run preprocessing for this prompt file")
        self._h5: Optional[h5py.File] = None
        self._pid: Optional[int] = None

    def _file(self) -> h5py.File:
        if self._h5 is None or self._pid != os.getpid():
            self._h5, self._pid = open_embeddings(self.hdf5_path), os.getpid()
        return self._h5

    def __getstate__(self):  # h5py handles cannot be pickled into worker processes
        state = dict(self.__dict__)
        state["_h5"], state["_pid"] = None, None
        return state

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, idx: int) -> dict:
        h5 = self._file()
        name = str(int(idx))
        if name not in h5:
            raise KeyError(f"{self.hdf5_path}: no group {name!r} for prompt index {idx}")
        stored_prompt = h5[name].attrs.get("prompt")
        if stored_prompt is not None and stored_prompt != self.prompts[idx]:
            raise ValueError(f"{self.hdf5_path}: group {name} was encoded from {stored_prompt!r} but line {idx} "
                             f"of {self.prompt_file_path} is {self.prompts[idx]!r}")
        item = _read_group(h5, name)
        item.update(prompts=self.prompts[idx], metadatas=self.metadatas[idx], indices=int(idx))
        return item

    @staticmethod
    def collate_fn(items: List[dict]) -> dict:
        return {
            "prompt_embeds": torch.stack([it["prompt_embeds"] for it in items]),  # [B, 205, 4096]
            "pooled_prompt_embeds": torch.stack([it["pooled_prompt_embeds"] for it in items]),  # [B, 2048]
            "prompt_ids": torch.stack([it["prompt_ids"] for it in items]),  # [B, 256]
            "indices": torch.tensor([it["indices"] for it in items], dtype=torch.int64),  # [B]
            "prompts": [it["prompts"] for it in items],
            "metadatas": [it["metadatas"] for it in items],
        }

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None
