"""GenEval metadata: validation of one prompt's metadata dict and reading metadata JSONL files.

One metadata dict per prompt (geneval ``prompts/evaluation_metadata.jsonl``, flow_grpo ``dataset/geneval``)::

    {"tag": one of TAGS,
     "include": [{"class": COCO name, "count": int >= 1,
                  "color": one of COLORS (optional),
                  "position": [relation, index of an earlier include clause] (optional)}, ...],
     "exclude": [{"class": COCO name, "count": int >= 1}, ...]   (optional; the benchmark uses it for counting),
     "prompt": text}

Upstream scores whatever it is sent; a misspelled tag or colour silently changes the numbers (spec B.11.4).
Here every key and value is checked and unknown keys are rejected, with a one-line error naming the row,
the key and the value.
"""
from __future__ import annotations

import json
from pathlib import Path

from .vocabulary import COCO_CLASSES, COLORS, RELATIONS, TAGS

_TOP_KEYS = ("tag", "include", "exclude", "prompt")
_INCLUDE_KEYS = ("class", "count", "color", "position")
_EXCLUDE_KEYS = ("class", "count")
_COCO = frozenset(COCO_CLASSES)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_clause(clause, where: str, allowed: tuple[str, ...]) -> None:
    if not isinstance(clause, dict):
        raise ValueError(f"{where}: expected an object, got {type(clause).__name__}")
    for key in clause:
        if key not in allowed:
            raise ValueError(f"{where}: unknown key {key!r}; allowed: {', '.join(allowed)}")
    if "class" not in clause:
        raise ValueError(f"{where}: missing key 'class'")
    if clause["class"] not in _COCO:
        raise ValueError(f"{where}.class={clause['class']!r}: not one of the 80 COCO class names")
    if "count" not in clause:
        raise ValueError(f"{where}: missing key 'count'")
    if not _is_int(clause["count"]) or clause["count"] < 1:
        raise ValueError(f"{where}.count={clause['count']!r}: must be an int >= 1")


def validate_metadata(md, index=0) -> dict:
    """Check one metadata dict; return it unchanged. ``index`` names the row in errors (``metadata[index]``)."""
    row = f"metadata[{index}]"
    if not isinstance(md, dict):
        raise ValueError(f"{row}: expected an object, got {type(md).__name__}")
    for key in md:
        if key not in _TOP_KEYS:
            raise ValueError(f"{row}: unknown key {key!r}; allowed: {', '.join(_TOP_KEYS)}")
    if "tag" not in md:
        raise ValueError(f"{row}: missing key 'tag'")
    if md["tag"] not in TAGS:
        raise ValueError(f"{row}.tag={md['tag']!r}: unknown tag; expected one of {', '.join(TAGS)}")
    if not isinstance(md.get("prompt"), str):
        raise ValueError(f"{row}.prompt={md.get('prompt')!r}: must be a string")
    include = md.get("include")
    if not isinstance(include, list) or not include:
        raise ValueError(f"{row}.include={include!r}: must be a non-empty list of clauses")
    for i, clause in enumerate(include):
        where = f"{row}.include[{i}]"
        _check_clause(clause, where, _INCLUDE_KEYS)
        if "color" in clause and clause["color"] not in COLORS:
            raise ValueError(f"{where}.color={clause['color']!r}: expected one of {', '.join(COLORS)}")
        if "position" in clause:
            position = clause["position"]
            # JSON gives a list; the upstream generator builds a tuple in memory
            if not isinstance(position, (list, tuple)) or len(position) != 2:
                raise ValueError(f"{where}.position={position!r}: must be [relation, earlier include index]")
            relation, target = position
            if relation not in RELATIONS:
                raise ValueError(f"{where}.position={position!r}: relation {relation!r} not one of {RELATIONS}")
            if not _is_int(target) or not 0 <= target < i:
                earlier = f"0..{i - 1}" if i else "none precede include[0]"
                raise ValueError(
                    f"{where}.position={position!r}: index {target!r} must point to an earlier include ({earlier})"
                )
    exclude = md.get("exclude", [])
    if not isinstance(exclude, list):
        raise ValueError(f"{row}.exclude={exclude!r}: must be a list of clauses")
    for i, clause in enumerate(exclude):
        _check_clause(clause, f"{row}.exclude[{i}]", _EXCLUDE_KEYS)
    return md


def read_metadata_jsonl(path) -> list[dict]:
    """All metadata rows of a JSONL file (blank lines skipped), each validated; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GenEval metadata file not found: {path}")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                md = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            try:
                rows.append(validate_metadata(md, lineno))
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: {e}") from None
    return rows
