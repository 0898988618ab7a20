import csv
import json

import pytest

from toy_experiments import ddpm, run


def _rows(out):
    return {(r["denoiser"], r["panel"], r["estimator"], r["log2_n"]): float(r["rmse"])
            for r in csv.DictReader(open(out / "results.csv"))}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One quick run (default ω) with a fresh checkpoint cache, shared by the tests below."""
    root = tmp_path_factory.mktemp("quick")
    out, cache = root / "out", root / "cache"
    return out, cache, run.main(["--quick", "--out", str(out), "--cache-dir", str(cache)])


def test_quick_mode_runs_end_to_end_and_writes_every_file(quick_run):
    out, cache, record = quick_run
    expected = [f"{panel}.png" for panel in run.PANELS] + ["branch_mechanism.png", "figure2.png", "results.csv",
                                                          "results.md", "run.json"]
    for name in expected:
        assert (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(out / "results.csv")))
    # Every panel has rows for both denoisers, and every RMSE is a finite positive number.
    for panel in run.PANELS:
        assert {r["denoiser"] for r in rows if r["panel"] == panel} == {"exact", "learned"}, panel
    assert all(0 < float(r["rmse"]) < float("inf") for r in rows)
    saved = json.loads((out / "run.json").read_text())
    assert saved["quick"] is True and saved["config"]["omega"] == "jump"
    # The branching mechanism: f(s) for every split state, a prediction and a measurement for every tree.
    mech = saved["branch_mechanism"]
    assert mech["states"] == ddpm.sampling_grid(ddpm.TEST_T)[1:] and mech["f"][-1] == pytest.approx(1.0)
    assert set(mech["configs"]) == set(saved["summaries"]["exact"]["branch_measured_ratio"])
    assert "### branching mechanism" in (out / "results.md").read_text()
    # Checkpoints are cached as safetensors keyed by the training settings and reused.
    assert len(list(cache.glob("eps_mlp_*.safetensors"))) == 2
    _, _, info = run.setup_models(run.Config.quick(), ddpm.linear_schedule(), cache)
    assert info["base"]["cached"] and info["ft"]["cached"]
    assert record["training"]["base"]["cached"] is False


def test_omega_flag_rescales_only_the_zeroth_order_estimators(quick_run, tmp_path):
    out, cache, _ = quick_run
    record = run.main(["--quick", "--out", str(tmp_path), "--cache-dir", str(cache), "--omega", "single-step"])
    assert record["summaries"]["exact"]["omega"] == pytest.approx(ddpm.credited_guidance_scale(
        ddpm.linear_schedule(), ddpm.TEST_T, "single-step"))
    jump, single = _rows(out), _rows(tmp_path)
    assert jump.keys() == single.keys()
    # Same seeds, same samples: first-order rows are identical, every zeroth-order row moves.
    first_order = [k for k in jump if k[1] == "lookahead_first" or k[2].startswith("FO")]
    zeroth_order = [k for k in jump if k[1] in ("lookahead_zeroth", "branch_zeroth_branchgrpo")
                    or k[2].startswith("ZO")]
    assert first_order and zeroth_order
    assert all(jump[k] == single[k] for k in first_order)
    assert all(jump[k] != single[k] for k in zeroth_order)
    with pytest.raises(SystemExit):
        run.main(["--quick", "--omega", "half"])
