"""The registry of tiny-model builders and their on-disk cache.

A builder is a function `build(out_dir: Path) -> None` registered with `@tiny_model(name)`. Its output is
cached under `<root>/<name>-<hash>`, where the hash covers the builder module's source, the shared helper
modules and the library versions that define the on-disk format, so editing a builder rebuilds it and nothing else.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib
import inspect
import os
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Callable, Sequence

Builder = Callable[[Path], None]
TINY_MODELS: dict[str, Builder] = {}
# Modules that register builders (or define `reward_options()`); imported on first use so `import rsm_testkit`
# stays cheap.
BUILDER_MODULES = ("rsm_testkit.diffusion", "rsm_testkit.rewards_clip", "rsm_testkit.rewards_blip",
                   "rsm_testkit.geneval_models", "rsm_testkit.prompt_sets", "rsm_testkit.ocr_standin")
# Helpers the builders share: their source is part of every key, so a change there rebuilds everything.
SHARED_MODULES = ("rsm_testkit.tokenizers",)
FORMAT_PACKAGES = ("diffusers", "transformers", "open_clip_torch", "torch")


def tiny_model(name: str) -> Callable[[Builder], Builder]:
    def register(fn: Builder) -> Builder:
        TINY_MODELS[name] = fn
        return fn
    return register


def _load_builders() -> None:
    for module in BUILDER_MODULES:
        importlib.import_module(module)


# In a checkout (rsm_testkit installed editable from <repo>/ci) the cache is <repo>/.cache/tiny_models, the
# folder `make` uses, so a launcher's --tiny and `make test` share one cache whatever the environment says.
_CHECKOUT = Path(__file__).resolve().parents[2]
CHECKOUT_CACHE = _CHECKOUT / ".cache" / "tiny_models"


def cache_root() -> Path:
    """`$RSM_TINY_MODELS`; else `<repo>/.cache/tiny_models` when running from a checkout; else
    ~/.cache/rsm_tiny_models (an installed, non-editable rsm_testkit)."""
    root = os.environ.get("RSM_TINY_MODELS")
    if root:
        return Path(root).expanduser()
    if (_CHECKOUT / "ci" / "rsm_testkit").is_dir() and os.access(_CHECKOUT, os.W_OK):
        return CHECKOUT_CACHE
    return Path.home() / ".cache" / "rsm_tiny_models"


def _key(name: str, fn: Builder) -> str:
    digest = hashlib.sha256(inspect.getsource(inspect.getmodule(fn)).encode())
    for module in SHARED_MODULES:
        digest.update(inspect.getsource(importlib.import_module(module)).encode())
    for package in FORMAT_PACKAGES:
        digest.update(f"{package}={version(package)}".encode())
    return f"{name}-{digest.hexdigest()[:12]}"


def get_tiny_model(name: str, root: Path | None = None) -> Path:
    """Path of the tiny checkpoint `name`, building it on first use (safe across processes)."""
    _load_builders()
    if name not in TINY_MODELS:
        raise KeyError(f"unknown tiny model {name!r}; available: {', '.join(sorted(TINY_MODELS))}")
    return _build_once(_key(name, TINY_MODELS[name]), TINY_MODELS[name], root)


def cached_artifact(name: str, key_parts: Sequence[str], build: Builder, root: Path | None = None) -> Path:
    """A component's own tiny-kit artifact (e.g. prompt embeddings made by a tiny text encoder), cached beside
    the tiny models under `<name>-<hash of key_parts>` and built at most once, like `get_tiny_model`. The
    caller puts into `key_parts` whatever defines the content (its builder's source, the inputs' paths)."""
    digest = hashlib.sha256()
    for part in key_parts:
        digest.update(str(part).encode() + b"\0")
    return _build_once(f"{name}-{digest.hexdigest()[:12]}", build, root)


def _build_once(key: str, build: Builder, root: Path | None) -> Path:
    """`<root>/<key>`, built by `build(staging_dir)` under a file lock and renamed into place when complete,
    so concurrent processes build it once and nobody sees a half-written folder."""
    root = Path(root) if root else cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / key
    if target.is_dir():
        return target
    name = key.rsplit("-", 1)[0]
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test process may be building the same thing
        if not target.is_dir():
            staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
            try:
                build(staging)
                staging.rename(target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
    return target


def tiny_reward_options(reward: str) -> dict:
    """The `load_reward` options that point reward `reward` at its tiny checkpoints.

    Builder modules may define `reward_options() -> {reward name: {option: value}}`; rewards without
    weights (JPEG) need no options.
    """
    _load_builders()
    for module in BUILDER_MODULES:
        table = getattr(importlib.import_module(module), "reward_options", None)
        if table is not None and reward in (options := table()):
            return options[reward]
    return {}


def build_all(root: Path | None = None) -> dict[str, Path]:
    _load_builders()
    return {name: get_tiny_model(name, root) for name in sorted(TINY_MODELS)}
