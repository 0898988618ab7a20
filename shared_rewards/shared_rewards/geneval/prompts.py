"""GenEval-style training prompts: metadata JSONL for all six tasks, never repeating a test prompt.

Usage::

    python -m shared_rewards.geneval.prompts --out train_metadata.jsonl --n 50000 --seed 0 \\
        --exclude test_metadata.jsonl --task-weights two_object=1,counting=1,colors=1,position=1,color_attr=1

One of ``--exclude FILE`` (repeatable; ``.jsonl`` files give their ``prompt`` fields, other files one prompt per
line) or ``--no-exclude`` is required, so the test prompts cannot be forgotten. Exclusion compares lower-cased,
whitespace-normalised text.

Templates and vocabulary follow the benchmark's generator (djghosh13/geneval ``prompts/create_prompts.py``):

* single_object: "a photo of a/an {cls}"; include {cls, 1}.
* two_object: two distinct classes, "a photo of a/an {A} and a/an {B}"; include A and B, count 1 each.
* counting: N in 2..4, "a photo of {two|three|four} {plural}"; include {cls, N}, exclude {cls, N + 1}.
* colors: a class other than "person" and a colour, "a photo of a/an {color} {cls}".
* position: distinct A, B and a relation, "a photo of a/an {A} {rel} a/an {B}"; include B first, then
  {A, 1, position: [rel, 0]}.
* color_attr: two distinct non-person classes, two distinct colours,
  "a photo of a/an {c1} {A} and a/an {c2} {B}".

"an" goes before a leading vowel letter ("an orange", "an umbrella"); plurals add "es" after a trailing "s"
("buses", "wine glasses"), else "s". Like the benchmark this writes "skises" and "scissorses"; kept, so the
training prompts are worded exactly as the benchmark's.

Every task's prompts are drawn uniformly without replacement from all of that task's distinct prompts, the
distribution the upstream generator gives after its de-duplication. The number of rows per task is
``n * weight / sum(weights)`` rounded by largest remainder, as flow_grpo's ``dataset/merge_genevaltask.py``
allocates them; rows are then shuffled. Unlisted tasks in ``--task-weights`` get weight 0; the default is
uniform over the six. The per-task weights of the published flow_grpo ``train_metadata.jsonl`` are not public
(the merge script's example uses position 0.7, counting 0.5, color_attr 0.3, colors 0.1, two_object 0.1 and no
single_object; whether the released file used them is unknown). Distinct prompts per task: single_object 80,
counting 240, colors 790, two_object 6,320, position 25,280, color_attr 554,580. Asking for more rows of a task
than it has distinct prompts (outside the exclude set) is an error unless ``--allow-repeats``: e.g. the uniform
default cannot give 50,000 distinct rows, since single_object and counting run out; give those tasks small or
zero weights, or allow repeats (each short task then cycles through its prompts in shuffled rounds).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .metadata import read_metadata_jsonl, validate_metadata
from .vocabulary import COCO_CLASSES, COLORS, RELATIONS, TAGS

_NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
_COUNTS = (2, 3, 4)  # create_prompts.py: rng.integers(2, max_count=4, endpoint=True)
# colors and color_attr never colour a person (create_prompts.py skips index 0, "person")
_NON_PERSON = tuple(name for name in COCO_CLASSES if name != "person")


def with_article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def plural(name: str) -> str:
    return f"{name}es" if name.endswith("s") else f"{name}s"


def normalize_prompt(text: str) -> str:
    return " ".join(text.lower().split())


def _pair(index: int, n: int) -> tuple[int, int]:
    """The index-th ordered pair (a, b) of distinct items among n."""
    a, j = divmod(index, n - 1)
    return a, j + (j >= a)


def _single_object(i):
    name = COCO_CLASSES[i]
    return {
        "tag": "single_object",
        "include": [{"class": name, "count": 1}],
        "prompt": f"a photo of {with_article(name)}",
    }


def _two_object(i):
    a, b = (COCO_CLASSES[k] for k in _pair(i, len(COCO_CLASSES)))
    return {
        "tag": "two_object",
        "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
        "prompt": f"a photo of {with_article(a)} and {with_article(b)}",
    }


def _counting(i):
    k, c = divmod(i, len(_COUNTS))
    name, count = COCO_CLASSES[k], _COUNTS[c]
    return {
        "tag": "counting",
        "include": [{"class": name, "count": count}],
        "exclude": [{"class": name, "count": count + 1}],
        "prompt": f"a photo of {_NUMBER_WORDS[count]} {plural(name)}",
    }


def _colors(i):
    k, c = divmod(i, len(COLORS))
    name, color = _NON_PERSON[k], COLORS[c]
    return {
        "tag": "colors",
        "include": [{"class": name, "count": 1, "color": color}],
        "prompt": f"a photo of {with_article(color)} {name}",
    }


def _position(i):
    pair, r = divmod(i, len(RELATIONS))
    a, b = (COCO_CLASSES[k] for k in _pair(pair, len(COCO_CLASSES)))
    relation = RELATIONS[r]
    return {
        "tag": "position",
        # the reference object B comes first so that position[1] = 0 points back to it
        "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [relation, 0]}],
        "prompt": f"a photo of {with_article(a)} {relation} {with_article(b)}",
    }


def _color_attr(i):
    classes, colors = divmod(i, len(COLORS) * (len(COLORS) - 1))
    a, b = (_NON_PERSON[k] for k in _pair(classes, len(_NON_PERSON)))
    color_a, color_b = (COLORS[k] for k in _pair(colors, len(COLORS)))
    return {
        "tag": "color_attr",
        "include": [{"class": a, "count": 1, "color": color_a}, {"class": b, "count": 1, "color": color_b}],
        "prompt": f"a photo of {with_article(color_a)} {a} and {with_article(color_b)} {b}",
    }


# tag -> (number of distinct prompts, index -> metadata); every index in range gives a distinct prompt
_SPACES = {
    "single_object": (len(COCO_CLASSES), _single_object),
    "two_object": (len(COCO_CLASSES) * (len(COCO_CLASSES) - 1), _two_object),
    "counting": (len(COCO_CLASSES) * len(_COUNTS), _counting),
    "colors": (len(_NON_PERSON) * len(COLORS), _colors),
    "position": (len(COCO_CLASSES) * (len(COCO_CLASSES) - 1) * len(RELATIONS), _position),
    "color_attr": (len(_NON_PERSON) * (len(_NON_PERSON) - 1) * len(COLORS) * (len(COLORS) - 1), _color_attr),
}


def allocate(n: int, weights: dict[str, float]) -> dict[str, int]:
    """Rows per tag: n * w / sum(w), floors plus one for the largest remainders (ties in TAGS order)."""
    total = sum(weights.get(tag, 0.0) for tag in TAGS)
    exact = {tag: n * weights.get(tag, 0.0) / total for tag in TAGS}
    counts = {tag: int(exact[tag]) for tag in TAGS}
    by_remainder = sorted(TAGS, key=lambda tag: exact[tag] - counts[tag], reverse=True)
    for tag in by_remainder[: n - sum(counts.values())]:
        counts[tag] += 1
    return counts


def _check_weights(weights: dict[str, float]) -> dict[str, float]:
    for tag, w in weights.items():
        if tag not in TAGS:
            raise ValueError(f"task weight for unknown tag {tag!r}; tags: {', '.join(TAGS)}")
        if not np.isfinite(w) or w < 0:
            raise ValueError(f"task weight {tag}={w!r}: must be a finite number >= 0")
    if sum(weights.values()) <= 0:
        raise ValueError(f"task weights {weights!r}: at least one must be > 0")
    return weights


def generate_training_metadata(
    n: int, seed: int, weights: dict[str, float] | None = None, exclude_prompts=(), allow_repeats: bool = False
) -> list[dict]:
    """``n`` GenEval metadata rows, deterministic in ``seed``, none with a prompt in ``exclude_prompts``.

    ``weights`` maps tags to relative weights (missing tags: 0; None: uniform over the six tags). Rows are
    distinct unless a task needs more rows than it has prompts outside the exclude set: then ValueError, or
    with ``allow_repeats`` that task repeats its prompts in successive shuffled rounds (each prompt appears
    the same number of times, +-1), as flow_grpo's merge script samples short tasks with replacement.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n={n!r}: must be an int >= 0")
    weights = _check_weights(dict(weights) if weights is not None else {tag: 1.0 for tag in TAGS})
    excluded = {normalize_prompt(p) for p in exclude_prompts}
    counts = allocate(n, weights)
    rows: list[dict] = []
    for t, tag in enumerate(TAGS):
        want = counts[tag]
        if want == 0:
            continue
        size, build = _SPACES[tag]
        if want > size and not allow_repeats:
            raise ValueError(f"{tag}: {want} rows requested but the task has only {size} distinct prompts; "
                             "lower its weight or n, or allow repeats")
        # one stream per task, so a task's prompts do not change when another task's weight does
        rng = np.random.default_rng([seed, t])
        picked = []
        for index in rng.permutation(size):
            md = build(int(index))
            if normalize_prompt(md["prompt"]) in excluded:
                continue
            picked.append(md)
            if len(picked) == want:
                break
        if len(picked) < want and not allow_repeats:
            raise ValueError(f"{tag}: {want} rows requested but only {len(picked)} distinct prompts remain outside "
                             "the exclude set; lower its weight or n, or allow repeats")
        if not picked:
            raise ValueError(f"{tag}: every prompt of the task is in the exclude set")
        distinct = picked
        while len(picked) < want:  # a short task, repeats allowed: more shuffled rounds of the same prompts
            picked = picked + [distinct[i] for i in rng.permutation(len(distinct))[: want - len(picked)]]
        rows.extend(picked)
    order = np.random.default_rng([seed, len(TAGS)]).permutation(len(rows))
    return [rows[i] for i in order]


def parse_weights(text: str) -> dict[str, float]:
    """``"position=0.7,counting=0.5"`` -> {"position": 0.7, "counting": 0.5}."""
    weights = {}
    for item in text.split(","):
        tag, sep, value = item.partition("=")
        tag = tag.strip()
        if not sep or not tag:
            raise ValueError(f"--task-weights item {item!r}: expected tag=weight")
        try:
            weights[tag] = float(value)
        except ValueError:
            raise ValueError(f"--task-weights item {item!r}: {value!r} is not a number") from None
    return _check_weights(weights)


def read_prompts(path) -> list[str]:
    """Prompts of a GenEval metadata JSONL file (validated rows) or of a text file (one per non-blank line)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return [md["prompt"] for md in read_metadata_jsonl(path)]
    if not path.is_file():
        raise FileNotFoundError(f"exclude file not found: {path}")
    with path.open(encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shared_rewards.geneval.prompts", description="Write GenEval-style training metadata JSONL."
    )
    parser.add_argument("--out", required=True, help="output metadata JSONL path")
    parser.add_argument("--n", type=int, required=True, help="number of rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task-weights", default=None, help="tag=weight,... (unlisted tags 0; default uniform)")
    parser.add_argument("--allow-repeats", action="store_true",
                        help="let a task with fewer distinct prompts than its share repeat them (else an error)")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--exclude", action="append", help="prompts never to emit (.jsonl metadata or .txt); repeatable")
    group.add_argument("--no-exclude", action="store_true", help="exclude nothing (you must say so explicitly)")
    args = parser.parse_args(argv)
    try:
        weights = parse_weights(args.task_weights) if args.task_weights else None
        excluded = [p for path in args.exclude or [] for p in read_prompts(path)]
        rows = generate_training_metadata(args.n, args.seed, weights, excluded, allow_repeats=args.allow_repeats)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"error: {e}\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for i, md in enumerate(rows):
            validate_metadata(md, i)
            f.write(json.dumps(md) + "\n")
    counts = {tag: sum(md["tag"] == tag for md in rows) for tag in TAGS}
    print(f"wrote {len(rows)} rows to {out}: {counts}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
