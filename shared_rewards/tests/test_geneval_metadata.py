"""GenEval metadata validation: benchmark-shaped rows pass, every kind of bad row fails with a one-line error."""
import copy
import json

import pytest

from shared_rewards.geneval.metadata import read_metadata_jsonl, validate_metadata

# one row of each tag, shaped like geneval's evaluation_metadata.jsonl (written here, not read from it)
GOOD = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "two_object", "include": [{"class": "toilet", "count": 1}, {"class": "bicycle", "count": 1}],
     "prompt": "a photo of a toilet and a bicycle"},
    {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}],
     "prompt": "a photo of two clocks"},
    {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "pink"}], "prompt": "a photo of a pink car"},
    {"tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                    {"class": "dog", "count": 1, "position": ["right of", 0]}],
     "prompt": "a photo of a dog right of a teddy bear"},
    {"tag": "color_attr", "include": [{"class": "wine glass", "count": 1, "color": "purple"},
                                      {"class": "apple", "count": 1, "color": "black"}],
     "prompt": "a photo of a purple wine glass and a black apple"},
]


@pytest.mark.parametrize("md", GOOD, ids=[md["tag"] for md in GOOD])
def test_benchmark_shaped_rows_pass_unchanged(md):
    assert validate_metadata(copy.deepcopy(md), 0) == md


def test_position_may_be_a_tuple_as_the_upstream_generator_builds_it():
    md = copy.deepcopy(GOOD[4])
    md["include"][1]["position"] = ("right of", 0)
    validate_metadata(md, 0)


def _broken(index, edit):
    md = copy.deepcopy(GOOD[index])
    edit(md)
    return md


BAD = [
    ("unknown tag", _broken(2, lambda md: md.update(tag="countin")), r"metadata\[7\]\.tag='countin': unknown tag"),
    ("missing tag", _broken(0, lambda md: md.pop("tag")), r"missing key 'tag'"),
    ("unknown top key", _broken(0, lambda md: md.update(excludes=[])), r"unknown key 'excludes'"),
    ("prompt not a string", _broken(0, lambda md: md.update(prompt=None)), r"\.prompt=None"),
    ("empty include", _broken(0, lambda md: md.update(include=[])), r"\.include=\[\]"),
    ("class not COCO", _broken(0, lambda md: md["include"][0].update({"class": "sofa"})),
     r"include\[0\]\.class='sofa': not one of the 80 COCO"),
    ("colour not known", _broken(3, lambda md: md["include"][0].update(color="grey")),
     r"include\[0\]\.color='grey'"),
    ("colour key misspelled", _broken(3, lambda md: md["include"][0].update(colour="red")),
     r"include\[0\]: unknown key 'colour'"),
    ("count zero", _broken(0, lambda md: md["include"][0].update(count=0)), r"include\[0\]\.count=0"),
    ("count float", _broken(0, lambda md: md["include"][0].update(count=1.0)), r"include\[0\]\.count=1\.0"),
    ("count bool", _broken(0, lambda md: md["include"][0].update(count=True)), r"include\[0\]\.count=True"),
    ("missing count", _broken(0, lambda md: md["include"][0].pop("count")), r"include\[0\]: missing key 'count'"),
    ("relation unknown", _broken(4, lambda md: md["include"][1].update(position=["behind", 0])),
     r"include\[1\]\.position=\['behind', 0\]: relation 'behind'"),
    ("position forward", _broken(4, lambda md: md["include"][1].update(position=["above", 1])),
     r"index 1 must point to an earlier include \(0\.\.0\)"),
    ("position on first clause", _broken(4, lambda md: md["include"][0].update(position=["above", 0])),
     r"include\[0\]\.position=\['above', 0\]: index 0 must point to an earlier include"),
    ("position wrong shape", _broken(4, lambda md: md["include"][1].update(position="above")),
     r"must be \[relation, earlier include index\]"),
    ("exclude class", _broken(2, lambda md: md["exclude"][0].update({"class": "clocks"})),
     r"exclude\[0\]\.class='clocks'"),
    ("exclude with colour", _broken(2, lambda md: md["exclude"][0].update(color="red")),
     r"exclude\[0\]: unknown key 'color'"),
    ("exclude not a list", _broken(2, lambda md: md.update(exclude={"class": "clock", "count": 3})),
     r"\.exclude=.*must be a list"),
]


@pytest.mark.parametrize("md,pattern", [(md, p) for _, md, p in BAD], ids=[name for name, _, _ in BAD])
def test_bad_rows_fail_naming_the_row_key_and_value(md, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        validate_metadata(md, 7)
    message = str(info.value)
    assert message.startswith("metadata[7]") and "\n" not in message


def test_not_a_dict():
    with pytest.raises(ValueError, match=r"metadata\[3\]: expected an object, got list"):
        validate_metadata([], 3)


def test_read_jsonl_validates_every_line_and_skips_blank_ones(tmp_path):
    path = tmp_path / "md.jsonl"
    path.write_text("\n".join(json.dumps(md) for md in GOOD) + "\n\n")
    assert read_metadata_jsonl(path) == GOOD


def test_read_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "md.jsonl"
    bad = dict(GOOD[0], tag="single")
    path.write_text(json.dumps(GOOD[0]) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=rf"^{path}:2: metadata\[2\]\.tag='single'"):
        read_metadata_jsonl(path)
    path.write_text(json.dumps(GOOD[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=rf"^{path}:2: not valid JSON"):
        read_metadata_jsonl(path)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_metadata_jsonl(tmp_path / "nope.jsonl")
