"""Contract §6: a non-finite loss, gradient norm or weight stops the run at that step with one line naming the
epoch, the step, the quantity and the last good checkpoint, and no checkpoint is written with non-finite weights;
`nan_policy: skip` skips such a step instead and counts it."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import RecordingLogger
from sd15fo import distributed
from sd15fo.trainer import DivergenceError, optimizer_step

COMPONENT = Path(__file__).resolve().parents[1]


def _run(nan_policy="stop", scaler=None):
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.full((3,), 0.5)
    config = {"nan_policy": nan_policy, "train": {"max_grad_norm": 1.0}}
    return SimpleNamespace(params=[param], optimizer=torch.optim.AdamW([param], lr=0.1), config=config, scaler=scaler,
                           procs=distributed.Processes(), device=torch.device("cpu"), grad_stats=[], global_step=6,
                           logger=RecordingLogger(), skipped_steps=0, scaler_skipped_steps=0, step_losses=[],
                           last_checkpoint="/runs/r/checkpoints/checkpoint-3")


def _window(*losses):
    return [{"loss": torch.tensor(v), "loss_forward": torch.tensor(v), "norm_score_r_max": torch.tensor(v),
             "norm_score_r_min": torch.tensor(v)} for v in losses]


def test_a_finite_step_updates_the_weights_and_reduces_the_window_by_key_suffix():
    run = _run()
    run.grad_stats = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])]
    optimizer_step(run, _window(0.5, 1.5), epoch=3)
    assert run.global_step == 7 and not torch.equal(run.params[0].detach(), torch.ones(3))
    record = run.logger.records[-1]
    assert record["loss"] == 1.0 and record["norm_score_r_max"] == 1.5 and record["norm_score_r_min"] == 0.5
    assert record["epoch"] == 4 and record["grad_norm"] == pytest.approx(0.75 ** 0.5)
    assert (record["grad_mean"], record["grad_var"]) == (2.0, 3.0) and run.grad_stats == []
    assert run.step_losses == [1.0] and run.params[0].grad is None


def test_a_nan_loss_stops_at_that_step_naming_epoch_step_quantity_and_last_checkpoint():
    run = _run()
    with pytest.raises(DivergenceError) as error:
        optimizer_step(run, _window(0.5, float("nan")), epoch=3)
    assert str(error.value) == (
        "training diverged at epoch 4, step 7: non-finite loss (nan); last good checkpoint: "
        "/runs/r/checkpoints/checkpoint-3; lower train.lr and resume from it, or pass --set nan_policy=skip to skip "
        "such steps")
    assert torch.equal(run.params[0].detach(), torch.ones(3))


def test_an_infinite_gradient_is_caught_even_with_a_finite_loss():
    run = _run()
    run.params[0].grad = torch.tensor([1.0, float("inf"), 0.0])
    with pytest.raises(DivergenceError, match=r"non-finite gradient norm \((inf|nan)\)"):
        optimizer_step(run, _window(0.1), epoch=0)


def test_with_a_grad_scaler_an_infinite_gradient_is_the_scalers_skipped_step():
    scaler = torch.amp.GradScaler("cpu", growth_interval=2000)
    run = _run(scaler=scaler)
    scaler.scale(torch.ones(()))  # the backward pass scaled a loss (this creates the scale)
    run.params[0].grad = torch.tensor([1.0, float("inf"), 0.0]) * scaler.get_scale()
    optimizer_step(run, _window(0.1), epoch=0)
    assert run.scaler_skipped_steps == 1 and torch.equal(run.params[0].detach(), torch.ones(3))
    assert scaler.get_scale() == 2.0 ** 15 and run.logger.records[-1]["scaler_skipped_step"] == 1


def test_non_finite_weights_stop_the_run_even_with_nan_policy_skip():
    run = _run("skip")
    with torch.no_grad():
        run.params[0][1] = float("nan")
    with pytest.raises(DivergenceError, match="non-finite LoRA weights"):
        optimizer_step(run, _window(0.1), epoch=0)


def test_nan_policy_skip_drops_the_step_and_counts_it():
    run = _run("skip")
    optimizer_step(run, _window(float("inf")), epoch=0)
    assert run.skipped_steps == 1 and run.global_step == 7 and run.params[0].grad is None
    assert torch.equal(run.params[0].detach(), torch.ones(3)) and run.logger.records[-1]["skipped_step"] == 1
    run.params[0].grad = torch.full((3,), 0.5)
    optimizer_step(run, _window(0.2), epoch=0)
    assert run.skipped_steps == 1 and not torch.equal(run.params[0].detach(), torch.ones(3))


def test_a_huge_learning_rate_stops_the_tiny_paper_run_before_any_checkpoint(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, "simple_res-nabladb.py", "--config", "config/simple_res-nabladb_sd_hps_usez0_basesnr.yaml",
               "--tiny", "--output-dir", str(tmp_path), "--run-name", "diverge", "--set", "train.lr=1e30",
               "--set", "sample.num_steps=10", "--set", "eval.freq=1000"]
    done = subprocess.run(command, cwd=COMPONENT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training diverged at epoch 1, step 2: non-finite loss (nan)"), last
    assert "last good checkpoint: none saved yet" in last
    assert not (tmp_path / "diverge" / "checkpoints").exists()

    def refuse(constant):
        raise AssertionError(f"metrics.jsonl holds the non-JSON constant {constant}")

    rows = [json.loads(line, parse_constant=refuse) for line in (tmp_path / "diverge" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"] is None) for r in rows] == [(1, False), (2, True)]
