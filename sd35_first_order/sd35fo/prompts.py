"""Prompt sets (spec §8.7): the training prompt functions (one `(prompt, metadata)` per draw) and the evaluation
prompt functions (the whole list), with upstream's names, arguments and slicing.

Files are named relative to a data folder laid out as `scripts/fetch_data.py` writes it (`<repo>/data` unless
`experiment.data_dir` says otherwise): `geneval/train_metadata.jsonl`, `hpdv2/benchmark_<style>.json`,
`drawbench/drawbench.json`, `pickscore/train.txt`, and `sd35_first_order/{simple_animals,imagenet_classes}.txt`
(`python scripts/fetch_assets.py`). A path that exists as given (absolute, or relative to the working directory)
is used as is, as upstream did. Draws use the `random.Random` the caller passes, so they are reproducible and
resumable. Pure Python: importing this module does not import torch.

Upstream differences: DrawBench comes from `drawbench.json` (the same 183 prompts in the same order as upstream's
`DrawBench Prompts.csv` once its Misspellings and Rare Words rows are dropped; then the first 2 of each category,
165 prompts remain). `pap` reads `pickscore/train.txt` by default (upstream's `pick_a_pic.txt` is not in its
repository). The combined HPD sets no longer grow at every call (spec §10 N5; `quirks.hpd_list_growth=True` restores
the growth for reproducing old `hpsv2.py` runs).
"""
from __future__ import annotations

import functools
import json
import os
import random

DATA_HINTS = {"geneval": "python scripts/fetch_data.py --only geneval", "hpdv2": "python scripts/fetch_data.py --only hpdv2",
              "drawbench": "python scripts/fetch_data.py --only drawbench",
              "pickscore": "python scripts/fetch_data.py --only pickscore",
              "sd35_first_order": "python sd35_first_order/scripts/fetch_assets.py"}
HPD_STYLES = ("anime", "concept-art", "paintings", "photo")


class PromptFileError(ValueError):
    """A prompt file that is missing, empty or malformed; one line naming it."""


def default_data_dir():
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "data")


def resolve(path: str, data_dir: str | None = None) -> str:
    """`path` as given when it exists (absolute or relative to the working directory), else `<data_dir>/<path>`."""
    if os.path.isfile(os.path.expanduser(path)):
        return os.path.abspath(os.path.expanduser(path))
    root = data_dir or default_data_dir()
    candidate = os.path.join(root, path)
    if os.path.isfile(candidate):
        return candidate
    top = path.split("/", 1)[0]
    hint = f" (run {DATA_HINTS[top]}, or use --tiny for the test kit's prompts)" if top in DATA_HINTS else ""
    raise PromptFileError(f"prompt file {path!r} not found (neither as given nor in {root}){hint}")


@functools.lru_cache(maxsize=None)
def _lines(path: str) -> tuple:
    with open(path, encoding="utf-8") as f:
        return tuple(line.strip() for line in f)


@functools.lru_cache(maxsize=None)
def _jsonl(path: str, prompt_key: str) -> tuple:
    prompts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise PromptFileError(f"{path}: line {number} is not JSON ({error.msg})") from None
            if not isinstance(row, dict) or prompt_key not in row:
                raise PromptFileError(f"{path}: line {number} has no {prompt_key!r} key")
            prompts.append(row[prompt_key])
    if not prompts:
        raise PromptFileError(f"{path}: no prompts found (empty file)")
    return tuple(prompts)


@functools.lru_cache(maxsize=None)
def _json(path: str):
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as error:
            raise PromptFileError(f"{path}: not JSON ({error.msg})") from None


def _nonempty(prompts, what):
    if not prompts:
        raise PromptFileError(f"{what}: no prompts")
    return list(prompts)


class Pool:
    """A fixed list of prompts (metadata `{}`), drawn uniformly."""

    def __init__(self, load):
        self._load = load  # data_dir -> list of prompts

    def prompts(self, data_dir=None) -> list:
        return self._load(data_dir)

    def draw(self, rng: random.Random, data_dir=None, calls: int = 0):
        return rng.choice(self.prompts(data_dir)), {}

    def items(self, data_dir=None) -> list:
        return [(p, {}) for p in self.prompts(data_dir)]


def _file_pool(path, low=None, high=None):
    return Pool(lambda d: _nonempty(_lines(resolve(path, d))[low:high], f"{path}[{low}:{high}]"))


def drawbench_prompts(data_dir=None) -> list:
    """165 DrawBench prompts: categories Misspellings and Rare Words dropped, then the first 2 of each category
    (upstream reserved them for evaluation, but its evaluation slices the same way)."""
    path = resolve("drawbench/drawbench.json", data_dir)
    table = _json(path)
    if not isinstance(table, dict):
        raise PromptFileError(f"{path}: expected an object {{prompt: {{'category': ...}}}}")
    by_category = {}
    for prompt, info in table.items():
        category = info.get("category") if isinstance(info, dict) else None
        if category is None:
            raise PromptFileError(f"{path}: prompt {prompt[:40]!r} has no category")
        by_category.setdefault(category, []).append(prompt)
    return _nonempty([p for c, ps in by_category.items() if c not in ("Misspellings", "Rare Words") for p in ps[2:]],
                     path)


def hpd_prompts(style, data_dir=None) -> list:
    """HPDv2 benchmark prompts of one style without its first 10 (800 -> 790 each)."""
    path = resolve(f"hpdv2/benchmark_{style}.json", data_dir)
    prompts = _json(path)
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise PromptFileError(f"{path}: expected a JSON list of prompt strings")
    return _nonempty(prompts[10:], f"{path}[10:]")


class HPDPool(Pool):
    """HPD styles; with `growth` (spec §10 N5) the second style is appended again at every draw, as upstream's
    in-place extension of a cached list did: draw k (0-based) chooses from photo + (k+1) x second."""

    def __init__(self, styles, growth=False):
        self.styles, self.growth = tuple(styles), growth
        super().__init__(lambda d: [p for s in self.styles for p in hpd_prompts(s, d)])

    def draw(self, rng, data_dir=None, calls=0):
        if not (self.growth and len(self.styles) == 2):
            return super().draw(rng, data_dir, calls)
        first, second = hpd_prompts(self.styles[0], data_dir), hpd_prompts(self.styles[1], data_dir)
        index = rng.randrange(len(first) + (calls + 1) * len(second))  # = choice over the grown list
        return (first[index] if index < len(first) else second[(index - len(first)) % len(second)]), {}


class Generated:
    """Prompts composed from word lists (need the `inflect` package, as upstream)."""

    def __init__(self, kind, nouns_file, activities_file=None, low=None, high=None):
        self.kind, self.nouns_file, self.activities_file, self.low, self.high = kind, nouns_file, activities_file, low, high

    @staticmethod
    def engine():
        try:
            import inflect
        except ImportError:
            raise PromptFileError("nouns_activities and counting prompts need the inflect package "
                                  "(pip install inflect)") from None
        return inflect.engine()

    def draw(self, rng, data_dir=None, calls=0):
        ie = self.engine()
        nouns = _lines(resolve(self.nouns_file, data_dir))
        if self.kind == "nouns_activities":
            activities = _lines(resolve(self.activities_file, data_dir))
            return f"{ie.a(rng.choice(nouns))} {rng.choice(activities)}", {}
        return _counting(ie, rng.randint(self.low, self.high), rng.choice(nouns))

    def items(self, data_dir=None):
        ie = self.engine()
        nouns = _lines(resolve(self.nouns_file, data_dir))
        if self.kind == "nouns_activities":
            activities = _lines(resolve(self.activities_file, data_dir))
            return [(f"{ie.a(n)} {a}", {}) for n in nouns for a in activities]
        return [_counting(ie, k, n) for n in nouns for k in range(self.low, self.high + 1)]

    def prompts(self, data_dir=None):
        return [p for p, _ in self.items(data_dir)]


def _counting(ie, number, noun):
    words, plural = ie.number_to_words(number), ie.plural(noun)
    return f"{words} {plural}", {"questions": [f"How many {plural} are there in this image?",
                                               "What animal is in this image?"], "answers": [words, noun]}


# ------------------------------------------------------------------------------------------- the functions
# Their signatures are the config's `experiment.prompt_fn_kwargs` (checked at start-up).

def from_file(path, low=None, high=None):
    return _file_pool(path, low, high)


def from_jsonl(path, prompt_key="prompt"):
    return Pool(lambda d: list(_jsonl(resolve(path, d), prompt_key)))


def pap(path="pickscore/train.txt"):
    return _file_pool(path)


def imagenet_all():
    return _file_pool("sd35_first_order/imagenet_classes.txt")


def imagenet_animals():
    return _file_pool("sd35_first_order/imagenet_classes.txt", 0, 398)


def imagenet_dogs():
    return _file_pool("sd35_first_order/imagenet_classes.txt", 151, 269)


def simple_animals():
    return _file_pool("sd35_first_order/simple_animals.txt")


def drawbench():
    return Pool(drawbench_prompts)


def hpd():
    return HPDPool(HPD_STYLES)


def hpd_photo():
    return HPDPool(("photo",))


def hpd_photo_painting():
    return HPDPool(("photo", "paintings"))


def hpd_photo_anime():
    return HPDPool(("photo", "anime"))


def hpd_photo_concept():
    return HPDPool(("photo", "concept-art"))


def nouns_activities(nouns_file, activities_file):
    return Generated("nouns_activities", nouns_file, activities_file)


def counting(nouns_file, low, high):
    return Generated("counting", nouns_file, low=low, high=high)


def pick_a_pic(path="pickscore/train.txt"):  # the evaluation module's name for `pap`
    return pap(path)


TRAIN_PROMPT_FNS = {f.__name__: f for f in (
    from_file, from_jsonl, pap, imagenet_all, imagenet_animals, imagenet_dogs, simple_animals, drawbench, hpd,
    hpd_photo, hpd_photo_painting, hpd_photo_anime, hpd_photo_concept, nouns_activities, counting)}
EVAL_PROMPT_FNS = {f.__name__: f for f in (
    from_file, from_jsonl, pick_a_pic, imagenet_all, imagenet_animals, imagenet_dogs, simple_animals, drawbench,
    hpd, hpd_photo, hpd_photo_painting, hpd_photo_anime, hpd_photo_concept, nouns_activities, counting)}


class PromptSource:
    """The training prompt function of a config: `draw(rng)` -> (prompt, metadata). Counts its draws (the state
    of the N5 growth, saved in checkpoints)."""

    def __init__(self, name: str, kwargs: dict, data_dir: str | None = None, hpd_growth: bool = False):
        self.name, self.data_dir = name, data_dir or None
        self.pool = TRAIN_PROMPT_FNS[name](**kwargs)
        if isinstance(self.pool, HPDPool):
            self.pool.growth = hpd_growth
        self.calls = 0

    def check(self):
        """Read the files now (start-up): a missing or empty file fails before any model loads."""
        if isinstance(self.pool, Generated):
            self.pool.engine()
            _lines(resolve(self.pool.nouns_file, self.data_dir))
            if self.pool.activities_file:
                _lines(resolve(self.pool.activities_file, self.data_dir))
            return
        self.pool.prompts(self.data_dir)

    def draw(self, rng: random.Random):
        prompt, metadata = self.pool.draw(rng, self.data_dir, self.calls)
        self.calls += 1
        return prompt, metadata

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = int(state["calls"])


def eval_items(name: str, kwargs: dict, data_dir: str | None = None) -> list:
    """The evaluation prompt function's whole list as (prompt, metadata) pairs, in order."""
    return EVAL_PROMPT_FNS[name](**kwargs).items(data_dir or None)
