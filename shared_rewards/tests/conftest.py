"""Fixtures shared by the GenEval server and client tests: the real evaluator on the tiny detector."""
import pytest

from shared_rewards.geneval.evaluator import load_evaluator


@pytest.fixture(scope="module")
def tiny_paths(tiny_models):
    """A tiny Mask2Former that sees 4 dogs (0.612) and 4 cats (0.371) in every image, and a tiny CLIP."""
    return {"detector": str(tiny_models.path("mask2former_coco_dog_cat")),
            "clip": str(tiny_models.path("clip_vit_l14"))}


@pytest.fixture(scope="module")
def evaluator(tiny_paths):
    return load_evaluator(device="cpu", **tiny_paths)
