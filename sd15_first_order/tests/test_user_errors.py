"""Contract §2-§3 at start-up: every user mistake is one line naming the key, path or value, raised before any
model loads, and a failed start leaves no run folder behind. The trainer's own `setup` runs in this process
with the model loader replaced by a tripwire, so each test proves the check comes first."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sd15fo import checkpoints, config, distributed, trainer
from sd15fo.config import ConfigError
from sd15fo.run_folder import upstream_checkpoint_epoch

COMPONENT = Path(__file__).resolve().parents[1]
OURS = "config/simple_res-nabladb_sd_hps_usez0_basesnr.yaml"


@pytest.fixture
def start(tmp_path, monkeypatch):
    """start(*overrides) runs the set-up of the tiny "ours" config with those `--set` overrides and returns the
    one-line error raised before any model loaded."""
    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(trainer, "load_models", no_models)

    def run(*overrides, **flags):
        loaded = config.load(OURS, [f"logging_dir={tmp_path / 'runs'}", *overrides], tiny=True, **flags)
        with pytest.raises(ConfigError) as error:
            trainer.setup(loaded, distributed.Processes())
        message = str(error.value)
        assert "\n" not in message
        runs = tmp_path / "runs"
        assert not runs.exists() or all(p.name in ("existing", "done") for p in runs.iterdir()), \
            "a failed start left a run folder behind"
        return message

    return run


def test_a_model_path_that_does_not_exist(start):
    assert start("model.pretrained=/does/not/exist") == (
        "model.pretrained='/does/not/exist': no such directory (and not a hub id like "
        "stable-diffusion-v1-5/stable-diffusion-v1-5)")


def test_a_model_folder_without_a_unet(start, tmp_path):
    for part in ("vae", "text_encoder", "tokenizer", "scheduler"):
        (tmp_path / "model" / part).mkdir(parents=True)
    assert start(f"model.pretrained={tmp_path / 'model'}").startswith(f"model.pretrained='{tmp_path / 'model'}': no unet/ there")


def test_the_withdrawn_hub_id_offline_names_the_mirror(start, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = start("model.pretrained=runwayml/stable-diffusion-v1-5", "model.revision=v1")
    assert "(revision 'v1') is not in the local hub cache and HF_HUB_OFFLINE is set" in message
    assert "the mirror is stable-diffusion-v1-5/stable-diffusion-v1-5" in message


def test_the_revision_and_variant_reach_from_pretrained(monkeypatch):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from sd15fo import models

    seen = []

    class Stop(Exception):
        pass

    def fake(name):
        def from_pretrained(where, **kwargs):
            seen.append((name, where, kwargs.get("subfolder"), kwargs.get("revision"), kwargs.get("variant")))
            if name == "text_encoder":
                raise Stop
            return DDPMScheduler() if name == "scheduler" else object()
        return from_pretrained

    for cls, name in ((DDPMScheduler, "scheduler"), (CLIPTokenizer, "tokenizer"), (UNet2DConditionModel, "unet"),
                      (AutoencoderKL, "vae"), (CLIPTextModel, "text_encoder")):
        monkeypatch.setattr(cls, "from_pretrained", fake(name))
    values = {"model": {"pretrained": "org/sd15", "revision": "abc", "variant": "fp16"}, "mixed_precision": "bf16"}
    with pytest.raises(Stop):
        models.load_models(values, torch.device("cpu"))
    assert seen == [("scheduler", "org/sd15", "scheduler", "abc", None), ("tokenizer", "org/sd15", "tokenizer", "abc", None),
                    ("unet", "org/sd15", "unet", "abc", "fp16"), ("vae", "org/sd15", "vae", "abc", "fp16"),
                    ("text_encoder", "org/sd15", "text_encoder", "abc", None)]


def test_missing_prompt_files_name_the_fetch_command(start, tmp_path):
    message = start(f"data_dir={tmp_path / 'nodata'}")
    assert message == (f"data_dir='{tmp_path / 'nodata' / 'geneval'}': {tmp_path / 'nodata' / 'geneval' / 'train_prompts.txt'} "
                       "not found (run python scripts/fetch_data.py --only geneval from the repository root, or use --tiny)")


def test_a_logging_dir_that_is_a_file(start, tmp_path):
    (tmp_path / "a_file").write_text("x")
    assert start(f"logging_dir={tmp_path / 'a_file' / 'runs'}") == (
        f"logging_dir='{tmp_path / 'a_file' / 'runs'}': {tmp_path / 'a_file'} is a file, not a directory")


def test_missing_reward_weights(start, tmp_path):
    assert start(f"reward_fn_kwargs.weights={tmp_path / 'none.pt'}") == (
        f"reward_fn_kwargs.weights='{tmp_path / 'none.pt'}': no such file or directory")


@pytest.mark.parametrize("override, module, fragment", [
    ("train.adam.use_8bit=true", "bitsandbytes", "train.adam.use_8bit=true needs bitsandbytes"),
    ("report_to=tensorboard", "tensorboard", "report_to='tensorboard' needs tensorboard"),
])
def test_optional_libraries_a_key_needs(start, override, module, fragment):
    import importlib.util

    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed here: nothing to refuse")
    assert start(override).startswith(fragment)


def test_cuda_or_fp16_without_a_gpu(start):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert start("device=cuda").startswith("device='cuda' but no CUDA device is visible")
    assert start("mixed_precision=fp16").startswith("mixed_precision='fp16' needs a CUDA device")


def test_a_run_folder_that_holds_a_run_is_not_overwritten(start, tmp_path):
    existing = tmp_path / "runs" / "existing"
    existing.mkdir(parents=True)
    (existing / "metrics.jsonl").write_text("{}\n")
    assert start(run_name="existing") == (
        f"run folder {existing} already holds a run (metrics or checkpoints): resume it with --resume {existing} "
        "or choose another --run-name")
    assert (existing / "metrics.jsonl").read_text() == "{}\n"


def _fake_checkpoint(tmp_path, epoch, values, name="done", world_size=1):
    """A checkpoint-<epoch> in a run folder, written by the trainer's own writer (state of a real config)."""
    run_dir = tmp_path / "runs" / name
    state = {"config_json": json.dumps(values), "epoch": epoch, "world_size": world_size, "params": []}
    return Path(checkpoints.save(str(run_dir), epoch, lambda d: None, state, None)), run_dir


def test_resume_refusals(start, tmp_path):
    values = config.load(OURS, [f"logging_dir={tmp_path / 'runs'}"], tiny=True).values
    one, run_dir = _fake_checkpoint(tmp_path, 1, values)
    two, _ = _fake_checkpoint(tmp_path, 2, values)
    assert start(resume=str(run_dir)) == (
        f"model.resume_from_checkpoint={str(run_dir)!r}: the checkpoint has trained 2 epochs and train.max_epochs=2: "
        "nothing left to train (raise train.max_epochs)")
    assert start("train.max_epochs=5", resume=str(one)) == (
        f"model.resume_from_checkpoint={str(one)!r}: {run_dir} has a newer checkpoint (checkpoint-2) that resuming "
        "here would overwrite; resume from it, or continue in a new folder with --run-name <name>")
    assert start("train.max_epochs=5", "train.reward_scale=10", resume=str(two)) == (
        f"model.resume_from_checkpoint={str(two)!r}: the checkpoint was trained with another config "
        "(train.reward_scale: 500000.0 -> 10.0); resume with the same config, or pass --set "
        "resume_ignore_config_changes=true to continue anyway")
    assert "world_size: 4 -> 1" in start("train.max_epochs=5", resume=str(_fake_checkpoint(tmp_path, 3, values, world_size=4)[0]))
    assert start(resume=str(tmp_path / "nowhere")) == (
        f"model.resume_from_checkpoint={str(tmp_path / 'nowhere')!r}: no such file or directory")


def test_a_corrupt_or_foreign_training_state_is_named(start, tmp_path):
    folder = tmp_path / "runs" / "done" / "checkpoints" / "checkpoint-1"
    folder.mkdir(parents=True)
    (folder / "training_state.pt").write_bytes(b"not a zip")
    assert start(resume=str(folder)).startswith(f"{folder / 'training_state.pt'}: not a readable training state")
    torch.save({"format": "someone-else/3"}, folder / "training_state.pt")
    assert start(resume=str(folder)) == (f"{folder / 'training_state.pt'}: not a training state of this trainer "
                                         "(format 'someone-else/3', expected 'sd15fo-training-state/1')")


def test_upstream_checkpoint_names_give_their_epoch():
    assert upstream_checkpoint_epoch("/logs/run/checkpoint_epoch7") == 7
    assert upstream_checkpoint_epoch("/logs/run/checkpoint_epoch12/") == 12
    with pytest.raises(ValueError, match="expected checkpoint_epoch<E>"):
        upstream_checkpoint_epoch("/logs/run/checkpoint-7")


def test_an_upstream_checkpoint_without_its_lora_file(start, tmp_path):
    folder = tmp_path / "upstream" / "checkpoint_epoch3"
    folder.mkdir(parents=True)
    assert "no pytorch_lora_weights.safetensors (or upstream's unet_lora_weights.safetensors) there" in \
        start("train.max_epochs=10", resume=str(folder))


def test_the_command_line_prints_one_line_and_exits_1():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "simple_res-nabladb.py", "--config", OURS, "--set", "sample.eta=0"],
                          cwd=COMPONENT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr == "error: sample.eta=0.0 must be a finite number > 0\n"
    done = subprocess.run([sys.executable, "simple_res-nabladb.py", "--config", "config/missing.yaml"],
                          cwd=COMPONENT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.startswith("error: --config=") and "no such file" in done.stderr
