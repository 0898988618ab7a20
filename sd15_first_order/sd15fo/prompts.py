"""Training and evaluation prompts: which prompt each trajectory gets (spec §5.3, §5.5, §5.7, §7).

Prompt `idx` of epoch (or eval step) `key` is `prompt_fn(**kwargs)` evaluated with Python's `random` seeded by
seed_mix(seed_mix(seed, salt), key, idx) — the global `random` state is restored afterwards — so the prompts do
not depend on the world size: rank r of W takes the global indices r, r + W, r + 2W, ... (a non-shuffling
distributed sampler), in batches. salt 21111 = training, 31111 = evaluation (the reference's constants, so a
run with the same seed draws the same prompts as upstream).

Prompt files come from `scripts/fetch_data.py` (`<data_dir>/geneval/...`): the GenEval training prompts are the
50,000 lines of the file upstream bundles (`geneval/train_prompts.txt`); the test prompts are the 2,212 prompts
of `geneval/test_metadata.jsonl` in file order, the same list as upstream's `geneval_test_prompts.txt` (the 553
GenEval prompts four times).
"""
from __future__ import annotations

import contextlib
import json
import os
import random
from typing import Callable, Iterator

SALT_TRAIN_PROMPTS, SALT_TRAIN_NOISE = 21111, 22222
SALT_EVAL_PROMPTS, SALT_EVAL_NOISE = 31111, 32222
SALT_SHUFFLE = 23333  # this implementation's: the shuffle generator (upstream used the global CUDA RNG)
FETCH_HINT = "run python scripts/fetch_data.py --only {set} from the repository root, or use --tiny"


def seed_mix(*values: int) -> int:
    """h = 0; h = (h·1000003 + v) mod (2^63 - 1) for each v: a deterministic seed from several integers."""
    mixed = 0
    for value in values:
        mixed = (mixed * 1000003 + int(value)) % (2**63 - 1)
    return mixed


@contextlib.contextmanager
def seeded_python_random(seed: int):
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


_LINES: dict = {}


def read_lines(path: str) -> list:
    """Stripped lines of a prompt file (cached). `.jsonl` files: the `prompt` of each object, in order."""
    if path not in _LINES:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                _LINES[path] = [json.loads(line)["prompt"].strip() for line in f if line.strip()]
            else:
                _LINES[path] = [line.strip() for line in f.readlines()]
    return _LINES[path]


class PromptSource:
    """The prompt functions a config may name (`prompt_fn` + `prompt_fn_kwargs`), reading files under
    `data_dir`. Each call returns (prompt, metadata) and draws with Python's `random`, like the reference."""

    FUNCTIONS = ("geneval", "from_file", "hpd_photo_painting")

    def __init__(self, data_dir: str):
        self.data_dir = data_dir

    def files(self, name: str, kwargs: dict) -> list:
        """[(config key, path, fetch set)] a call of `name` with `kwargs` reads (for preflight)."""
        if name == "geneval":
            split = kwargs.get("split", "train")
            file = "train_prompts.txt" if split == "train" else "test_metadata.jsonl"
            return [("data_dir", os.path.join(self.data_dir, "geneval", file), "geneval")]
        if name == "from_file":
            return [("prompt_fn_kwargs.path", kwargs.get("path", ""), None)]
        if name == "hpd_photo_painting":
            return [("data_dir", os.path.join(self.data_dir, "hpdv2", f"benchmark_{style}.json"), "hpdv2")
                    for style in ("photo", "paintings")]
        raise ValueError(f"prompt_fn={name!r} is not supported; allowed: {', '.join(self.FUNCTIONS)}")

    def function(self, name: str) -> Callable:
        return getattr(self, name)

    def geneval(self, split: str = "train"):
        if split not in ("train", "test"):
            raise ValueError(f"geneval split={split!r} is not supported; allowed: train, test")
        return random.choice(read_lines(self.files("geneval", {"split": split})[0][1])), {}

    def from_file(self, path: str, low=None, high=None):
        return random.choice(read_lines(path)[low:high]), {}

    def hpd_photo_painting(self):
        """HPDv2 photo + paintings benchmark prompts, the first 10 of each held out. A fresh list each call: the
        reference extended its cached list in place, so the pool grew with every call (spec §7)."""
        pool = []
        for _, path, _ in self.files("hpd_photo_painting", {}):
            if path not in _LINES:
                with open(path, encoding="utf-8") as f:
                    _LINES[path] = json.load(f)[10:]
            pool.extend(_LINES[path])
        return random.choice(pool), {}


def prompt_at(source: PromptSource, name: str, kwargs: dict, seed: int, salt: int, key: int, idx: int):
    """(prompt, metadata) of global index `idx` for `key` (the epoch, or the global step in evaluation)."""
    with seeded_python_random(seed_mix(seed_mix(seed, salt), key, idx)):
        return source.function(name)(**kwargs)


def rank_batches(source: PromptSource, name: str, kwargs: dict, *, seed: int, salt: int, key: int, batch_size: int,
                 num_batches: int, rank: int, world_size: int) -> Iterator[tuple[list, list]]:
    """This rank's `num_batches` batches of (prompts, metadata) of a global set of batch_size·num_batches·W prompts:
    indices rank, rank + W, ... (spec §5.3 step 2)."""
    total = batch_size * num_batches * world_size
    mine = list(range(rank, total, world_size))
    for b in range(num_batches):
        drawn = [prompt_at(source, name, kwargs, seed, salt, key, i) for i in mine[b * batch_size:(b + 1) * batch_size]]
        yield [p for p, _ in drawn], [m for _, m in drawn]


def eval_kwargs(config: dict) -> dict:
    """`eval_prompt_fn_kwargs`, or a copy of `prompt_fn_kwargs` with split='test' for geneval (spec §1.4)."""
    if config.get("eval_prompt_fn_kwargs") is not None:
        return dict(config["eval_prompt_fn_kwargs"])
    kwargs = dict(config.get("prompt_fn_kwargs") or {})
    if config["prompt_fn"] == "geneval":
        kwargs.setdefault("split", "test")
    return kwargs
