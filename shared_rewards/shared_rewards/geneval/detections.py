"""What a detector hands the GenEval scorer: per image, a class name -> detections mapping.

Every detector backend (transformers Mask2Former, mmdet Mask2Former) produces this, and the scoring rules
(scoring.py) read only this, so the rules are testable on hand-built detections without any model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Detection:
    box: np.ndarray  # [4] float: x1, y1, x2, y2 in pixels, y grows downward
    score: float  # detector confidence in [0, 1]
    mask: np.ndarray | None = None  # [H, W] bool instance mask, None when the backend gives none
    color: str | None = None  # filled by the colour classifier for classes whose clause asks for a colour
    extras: dict = field(default_factory=dict)


# class name (GenEval/COCO vocabulary) -> detections of that class in one image
ImageDetections = dict[str, list[Detection]]
