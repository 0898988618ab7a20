"""Finding reward weights: a local path or a hub id, never a path relative to the working directory."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import torch.distributed as dist

T = TypeVar("T")


class RewardWeightsError(RuntimeError):
    """Weights could be found neither at a local path nor on the hub."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _fail(reward: str, option: str, source: str, what: str, exc: BaseException) -> RewardWeightsError:
    return RewardWeightsError(
        f"{reward}: cannot load {what} from {option}={source!r}: it is not an existing local path and the hub "
        f"download failed ({_one_line(exc)}); pass {option}=<local path> or make the hub id reachable")


@contextlib.contextmanager
def rank_zero_first() -> Iterator[None]:
    """Under torch.distributed, rank 0 downloads first and the others read its cache after a barrier."""
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed and dist.get_rank() != 0:
        dist.barrier()
    try:
        yield
    finally:
        if distributed and dist.get_rank() == 0:
            dist.barrier()


def looks_like_path(source: str) -> bool:
    """Hub ids are `name` or `owner/name`; anything else that does not exist is a missing local path."""
    text = str(source)
    return text.startswith(("/", ".", "~")) or text.count("/") > 1 or text.endswith((".pt", ".pth", ".bin", ".safetensors"))


def _missing(reward: str, option: str, source: str) -> RewardWeightsError:
    return RewardWeightsError(f"{reward}: {option}={source!r} does not exist (give an existing local path or a hub id)")


def resolve_file(reward: str, source: str | os.PathLike, filename: str, option: str = "weights") -> Path:
    """`source` is a file, a directory holding `filename`, or a hub repo id holding `filename`."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        candidate = path / filename
        if not candidate.is_file():
            raise RewardWeightsError(f"{reward}: {option}={str(source)!r} is a directory without {filename!r}")
        return candidate
    if looks_like_path(str(source)):
        raise _missing(reward, option, str(source))
    try:
        from huggingface_hub import hf_hub_download

        with rank_zero_first():
            return Path(hf_hub_download(repo_id=str(source), filename=filename))
    except Exception as exc:  # offline, unknown repo, bad id: all end in the same actionable message
        raise _fail(reward, option, str(source), filename, exc) from exc


def load_pretrained(reward: str, loader: Callable[[str], T], source: str | os.PathLike,
                    option: str = "weights") -> T:
    """Calls a `from_pretrained`-style loader on a local directory or a hub id, with a clear error."""
    path = Path(source).expanduser()
    if path.exists() and not path.is_dir():
        raise RewardWeightsError(f"{reward}: {option}={str(source)!r} must be a model directory or a hub id")
    if not path.exists() and looks_like_path(str(source)):
        raise _missing(reward, option, str(source))
    try:
        with rank_zero_first():
            return loader(str(path) if path.is_dir() else str(source))
    except Exception as exc:
        if path.is_dir():  # a local directory that does not load is a broken checkpoint, say so plainly
            raise RewardWeightsError(f"{reward}: {option}={str(source)!r} does not load ({_one_line(exc)})") from exc
        raise _fail(reward, option, str(source), "the model", exc) from exc
