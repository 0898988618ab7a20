"""GenEval scoring rules on hand-built detections; every expected number is worked out by hand in a comment.

Rules: benchmark (djghosh13/geneval evaluate_images.py), strict and partial credit (yifan123/reward-server
gen_eval.py), as in spec B.3-B.5 and B.8.
"""
import dataclasses

import numpy as np
import pytest

from shared_rewards.geneval.detections import Detection
from shared_rewards.geneval.scoring import (
    GenEvalOptions,
    ImageResult,
    batch_response,
    benchmark_correct,
    classes_needing_color,
    evaluate_image,
    partial_credit,
    postprocess,
    relative_position,
    strict_correct,
)

OPTS = GenEvalOptions()


def det(x1=0.0, y1=0.0, x2=10.0, y2=10.0, score=0.95, color=None):
    return Detection(box=np.array([x1, y1, x2, y2], dtype=np.float64), score=score, color=color)


def meta(tag, include, exclude=None, prompt="a photo"):
    md = {"tag": tag, "include": include, "prompt": prompt}
    if exclude is not None:
        md["exclude"] = exclude
    return md


def scores(dets):
    return [d.score for d in dets]


# ---------------------------------------------------------------- post-processing (B.3)

def test_threshold_is_strict_and_counting_uses_0_9():
    raw = {"cat": [det(score=0.3), det(score=0.31), det(score=0.9), det(score=0.91), det(score=0.2)]}
    # 0.3 and 0.2 are not > 0.3; the rest survive, most confident first
    assert scores(postprocess(raw, "single_object", OPTS)["cat"]) == [0.91, 0.9, 0.31]
    # counting: only 0.91 > 0.9; a score exactly at the threshold is dropped
    assert scores(postprocess(raw, "counting", OPTS)["cat"]) == [0.91]


def test_class_left_empty_is_dropped():
    raw = {"cat": [det(score=0.1)], "dog": [det(score=0.5)], "cow": []}
    assert set(postprocess(raw, "two_object", OPTS)) == {"dog"}


def test_sorted_by_score_and_capped_at_16():
    rng = np.random.default_rng(0)
    values = rng.uniform(0.31, 1.0, size=20)
    out = postprocess({"cup": [det(score=float(s)) for s in values]}, "single_object", OPTS)["cup"]
    assert len(out) == 16
    assert scores(out) == sorted(values.tolist(), reverse=True)[:16]
    assert len(postprocess({"cup": [det(score=float(s)) for s in values]}, "single_object",
                           dataclasses.replace(OPTS, max_objects=3))["cup"]) == 3


def test_equal_scores_keep_upstreams_reversed_order():
    # upstream reverses an ascending argsort: of two equal scores the later detection comes first
    first, second = det(x1=0, score=0.5), det(x1=1, score=0.5)
    assert postprocess({"cat": [first, second]}, "single_object", OPTS)["cat"] == [second, first]


def test_no_nms_by_default_even_for_identical_boxes():
    raw = {"cat": [det(score=0.9), det(score=0.8)]}  # IoU 1.0, kept because max_overlap 1.0 disables NMS
    assert len(postprocess(raw, "single_object", OPTS)["cat"]) == 2


def test_nms_with_plus_one_pixel_iou():
    a = det(0, 0, 9, 9, score=0.9)
    b = det(1, 0, 10, 9, score=0.8)
    c = det(20, 20, 29, 29, score=0.7)
    # +1 convention: area(a) = area(b) = 10*10 = 100; intersection x 1..9 -> 9*10 = 90; IoU = 90/110 = 0.818
    keep_half = postprocess({"cat": [a, b, c]}, "single_object", dataclasses.replace(OPTS, max_overlap=0.5))
    assert keep_half["cat"] == [a, c]
    # 0.818 < 0.85 keeps b
    keep_085 = postprocess({"cat": [a, b, c]}, "single_object", dataclasses.replace(OPTS, max_overlap=0.85))
    assert keep_085["cat"] == [a, b, c]
    # where the +1 matters: boxes touching at x = 1 have zero intersection without it; with it, areas 2*2 = 4,
    # intersection (1-1+1)*(1-0+1) = 2, IoU 2/(4+4-2) = 0.333: dropped at 0.3, kept at 0.34
    d, e = det(0, 0, 1, 1, score=0.9), det(1, 0, 2, 1, score=0.8)
    assert postprocess({"cat": [d, e]}, "single_object", dataclasses.replace(OPTS, max_overlap=0.3))["cat"] == [d]
    assert postprocess({"cat": [d, e]}, "single_object", dataclasses.replace(OPTS, max_overlap=0.34))["cat"] == [d, e]


def test_nms_runs_after_the_cap():
    # 16 identical boxes outrank one distinct box; the cap keeps the 16, NMS then leaves one: the distinct
    # 17th box was cut by the cap before NMS could make room for it
    raw = {"cat": [det(score=0.99 - i * 0.01) for i in range(16)] + [det(50, 50, 60, 60, score=0.5)]}
    out = postprocess(raw, "single_object", dataclasses.replace(OPTS, max_overlap=0.5))["cat"]
    assert scores(out) == [0.99]


def test_unknown_tag_is_rejected_not_scored_with_the_default_threshold():
    with pytest.raises(ValueError, match="'countin'"):
        postprocess({"cat": [det()]}, "countin", OPTS)


def test_options_are_validated():
    with pytest.raises(ValueError, match="max_overlap"):
        GenEvalOptions(max_overlap=0.0)
    with pytest.raises(ValueError, match="threshold"):
        GenEvalOptions(threshold=1.5)
    with pytest.raises(ValueError, match="max_objects"):
        GenEvalOptions(max_objects=0)
    with pytest.raises(ValueError, match="threshold='0.3': must be a number"):
        GenEvalOptions(threshold="0.3")
    with pytest.raises(ValueError, match="position_partial_credit_quirk=1: must be true or false"):
        GenEvalOptions(position_partial_credit_quirk=1)


# ---------------------------------------------------------------- relative position (B.5)

def test_relative_position_left_right_above_below():
    a, b = [0, 0, 10, 10], [50, 0, 60, 10]
    # centres (5,5) and (55,5): offset (-50, 0); margin 0.1*(10+10) = 2 -> (-48, 0); / 50 -> (-0.96, 0)
    assert relative_position(a, b, 0.1) == {"left of"}
    assert relative_position(b, a, 0.1) == {"right of"}
    c, d = [0, 0, 10, 10], [0, 50, 10, 60]  # y grows downward: c is above d
    assert relative_position(c, d, 0.1) == {"above"}
    assert relative_position(d, c, 0.1) == {"below"}


def test_relative_position_diagonal_gives_two_relations():
    # offset (-50, -50) -> (-48, -48) / 70.71 = (-0.679, -0.679): both components beyond 0.5
    assert relative_position([0, 0, 10, 10], [50, 50, 60, 60], 0.1) == {"left of", "above"}
    # offset (-10, -60) -> (-8, -58) / 60.83 = (-0.13, -0.95): only above
    assert relative_position([0, 0, 10, 10], [10, 60, 20, 70], 0.1) == {"above"}


def test_relative_position_overlap_within_margin_gives_none():
    # centres (50,50) and (55,50): |dx| = 5 < margin 0.1*(100+100) = 20 -> 0; dy = 0 -> empty set
    assert relative_position([0, 0, 100, 100], [5, 0, 105, 100], 0.1) == set()


def test_relative_position_normalises_by_the_original_offset():
    a, b = [0, 0, 80, 10], [20, 0, 100, 10]
    # offset (-20, 0); margin 0.1*(80+80) = 16 -> (-4, 0): not in the 1e-3 dead zone, but -4/20 = -0.2
    # (dividing by the shrunk norm would give -1.0 and "left of")
    assert relative_position(a, b, 0.1) == set()
    # without a margin: -20/20 = -1.0
    assert relative_position(a, b, 0.0) == {"left of"}


# ---------------------------------------------------------------- single_object / two_object

SINGLE = meta("single_object", [{"class": "cat", "count": 1}])
TWO = meta("two_object", [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}])


def test_single_object_one_detection_is_right_in_every_mode():
    dets = {"cat": [det()]}
    assert benchmark_correct(dets, SINGLE, OPTS) == (True, "")
    assert strict_correct(dets, SINGLE, OPTS) is True
    assert partial_credit(dets, SINGLE, OPTS) == 1.0  # terms [1 - 0/1] = [1]


def test_single_object_missing():
    correct, reason = benchmark_correct({"dog": [det()]}, SINGLE, OPTS)
    assert not correct and reason == "expected cat>=1, found 0"
    assert strict_correct({}, SINGLE, OPTS) is False
    assert partial_credit({}, SINGLE, OPTS) == 0.0  # terms [1 - |1-0|/1] = [0]


def test_extra_objects_pass_the_benchmark_but_not_strict_and_go_negative():
    two = {"cat": [det(), det()]}
    assert benchmark_correct(two, SINGLE, OPTS)[0] is True  # ">= count" at this stage
    assert strict_correct(two, SINGLE, OPTS) is False  # exactly count
    assert partial_credit(two, SINGLE, OPTS) == 0.0  # [1 - |1-2|/1] = [0]
    three = {"cat": [det(), det(), det()]}
    assert partial_credit(three, SINGLE, OPTS) == -1.0  # [1 - |1-3|/1] = [-1]


def test_two_object_partial():
    # cat found (1), dog missing (1 - 1/1 = 0): (1 + 0) / 2 = 0.5
    dets = {"cat": [det()]}
    assert partial_credit(dets, TWO, OPTS) == 0.5
    assert strict_correct(dets, TWO, OPTS) is False
    assert benchmark_correct(dets, TWO, OPTS) == (False, "expected dog>=1, found 0")
    both = {"cat": [det()], "dog": [det(50, 50, 60, 60)]}
    assert benchmark_correct(both, TWO, OPTS)[0] and strict_correct(both, TWO, OPTS)
    assert partial_credit(both, TWO, OPTS) == 1.0


# ---------------------------------------------------------------- counting

COUNT3 = meta("counting", [{"class": "cup", "count": 3}], exclude=[{"class": "cup", "count": 4}])


def test_counting_exact():
    dets = {"cup": [det() for _ in range(3)]}
    assert benchmark_correct(dets, COUNT3, OPTS) == (True, "")
    assert strict_correct(dets, COUNT3, OPTS) is True
    assert partial_credit(dets, COUNT3, OPTS) == 1.0


def test_counting_too_many_fails_the_benchmark_through_the_exclude_clause():
    dets = {"cup": [det() for _ in range(4)]}
    without_exclude = meta("counting", [{"class": "cup", "count": 3}])
    assert benchmark_correct(dets, without_exclude, OPTS) == (True, "")  # 4 >= 3 passes the include clause
    assert benchmark_correct(dets, COUNT3, OPTS) == (False, "expected cup<4, found 4")  # 4 >= 4 excluded
    assert strict_correct(dets, COUNT3, OPTS) is False  # 4 != 3, the exact count, not the exclude
    assert partial_credit(dets, COUNT3, OPTS) == pytest.approx(2 / 3)  # [1 - |3-4|/3] = [2/3]


def test_counting_too_few():
    dets = {"cup": [det(), det()]}
    assert benchmark_correct(dets, COUNT3, OPTS) == (False, "expected cup>=3, found 2")
    assert partial_credit(dets, COUNT3, OPTS) == pytest.approx(2 / 3)  # [1 - |3-2|/3]


def test_counting_term_is_unbounded_below_with_the_16_cap():
    raw = {"cup": [det(score=0.95) for _ in range(20)]}
    md = meta("counting", [{"class": "cup", "count": 1}], exclude=[{"class": "cup", "count": 2}])
    dets = postprocess(raw, "counting", OPTS)
    assert len(dets["cup"]) == 16
    assert partial_credit(dets, md, OPTS) == -14.0  # [1 - |1-16|/1] = [-14]
    clipped = dataclasses.replace(OPTS, unbounded_count_term_quirk=False)
    assert partial_credit(dets, md, clipped) == 0.0  # max(-14, 0)


def test_counting_threshold_in_the_pipeline():
    # three cups, one exactly at 0.9: for counting only two survive; the same image under another tag keeps 3
    raw = {"cup": [det(score=0.95), det(score=0.92), det(score=0.9)]}
    assert benchmark_correct(postprocess(raw, "counting", OPTS), COUNT3, OPTS)[0] is False
    assert len(postprocess(raw, "colors", OPTS)["cup"]) == 3


def test_strict_ignores_exclude_clauses_unless_the_quirk_is_off():
    md = meta("two_object", [{"class": "cat", "count": 1}], exclude=[{"class": "dog", "count": 1}])
    dets = {"cat": [det()], "dog": [det(50, 50, 60, 60)]}
    assert benchmark_correct(dets, md, OPTS) == (False, "expected dog<1, found 1")
    assert strict_correct(dets, md, OPTS) is True
    assert strict_correct(dets, md, dataclasses.replace(OPTS, strict_ignores_exclude_quirk=False)) is False
    assert partial_credit(dets, md, OPTS) == 1.0  # excludes never add terms


# ---------------------------------------------------------------- colors / color_attr

RED_CAR = meta("colors", [{"class": "car", "count": 1, "color": "red"}])


def test_colors_right_and_wrong():
    assert benchmark_correct({"car": [det(color="red")]}, RED_CAR, OPTS) == (True, "")
    assert partial_credit({"car": [det(color="red")]}, RED_CAR, OPTS) == 1.0  # [1, 1]
    wrong = {"car": [det(color="blue")]}
    correct, reason = benchmark_correct(wrong, RED_CAR, OPTS)
    assert not correct and reason.startswith("expected red car>=1, found 0 red")
    assert strict_correct(wrong, RED_CAR, OPTS) is False
    assert partial_credit(wrong, RED_CAR, OPTS) == 0.5  # [count 1, colour 1 - |1-0|/1 = 0] -> 1/2


def test_colors_benchmark_checks_only_the_most_confident_objects():
    red_first = {"car": [det(score=0.9, color="red"), det(score=0.8, color="blue")]}
    blue_first = {"car": [det(score=0.9, color="blue"), det(score=0.8, color="red")]}
    assert benchmark_correct(red_first, RED_CAR, OPTS)[0] is True
    assert benchmark_correct(blue_first, RED_CAR, OPTS)[0] is False
    # strict/partial see both: n = 2 != 1 -> count term 1 - 1/1 = 0, plus the single 0.0 for a colour clause
    assert strict_correct(red_first, RED_CAR, OPTS) is False
    assert partial_credit(red_first, RED_CAR, OPTS) == 0.0  # [0, 0]


def test_colour_term_counts_matching_objects():
    md = meta("colors", [{"class": "car", "count": 2, "color": "red"}])
    dets = {"car": [det(color="red"), det(color="blue")]}
    # count term 1; colour term 1 - |2-1|/2 = 0.5 -> (1 + 0.5) / 2 = 0.75
    assert partial_credit(dets, md, OPTS) == 0.75
    assert strict_correct(dets, md, OPTS) is False
    assert benchmark_correct(dets, md, OPTS)[0] is False  # 1 red < 2


def test_color_attr():
    md = meta("color_attr", [{"class": "bus", "count": 1, "color": "red"},
                             {"class": "cup", "count": 1, "color": "blue"}])
    good = {"bus": [det(color="red")], "cup": [det(50, 50, 60, 60, color="blue")]}
    assert benchmark_correct(good, md, OPTS)[0] and strict_correct(good, md, OPTS)
    assert partial_credit(good, md, OPTS) == 1.0
    bad = {"bus": [det(color="red")], "cup": [det(50, 50, 60, 60, color="green")]}
    assert partial_credit(bad, md, OPTS) == 0.75  # [1, 1, 1, 0] / 4
    assert not benchmark_correct(bad, md, OPTS)[0] and not strict_correct(bad, md, OPTS)
    missing = {"bus": [det(color="red")]}
    assert partial_credit(missing, md, OPTS) == 0.5  # [1, 1, 0 (count), 0.0 (the single colour zero)] / 4


def test_missing_colour_is_an_error_not_a_wrong_colour():
    with pytest.raises(ValueError, match="'car'"):
        benchmark_correct({"car": [det()]}, RED_CAR, OPTS)
    with pytest.raises(ValueError, match="'car'"):
        partial_credit({"car": [det()]}, RED_CAR, OPTS)


def test_classes_needing_color():
    md = meta("color_attr", [{"class": "bus", "count": 1, "color": "red"}, {"class": "cup", "count": 1}])
    assert classes_needing_color(md) == {"bus"}
    assert classes_needing_color(SINGLE) == set()


# ---------------------------------------------------------------- position

CAT_LEFT_OF_DOG = meta("position", [{"class": "dog", "count": 1},
                                    {"class": "cat", "count": 1, "position": ["left of", 0]}])
DOG = det(50, 0, 60, 10)


def test_position_success():
    dets = {"dog": [DOG], "cat": [det(0, 0, 10, 10)]}
    assert benchmark_correct(dets, CAT_LEFT_OF_DOG, OPTS) == (True, "")
    assert strict_correct(dets, CAT_LEFT_OF_DOG, OPTS) is True
    assert partial_credit(dets, CAT_LEFT_OF_DOG, OPTS) == 1.0  # [1, 1, 1] / 3


def test_position_failure_with_target_present_is_the_075_quirk():
    dets = {"dog": [DOG], "cat": [det(100, 0, 110, 10)]}  # cat right of dog
    correct, reason = benchmark_correct(dets, CAT_LEFT_OF_DOG, OPTS)
    assert not correct and reason == "expected cat left of target, found right of target"
    assert strict_correct(dets, CAT_LEFT_OF_DOG, OPTS) is False
    # dog count 1, cat count 1, first violation 0.0, then 1.0 appended anyway: (1 + 1 + 0 + 1) / 4
    assert partial_credit(dets, CAT_LEFT_OF_DOG, OPTS) == 0.75
    clean = dataclasses.replace(OPTS, position_partial_credit_quirk=False)
    assert partial_credit(dets, CAT_LEFT_OF_DOG, clean) == pytest.approx(2 / 3)  # (1 + 1 + 0) / 3


def test_position_no_target():
    dets = {"cat": [det(0, 0, 10, 10)]}
    correct, reason = benchmark_correct(dets, CAT_LEFT_OF_DOG, OPTS)
    assert not correct
    assert reason == "expected dog>=1, found 0\nno target for cat to be left of"
    # dog count 1 - 1/1 = 0; cat count 1; target empty -> 0.0 and nothing else: (0 + 1 + 0) / 3
    assert partial_credit(dets, CAT_LEFT_OF_DOG, OPTS) == pytest.approx(1 / 3)
    assert strict_correct(dets, CAT_LEFT_OF_DOG, OPTS) is False


def test_position_target_group_differs_between_benchmark_and_strict():
    # two dogs: the benchmark keeps the most confident one as the target; strict fails the dog clause (2 != 1),
    # so the cat has no target there
    far_dog = det(-100, 0, -90, 10, score=0.5)  # the cat is right of this one
    dets = {"dog": [DOG, far_dog], "cat": [det(0, 0, 10, 10)]}
    assert benchmark_correct(dets, CAT_LEFT_OF_DOG, OPTS) == (True, "")
    assert strict_correct(dets, CAT_LEFT_OF_DOG, OPTS) is False
    # dog 1 - |1-2|/1 = 0; cat 1; no target 0.0: (0 + 1 + 0) / 3
    assert partial_credit(dets, CAT_LEFT_OF_DOG, OPTS) == pytest.approx(1 / 3)


def test_position_benchmark_checks_every_pair():
    md = meta("position", [{"class": "dog", "count": 1}, {"class": "cat", "count": 2, "position": ["left of", 0]}])
    one_wrong = {"dog": [DOG], "cat": [det(0, 0, 10, 10), det(100, 0, 110, 10)]}
    assert benchmark_correct(one_wrong, md, OPTS)[0] is False
    # dog 1; cat count 1; violation 0.0 then 1.0: (1 + 1 + 0 + 1) / 4
    assert partial_credit(one_wrong, md, OPTS) == 0.75
    both_left = {"dog": [DOG], "cat": [det(0, 0, 10, 10), det(0, 20, 10, 30)]}
    assert benchmark_correct(both_left, md, OPTS) == (True, "")
    assert partial_credit(both_left, md, OPTS) == 1.0


def test_position_respects_position_threshold_option():
    md = meta("position", [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}])
    dets = {"dog": [det(20, 0, 100, 10)], "cat": [det(0, 0, 80, 10)]}  # offset -20, margin 16: -0.2, none
    assert benchmark_correct(dets, md, OPTS)[0] is False
    assert benchmark_correct(dets, md, dataclasses.replace(OPTS, position_threshold=0.0))[0] is True


def test_no_include_clauses_scores_zero():
    assert partial_credit({}, {"tag": "single_object", "include": [], "prompt": ""}, OPTS) == 0.0


# ---------------------------------------------------------------- evaluate_image / batch_response

def test_evaluate_image_only_strict_skips_the_benchmark_rule():
    dets = {"cat": [det(), det()]}
    full = evaluate_image(dets, SINGLE, only_strict=False, options=OPTS)
    assert full == ImageResult(score=0.0, correct=True, strict_correct=False, reason="")
    quick = evaluate_image(dets, SINGLE, only_strict=True, options=OPTS)
    assert quick == ImageResult(score=0.0, correct=False, strict_correct=False, reason="expected cat==1, found 2")


def test_batch_response_keys_lengths_order_and_fillers():
    mds = [CAT_LEFT_OF_DOG, COUNT3, SINGLE]
    results = [
        ImageResult(score=0.75, correct=False, strict_correct=False, reason="x"),
        ImageResult(score=1.0, correct=True, strict_correct=True, reason=""),
        ImageResult(score=-1.0, correct=True, strict_correct=False, reason=""),
    ]
    out = batch_response(mds, results)
    assert list(out) == ["scores", "rewards", "strict_rewards", "group_rewards", "group_strict_rewards"]
    assert out["scores"] == [0.75, 1.0, -1.0]
    assert out["rewards"] == [0.0, 1.0, 1.0]
    assert out["strict_rewards"] == [0.0, 1.0, 0.0]
    tags = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
    assert list(out["group_rewards"]) == tags and list(out["group_strict_rewards"]) == tags
    assert out["group_rewards"]["position"] == [0.0, -10.0, -10.0]
    assert out["group_rewards"]["counting"] == [-10.0, 1.0, -10.0]
    assert out["group_rewards"]["single_object"] == [-10.0, -10.0, 1.0]
    assert out["group_strict_rewards"]["single_object"] == [-10.0, -10.0, 0.0]
    for tag in ("two_object", "colors", "color_attr"):
        assert out["group_rewards"][tag] == [-10.0] * 3 and out["group_strict_rewards"][tag] == [-10.0] * 3


def test_batch_response_only_strict_rewards_are_all_zero():
    dets = {"cat": [det()]}
    results = [evaluate_image(dets, SINGLE, only_strict=True, options=OPTS) for _ in range(2)]
    out = batch_response([SINGLE, SINGLE], results)
    assert out["rewards"] == [0.0, 0.0] and out["strict_rewards"] == [1.0, 1.0]
    assert out["group_rewards"]["single_object"] == [0.0, 0.0]


def test_batch_response_edge_cases():
    assert batch_response([], []) == {
        "scores": [], "rewards": [], "strict_rewards": [], "group_rewards": {}, "group_strict_rewards": {}}
    result = ImageResult(score=1.0, correct=True, strict_correct=True, reason="")
    with pytest.raises(ValueError, match="'count'"):
        batch_response([meta("count", [{"class": "cat", "count": 1}])], [result])
    with pytest.raises(ValueError, match="2 metadata rows but 1 results"):
        batch_response([SINGLE, SINGLE], [result])
