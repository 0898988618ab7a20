"""What a run reports (contract §4-§5): strict metrics.jsonl always; wandb only when a key is set or offline is
asked; TensorBoard when report_to says so; the console line."""
import json
import sys
import types

import pytest
import torch

from sd15fo.metrics import MetricLogger, console_line

BASE = {"report_to": "none", "wandb": {"project": "sd-align", "entity": None, "mode": "auto"}}


def test_records_are_strict_json_with_non_finite_numbers_as_null(tmp_path):
    logger = MetricLogger(str(tmp_path), BASE, is_main=True)
    logger.log({"loss": float("nan"), "grad_norm": torch.tensor(2.0), "epoch": 1}, step=3)
    logger.log({"loss": 1.5}, step=4, kind="epoch")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"kind": "step", "step": 3, "loss": None, "grad_norm": 2.0, "epoch": 1},
                    {"kind": "epoch", "step": 4, "loss": 1.5}]
    assert logger.lines == 2 and MetricLogger(str(tmp_path), BASE, is_main=True).lines == 2
    assert MetricLogger(str(tmp_path), BASE, is_main=False).log({"x": 1}, 1) is None  # other ranks write nothing


def _fake_wandb(monkeypatch):
    calls = []

    class Run:
        def log(self, record, step=None):
            calls.append(("log", step, record))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls.append(("init", kwargs)) or Run()
    fake.Image = lambda *a, **k: ("image", k.get("caption"))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return calls


def test_wandb_is_off_without_a_key_and_on_offline_or_with_a_key(tmp_path, monkeypatch):
    calls = _fake_wandb(monkeypatch)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    config = {**BASE, "report_to": "wandb"}
    assert MetricLogger(str(tmp_path), config, True).wandb is None and calls == []
    logger = MetricLogger(str(tmp_path), {**config, "wandb": {**BASE["wandb"], "mode": "offline"}}, True)
    assert calls[0][0] == "init" and calls[0][1]["mode"] == "offline" and calls[0][1]["project"] == "sd-align"
    logger.log({"loss": 1.0, "note": "text"}, step=2)
    assert calls[-1] == ("log", 2, {"step": 2, "loss": 1.0})
    monkeypatch.setenv("WANDB_API_KEY", "x")
    MetricLogger(str(tmp_path), config, True)
    assert calls[-1][0] == "init" and calls[-1][1]["mode"] == "online"


def test_tensorboard_gets_every_number(tmp_path, monkeypatch):
    scalars = []

    class Writer:
        def __init__(self, folder):
            scalars.append(("dir", folder))

        def add_scalar(self, key, value, step):
            scalars.append((key, value, step))

        def close(self):
            pass

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    logger = MetricLogger(str(tmp_path), {**BASE, "report_to": "tensorboard"}, True)
    logger.log({"reward_mean": 0.25, "epoch": 1}, step=2, kind="epoch")
    assert scalars[0] == ("dir", str(tmp_path / "tensorboard"))
    assert ("epoch/reward_mean", 0.25, 2) in scalars and ("epoch/epoch", 1, 2) in scalars


def test_console_line():
    record = {"epoch": 3, "reward_mean": 0.25, "reward_std": 0.0125, "loss": 12.34, "time_per_epoch": 10.0,
              "samples_this_epoch": 20, "eval_reward_mean": 0.3, "checkpoint_path": "/r/checkpoints/checkpoint-3"}
    assert console_line(record, 100) == ("epoch 3/100  reward 0.2500 ± 0.0125  loss 12.34  10.0 s  2.00 samples/s  "
                                         "eval 0.3000  saved /r/checkpoints/checkpoint-3")
