"""sd35zo/checkpoints.py and run_folder.py on their own: atomic folders, num_checkpoint_limit, RNG state through
weights_only loading, which config changes a resume refuses, and where a resume continues."""
import json
import os
import random

import numpy as np
import pytest
import torch
from ml_collections import ConfigDict

from sd35zo import checkpoints, run_folder
from sd35zo.config_check import ConfigError


def _state(epoch):
    return {"epoch": epoch, "params": [torch.full((2,), float(epoch))], "rng": checkpoints.rng_state()}


def test_a_failing_write_leaves_no_checkpoint_folder_and_no_partial(tmp_path):
    def broken_lora(directory):
        os.makedirs(directory)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        checkpoints.save(str(tmp_path), 1, broken_lora, _state(1), limit=5)
    assert os.listdir(tmp_path / "checkpoints") == []


def test_num_checkpoint_limit_keeps_the_newest(tmp_path):
    for epoch in (1, 2, 3, 10):
        path = checkpoints.save(str(tmp_path), epoch, os.makedirs, _state(epoch), limit=2)
    assert path == str(tmp_path / "checkpoints" / "checkpoint-10")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["checkpoint-10", "checkpoint-3"]  # by number, not name
    assert checkpoints.load_state(path)["params"][0].tolist() == [10.0, 10.0]


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = checkpoints.save(str(tmp_path), 1, os.makedirs, _state(1), limit=1)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoints.set_rng_state(checkpoints.load_state(path)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_resume_config_check_ignores_run_bookkeeping_and_names_math_changes():
    saved = {"run_name": "a", "num_epochs": 10, "save_dir": "/x", "wandb": {"mode": "online"}, "seed": 42,
             "train": {"learning_rate": 3e-4}, "reward_options": {"geneval": {"url": "http://a", "only_strict": True}}}
    now = ConfigDict({**saved, "run_name": "b", "num_epochs": 20, "save_dir": "/y", "wandb": {"mode": "disabled"},
                      "train": {"learning_rate": 1e-4},
                      "reward_options": {"geneval": {"url": "http://b", "only_strict": False}}})
    assert checkpoints.math_key_diff(saved, now) == {"train.learning_rate": (3e-4, 1e-4),
                                                     "reward_options.geneval.only_strict": (True, False)}


def test_find_checkpoint_takes_the_newest_complete_one_of_a_run(tmp_path):
    for epoch in (1, 2):
        checkpoints.save(str(tmp_path), epoch, os.makedirs, _state(epoch), limit=5)
    (tmp_path / "checkpoints" / "checkpoint-3").mkdir()  # a folder without a state is not a checkpoint
    newest = str(tmp_path / "checkpoints" / "checkpoint-2")
    assert run_folder.find_checkpoint(str(tmp_path)) == newest
    assert run_folder.find_checkpoint(str(tmp_path / "checkpoints")) == newest
    assert run_folder.find_checkpoint(newest + "/training_state.pt") == newest
    with pytest.raises(ConfigError, match="expected a checkpoint-<n> folder or a run folder, got a file"):
        (tmp_path / "notes.txt").write_text("x")
        run_folder.find_checkpoint(str(tmp_path / "notes.txt"))


def test_strict_json_turns_non_finite_numbers_into_null():
    record = run_folder.strict({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf")}, "e": 2})
    assert json.dumps(record, allow_nan=False) == '{"a": null, "b": [1.0, null], "c": {"d": null}, "e": 2}'


def test_a_timestamped_run_never_lands_in_a_folder_that_holds_a_run(tmp_path, monkeypatch):
    """Two unnamed runs started in the same second get different folders."""
    monkeypatch.setattr(run_folder.time, "strftime", lambda fmt: "2026.01.01_00.00.00")
    config = ConfigDict({"save_dir": str(tmp_path), "run_name": "", "resume_from": ""})
    first = run_folder.plan_run(config, None, None).run_dir
    os.makedirs(first)
    open(os.path.join(first, "metrics.jsonl"), "w").close()
    assert run_folder.plan_run(config, None, None).run_dir == first + "_2"
