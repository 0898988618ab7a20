"""Tiny prompt sets in the layout `scripts/fetch_data.py` writes (`<set>/<file>`), so a `--tiny` run needs no
download: `get_tiny_model("prompt_sets") / "geneval" / "train_metadata.jsonl"` is where a real run reads
`data/geneval/train_metadata.jsonl`.

A few prompts per split, written here: plain lines for the text sets, GenEval metadata rows (one per task tag,
COCO classes the tiny detector knows) for GenEval, a JSON list for HPDv2 and a {prompt: {category}}
object for DrawBench.
"""
from __future__ import annotations

import json
from pathlib import Path

from .factory import tiny_model

PLAIN_TRAIN = ["a red apple on a wooden table", "a blue car parked by the sea", "a cat sleeping on a mat",
               "two dogs playing in the snow", "a lighthouse at dusk", "a bowl of ramen, studio photo",
               "an astronaut riding a horse", "a watercolor of a mountain village"]
PLAIN_TEST = ["a green tree in a field", "a yellow bus on a city street", "a portrait of an old sailor",
              "a castle on a hill at night"]
OCR_TRAIN = ['a shop sign that says "OPEN"', 'a coffee cup printed with "MORNING"',
             'a poster with the words "HELLO WORLD"', 'a street sign reading "MAIN ST"']
OCR_TEST = ['a book cover titled "TINY"', 'a banner saying "WELCOME"']


def _geneval(tag, prompt, include, exclude=None):
    row = {"tag": tag, "include": include, "prompt": prompt}
    if exclude:
        row["exclude"] = exclude
    return row


GENEVAL_TRAIN = [
    _geneval("single_object", "a photo of a dog", [{"class": "dog", "count": 1}]),
    _geneval("two_object", "a photo of a cat and a chair", [{"class": "cat", "count": 1}, {"class": "chair", "count": 1}]),
    _geneval("counting", "a photo of two cups", [{"class": "cup", "count": 2}], [{"class": "cup", "count": 3}]),
    _geneval("colors", "a photo of a red car", [{"class": "car", "count": 1, "color": "red"}]),
    _geneval("position", "a photo of a bench left of a bird",
             [{"class": "bird", "count": 1}, {"class": "bench", "count": 1, "position": ["left of", 0]}]),
    _geneval("color_attr", "a photo of a blue bus and a yellow umbrella",
             [{"class": "bus", "count": 1, "color": "blue"}, {"class": "umbrella", "count": 1, "color": "yellow"}]),
    _geneval("single_object", "a photo of a horse", [{"class": "horse", "count": 1}]),
    _geneval("counting", "a photo of three apples", [{"class": "apple", "count": 3}], [{"class": "apple", "count": 4}]),
]
GENEVAL_TEST = [
    _geneval("single_object", "a photo of a bicycle", [{"class": "bicycle", "count": 1}]),
    _geneval("two_object", "a photo of a dog and a cat", [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}]),
    _geneval("colors", "a photo of a green clock", [{"class": "clock", "count": 1, "color": "green"}]),
    _geneval("counting", "a photo of two birds", [{"class": "bird", "count": 2}], [{"class": "bird", "count": 3}]),
]


def _lines(path: Path, lines) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


@tiny_model("prompt_sets")
def build_prompt_sets(out_dir: Path) -> None:
    for name in ("pickscore", "hpsv2"):
        _lines(out_dir / name / "train.txt", PLAIN_TRAIN)
        _lines(out_dir / name / "test.txt", PLAIN_TEST)
    _lines(out_dir / "ocr" / "train.txt", OCR_TRAIN)
    _lines(out_dir / "ocr" / "test.txt", OCR_TEST)
    _lines(out_dir / "geneval" / "train_metadata.jsonl", [json.dumps(row) for row in GENEVAL_TRAIN])
    _lines(out_dir / "geneval" / "test_metadata.jsonl", [json.dumps(row) for row in GENEVAL_TEST])
    _lines(out_dir / "geneval" / "train_prompts.txt", [row["prompt"] for row in GENEVAL_TRAIN])
    _lines(out_dir / "dancegrpo" / "prompts.txt", PLAIN_TRAIN)
    for style in ("anime", "concept-art", "paintings", "photo"):
        (out_dir / "hpdv2").mkdir(parents=True, exist_ok=True)
        (out_dir / "hpdv2" / f"benchmark_{style}.json").write_text(json.dumps([f"{p}, {style}" for p in PLAIN_TEST]))
    (out_dir / "drawbench").mkdir(parents=True, exist_ok=True)
    drawbench = {prompt: {"category": "Tiny"} for prompt in PLAIN_TEST}  # upstream: {prompt: {"category": ...}}
    (out_dir / "drawbench" / "drawbench.json").write_text(json.dumps(drawbench, indent=1))
