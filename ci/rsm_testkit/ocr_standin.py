"""A stand-in text recogniser for the `ocr` reward in tests and `--tiny` runs, where PaddleOCR (an optional,
large dependency) is absent. NOT an OCR model: it "reads" one lower-case letter per vertical strip of the image
from the strip's mean brightness, so the text it returns is a deterministic function of the pixels and the
reward (edit distance to the prompt's quoted text) varies with the image, as a tiny run needs.
"""
from __future__ import annotations

import numpy as np

STRIPS = 4  # as long as the shortest tiny OCR target ("OPEN"), so matches earn partial credit
RECOGNIZER = "rsm_testkit.ocr_standin:recognize"


def recognize(images: list[np.ndarray]) -> list[list[str]]:
    """[H, W, 3] uint8 RGB arrays -> one text line each, STRIPS letters long."""
    lines = []
    for image in images:
        strips = np.array_split(np.asarray(image, dtype=np.float64).mean(axis=(0, 2)), STRIPS)  # [W] -> strips
        letters = [chr(ord("a") + min(int(strip.mean() / 256 * 26), 25)) for strip in strips]
        lines.append(["".join(letters)])
    return lines


def reward_options() -> dict:
    """`tiny_reward_options("ocr")`: the shared_rewards `ocr` reward reading with this stand-in."""
    return {"ocr": {"recognizer": RECOGNIZER}}
