"""GenEval scoring rules as pure functions of detections and metadata (no model runs here).

Three rules score one image against its metadata (schema: metadata.py):

* ``benchmark_correct``: the GenEval benchmark's rule (djghosh13/geneval ``evaluation/evaluate_images.py``).
  Each include clause needs at least ``count`` detections; colour and position are checked on the ``count``
  most confident ones only; an exclude clause fails the image when the class has at least ``count``
  detections. This is the number the benchmark reports, and the server's ``rewards`` at evaluation.
* ``strict_correct``: the reward server's strict rule (yifan123/reward-server ``reward_server/gen_eval.py``):
  exactly ``count`` detections, all of them of the requested colour, all of them in the requested relation.
* ``partial_credit``: the reward server's training score, the reward of RSM SD3.5 and Flow-GRPO. Each include
  clause appends terms to a list and the score is their mean:
  count term ``1 - |count - n| / count`` (unbounded below: 16 detections of a count-1 clause give -14);
  a single 0.0 when ``n != count`` and the clause has a colour or position; else a colour term
  ``1 - |count - n_colour| / count``; for a position clause whose colour (if any) passed, 0.0 when the target
  clause failed, else 0.0 at the first violating pair and then 1.0 whatever the scan found (a failed position
  image with its target present scores (1 + 1 + 0 + 1) / 4 = 0.75).

Detections come from ``postprocess`` (threshold, sort, cap, optional NMS) with ``Detection.color`` filled by
the evaluator for every detection of each class in ``classes_needing_color(metadata)``.

Upstream quirks that change numbers are named flags of ``GenEvalOptions``, on by default so that the training
reward matches Flow-GRPO / RSM. Metadata tags outside the six known ones are silently accepted upstream (a
misspelled ``counting`` gets the 0.3 threshold and credits no grouped output); here they raise ValueError,
in ``metadata.validate_metadata`` at the boundary and again in ``postprocess`` / ``batch_response``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .detections import Detection, ImageDetections
from .vocabulary import TAGS

# the reward server's filler for the grouped outputs of rows with another tag; consumers drop it before averaging
GROUP_FILLER = -10.0


@dataclass(frozen=True)
class GenEvalOptions:
    # defaults: geneval evaluate_images.py --options defaults, hard-coded identically in reward-server gen_eval.py
    threshold: float = 0.3  # keep detections scoring strictly above this (all tags but counting)
    counting_threshold: float = 0.9  # the same for the counting tag
    max_objects: int = 16  # per class, after thresholding, before NMS
    max_overlap: float = 1.0  # greedy NMS IoU threshold; 1.0 disables NMS
    position_threshold: float = 0.1  # margin per axis, as a fraction of the two boxes' summed width / height
    # reward-server quirk: after a position scan that found a violation, 1.0 is appended anyway (0.75, not 0.67)
    position_partial_credit_quirk: bool = True
    # reward-server quirk: the count term 1 - |count - n| / count is not clipped at 0 (scores can be negative)
    unbounded_count_term_quirk: bool = True
    # reward-server quirk: the strict rule never evaluates exclude clauses (False: it fails like the benchmark)
    strict_ignores_exclude_quirk: bool = True

    def __post_init__(self):
        # options arrive from command lines and configs, so types are checked too, not only ranges
        for key in ("threshold", "counting_threshold", "max_overlap", "position_threshold"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"GenEvalOptions.{key}={value!r}: must be a number")
        for key in ("position_partial_credit_quirk", "unbounded_count_term_quirk", "strict_ignores_exclude_quirk"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"GenEvalOptions.{key}={getattr(self, key)!r}: must be true or false")
        for key in ("threshold", "counting_threshold"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"GenEvalOptions.{key}={value!r}: must be in [0, 1]")
        if isinstance(self.max_objects, bool) or not isinstance(self.max_objects, int) or self.max_objects < 1:
            raise ValueError(f"GenEvalOptions.max_objects={self.max_objects!r}: must be an int >= 1")
        if not 0.0 < self.max_overlap <= 1.0:
            raise ValueError(f"GenEvalOptions.max_overlap={self.max_overlap!r}: must be in (0, 1] (1 disables NMS)")
        if self.position_threshold < 0.0:
            raise ValueError(f"GenEvalOptions.position_threshold={self.position_threshold!r}: must be >= 0")


@dataclass(frozen=True)
class ImageResult:
    score: float  # partial credit, the training reward
    correct: bool  # benchmark rule; False when it was not computed (only_strict)
    strict_correct: bool
    reason: str  # one line per failed check, of the benchmark rule when computed, else of the strict rule


def _check_tag(tag: str) -> None:
    if tag not in TAGS:
        raise ValueError(f"unknown GenEval tag {tag!r}; expected one of {', '.join(TAGS)}")


def _box_iou(box_a: np.ndarray, box_b: np.ndarray) -> float:
    # mmdet 1.x/2.x "+1 pixel" area convention, as in geneval's compute_iou
    def area(x1, y1, x2, y2):
        return max(x2 - x1 + 1, 0) * max(y2 - y1 + 1, 0)

    inter = area(max(box_a[0], box_b[0]), max(box_a[1], box_b[1]), min(box_a[2], box_b[2]), min(box_a[3], box_b[3]))
    union = area(*box_a[:4]) + area(*box_b[:4]) - inter
    return float(inter / union) if union else 0.0


def postprocess(raw: ImageDetections, tag: str, options: GenEvalOptions = GenEvalOptions()) -> ImageDetections:
    """Threshold, sort, cap and optionally NMS one image's raw detections, per class (spec B.3).

    Keeps scores strictly above the tag's threshold, most confident first, at most ``max_objects``, then
    greedy NMS dropping boxes with IoU >= ``max_overlap`` to a kept one (skipped when it is 1.0).
    Classes left empty are dropped. The Detection objects are shared with ``raw``, not copied.
    """
    _check_tag(tag)
    threshold = options.counting_threshold if tag == "counting" else options.threshold
    kept: ImageDetections = {}
    for name, detections in raw.items():
        scores = np.array([d.score for d in detections], dtype=np.float64)
        # upstream reverses numpy's default ascending argsort; on the short per-class arrays of its numpy 1.x
        # environment that sort is stable, so of two equal scores the later detection comes first. A stable
        # sort reproduces that on any numpy version and array length (newer numpy may use unstable SIMD sorts).
        order = np.argsort(scores, kind="stable")[::-1]
        order = [int(i) for i in order if scores[i] > threshold][: options.max_objects]
        selected: list[Detection] = []
        while order:
            best = detections[order.pop(0)]
            selected.append(best)
            if options.max_overlap < 1.0:
                order = [i for i in order if _box_iou(best.box, detections[i].box) < options.max_overlap]
        if selected:
            kept[name] = selected
    return kept


def classes_needing_color(metadata: dict) -> set[str]:
    """Classes whose detections the evaluator must colour-classify before scoring."""
    return {clause["class"] for clause in metadata.get("include", []) if "color" in clause}


def relative_position(a, b, position_threshold: float = 0.1) -> set[str]:
    """Relations of box ``a`` to box ``b`` (x1, y1, x2, y2 pixels, y down), spec B.5.

    Each centre-offset component is shrunk towards 0 by ``position_threshold`` times the two boxes' summed
    size on that axis; if both shrunk components are below 1e-3 the boxes are "level" (empty set). Otherwise
    the shrunk vector divided by the norm of the *unshrunk* offset must exceed 0.5 in magnitude on an axis
    for that axis's relation, so a diagonal offset can give two relations.
    """
    box_a = np.asarray(a, dtype=np.float64)[:4]
    box_b = np.asarray(b, dtype=np.float64)[:4]
    centre_a = (box_a[:2] + box_a[2:]) / 2  # [2] x, y
    centre_b = (box_b[:2] + box_b[2:]) / 2
    size_a = np.abs(box_a[2:] - box_a[:2])  # [2] width, height
    size_b = np.abs(box_b[2:] - box_b[:2])
    offset = centre_a - centre_b
    revised = np.sign(offset) * np.maximum(np.abs(offset) - position_threshold * (size_a + size_b), 0.0)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def _colors(found: list[Detection], name: str) -> list[str]:
    colors = [d.color for d in found]
    if any(c is None for c in colors):
        raise ValueError(
            f"a detection of {name!r} has no colour; colour-classify every class in classes_needing_color(metadata)"
        )
    return colors


def _first_violation(found: list[Detection], targets: list[Detection], relation: str, margin: float) -> set | None:
    """The relations of the first (object, target) pair lacking ``relation``, or None when all pairs hold it."""
    for obj in found:
        for target in targets:
            relations = relative_position(obj.box, target.box, margin)
            if relation not in relations:
                return relations
    return None


def benchmark_correct(
    dets: ImageDetections, metadata: dict, options: GenEvalOptions = GenEvalOptions()
) -> tuple[bool, str]:
    """The benchmark's rule (spec B.4): (correct, reason with one line per failure)."""
    correct = True
    reasons = []
    groups: list[list[Detection] | None] = []  # per include clause: its found objects, None when it failed
    for clause in metadata.get("include", []):
        name, count = clause["class"], clause["count"]
        found = dets.get(name, [])[:count]  # only the `count` most confident ones are checked further
        matched = len(found) >= count
        if not matched:
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in clause:
                hits = _colors(found, name).count(clause["color"])
                if hits < count:
                    matched = False
                    reasons.append(f"expected {clause['color']} {name}>={count}, found {hits} {clause['color']}")
            if "position" in clause and matched:
                relation, target_index = clause["position"]
                if groups[target_index] is None:
                    matched = False
                    reasons.append(f"no target for {name} to be {relation}")
                else:
                    seen = _first_violation(found, groups[target_index], relation, options.position_threshold)
                    if seen is not None:
                        matched = False
                        reasons.append(f"expected {name} {relation} target, found {' and '.join(sorted(seen))} target")
        correct = correct and matched
        groups.append(found if matched else None)
    for clause in metadata.get("exclude", []):
        n = len(dets.get(clause["class"], []))
        if n >= clause["count"]:
            correct = False
            reasons.append(f"expected {clause['class']}<{clause['count']}, found {n}")
    return correct, "\n".join(reasons)


def _strict_and_terms(
    dets: ImageDetections, metadata: dict, options: GenEvalOptions
) -> tuple[bool, list[float], str]:
    """The reward server's strict rule and partial-credit terms, one pass as upstream (spec B.8)."""
    correct = True
    reasons = []
    terms: list[float] = []
    groups: list[list[Detection] | None] = []
    for clause in metadata.get("include", []):
        name, count = clause["class"], clause["count"]
        found = dets.get(name, [])  # all detections (at most max_objects), not the first `count`
        count_term = 1.0 - abs(count - len(found)) / count
        terms.append(count_term if options.unbounded_count_term_quirk else max(count_term, 0.0))
        matched = len(found) == count
        if not matched:
            reasons.append(f"expected {name}=={count}, found {len(found)}")
            if "color" in clause or "position" in clause:
                terms.append(0.0)
        else:
            if "color" in clause:
                hits = _colors(found, name).count(clause["color"])
                terms.append(1.0 - abs(count - hits) / count)
                if hits != count:
                    matched = False
                    reasons.append(f"expected {clause['color']} {name}=={count}, found {hits} {clause['color']}")
            if "position" in clause and matched:
                relation, target_index = clause["position"]
                if groups[target_index] is None:
                    matched = False
                    reasons.append(f"no target for {name} to be {relation}")
                    terms.append(0.0)
                else:
                    seen = _first_violation(found, groups[target_index], relation, options.position_threshold)
                    if seen is not None:
                        matched = False
                        reasons.append(f"expected {name} {relation} target, found {' and '.join(sorted(seen))} target")
                        terms.append(0.0)
                    if seen is None or options.position_partial_credit_quirk:
                        terms.append(1.0)
        correct = correct and matched
        groups.append(found if matched else None)
    if not options.strict_ignores_exclude_quirk:
        for clause in metadata.get("exclude", []):
            n = len(dets.get(clause["class"], []))
            if n >= clause["count"]:
                correct = False
                reasons.append(f"expected {clause['class']}<{clause['count']}, found {n}")
    return correct, terms, "\n".join(reasons)


def strict_correct(dets: ImageDetections, metadata: dict, options: GenEvalOptions = GenEvalOptions()) -> bool:
    """The reward server's strict rule: exact counts, all colours and positions right, excludes ignored."""
    return _strict_and_terms(dets, metadata, options)[0]


def partial_credit(dets: ImageDetections, metadata: dict, options: GenEvalOptions = GenEvalOptions()) -> float:
    """The reward server's training score: the mean of the clause terms, 0.0 when there are none."""
    terms = _strict_and_terms(dets, metadata, options)[1]
    return sum(terms) / len(terms) if terms else 0.0


def evaluate_image(
    dets: ImageDetections, metadata: dict, only_strict: bool, options: GenEvalOptions = GenEvalOptions()
) -> ImageResult:
    """All three numbers for one post-processed image; the benchmark rule is skipped when ``only_strict``."""
    strict, terms, strict_reason = _strict_and_terms(dets, metadata, options)
    score = sum(terms) / len(terms) if terms else 0.0
    if only_strict:
        return ImageResult(score=score, correct=False, strict_correct=strict, reason=strict_reason)
    correct, reason = benchmark_correct(dets, metadata, options)
    return ImageResult(score=score, correct=correct, strict_correct=strict, reason=reason)


def batch_response(metadatas: list[dict], results: list[ImageResult]) -> dict:
    """The reward server's response dict for one request, rows in request order (spec B.9).

    ``group_rewards`` / ``group_strict_rewards`` map each of the six tags to a list as long as the batch: the
    row's 1.0/0.0 under its own tag and -10.0 under the others. Upstream fills them lazily per row, so an
    empty batch gives empty dicts; that is kept.
    """
    if len(metadatas) != len(results):
        raise ValueError(f"batch_response: {len(metadatas)} metadata rows but {len(results)} results")
    for md in metadatas:
        _check_tag(md["tag"])
    group_rewards = {tag: [] for tag in TAGS} if results else {}
    group_strict = {tag: [] for tag in TAGS} if results else {}
    for md, result in zip(metadatas, results):
        for tag in TAGS:
            mine = tag == md["tag"]
            group_rewards[tag].append((1.0 if result.correct else 0.0) if mine else GROUP_FILLER)
            group_strict[tag].append((1.0 if result.strict_correct else 0.0) if mine else GROUP_FILLER)
    return {
        "scores": [float(r.score) for r in results],
        "rewards": [1.0 if r.correct else 0.0 for r in results],
        "strict_rewards": [1.0 if r.strict_correct else 0.0 for r in results],
        "group_rewards": group_rewards,
        "group_strict_rewards": group_strict,
    }
