"""scripts/plot_runs.py on synthetic run folders: the plotted data (through `load_curve`, not pixels), the
files it writes, and its one-line errors."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "plot_runs.py"
spec = importlib.util.spec_from_file_location("plot_runs", SCRIPT)
plot_runs = importlib.util.module_from_spec(spec)
sys.modules["plot_runs"] = plot_runs  # its dataclass looks its module up while the module runs
spec.loader.exec_module(plot_runs)


def _run(folder: Path, epochs: int, config_id: str = "", tail: str = "") -> Path:
    folder.mkdir(parents=True)
    lines = []
    for e in range(1, epochs + 1):
        lines.append({"kind": "step", "step": 2 * e, "loss": 0.1})
        lines.append({"kind": "epoch", "step": 2 * e, "epoch": e, "samples": 120 * e, "elapsed_s": 1800.0 * e,
                      "reward_mean": 0.1 * e, "reward_std": 0.01 * e, "eval_reward_mean": None})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + tail)
    if config_id:
        (folder / "run.json").write_text(json.dumps({"config_id": config_id}))
    return folder


def test_two_runs_of_different_lengths_give_their_epoch_points_and_bands(tmp_path):
    a = plot_runs.load_curve(_run(tmp_path / "a", 3, "sd3.base.branch.x.ppo.tempflow"))
    b = plot_runs.load_curve(_run(tmp_path / "b", 5), label="ours")
    assert a.label == "sd3.base.branch.x.ppo.tempflow" and b.label == "ours"
    assert a.x == [120, 240, 360] and b.x == [120, 240, 360, 480, 600]
    assert a.y == pytest.approx([0.1, 0.2, 0.3]) and a.std == pytest.approx([0.01, 0.02, 0.03])


def test_other_axes_and_smoothing(tmp_path):
    run = _run(tmp_path / "a", 4)
    hours = plot_runs.load_curve(run, x="hours")
    assert hours.x == [0.5, 1.0, 1.5, 2.0]
    epochs = plot_runs.load_curve(run, x="epoch", smooth=2)
    assert epochs.x == [1, 2, 3, 4] and epochs.y == pytest.approx([0.1, 0.15, 0.25, 0.35])
    assert plot_runs.load_curve(run, metric="samples").std is None  # no samples_std: no band


def test_a_run_still_writing_is_read_up_to_its_last_complete_line(tmp_path):
    run = _run(tmp_path / "a", 2, tail='{"kind": "epoch", "epoch": 3, "sam')
    assert plot_runs.load_curve(run).x == [120, 240]


def test_null_values_are_gaps_not_errors(tmp_path):
    curve = plot_runs.load_curve(_run(tmp_path / "a", 2), metric="eval_reward_mean")
    assert all(math.isnan(v) for v in curve.y)


def test_bad_runs_are_one_line_naming_the_file_and_record(tmp_path):
    with pytest.raises(plot_runs.RunError, match=f"{tmp_path / 'none' / 'metrics.jsonl'}: not found"):
        plot_runs.load_curve(tmp_path / "none")
    broken = _run(tmp_path / "broken", 2)
    lines = (broken / "metrics.jsonl").read_text().splitlines(keepends=True)
    (broken / "metrics.jsonl").write_text(lines[0] + "{oops\n" + "".join(lines[1:]))
    with pytest.raises(plot_runs.RunError, match=r"broken/metrics.jsonl: record 2 is not JSON"):
        plot_runs.load_curve(broken)
    with pytest.raises(plot_runs.RunError) as error:
        plot_runs.load_curve(_run(tmp_path / "ok", 1), metric="accuracy")
    assert "no epoch record has 'accuracy'; available: " in str(error.value) and "reward_mean" in str(error.value)
    assert "\n" not in str(error.value)


def test_the_command_writes_png_and_svg_and_reports_errors_in_one_line(tmp_path, capsys):
    a, b = _run(tmp_path / "a", 3), _run(tmp_path / "b", 4)
    out = tmp_path / "plots" / "curves.png"
    assert plot_runs.main([str(a), str(b), "--label", "baseline", "--label", "ours", "--out", str(out), "--svg"]) == 0
    assert out.stat().st_size > 1000 and out.with_suffix(".svg").is_file()
    assert plot_runs.main([str(a), str(tmp_path / "missing"), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "missing/metrics.jsonl" in err
    with pytest.raises(SystemExit):
        plot_runs.main([str(a), "--label", "x", "--label", "y"])  # two labels for one run
