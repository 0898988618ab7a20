"""GenEval training-prompt generator: schema, determinism, exclusion, task weights, grammar, CLI, limits."""
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from shared_rewards.geneval.metadata import read_metadata_jsonl, validate_metadata
from shared_rewards.geneval.prompts import (
    allocate,
    generate_training_metadata,
    main,
    parse_weights,
    plural,
    with_article,
)

TAGS = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def only(tag, n, seed=0, exclude=()):
    return generate_training_metadata(n, seed, {tag: 1.0}, exclude)


def test_rows_are_schema_valid_distinct_and_uniform_by_default():
    rows = generate_training_metadata(300, seed=0, weights=None, exclude_prompts=())
    for i, md in enumerate(rows):
        validate_metadata(md, i)
        # the benchmark file's key order
        keys = ["tag", "include", "exclude", "prompt"] if md["tag"] == "counting" else ["tag", "include", "prompt"]
        assert list(md) == keys
    assert Counter(md["tag"] for md in rows) == {tag: 50 for tag in TAGS}  # 300 / 6
    assert len({md["prompt"] for md in rows}) == 300


def test_deterministic_per_seed_and_seeds_differ():
    a = generate_training_metadata(120, 3, None, ())
    assert json.dumps(a) == json.dumps(generate_training_metadata(120, 3, None, ()))
    b = generate_training_metadata(120, 4, None, ())
    assert {md["prompt"] for md in a} != {md["prompt"] for md in b}  # other prompts, not just another order


def test_draws_spread_over_the_whole_space():
    # 200 uniform draws of ordered class pairs hit about 80 * (1 - exp(-200/80)) = 73 distinct first classes;
    # walking the space in order would give 3 (79 pairs per first class)
    firsts = {md["include"][0]["class"] for md in only("two_object", 200)}
    assert len(firsts) > 50


def test_rows_are_shuffled_across_tags():
    rows = generate_training_metadata(60, 0, None, ())
    first_ten = {md["tag"] for md in rows[:10]}
    assert len(first_ten) > 1  # not grouped by tag


def test_never_emits_an_excluded_prompt():
    first = generate_training_metadata(300, 1, {"two_object": 1, "counting": 1, "position": 1}, ())
    second = generate_training_metadata(300, 2, {"two_object": 1, "counting": 1, "position": 1},
                                        [md["prompt"] for md in first])
    assert not {md["prompt"] for md in first} & {md["prompt"] for md in second}


def test_exclusion_can_use_up_a_task_exactly_and_then_errors():
    # counting has 80 classes x 3 numbers = 240 distinct prompts; 200 used leaves exactly 40
    used = [md["prompt"] for md in only("counting", 200, seed=1)]
    rest = only("counting", 40, seed=2, exclude=used)
    assert len({md["prompt"] for md in rest} | set(used)) == 240
    with pytest.raises(ValueError, match="counting: 41 rows requested but only 40 distinct prompts remain"):
        only("counting", 41, seed=2, exclude=used)


def test_exclusion_ignores_case_and_spacing():
    everything = {md["prompt"] for md in only("single_object", 80)}
    assert "a photo of a cat" in everything
    rows = only("single_object", 79, exclude=["  A Photo of a  CAT "])
    assert "a photo of a cat" not in {md["prompt"] for md in rows}


def test_impossible_n_is_an_error_not_an_endless_loop():
    # uniform over six tags: 600 rows ask 100 single_object prompts, but there are only 80 classes
    with pytest.raises(ValueError, match="single_object: 100 rows requested but the task has only 80 distinct"):
        generate_training_metadata(600, 0, None, ())


def test_allowed_repeats_cycle_a_short_task_evenly_and_keep_exclusions():
    excluded = [md["prompt"] for md in only("single_object", 10, seed=5)]
    rows = generate_training_metadata(600, 0, None, excluded, allow_repeats=True)
    single = Counter(md["prompt"] for md in rows if md["tag"] == "single_object")
    # 100 rows over the 70 classes left: every prompt once, 30 of them twice
    assert sum(single.values()) == 100 and len(single) == 70
    assert sorted(Counter(single.values()).items()) == [(1, 40), (2, 30)]
    assert not set(single) & set(excluded)
    big = Counter(md["prompt"] for md in rows if md["tag"] == "color_attr")
    assert max(big.values()) == 1  # tasks with room stay distinct
    assert rows == generate_training_metadata(600, 0, None, excluded, allow_repeats=True)


def test_counts_follow_the_weights_by_largest_remainder():
    weights = {"position": 0.7, "counting": 0.5, "color_attr": 0.3, "colors": 0.1, "two_object": 0.1}
    # 500 * w / 1.7: position 205.88, counting 147.06, color_attr 88.24, colors 29.41, two_object 29.41;
    # floors sum to 498; the two largest remainders get +1: position (.88), then of the tied .41s the earlier
    # tag in TAGS order, two_object
    expected = {"single_object": 0, "two_object": 30, "counting": 147, "colors": 29, "position": 206, "color_attr": 88}
    assert allocate(500, weights) == expected
    rows = generate_training_metadata(500, 0, weights, ())
    assert Counter(md["tag"] for md in rows) == {tag: n for tag, n in expected.items() if n}


def test_one_tasks_prompts_do_not_depend_on_other_weights():
    a = generate_training_metadata(20, 5, {"colors": 1.0, "position": 1.0}, ())
    b = generate_training_metadata(20, 5, {"colors": 1.0, "counting": 1.0}, ())
    assert sorted(md["prompt"] for md in a if md["tag"] == "colors") == \
        sorted(md["prompt"] for md in b if md["tag"] == "colors")


def test_articles_and_plurals():
    assert with_article("apple") == "an apple" and with_article("orange") == "an orange"
    assert with_article("umbrella") == "an umbrella" and with_article("cat") == "a cat"
    assert plural("bus") == "buses" and plural("wine glass") == "wine glasses" and plural("cat") == "cats"
    counting = {md["prompt"] for md in only("counting", 240)}  # every counting prompt
    assert {"a photo of three buses", "a photo of two wine glasses", "a photo of four clocks"} <= counting
    assert "a photo of two person" not in counting and "a photo of two persons" in counting
    colors = {md["prompt"] for md in only("colors", 790)}
    assert {"a photo of an orange car", "a photo of a red apple", "a photo of a white oven"} <= colors


def test_counting_rows_carry_the_exclude_clause():
    for md in only("counting", 240):
        count = md["include"][0]["count"]
        assert 2 <= count <= 4
        assert md["exclude"] == [{"class": md["include"][0]["class"], "count": count + 1}]


def test_colour_tasks_never_use_person_and_pick_distinct_classes_and_colours():
    colors = only("colors", 790)  # 79 non-person classes x 10 colours: all of them
    assert all(md["include"][0]["class"] != "person" for md in colors)
    assert len({md["prompt"] for md in colors}) == 790
    for md in only("color_attr", 2000):
        a, b = md["include"]
        assert "person" not in (a["class"], b["class"])
        assert a["class"] != b["class"] and a["color"] != b["color"]
        first, second = f"{with_article(a['color'])} {a['class']}", f"{with_article(b['color'])} {b['class']}"
        assert md["prompt"] == f"a photo of {first} and {second}"


def test_two_object_and_position_shapes():
    for md in only("two_object", 500):
        a, b = md["include"]
        assert a["class"] != b["class"]
        assert md["prompt"] == f"a photo of {with_article(a['class'])} and {with_article(b['class'])}"
    for md in only("position", 500):
        reference, subject = md["include"]
        assert reference == {"class": reference["class"], "count": 1}
        relation = subject["position"][0]
        assert subject["position"] == [relation, 0] and subject["class"] != reference["class"]
        subject_text, reference_text = with_article(subject["class"]), with_article(reference["class"])
        assert md["prompt"] == f"a photo of {subject_text} {relation} {reference_text}"


def test_benchmark_rows_are_in_the_generators_space():
    # rows copied by hand from geneval's evaluation_metadata.jsonl: the generator can emit them verbatim
    benchmark = [
        '{"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}], "prompt": "a photo of two clocks"}',
        '{"tag": "position", "include": [{"class": "teddy bear", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}], "prompt": "a photo of a dog right of a teddy bear"}',
        '{"tag": "colors", "include": [{"class": "fire hydrant", "count": 1, "color": "blue"}], "prompt": "a photo of a blue fire hydrant"}',
        '{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}',
    ]
    every_prompt = [("counting", 240), ("position", 25280), ("colors", 790), ("single_object", 80)]
    space = {json.dumps(md) for tag, n in every_prompt for md in only(tag, n)}
    assert set(benchmark) <= space


def test_weight_parsing_and_checks():
    assert parse_weights("position=0.7, counting=0.5") == {"position": 0.7, "counting": 0.5}
    with pytest.raises(ValueError, match="unknown tag 'postion'"):
        parse_weights("postion=1")
    with pytest.raises(ValueError, match="'counting=x'"):
        parse_weights("counting=x")
    with pytest.raises(ValueError, match="counting=-1.0"):
        generate_training_metadata(10, 0, {"counting": -1.0}, ())
    with pytest.raises(ValueError, match="at least one must be > 0"):
        generate_training_metadata(10, 0, {"counting": 0.0}, ())


def test_cli_writes_valid_jsonl_without_the_excluded_prompts(tmp_path):
    exclude = tmp_path / "test_metadata.jsonl"
    taken = only("colors", 700, seed=9)
    exclude.write_text("".join(json.dumps(md) + "\n" for md in taken))
    out = tmp_path / "sub" / "train.jsonl"
    assert main(["--out", str(out), "--n", "90", "--seed", "0", "--exclude", str(exclude),
                 "--task-weights", "colors=1"]) == 0
    rows = read_metadata_jsonl(out)
    assert len(rows) == 90 and {md["tag"] for md in rows} == {"colors"}
    assert not {md["prompt"] for md in rows} & {md["prompt"] for md in taken}  # 790 - 700 = the 90 left


def test_cli_requires_an_explicit_exclude_choice_and_reports_impossible_n(tmp_path, capsys):
    out = tmp_path / "train.jsonl"
    with pytest.raises(SystemExit) as info:
        main(["--out", str(out), "--n", "5"])
    assert info.value.code == 2 and "--exclude" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["--out", str(out), "--n", "600", "--no-exclude"])
    assert info.value.code == 2 and "single_object: 100 rows requested" in capsys.readouterr().err
    assert not out.exists()


def test_cli_runs_as_a_module(tmp_path):
    prompts_txt = tmp_path / "excluded.txt"
    prompts_txt.write_text("a photo of a cat\n")
    out = tmp_path / "train.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "shared_rewards.geneval.prompts", "--out", str(out), "--n", "80", "--seed", "1",
         "--exclude", str(prompts_txt), "--task-weights", "single_object=1"],
        capture_output=True, text=True, timeout=120, cwd=PACKAGE_ROOT)
    assert proc.returncode == 2 and "only 79 distinct prompts remain" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "shared_rewards.geneval.prompts", "--out", str(out), "--n", "79", "--seed", "1",
         "--exclude", str(prompts_txt), "--task-weights", "single_object=1"],
        capture_output=True, text=True, timeout=120, cwd=PACKAGE_ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(read_metadata_jsonl(out)) == 79


def test_exclude_files_are_read_as_validated_metadata_or_plain_lines(tmp_path):
    from shared_rewards.geneval.prompts import read_prompts

    good = tmp_path / "test.jsonl"
    good.write_text(json.dumps({"tag": "single_object", "include": [{"class": "cat", "count": 1}],
                                "prompt": "a photo of a cat"}) + "\n\n")
    assert read_prompts(good) == ["a photo of a cat"]
    text = tmp_path / "test.txt"
    text.write_text("a photo of a dog\n\n  a photo of a cow  \n")
    assert read_prompts(text) == ["a photo of a dog", "a photo of a cow"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "tag": "countin", "include": []}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: .*countin"):
        read_prompts(bad)
