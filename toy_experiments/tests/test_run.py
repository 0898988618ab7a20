import csv
import json

from toy_experiments import ddpm, run


def test_quick_mode_runs_end_to_end_and_writes_every_file(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    record = run.main(["--quick", "--out", str(out), "--cache-dir", str(cache)])
    expected = [f"{panel}.png" for panel in run.PANELS] + ["figure2.png", "results.csv", "results.md", "run.json"]
    for name in expected:
        assert (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(out / "results.csv")))
    # Every panel has rows for both denoisers, and every RMSE is a finite positive number.
    for panel in run.PANELS:
        assert {r["denoiser"] for r in rows if r["panel"] == panel} == {"exact", "learned"}, panel
    assert all(0 < float(r["rmse"]) < float("inf") for r in rows)
    assert json.loads((out / "run.json").read_text())["quick"] is True
    # Checkpoints are cached as safetensors keyed by the training settings and reused.
    assert len(list(cache.glob("eps_mlp_*.safetensors"))) == 2
    _, _, info = run.setup_models(run.Config.quick(), ddpm.linear_schedule(), cache)
    assert info["base"]["cached"] and info["ft"]["cached"]
    assert record["training"]["base"]["cached"] is False
