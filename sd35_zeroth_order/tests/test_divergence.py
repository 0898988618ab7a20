"""Contract §6: a non-finite loss, gradient norm or weight stops the run at that step with one line naming the
epoch, the step, the quantity and the last good checkpoint, and no checkpoint is written with non-finite
weights; `nan_policy=skip` skips such a step instead and counts it (issue 9 item 3)."""
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sd35zo.trainer_common import DivergenceError, optimizer_step

COMPONENT = Path(__file__).resolve().parents[1]


class _Log:
    def __init__(self):
        self.records = []

    def log(self, record, step, kind="step"):
        self.records.append({"kind": kind, "step": step, **record})


def _run(nan_policy="stop"):
    """What optimizer_step reads of a Run: one parameter with a gradient, AdamW, a logger."""
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.full((3,), 0.5)
    config = SimpleNamespace(nan_policy=nan_policy, train=SimpleNamespace(max_grad_norm=1.0))
    return SimpleNamespace(params=[param], optimizer=torch.optim.AdamW([param], lr=0.1), config=config,
                           accelerator=SimpleNamespace(device=torch.device("cpu"), num_processes=1,
                                                       autocast=contextlib.nullcontext),
                           logger=_Log(), global_step=6, epoch=2, skipped_steps=0, step_losses=[],
                           last_checkpoint="/runs/r/checkpoints/checkpoint-2")


def _window(*losses):
    return [{"loss": torch.tensor(v), "policy_loss": torch.tensor(v)} for v in losses]


def test_a_finite_step_updates_the_weights_and_logs_the_means():
    run = _run()
    optimizer_step(run, _window(0.5, 1.5), epoch=3)
    assert run.global_step == 7 and not torch.equal(run.params[0].detach(), torch.ones(3))
    record = run.logger.records[-1]
    assert record["loss"] == 1.0 and record["epoch"] == 3 and record["grad_norm"] == pytest.approx(0.75 ** 0.5)
    assert run.step_losses == [1.0] and run.params[0].grad is None


def test_a_nan_loss_stops_at_that_step_naming_epoch_step_quantity_and_last_checkpoint():
    run = _run()
    with pytest.raises(DivergenceError) as error:
        optimizer_step(run, _window(0.5, float("nan")))
    assert str(error.value) == (
        "training diverged at epoch 3, step 7: non-finite loss (nan); last good checkpoint: "
        "/runs/r/checkpoints/checkpoint-2; lower train.learning_rate and resume from it, or pass "
        "--config.nan_policy=skip to skip such steps")
    assert torch.equal(run.params[0].detach(), torch.ones(3))  # the bad step was not taken
    assert run.logger.records[-1]["loss"] != run.logger.records[-1]["loss"]  # logged (as NaN; null in the file)


def test_an_infinite_gradient_is_caught_even_with_a_finite_loss():
    run = _run()
    run.params[0].grad = torch.tensor([1.0, float("inf"), 0.0])
    with pytest.raises(DivergenceError, match=r"non-finite gradient norm \((inf|nan)\)"):
        optimizer_step(run, _window(0.1))


def test_non_finite_weights_stop_the_run_even_with_nan_policy_skip():
    run = _run("skip")
    with torch.no_grad():
        run.params[0][1] = float("nan")
    with pytest.raises(DivergenceError, match="non-finite LoRA weights"):
        optimizer_step(run, _window(0.1))


def test_nan_policy_skip_drops_the_step_and_counts_it():
    run = _run("skip")
    optimizer_step(run, _window(float("inf")))
    assert run.skipped_steps == 1 and run.global_step == 7 and run.params[0].grad is None
    assert torch.equal(run.params[0].detach(), torch.ones(3))
    assert run.logger.records[-1]["skipped_step"] == 1
    run.params[0].grad = torch.full((3,), 0.5)
    optimizer_step(run, _window(0.2))  # the next healthy step trains as usual
    assert run.skipped_steps == 1 and not torch.equal(run.params[0].detach(), torch.ones(3))


def test_a_huge_learning_rate_stops_the_tiny_paper_run_before_any_checkpoint(tmp_path):
    """The issue's reproduction: learning_rate=1e30 used to log NaN losses, save checkpoint-1 with NaN weights
    and die an epoch later blaming the reward input."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable, WANDB_MODE="disabled")
    command = ["bash", "scripts/single_node/run_sd3.sh", "--tiny", "--profile", "lowsnr2", "--sampler", "branch",
               "--reward", "jpeg_compressibility", "--loss", "matching", "--reweight", "fairclip2", "--",
               f"--config.save_dir={tmp_path}", "--config.run_name=diverge", "--config.num_epochs=3",
               "--config.train.learning_rate=1e30"]
    done = subprocess.run(command, cwd=COMPONENT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training diverged at epoch 1, step 2: non-finite loss (nan)"), last
    assert "last good checkpoint: none saved yet" in last
    run = tmp_path / "diverge"
    assert not (run / "checkpoints").exists()

    def refuse(constant):
        raise AssertionError(f"metrics.jsonl holds the non-JSON constant {constant}")

    rows = [json.loads(line, parse_constant=refuse) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"] is None) for r in rows] == [(1, False), (2, True)]
