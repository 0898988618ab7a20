"""OCR reward for visual text rendering (Flow-GRPO's `ocr`): how closely the text read in the image matches
the text the prompt asks for, 1 - capped edit distance / target length, in [0, 1].

The rule is a pure function of the recognised lines and the prompt (`ocr_reward_from_text`); the reading
itself is PaddleOCR 2.9.x as upstream, or any `recognizer` callable you pass in.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np
import torch

from .base import Reward, RewardInputError, RewardOutput
from .preprocess import to_uint8

logger = logging.getLogger(__name__)

# images: list of [H, W, 3] uint8 RGB arrays -> per image, the recognised text lines
Recognizer = Callable[[list[np.ndarray]], list[list[str]]]
ENGINES = ("paddleocr",)
INSTALL_HINT = 'pip install "shared_rewards[ocr]"'


def target_text(prompt: str) -> str | None:
    """The text after the first double quote up to the next one (upstream: `prompt.split('"')[1]`, so an
    unclosed quote runs to the end of the prompt). None when the prompt has no double quote."""
    parts = prompt.split('"')
    return parts[1] if len(parts) > 1 else None


def _squash(text: str) -> str:
    return text.replace(" ", "").lower()  # upstream drops spaces only, not tabs or newlines


def ocr_reward_from_text(recognised_lines: Sequence[str], prompt: str) -> float:
    """1 - d / len(target), with target and recognised text lower-cased and stripped of spaces, and
    d = 0 if the target occurs in the recognised text, else their Levenshtein distance capped at len(target)."""
    from Levenshtein import distance

    target = target_text(prompt)
    if target is None or not _squash(target):
        raise ValueError(f"prompt has no non-empty text in double quotes to render: {prompt!r}")
    target, recognised = _squash(target), _squash("".join(recognised_lines))
    d = 0 if target in recognised else min(distance(recognised, target), len(target))
    return 1.0 - d / len(target)


def paddle_recognizer() -> Recognizer:
    """PaddleOCR 2.9.x configured as upstream: English, no angle classifier, CPU, quiet."""
    try:
        import paddleocr
    except ImportError:
        raise ImportError(f"ocr: PaddleOCR is not installed; {INSTALL_HINT} (or pass recognizer=<callable>)") from None
    version = str(getattr(paddleocr, "__version__", "2"))
    if not version.startswith("2."):
        raise ImportError(f"ocr: needs paddleocr 2.9.x (its 3.x API differs), found {version}; {INSTALL_HINT}")
    engine = paddleocr.PaddleOCR(use_angle_cls=False, lang="en", use_gpu=False, show_log=False)

    def recognise(images: list[np.ndarray]) -> list[list[str]]:
        out = []
        for image in images:  # upstream hands PaddleOCR the RGB array as is
            result = engine.ocr(image, cls=False)
            lines = (result[0] if result else None) or []  # [[box, (text, confidence)], ...] or None
            out.append([text for _box, (text, confidence) in lines if confidence > 0])  # upstream drops conf 0
        return out

    return recognise


def _import_recognizer(name: str, spec: str) -> Recognizer:
    import importlib

    module, _, attribute = spec.partition(":")
    try:
        found = getattr(importlib.import_module(module), attribute) if attribute else None
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"{name}: recognizer {spec!r} cannot be imported ({exc})") from None
    if found is None:
        raise ValueError(f"{name}: recognizer must look like 'package.module:function', got {spec!r}")
    return found


class OCRReward(Reward):
    name = "ocr"
    differentiable = False
    needs_prompts = True
    weights_source = "PaddleOCR 2.9 English models (downloaded by paddleocr) or your own recognizer"

    def __init__(self, device="cpu", dtype=torch.float32, *, engine: str = "paddleocr",
                 recognizer: Recognizer | None = None):
        """engine: "paddleocr" (2.9.x, CPU, as Flow-GRPO). recognizer: a callable taking a list of uint8
        [H, W, 3] RGB arrays and returning each image's text lines, or its import path 'package.module:function'
        (what a config file can hold); when given, `engine` is not imported."""
        super().__init__(device, dtype)
        if engine not in ENGINES:
            raise ValueError(f"{self.name}: engine must be one of {ENGINES}, got {engine!r}")
        if isinstance(recognizer, str):  # "package.module:function", so a config file can name one
            recognizer = _import_recognizer(self.name, recognizer)
        if recognizer is not None and not callable(recognizer):
            raise ValueError(f"{self.name}: recognizer must be a callable or 'module:function', "
                             f"got {type(recognizer).__name__}")
        self.engine = engine
        self.recognizer = recognizer if recognizer is not None else paddle_recognizer()

    def _read(self, arrays: list[np.ndarray]) -> tuple[list[list[str] | None], list[Exception | None]]:
        """Lines per image; a failing batch is retried image by image so one bad image costs only itself."""
        try:
            lines = list(self.recognizer(arrays))
            errors: list[Exception | None] = [None] * len(arrays)
        except Exception:
            lines, errors = [], []
            for array in arrays:
                try:
                    lines.append(list(self.recognizer([array]))[0])
                    errors.append(None)
                except Exception as exc:  # upstream: any OCR failure scores 0
                    lines.append(None)
                    errors.append(exc)
        if len(lines) != len(arrays):
            raise RuntimeError(f"{self.name}: recognizer returned {len(lines)} results for {len(arrays)} images")
        return lines, errors

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None, metadata) -> RewardOutput:
        for i, prompt in enumerate(prompts):
            target = target_text(prompt)
            if target is None or not _squash(target):
                raise RewardInputError(f"{self.name}: prompt {i} has no non-empty text in double quotes to render: "
                                       f"{prompt!r}")
        lines, errors = self._read(list(to_uint8(images)))
        rewards, texts = [], []
        for i, (found, error) in enumerate(zip(lines, errors)):
            if error is not None:
                logger.warning("%s: OCR failed on image %d (%s: %s); reward 0",
                               self.name, i, type(error).__name__, error)
            rewards.append(0.0 if error is not None else ocr_reward_from_text(found, prompts[i]))
            texts.append("" if error is not None else "".join(found))
        failed = torch.tensor([e is not None for e in errors], dtype=torch.float32)
        return RewardOutput(torch.tensor(rewards, dtype=torch.float32, device=images.device),
                            {"ocr_failed": failed, "ocr_text": texts})
