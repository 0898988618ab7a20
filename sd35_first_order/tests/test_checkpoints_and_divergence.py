"""Checkpoints on their own (atomic folders, num_checkpoint_limit, RNG through weights-only loading, which config
changes a resume refuses) and the optimizer step's divergence guard (contract §4, §6)."""
import contextlib
import json
import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ml_collections import ConfigDict

from sd35fo import checkpoints
from sd35fo.distributed import Dist
from sd35fo.trainer import DivergenceError, optimizer_step


def _state(epoch):
    return {"epoch": epoch, "policy": [torch.full((2,), float(epoch))], "rng": checkpoints.rng_state()}


def test_a_failing_write_leaves_no_checkpoint_folder(tmp_path):
    def broken(directory):
        os.makedirs(directory)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        checkpoints.save(str(tmp_path), 1, broken, _state(1), limit=5)
    assert os.listdir(tmp_path / "checkpoints") == []


def test_num_checkpoint_limit_keeps_the_newest_by_number(tmp_path):
    for epoch in (1, 2, 3, 10):
        path = checkpoints.save(str(tmp_path), epoch, os.makedirs, _state(epoch), limit=2)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["checkpoint-10", "checkpoint-3"]
    assert checkpoints.load_state(path)["policy"][0].tolist() == [10.0, 10.0]


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = checkpoints.save(str(tmp_path), 1, os.makedirs, _state(1), limit=1)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoints.set_rng_state(checkpoints.load_state(path)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_a_resume_may_change_schedules_and_paths_but_not_the_math():
    saved = {"training": {"num_epochs": 10, "lr": 5e-4}, "logging": {"save_freq": 5}, "saving": {"output_dir": "/a"},
             "eval": {"enabled": False}, "model": {"reward_scale": 3e7}, "exp_name": "A", "run_name": "r", "seed": 0,
             "world_size": 1}
    now = ConfigDict({**saved, "training": {"num_epochs": 20, "lr": 1e-4}, "logging": {"save_freq": 1},
                      "saving": {"output_dir": "/b"}, "eval": {"enabled": True}, "exp_name": "B", "run_name": "s"})
    assert checkpoints.math_key_diff(saved, now) == {"training.lr": (5e-4, 1e-4)}


def _run(nan_policy="stop", world=1):
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.full((3,), 0.5)
    config = SimpleNamespace(training=SimpleNamespace(nan_policy=nan_policy, max_grad_norm=1.0),
                             quirks=SimpleNamespace(single_rank_quantile=True))

    class Log:
        def __init__(self):
            self.records = []

        def log(self, record, kind):
            self.records.append(record)

    return SimpleNamespace(config=config, dist=Dist(), policy_params=[param], value_params=[], scaler=None,
                           optimizer=torch.optim.AdamW([param], lr=0.1), logger=Log(), global_step=4, tau=1.0,
                           skipped_steps=0, step_records=[], last_checkpoint="/runs/r/checkpoints/checkpoint-2")


def _window(*losses):
    return [{"loss": torch.tensor(v / 20), "loss_total": torch.tensor(v), "loss_raw": torch.tensor(v),
             "rgrad_norm": torch.tensor([1e-6, 2e-6]), "rgrad_mean": torch.tensor(1.5e-6),
             "rgrad_min": torch.tensor(1e-6), "rgrad_max": torch.tensor(2e-6)} for v in losses]


def test_a_finite_step_updates_and_sets_tau_to_the_quantile():
    run = _run()
    optimizer_step(run, _window(0.5, 1.5), epoch=2)
    assert run.global_step == 5 and not torch.equal(run.policy_params[0].detach(), torch.ones(3))
    record = run.logger.records[-1]
    assert record["loss_total"] == 1.0 and record["epoch"] == 3 and record["grad_norm"] == pytest.approx(0.75 ** 0.5)
    assert run.tau == pytest.approx(torch.quantile(torch.tensor([1e-6, 2e-6, 1e-6, 2e-6], dtype=torch.float64), 0.8).item())
    assert run.policy_params[0].grad is None


def test_a_nan_loss_stops_at_that_step_naming_epoch_step_quantity_and_the_last_checkpoint():
    run = _run()
    with pytest.raises(DivergenceError) as error:
        optimizer_step(run, _window(0.5, float("nan")), epoch=2)
    assert str(error.value) == (
        "training diverged at epoch 3, step 5: non-finite loss (nan); last good checkpoint: "
        "/runs/r/checkpoints/checkpoint-2; lower training.lr and resume from it, or pass "
        "--config.training.nan_policy=skip to skip such steps")
    assert torch.equal(run.policy_params[0].detach(), torch.ones(3))


def test_an_infinite_gradient_is_caught_with_a_finite_loss():
    run = _run()
    run.policy_params[0].grad = torch.tensor([1.0, float("inf"), 0.0])
    with pytest.raises(DivergenceError, match=r"non-finite gradient norm \((inf|nan)\)"):
        optimizer_step(run, _window(0.1), epoch=0)


def test_non_finite_weights_stop_the_run_even_with_nan_policy_skip():
    run = _run("skip")
    with torch.no_grad():
        run.policy_params[0][1] = float("nan")
    with pytest.raises(DivergenceError, match=r"non-finite weights \(after the previous step\)"):
        optimizer_step(run, _window(0.1), epoch=0)


def test_nan_policy_skip_drops_the_step_counts_it_and_keeps_tau():
    run = _run("skip")
    optimizer_step(run, _window(float("inf")), epoch=0)
    assert run.skipped_steps == 1 and run.global_step == 5 and run.tau == 1.0
    assert torch.equal(run.policy_params[0].detach(), torch.ones(3)) and run.logger.records[-1]["skipped_step"] == 1
    run.policy_params[0].grad = torch.full((3,), 0.5)
    optimizer_step(run, _window(0.2), epoch=0)
    assert run.skipped_steps == 1 and not torch.equal(run.policy_params[0].detach(), torch.ones(3))


def test_with_fp16_the_grad_scaler_skips_non_finite_gradients_instead_of_stopping():
    run = _run()
    run.scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    run.scaler.scale(torch.ones(()))  # the trainer's backward goes through scaler.scale(loss)
    run.policy_params[0].grad = torch.full((3,), 2.0)  # as if scaled by 4: 0.5 after unscaling
    optimizer_step(run, _window(0.5), epoch=0)
    assert not torch.equal(run.policy_params[0].detach(), torch.ones(3)) and run.logger.records[-1]["grad_scale"] == 4.0
    before = run.policy_params[0].detach().clone()
    run.policy_params[0].grad = torch.tensor([1.0, float("inf"), 0.0])
    run.scaler.scale(torch.ones(()))
    optimizer_step(run, _window(0.5), epoch=0)  # the scaler skips the step and halves its scale
    assert torch.equal(run.policy_params[0].detach(), before) and run.logger.records[-1]["grad_scale"] == 2.0
