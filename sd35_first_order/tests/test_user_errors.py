"""Contract §2-§4 at start-up: every user mistake is one line naming the key, path or value, raised before any model
loads, and a failed start leaves no run folder behind. The trainer's own `setup` runs in this process with the
model loader replaced by a tripwire, so each test proves its check comes first."""
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from helpers import paper_config

from sd35fo import checkpoints, trainer
from sd35fo.config_check import ConfigError
from sd35fo.distributed import Dist

ROOT = Path(__file__).resolve().parents[1]


class Tripwire(Exception):
    """Raised where the models would load: the checks before it all passed."""


@pytest.fixture
def start(tmp_path, monkeypatch):
    """start(**overrides) -> the one-line ConfigError `setup` raised before any model loaded."""
    def no_models(*args, **kwargs):
        raise Tripwire()

    monkeypatch.setattr(trainer, "load_models", no_models)

    def run(name_given=False, **overrides):
        overrides.setdefault("saving__output_dir", str(tmp_path / "runs"))
        config = paper_config(**overrides)
        with pytest.raises(ConfigError) as error:
            trainer.setup(config, Dist(), name_given=name_given)
        message = str(error.value)
        assert "\n" not in message
        runs = tmp_path / "runs"
        assert not runs.exists() or not any(p for p in runs.iterdir() if "existing" not in p.name), \
            "a failed start left a run folder behind"
        return message

    return run


def test_the_tiny_paper_config_passes_every_check_and_reaches_the_models(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "load_models", lambda *a, **k: (_ for _ in ()).throw(Tripwire()))
    with pytest.raises(Tripwire):
        trainer.setup(paper_config(saving__output_dir=str(tmp_path)), Dist())
    assert not any(tmp_path.iterdir())


def test_a_model_path_that_does_not_exist(start):
    assert start(pretrained__model="/does/not/exist") == (
        "pretrained.model (--model)='/does/not/exist': no such directory (and not a hub id)")


def test_a_model_folder_without_a_transformer(start, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text("{}")
    assert start(pretrained__model=str(tmp_path / "model")).startswith(
        f"pretrained.model (--model)='{tmp_path / 'model'}': no transformer/config.json there; expected a diffusers "
        "StableDiffusion3Pipeline folder")


def test_a_hub_id_not_in_the_offline_cache_names_the_revision(start, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "pretrained.model (--model)='someone/not-downloaded' (revision 'v2') is not in the local hub cache" in start(
        pretrained__model="someone/not-downloaded", pretrained__revision="v2")


def test_a_missing_taesd_folder(start):
    assert start(pretrained__autoencodertiny_model="./no/taesd") == (
        "pretrained.autoencodertiny_model='./no/taesd': no such directory (and not a hub id)")


def test_an_output_dir_that_is_a_file(start, tmp_path):
    (tmp_path / "a_file").write_text("x")
    assert start(saving__output_dir=str(tmp_path / "a_file" / "runs")) == (
        f"saving.output_dir='{tmp_path / 'a_file' / 'runs'}': {tmp_path / 'a_file'} is a file, not a directory")


def test_missing_geneval_prompts_point_at_the_fetch_command(start, tmp_path):
    (tmp_path / "empty_data").mkdir()
    assert start(experiment__data_dir=str(tmp_path / "empty_data")) == (
        f"experiment.prompt_fn='from_jsonl': prompt file 'geneval/train_metadata.jsonl' not found (neither as given nor "
        f"in {tmp_path / 'empty_data'}) (run python scripts/fetch_data.py --only geneval, or use --tiny for the test "
        "kit's prompts)")


@pytest.mark.parametrize("content, fragment", [
    ('{"prompt": "a cat"}\n{"tag": "x"}\n', "line 2 has no 'prompt' key"),
    ("\n\n", "no prompts found (empty file)"),
    ('{"prompt": "a"}\nnot json\n', "line 2 is not JSON (Expecting value)"),
])
def test_a_bad_jsonl_prompt_file_is_named_with_its_line(start, tmp_path, content, fragment):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    message = start(experiment__prompt_fn_kwargs={"path": str(path), "prompt_key": "prompt"})
    assert message == f"experiment.prompt_fn='from_jsonl': {path}: {fragment}"


def test_missing_reward_weights_are_one_line_before_the_models(start, tmp_path):
    message = start(experiment__reward_options__weights=str(tmp_path / "no_hps"))
    assert message.startswith("experiment.reward_fn='hpscore' with experiment.reward_options=")


def test_an_unknown_reward_option_is_named(start):
    message = start(experiment__reward_options__colour="red")
    assert "hpsv2: unknown option 'colour'" in message


def test_reusing_a_run_folder_is_refused_and_the_run_is_untouched(start, tmp_path):
    existing = tmp_path / "runs" / "hpscore_vggflow_existing_seed0"
    (existing / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    (existing / "metrics.jsonl").write_text('{"kind": "step"}\n')
    message = start(exp_name="existing")
    assert message == (f"run folder {existing} already holds a run (metrics or checkpoints): resume it with "
                       f"--resume={existing}, or choose another --exp_name (or --output_dir)")
    assert (existing / "metrics.jsonl").read_text() == '{"kind": "step"}\n'


def _checkpoint(folder, epoch=1, **state):
    config = paper_config()
    full = {"config_json": json.dumps(config.to_dict()), "epoch": epoch, "global_step": epoch, "metrics_lines": 0,
            **state}
    return checkpoints.save(str(folder), epoch, lambda d: os.makedirs(d), full, limit=5)


def test_resume_from_an_empty_folder(start, tmp_path):
    (tmp_path / "empty").mkdir()
    assert start(saving__resume_from=str(tmp_path / "empty")) == (
        f"--resume={str(tmp_path / 'empty')!r}: no training_state.pt there and no checkpoint-<n> folder holding one")


def test_a_truncated_training_state_is_named_in_one_line(start, tmp_path):
    path = Path(_checkpoint(tmp_path / "existing_run"))
    state = path / "training_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    assert start(saving__resume_from=str(path)).startswith(
        f"{state}: not a readable training state (truncated, or not written by this trainer")


class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_training_state_does_not_run_code(start, tmp_path):
    folder = tmp_path / "existing" / "checkpoints" / "checkpoint-1"
    folder.mkdir(parents=True)
    marker = tmp_path / "pwned"
    torch.save({"format": checkpoints.STATE_FORMAT, "payload": _RunsACommand(marker)}, folder / "training_state.pt")
    assert start(saving__resume_from=str(folder)).startswith(f"{folder / 'training_state.pt'}: not a readable training state")
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(folder / "training_state.pt", weights_only=True)


def test_a_foreign_file_is_not_taken_for_a_training_state(start, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({"epoch": 3}, folder / "training_state.pt")
    assert start(saving__resume_from=str(folder)) == (
        f"{folder / 'training_state.pt'}: not a training state of this trainer (format None, expected "
        f"'{checkpoints.STATE_FORMAT}')")


def test_resuming_past_num_epochs_is_refused(start, tmp_path):
    path = _checkpoint(tmp_path / "existing_run", epoch=2)
    assert start(saving__resume_from=path) == (
        f"--resume={path!r}: the checkpoint is at epoch 2 and training.num_epochs=2: nothing left to train (raise "
        "--config.training.num_epochs)")


def test_resuming_an_older_checkpoint_of_a_run_that_went_further_is_refused(start, tmp_path):
    first = _checkpoint(tmp_path / "existing_run", epoch=1)
    _checkpoint(tmp_path / "existing_run", epoch=2)
    assert start(saving__resume_from=first, training__num_epochs=5).startswith(
        f"--resume={first!r}: {tmp_path / 'existing_run'} has a newer checkpoint (checkpoint-2)")


def test_resuming_with_a_changed_objective_names_the_keys_and_can_be_overridden(start, tmp_path, monkeypatch):
    path = _checkpoint(tmp_path / "existing_run", epoch=1)
    message = start(saving__resume_from=path, model__reward_scale=2e7, training__num_epochs=5)
    assert message == (f"--resume={path!r}: the checkpoint was trained with another config (model.reward_scale: "
                       "15000000.0 -> 20000000.0); resume with the same config and flags, or pass "
                       "--config.saving.resume_ignore_config_changes=True to continue anyway")
    monkeypatch.setattr(trainer, "load_models", lambda *a, **k: (_ for _ in ()).throw(Tripwire()))
    with pytest.raises(Tripwire):
        trainer.setup(paper_config(saving__resume_from=path, model__reward_scale=2e7, training__num_epochs=5,
                                   saving__resume_ignore_config_changes=True,
                                   saving__output_dir=str(tmp_path / "runs")), Dist())


def test_resuming_on_another_world_size_says_what_that_changes(tmp_path, monkeypatch, caplog):
    """A checkpoint of 4 processes resumed on 1 (or on more nodes): allowed, with a warning that names the effect."""
    path = _checkpoint(tmp_path / "existing_run", epoch=1, world_size=4)
    monkeypatch.setattr(trainer, "load_models", lambda *a, **k: (_ for _ in ()).throw(Tripwire()))
    for same_seed, effect in ((True, "the same numbers up to rounding"),
                              (False, "each update now averages the gradients of 1 process(es), not 4")):
        caplog.clear()
        with caplog.at_level("WARNING", logger="sd35fo.trainer"), pytest.raises(Tripwire):
            trainer.setup(paper_config(saving__resume_from=path, training__num_epochs=5,
                                       quirks__same_seed_all_ranks=same_seed,
                                       saving__resume_ignore_config_changes=True,
                                       saving__output_dir=str(tmp_path / "runs")), Dist())
        assert f"the checkpoint was trained on 4 processes, this run has 1: {effect}" in caplog.text
