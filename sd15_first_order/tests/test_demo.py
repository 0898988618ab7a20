"""`make demo`'s part for this component (demo.json): both paper commands with --tiny, one epoch each (--quick),
their curves and the index entry."""
import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_demo_runs_both_paper_commands_and_plots_them(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spec = importlib.util.spec_from_file_location("demo_driver", REPO / "scripts" / "demo.py")
    driver = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(driver)
    assert driver.main(["--out", str(tmp_path), "--parts", "sd15_first_order", "--quick"]) == 0
    for run in ("pruned", "ours"):
        rows = [json.loads(line) for line in
                (tmp_path / "sd15_first_order" / "runs" / run / "metrics.jsonl").read_text().splitlines()]
        epochs = [r for r in rows if r["kind"] == "epoch"]
        assert [r["epoch"] for r in epochs] == [1] and epochs[0]["eval_reward_mean"] is not None
    assert (tmp_path / "sd15_first_order" / "reward_curves.png").is_file()
    assert "sd15_first_order/reward_curves.png" in (tmp_path / "index.md").read_text()
