"""GenEval end to end: images + metadata -> the reward server's response dict.

    evaluator = load_evaluator(device="cuda:0")                  # Mask2Former Swin-S + CLIP ViT-L/14
    response = evaluator(images, metadatas, only_strict=True)    # images: RGB uint8 [H, W, 3] arrays
    response["scores"]                                           # partial credit, the training reward

Per image: detect (detector.py), post-process with the image's tag (scoring.postprocess: threshold, sort,
cap, NMS), colour-classify the detections of every class whose clause asks for a colour (color.py), score
(scoring.evaluate_image); then scoring.batch_response assembles the upstream response keys. Upstream
classifies only the objects each rule looks at (the first `count` for the benchmark rule, all for the strict
rule); every kept detection of such a class is classified here, once, and each rule reads what it needs.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
import torch

from .color import DEFAULT_BGCOLOR, DEFAULT_CLIP, ColorClassifier, check_color_options, load_color_classifier
from .detections import ImageDetections
from .detector import Detector, check_images, load_detector
from .metadata import validate_metadata
from .scoring import GenEvalOptions, ImageResult, batch_response, classes_needing_color, evaluate_image, postprocess

OPTION_NAMES = tuple(f.name for f in dataclasses.fields(GenEvalOptions))


class GenEvalEvaluator:
    def __init__(self, detector: Detector, color_classifier: ColorClassifier,
                 options: GenEvalOptions = GenEvalOptions(), batch_size: int = 8):
        self.detector = detector
        self.color_classifier = color_classifier
        self.options = options
        # images are detected, coloured and scored `batch_size` at a time, so that only that many images'
        # full-resolution instance masks are held at once
        self.batch_size = batch_size

    def _prepare(self, images: Sequence[np.ndarray], metadatas: Sequence[dict]) -> list[dict]:
        if len(images) != len(metadatas):
            raise ValueError(f"geneval: {len(images)} images but {len(metadatas)} metadata rows")
        checked = [validate_metadata(md, i) for i, md in enumerate(metadatas)]
        check_images(images)
        return checked

    def _detect_chunk(self, images: Sequence[np.ndarray], metadatas: Sequence[dict]) -> list[ImageDetections]:
        out = []
        for image, raw, md in zip(images, self.detector(images), metadatas):
            detections = postprocess(raw, md["tag"], self.options)
            for name in classes_needing_color(md):
                found = detections.get(name, [])
                for detection, color in zip(found, self.color_classifier.classify(image, found, name)):
                    detection.color = color
            out.append(detections)
        return out

    def detect(self, images: Sequence[np.ndarray], metadatas: Sequence[dict]) -> list[ImageDetections]:
        """Post-processed detections per image, `.color` filled where the metadata asks for a colour."""
        metadatas = self._prepare(images, metadatas)
        out: list[ImageDetections] = []
        for start in range(0, len(images), self.batch_size):
            end = start + self.batch_size
            out += self._detect_chunk(images[start:end], metadatas[start:end])
        return out

    def evaluate(self, images: Sequence[np.ndarray], metadatas: Sequence[dict],
                 only_strict: bool = False) -> list[ImageResult]:
        metadatas = self._prepare(images, metadatas)
        results: list[ImageResult] = []
        for start in range(0, len(images), self.batch_size):
            end = start + self.batch_size
            chunk = self._detect_chunk(images[start:end], metadatas[start:end])
            results += [evaluate_image(d, md, only_strict, self.options) for d, md in zip(chunk, metadatas[start:end])]
        return results

    def __call__(self, images: Sequence[np.ndarray], metadatas: Sequence[dict], only_strict: bool = False) -> dict:
        """The upstream response: scores, rewards, strict_rewards, group_rewards, group_strict_rewards."""
        if not isinstance(only_strict, bool):
            raise ValueError(f"geneval: only_strict must be a bool, got {only_strict!r}")
        results = self.evaluate(images, metadatas, only_strict)
        return batch_response([dict(md) for md in metadatas], results)


def load_evaluator(device: str | torch.device = "cpu", backend: str = "transformers", detector: str | None = None,
                   clip: str = DEFAULT_CLIP, config: str | None = None, checkpoint: str | None = None,
                   detector_input: str = "rgb", bgcolor: str = DEFAULT_BGCOLOR, crop: bool = True,
                   batch_size: int = 8, color_batch_size: int = 16, detector_size: int | None = None,
                   **options: Any) -> GenEvalEvaluator:
    """Builds the detector and colour classifier and checks every option once.

    backend / detector / config / checkpoint / detector_input / detector_size: see detector.load_detector.
    clip / bgcolor / crop / color_batch_size: see color.load_color_classifier.
    **options: GenEvalOptions fields (thresholds, max_objects, max_overlap, position_threshold, quirk flags).
    """
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        allowed = ("device", "backend", "detector", "clip", "config", "checkpoint", "detector_input", "bgcolor",
                   "crop", "batch_size", "color_batch_size", "detector_size", *OPTION_NAMES)
        raise ValueError(f"geneval: unknown option {unknown[0]!r}; allowed: {', '.join(allowed)}")
    # every option is checked before either model loads, so a bad one costs no download
    scoring_options = GenEvalOptions(**options)
    check_color_options(bgcolor, crop, color_batch_size)
    found = load_detector(backend=backend, device=device, detector=detector, config=config, checkpoint=checkpoint,
                          detector_input=detector_input, batch_size=batch_size, detector_size=detector_size)
    colors = load_color_classifier(clip=clip, device=device, bgcolor=bgcolor, crop=crop, batch_size=color_batch_size)
    return GenEvalEvaluator(found, colors, scoring_options, batch_size=batch_size)
