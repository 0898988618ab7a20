"""Contract §2-§3 at start-up: every user mistake is one line naming the key, path or value, raised before any model
loads, and a failed start leaves no run folder behind. The trainers' own `setup` runs in this process with the
model loader replaced by a tripwire, so each test proves the check comes first; two checks go through the command
line to see the `error: ...` line and exit status 1."""
import subprocess
import sys

import pytest
import torch

from conftest import COMPONENT, subprocess_env
from sd15zo import models as sd_models, trainer_common
from sd15zo.config import ConfigError, load_config


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


@pytest.fixture
def start(accelerator, tmp_path, monkeypatch):
    """start(trainer, key=value, ...) runs set-up of the tiny paper config with those overrides and returns its
    one-line error."""
    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(sd_models, "load_models", no_models)
    runs = tmp_path / "runs"

    def run(trainer="grpo_pr", **overrides):
        sets = [f"{k}={v}" for k, v in overrides.items()]
        config = load_config(trainer, tiny=True, sets=[f"logging_dir={runs}", *sets])
        with pytest.raises(ConfigError) as error:
            trainer_common.setup(config, accelerator)
        message = str(error.value)
        assert "\n" not in message
        assert not runs.exists() or all(p.name == "existing" for p in runs.iterdir()), "a failed start left a folder"
        return message

    return run


def test_a_model_path_that_does_not_exist(start):
    assert start(pretrained_model="/does/not/exist") == (
        "pretrained_model='/does/not/exist': no such folder (and not a hub id like "
        "stable-diffusion-v1-5/stable-diffusion-v1-5)")


def test_a_model_folder_without_a_unet(start, tmp_path):
    (tmp_path / "model" / "vae").mkdir(parents=True)
    assert start(pretrained_model=str(tmp_path / "model")).startswith(
        f"pretrained_model='{tmp_path / 'model'}': no unet/config.json there; expected a diffusers SD1.5 folder")


def test_a_hub_id_not_in_the_offline_cache_names_the_revision(monkeypatch, start):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = start(pretrained_model="someone/not-downloaded", revision="v2")
    assert "pretrained_model='someone/not-downloaded' (revision 'v2') is not in the local hub cache" in message


def test_the_default_prompt_file_missing_names_the_fetch_command(start, tmp_path):
    from sd15zo.config import REPO_ROOT

    default = f"{REPO_ROOT}/data/dancegrpo/prompts.txt"
    if (COMPONENT.parent / "data" / "dancegrpo" / "prompts.txt").exists():
        pytest.skip("the real prompt list is present in this checkout")
    assert start(prompt_file=default) == (f"prompt_file={default!r}: file not found (run `python scripts/fetch_data.py"
                                          " --only dancegrpo` from the repository root, or use --tiny for the test "
                                          "kit's prompts)")


def test_an_empty_prompt_file(start, tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    assert start(prompt_file=str(tmp_path / "empty.txt")).endswith("the file holds no prompts (one a line)")


def test_a_logging_dir_that_is_a_file(start, tmp_path):
    (tmp_path / "file").write_text("x")
    assert start(logging_dir=str(tmp_path / "file" / "runs")) == (
        f"logging_dir='{tmp_path / 'file' / 'runs'}': {tmp_path / 'file'} is a file, not a directory")


def test_a_run_folder_holding_a_run_is_refused_with_both_ways_out(start, tmp_path):
    existing = tmp_path / "runs" / "existing"
    existing.mkdir(parents=True)
    (existing / "metrics.jsonl").write_text("{}\n")
    message = start(run_name="existing")
    assert message == (f"run folder {existing} already holds a run (metrics or checkpoints): continue it with --set "
                       f"resume_from_checkpoint={existing}, or choose another --set run_name=...")


def _fake_checkpoint(tmp_path, epoch=2, trainer="grpo_pr"):
    folder = tmp_path / "runs" / "existing" / "checkpoints" / f"checkpoint-{epoch}"
    folder.mkdir(parents=True)
    config = load_config(trainer, tiny=True).to_dict()
    torch.save({"format": "sd15zo-training-state/1", "trainer": trainer, "epoch": epoch, "config": config},
               folder / "training_state.pt")
    return folder


def test_resuming_past_num_train_epochs_is_one_line(start, tmp_path):
    folder = _fake_checkpoint(tmp_path)
    assert start(resume_from_checkpoint=str(folder)) == (
        f"resume_from_checkpoint={str(folder)!r}: the checkpoint is at epoch 2 and num_train_epochs=2: nothing left "
        "to train (raise --set num_train_epochs=...)")


def test_resuming_with_another_config_names_the_changed_keys_and_the_override(start, tmp_path):
    folder = _fake_checkpoint(tmp_path, epoch=1)
    message = start(resume_from_checkpoint=str(folder), learning_rate=0.1)
    assert "the checkpoint was trained with another config (learning_rate: 0.0003 -> 0.1)" in message
    assert message.endswith("--set resume_ignore_config_changes=true to continue anyway")
    other = start("grpo", resume_from_checkpoint=str(folder))
    assert other.endswith("was written by train_grpo_pr.py; this is train_grpo.py")


def test_a_corrupt_or_foreign_checkpoint_is_named(start, tmp_path):
    folder = tmp_path / "runs" / "existing" / "checkpoints" / "checkpoint-1"
    folder.mkdir(parents=True)
    (folder / "training_state.pt").write_bytes(b"not a zip")
    assert start(resume_from_checkpoint=str(folder)).startswith(f"{folder / 'training_state.pt'}: not a readable "
                                                                "training state")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(1)}, foreign)
    assert start(resume_from_checkpoint=str(foreign)) == (
        f"{foreign}: not a checkpoint of this trainer or of upstream's train_grpo*.py (expected lora_weights and "
        "optimizer_state)")


def test_optional_libraries_are_checked_before_anything_loads(start, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("bitsandbytes", "xformers")
                        else real(name, *a))
    assert start(use_8bit_adam="true").startswith("use_8bit_adam=true needs bitsandbytes")
    assert start(enable_xformers_memory_efficient_attention="true").startswith(
        "enable_xformers_memory_efficient_attention=true needs xformers")


def test_missing_reward_weights_name_the_option(start, tmp_path):
    message = start(**{"reward_options.hps_v2.weights": str(tmp_path / "nothing")})
    assert message.startswith("reward_fn='hps_v2': cannot build the reward: hpsv2:")
    assert message.endswith("(weights and options: reward_options, e.g. --set reward_options.hps_v2.weights=/path)")


def test_a_schedule_without_a_real_pcpo_sigma_is_refused_before_the_models(start):
    assert "sample_num_steps=20 with algorithm=uw-sigma" in start("grpo", sample_num_steps=20)


def _cli(*args):
    return subprocess.run([sys.executable, *args], cwd=COMPONENT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=120)


def test_the_command_line_prints_one_error_line_and_exits_1():
    done = _cli("train_grpo_pr.py", "--tiny", "--set", "updates_per_epoch=3")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "error: updates_per_epoch=3 does not divide the 8 micro-batches of an epoch (32 rows / "
        "policy_update_row_batch_size=4), so an update would carry over into the next epoch (no-carry invariant): "
        "use a divisor (1, 2, 4, 8)"]
    done = _cli("train_grpo.py", "--config", "nope.yaml")
    assert done.returncode == 1 and done.stderr.strip().startswith("error: --config 'nope.yaml': no such file")


def test_config_check_command_prints_the_budget_and_the_diff():
    done = _cli("-m", "sd15zo.config", "check", "--trainer", "grpo")
    assert done.returncode == 0 and done.stdout.startswith("budget: calls_per_epoch=16")
    done = _cli("-m", "sd15zo.config", "diff")
    assert done.returncode == 0 and "exploration_k: '<absent>' -> [50 entries; nonzero at 0:4, 10:4" in done.stdout
