"""Contract §2-§4 at start-up: every user mistake is one line naming the key, path or value, raised before any
model loads, and a failed start leaves no run folder behind (issue 9 items 4-6, 9). The trainer's own `setup` is
called in this process with the model loader replaced by a tripwire, so each test proves the check comes first.
"""
import importlib.util
import json
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch

from sd35zo import checkpoints, preflight, trainer_common
from sd35zo.config_check import ConfigError

ROOT = Path(__file__).resolve().parent.parent
TINY_ID = "tiny:sd3.lowsnr2.branch.jpeg_compressibility.matching.fairclip2"


def _matrix():
    spec = importlib.util.spec_from_file_location("sd3_matrix_for_errors", ROOT / "config" / "sd3_matrix.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def matrix():
    return _matrix()


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


@pytest.fixture
def start(matrix, accelerator, tmp_path, monkeypatch):
    """start(key=value, ...) runs the branch trainer's set-up of the tiny paper config with those overrides
    (dotted keys as `train__learning_rate`) and returns the one-line error it raised before any model loaded."""
    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(trainer_common, "load_base_models", no_models)

    def run(**overrides):
        config = matrix.get_config(TINY_ID)
        config.save_dir = str(tmp_path / "runs")
        for key, value in overrides.items():
            node, *path = key.split("__")
            target = config
            for part in [node, *path][:-1]:
                target = target[part]
            target[[node, *path][-1]] = value
        with pytest.raises(ConfigError) as error:
            trainer_common.setup(config, accelerator, "sde_branching", lambda *a: None, lambda s: s)
        message = str(error.value)
        assert "\n" not in message
        runs = tmp_path / "runs"
        assert not runs.exists() or not any(p for p in runs.iterdir() if p.name != "existing"), \
            "a failed start left a run folder behind"
        return message

    return run


def test_a_model_path_that_does_not_exist(start):
    assert start(pretrained__model="/does/not/exist") == (
        "pretrained.model='/does/not/exist': no such directory (and not a hub id like "
        "stabilityai/stable-diffusion-3.5-medium)")


def test_a_model_folder_without_a_transformer(start, tmp_path):
    (tmp_path / "model" / "vae").mkdir(parents=True)
    message = start(pretrained__model=str(tmp_path / "model"))
    assert message.startswith(f"pretrained.model='{tmp_path / 'model'}': no transformer/config.json there")


def test_a_hub_id_not_in_the_offline_cache_names_the_revision(monkeypatch, start):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = start(pretrained__model="someone/not-downloaded", pretrained__revision="v2")
    assert "pretrained.model='someone/not-downloaded' (revision 'v2') is not in the local hub cache" in message


def test_the_revision_reaches_from_pretrained(monkeypatch):
    from types import SimpleNamespace

    from diffusers import AutoencoderKL, SD3Transformer2DModel

    seen = []

    def fake(cls):
        def from_pretrained(model, **kwargs):
            seen.append((cls, model, kwargs.get("subfolder"), kwargs.get("revision")))
            return torch.nn.Linear(1, 1)
        return from_pretrained

    monkeypatch.setattr(SD3Transformer2DModel, "from_pretrained", fake("transformer"))
    monkeypatch.setattr(AutoencoderKL, "from_pretrained", fake("vae"))
    config = SimpleNamespace(pretrained=SimpleNamespace(model="org/sd35", revision="a1b2c3"))
    trainer_common.load_base_models(config, "cpu")
    assert seen == [("transformer", "org/sd35", "transformer", "a1b2c3"), ("vae", "org/sd35", "vae", "a1b2c3")]


def test_a_save_dir_that_is_a_file(start, tmp_path):
    (tmp_path / "a_file").write_text("x")
    assert start(save_dir=str(tmp_path / "a_file" / "runs")) == (
        f"save_dir='{tmp_path / 'a_file' / 'runs'}': {tmp_path / 'a_file'} is a file, not a directory")


def test_a_negative_learning_rate(start):
    assert start(train__learning_rate=-1.0) == "train.learning_rate=-1.0 must be a finite number > 0.0"


@pytest.mark.parametrize("key, value, fragment", [
    ("train__batch_size", -4, "train.batch_size=-4 is not read: this trainer's batch is latent_chunk_size=4"),
    ("logdir", "elsewhere", "logdir='elsewhere' is not read by this trainer"),
    ("train__clip_range_gt", 0.2, "train.clip_range_gt=0.2 is not read by this trainer"),
    ("sample__num_batches_per_epoch", 7, "sample.num_batches_per_epoch=7 is derived"),
    ("num_checkpoint_limit", 0, "num_checkpoint_limit=0 must be a positive integer"),
    ("pretrained__revision", "", "pretrained.revision='' must be a hub branch, tag or commit"),
    ("nan_policy", "ignore", "nan_policy='ignore' is not supported; allowed: stop, skip"),
])
def test_keys_that_would_be_ignored_or_are_invalid_are_refused(start, key, value, fragment):
    assert fragment in start(**{key: value})


def test_8bit_adam_without_bitsandbytes_is_refused(start):
    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here: the optimizer is built, nothing to refuse")
    assert start(train__use_8bit_adam=True).startswith("train.use_8bit_adam=True needs bitsandbytes")


def test_8bit_adam_builds_bitsandbytes_adamw8bit(monkeypatch):
    """With bitsandbytes present the key selects its AdamW8bit with the config's hyper-parameters."""
    from types import ModuleType, SimpleNamespace

    made = {}
    fake = ModuleType("bitsandbytes")
    fake.optim = SimpleNamespace(AdamW8bit=lambda params, **kw: made.update(kw) or "adamw8bit")
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    train = SimpleNamespace(use_8bit_adam=True, learning_rate=3e-4, adam_beta1=0.9, adam_beta2=0.999,
                            adam_weight_decay=1e-4, adam_epsilon=1e-8)
    assert trainer_common.make_optimizer(SimpleNamespace(train=train), [torch.nn.Parameter(torch.zeros(1))]) == "adamw8bit"
    assert made == {"lr": 3e-4, "betas": (0.9, 0.999), "weight_decay": 1e-4, "eps": 1e-8}


def test_an_empty_prompt_file_is_named(start, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert start(train_prompt_file_path=str(empty)) == f"prompt file {empty} holds no prompts (empty or only blank lines)"


def test_preprocessing_refuses_an_empty_prompt_file_before_loading_encoders(tmp_path, capsys):
    from sd35zo.preprocess_embeddings import parse_args

    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "test.txt").write_text("a cat\n")
    with pytest.raises(SystemExit):
        parse_args(["--output_dir", str(tmp_path), "--train_prompt_file", str(tmp_path / "empty.txt"),
                    "--test_prompt_file", str(tmp_path / "test.txt")])
    assert "--train_prompt_file: prompt file" in capsys.readouterr().err


def test_missing_embeddings_point_at_the_preprocessing_command(start, tmp_path):
    folder = tmp_path / "pickscore"
    folder.mkdir()
    message = start(train_hdf5_path=str(folder / "train_embeddings.h5"))
    assert message.startswith(f"train_hdf5_path='{folder / 'train_embeddings.h5'}': file not found (run "
                              "PROMPT_PRESET=pickscore bash scripts/preprocess/preprocess_sd35_embeddings.sh")


# ------------------------------------------------------------------------------------------ run folders

def test_reusing_a_run_name_is_refused_and_the_run_is_untouched(start, tmp_path):
    existing = tmp_path / "runs" / "existing"
    (existing / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    (existing / "metrics.jsonl").write_text('{"kind": "step", "step": 1}\n')
    message = start(run_name="existing")
    assert message == (f"run folder {existing} already holds a run (metrics or checkpoints): resume it with "
                       f"--config.resume_from={existing} or choose another --config.run_name")
    assert (existing / "metrics.jsonl").read_text() == '{"kind": "step", "step": 1}\n'


def test_resume_from_an_empty_folder(start, tmp_path):
    (tmp_path / "empty").mkdir()
    assert start(resume_from=str(tmp_path / "empty")) == (
        f"resume_from='{tmp_path / 'empty'}': no training_state.pt there and no checkpoint-<n> folder holding one")


def _checkpoint(matrix, folder, epoch=1, **state):
    """A checkpoint folder as `save_checkpoint` writes it, with a plain state (no real weights needed here)."""
    config = matrix.get_config(TINY_ID)
    full = {"trainer": "scripts/train_sd3_pr.py", "sampling_mode": "sde_branching",
            "config_json": json.dumps(config.to_dict()), "epoch": epoch, "global_step": 2 * epoch,
            "metrics_lines": 0, **state}
    return checkpoints.save(str(folder), epoch, lambda d: os.makedirs(d), full, limit=5)


def test_a_truncated_training_state_is_named_in_one_line(start, matrix, tmp_path):
    path = Path(_checkpoint(matrix, tmp_path / "run"))
    state = path / "training_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    message = start(resume_from=str(path), num_epochs=3)
    assert message.startswith(f"{state}: not a readable training state (truncated, or not written by this trainer")


class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_training_state_does_not_run_code(start, tmp_path):
    """Contract §4: states load with weights_only=True; a pickle that calls os.system is refused, not run."""
    folder = tmp_path / "run" / "checkpoints" / "checkpoint-1"
    folder.mkdir(parents=True)
    marker = tmp_path / "pwned"
    torch.save({"format": checkpoints.STATE_FORMAT, "payload": _RunsACommand(marker)}, folder / "training_state.pt")
    message = start(resume_from=str(folder), num_epochs=3)
    assert message.startswith(f"{folder / 'training_state.pt'}: not a readable training state")
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):  # and the file really is a code-running pickle
        torch.load(folder / "training_state.pt", weights_only=True)


def test_a_foreign_file_is_not_taken_for_a_training_state(start, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({"epoch": 3, "params": [torch.zeros(2)]}, folder / "training_state.pt")
    message = start(resume_from=str(folder), num_epochs=5)
    assert message == (f"{folder / 'training_state.pt'}: not a training state of this trainer (format None, "
                       f"expected '{checkpoints.STATE_FORMAT}')")


def test_resuming_past_num_epochs_is_refused(start, matrix, tmp_path):
    path = _checkpoint(matrix, tmp_path / "run", epoch=2)
    assert start(resume_from=path, num_epochs=2) == (
        f"resume_from='{path}': the checkpoint is at epoch 2 and num_epochs=2: nothing left to train "
        "(raise --config.num_epochs)")


def test_resuming_an_older_checkpoint_of_a_run_that_went_further_is_refused(start, matrix, tmp_path):
    first = _checkpoint(matrix, tmp_path / "run", epoch=1)
    _checkpoint(matrix, tmp_path / "run", epoch=2)
    message = start(resume_from=first, num_epochs=3)
    assert message.startswith(f"resume_from='{first}': {tmp_path / 'run'} has a newer checkpoint (checkpoint-2)")


def test_misspelled_key_is_named_with_the_likely_fix(tmp_path):
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "sd35zo.config_check", f"--config=config/sd3_matrix.py:{TINY_ID}",
                           "--config.train.learnign_rate=1e-4"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1] == (
        "config error: no config key train.learnign_rate (did you mean train.learning_rate?); check the "
        "--config.<key>=<value> overrides")


def test_preflight_accepts_the_tiny_paper_config(matrix):
    train, test = preflight.check_all(matrix.get_config(TINY_ID))
    assert len(train) > 0 and len(test) > 0


SERVED = ("geneval", "deqa", "qwenvl", "unifiedreward")  # started beside a --tiny run by the launcher


@pytest.mark.parametrize("reward", ["ocr", "pickscore", "imagereward", "aesthetic", "jpeg_compressibility"])
def test_every_in_process_reward_builds_and_scores_in_tiny_mode(matrix, reward):
    """Issue 9 item 2: every --reward works with --tiny (the served ones get the kit's servers from the
    launcher, tested in test_launcher.py and, for GenEval, end to end in test_train_branch.py)."""
    from sd35zo.rewards import build_reward, score_images

    assert reward not in SERVED
    config = matrix.get_config(f"tiny:sd3.base.branch.{reward}.ppo.base")
    train, _ = preflight.check_all(config)  # the kit's prompt set of this reward, with embeddings
    prompts = [train[i]["prompts"] for i in range(2)]
    scores = score_images(build_reward(config), torch.rand(2, 3, 64, 64), prompts, [{}, {}])
    assert scores["avg"].shape == (2,) and torch.isfinite(scores["avg"]).all()
