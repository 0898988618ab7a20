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


# ---------------------------------------------------------------- scripts/demo.py, the `make demo` driver
def _driver():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "demo.py"
    spec = importlib.util.spec_from_file_location("demo_driver", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["demo_driver"] = module
    spec.loader.exec_module(module)
    return module


def _fake_component(epochs_text: str, fail: bool = False) -> dict:
    """A demo.json whose runs write a metrics.jsonl with rising rewards (or fail), in a fraction of a second."""
    import sys

    writer = ("import json, os, sys; d = os.path.join(sys.argv[1], sys.argv[2]); os.makedirs(d); "
              "open(os.path.join(d, 'metrics.jsonl'), 'w').writelines(json.dumps({'kind': 'epoch', 'epoch': e, "
              "'samples': 10 * e, 'reward_mean': 0.1 * e, 'reward_std': 0.01}) + '\\n' for e in range(1, int(sys.argv[3]) + 1))")
    command = [sys.executable, "-c", "raise SystemExit(3)"] if fail else \
        [sys.executable, "-c", writer, "{save_dir}", "{name}", "{epochs}"]
    return {"figure": "9", "title": "fake", "sentence": f"two fake runs ({epochs_text})", "epochs": 3,
            "quick_epochs": 2, "runs": [{"name": n, "label": n, "command": command} for n in ("baseline", "ours")]}


def test_demo_driver_trains_each_component_plots_and_indexes_and_a_failed_part_does_not_hide_the_others(
        tmp_path, monkeypatch, capsys):
    driver = _driver()
    monkeypatch.setattr(driver, "components", lambda: {"ci": _fake_component("ok"),
                                                       "shared_rewards": _fake_component("broken", fail=True)})
    assert driver.main(["--out", str(tmp_path), "--parts", "ci,shared_rewards", "--quick"]) == 1
    assert (tmp_path / "ci" / "reward_curves.png").stat().st_size > 1000
    rows = [line for line in (tmp_path / "ci" / "runs" / "ours" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2  # quick_epochs
    index = (tmp_path / "index.md").read_text()
    assert "ci/reward_curves.png" in index and "random weights" in index
    assert "shared_rewards: baseline exited 3" in index
    assert "[shared_rewards] FAILED: baseline exited 3" in capsys.readouterr().err


def test_demo_driver_runs_the_real_sd35_paper_commands_on_the_tiny_kit(tmp_path, tiny_models):
    """The real part `make demo` runs, for one epoch each: both runs train and the curves and index appear."""
    driver = _driver()
    assert "sd35_zeroth_order" in driver.components()
    assert driver.main(["--out", str(tmp_path), "--parts", "sd35_zeroth_order", "--quick"]) == 0
    for run in ("baseline", "ours"):
        records = [json.loads(line) for line in
                   (tmp_path / "sd35_zeroth_order" / "runs" / run / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1]
    assert (tmp_path / "sd35_zeroth_order" / "reward_curves.png").is_file()
    assert "sd35_zeroth_order/reward_curves.png" in (tmp_path / "index.md").read_text()


def test_demo_driver_names_unknown_parts():
    with pytest.raises(SystemExit):
        _driver().parse_args(["--parts", "nosuch"])
