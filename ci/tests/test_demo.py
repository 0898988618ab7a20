"""`make demo` on the tiny models: images from both pipelines, scored, written as a PNG grid and a JSON."""
from __future__ import annotations

import json
import math

import pytest

from rsm_testkit import demo


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, tiny_models):
    out = tmp_path_factory.mktemp("demo")
    assert demo.main(["--out", str(out), "--size", "32", "--steps", "2",
                      "--prompts", "a photo of a cat", "a red car"]) == 0
    return out / "rewards"


def test_demo_writes_a_grid_png_with_one_row_per_pipeline(demo_run):
    from PIL import Image

    with Image.open(demo_run / "grid.png") as image:
        assert image.format == "PNG"
        width, height = image.size
    assert width == 2 * 192 and height > 2 * 192  # two prompts a row, two pipelines, captions below


def test_demo_scores_every_buildable_reward_and_names_the_skipped_ones(demo_run):
    from shared_rewards.registry import CATALOGUE

    result = json.loads((demo_run / "scores.json").read_text())
    assert set(result["pipelines"]) == {"sd35", "sd15"}
    assert set(result["rewards"]) | set(result["skipped"]) == set(CATALOGUE)
    assert {"jpeg_compressibility", "jpeg_incompressibility"} <= set(result["rewards"])  # need no weights
    assert all(isinstance(reason, str) and reason for reason in result["skipped"].values())
    for pipeline in result["pipelines"].values():
        assert not pipeline["score_errors"]
        assert set(pipeline["scores"]) == set(result["rewards"])
        for scores in pipeline["scores"].values():
            assert len(scores) == 2 and all(math.isfinite(s) for s in scores)
        # jpeg_compressibility is minus jpeg_incompressibility
        assert pipeline["scores"]["jpeg_compressibility"] == [-s for s in pipeline["scores"]["jpeg_incompressibility"]]


def test_reward_without_tiny_checkpoint_is_skipped_with_a_reason(monkeypatch):
    import rsm_testkit.demo as module

    monkeypatch.setattr(module, "tiny_reward_options", lambda name: {})
    rewards, skipped = demo.load_tiny_rewards("cpu", ["hpsv2", "jpeg_compressibility"])
    assert list(rewards) == ["jpeg_compressibility"]
    assert "no tiny checkpoint" in skipped["hpsv2"]


def test_demo_rejects_a_size_the_models_cannot_take():
    with pytest.raises(SystemExit):
        demo.parse_args(["--size", "40"])
