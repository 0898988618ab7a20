"""Checkpoints (contract §4, spec §12 item 27) and the divergence guard (contract §6).

Checkpoints: a failed write leaves no checkpoint folder, num_checkpoint_limit keeps the newest, RNG state survives a
weights-only load, only keys that change the math refuse a resume, upstream's checkpoint_<e>.pt is read with LoRA
keys with or without the adapter name. Divergence: a non-finite loss, gradient norm or weight stops the update with
one line naming epoch, step, quantity and last checkpoint; nan_policy=skip drops the step and counts it; a huge
learning rate stops the tiny paper run before it saves non-finite weights.
"""
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sd15zo import checkpoints, trainer_common
from sd15zo.config import ConfigError, load_config
from sd15zo.run_folder import find_checkpoint, list_checkpoints
from sd15zo.trainer_common import DivergenceError, MetricLogger, optimizer_step


def test_a_failing_write_leaves_no_checkpoint_folder_and_no_partial(tmp_path):
    def broken(folder):
        raise OSError("disk full")

    with pytest.raises(OSError):
        checkpoints.save(str(tmp_path), 1, broken, {"epoch": 1}, 5)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_num_checkpoint_limit_keeps_the_newest(tmp_path):
    for epoch in range(1, 5):
        checkpoints.save(str(tmp_path), epoch, lambda folder: None, {"epoch": epoch}, 2)
    assert [n for n, _ in list_checkpoints(str(tmp_path))] == [3, 4]
    assert find_checkpoint(str(tmp_path)).endswith("checkpoint-4")
    state = checkpoints.load_state(find_checkpoint(str(tmp_path)))
    assert state["epoch"] == 4 and state["format"] == checkpoints.STATE_FORMAT


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(checkpoints.rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    checkpoints.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_resume_diff_ignores_bookkeeping_and_names_keys_that_change_the_math():
    saved = load_config("grpo_pr", tiny=True).to_dict()
    now = load_config("grpo_pr", tiny=True, sets=["num_train_epochs=9", "logging_dir=/elsewhere", "eval_freq=3",
                                                   "efficient_rollout=false", "train_approx_kl=never"])
    assert checkpoints.math_key_diff(saved, now) == {}
    now = load_config("grpo_pr", tiny=True, sets=["ode_kl_anchor_beta=0.01"])
    assert checkpoints.math_key_diff(saved, now) == {"ode_kl_anchor_beta": (0.00008, 0.01)}


def test_lora_keys_without_the_adapter_name_are_accepted(tmp_path):
    from diffusers import UNet2DConditionModel
    from peft.utils import get_peft_model_state_dict
    from rsm_testkit import get_tiny_model

    from sd15zo.models import add_lora

    unet = UNet2DConditionModel.from_pretrained(str(get_tiny_model("sd15")), subfolder="unet")
    torch.manual_seed(0)
    params = add_lora(unet, 4)
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    state = {k: v.clone() for k, v in get_peft_model_state_dict(unet).items()}  # no ".default." in the keys
    assert not any(".default." in k for k in state)
    assert checkpoints.with_adapter_name({"a.lora_A.weight": 1})["a.lora_A.default.weight"] == 1
    torch.save({"lora_config": {"r": 4}, "lora_weights": state,
                "optimizer_state": {"optimizer": {"state": {}, "param_groups": []}, "epoch": 4, "global_step": 10,
                                    "stat_tracker": None}}, tmp_path / "checkpoint_4.pt")
    upstream = checkpoints.load_state(find_checkpoint(str(tmp_path / "checkpoint_4.pt")))
    assert (upstream["epoch"], upstream["global_step"], upstream["format"]) == (5, 10, "upstream")  # 0-based epoch 4
    fresh = UNet2DConditionModel.from_pretrained(str(get_tiny_model("sd15")), subfolder="unet")
    add_lora(fresh, 4)
    checkpoints.load_lora_state(fresh, upstream["lora_weights"])
    loaded = get_peft_model_state_dict(fresh)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    with pytest.raises(ConfigError, match="do not fit this UNet"):
        checkpoints.load_lora_state(fresh, {**state, "down_blocks.9.lora_A.weight": torch.zeros(1)})


# ------------------------------------------------------------------------------------------------ divergence

def _run(tmp_path, nan_policy="stop", weight=1.0):
    layer = torch.nn.Linear(3, 1)
    with torch.no_grad():
        layer.weight.fill_(weight)
    params = list(layer.parameters())
    config = SimpleNamespace(train_max_grad_norm=1.0, nan_policy=nan_policy, wandb_mode="disabled",
                             report_to="none", wandb_project="x")
    return SimpleNamespace(params=params, optimizer=torch.optim.SGD(params, lr=0.1), config=config, device="cpu",
                           accelerator=SimpleNamespace(num_processes=1), logger=MetricLogger(str(tmp_path), config, True),
                           global_step=0, epoch=2, skipped_steps=0, scaler_skipped_steps=0, step_records=[],
                           updates_this_epoch=0, last_checkpoint="/runs/a/checkpoints/checkpoint-2",
                           scaler=torch.amp.GradScaler("cpu", enabled=False)), layer


def _backward(layer, value=1.0):
    loss = layer(torch.full((1, 3), value)).sum()
    loss.backward()
    return {"loss": loss.detach()}


def test_a_finite_step_updates_the_weights_and_logs_the_means(tmp_path):
    run, layer = _run(tmp_path)
    before = layer.weight.detach().clone()
    optimizer_step(run, [_backward(layer), _backward(layer)], epoch=3)
    assert run.global_step == 1 and not torch.equal(layer.weight, before)
    record = run.step_records[-1]
    assert record["epoch"] == 3 and {"loss", "grad_mean", "grad_var"} <= set(record)
    # two identical micro-steps: gradient 2 x (1, 1, 1 | 1); the norm is logged before clipping to 1.0
    assert record["grad_norm"] == pytest.approx(4.0) and record["grad_mean"] == pytest.approx(2.0)
    torch.testing.assert_close(layer.weight.detach(), before - 0.1 * 2 / 4.0)


def test_a_nan_loss_stops_at_that_step_naming_epoch_step_quantity_and_last_checkpoint(tmp_path):
    run, layer = _run(tmp_path)
    entry = _backward(layer)
    entry["loss"] = torch.tensor(float("nan"))
    with pytest.raises(DivergenceError) as error:
        optimizer_step(run, [entry])
    assert str(error.value) == ("training diverged at epoch 3, step 1: non-finite loss (nan); last good checkpoint: "
                                "/runs/a/checkpoints/checkpoint-2; lower learning_rate and resume from it, or pass "
                                "--set nan_policy=skip to skip such steps")


def test_an_infinite_gradient_is_caught_even_with_a_finite_loss(tmp_path):
    run, layer = _run(tmp_path)
    entry = _backward(layer)
    layer.weight.grad[0, 0] = float("inf")
    with pytest.raises(DivergenceError, match="non-finite gradient norm"):
        optimizer_step(run, [entry])


def test_non_finite_weights_stop_the_run_even_with_nan_policy_skip(tmp_path):
    run, layer = _run(tmp_path, nan_policy="skip", weight=float("nan"))
    with pytest.raises(DivergenceError, match="non-finite .*weights"):
        optimizer_step(run, [_backward(layer)])


def test_nan_policy_skip_drops_the_step_and_counts_it(tmp_path):
    run, layer = _run(tmp_path, nan_policy="skip")
    before = layer.weight.detach().clone()
    entry = _backward(layer)
    entry["loss"] = torch.tensor(float("inf"))
    optimizer_step(run, [entry])
    assert run.skipped_steps == 1 and torch.equal(layer.weight, before) and layer.weight.grad is None
    assert '"skipped_step": 1' in (tmp_path / "metrics.jsonl").read_text()


def test_a_huge_learning_rate_stops_the_tiny_run_before_any_checkpoint(tmp_path, one_cpu_thread):
    from accelerate import Accelerator

    from sd15zo import trainer_grpo

    config = load_config("grpo", tiny=True, sets=[f"logging_dir={tmp_path}", "run_name=boom", "learning_rate=1e30"])
    with pytest.raises(DivergenceError) as error:
        trainer_grpo.train(config, Accelerator(cpu=True))
    message = str(error.value)
    assert message.startswith("training diverged at epoch 1, step 2: non-finite loss (nan)")
    assert message.endswith("last good checkpoint: none saved yet; lower learning_rate and resume from it, or pass "
                            "--set nan_policy=skip to skip such steps")
    assert not (tmp_path / "boom" / "checkpoints").exists()
