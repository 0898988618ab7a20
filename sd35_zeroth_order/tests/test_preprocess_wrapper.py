"""scripts/preprocess/preprocess_sd35_embeddings.sh (spec §1.3), run with bash on the tiny SD3.5 model."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sd35zo.embeddings import PrecomputedEmbeddingDataset

COMPONENT = Path(__file__).resolve().parent.parent
WRAPPER = COMPONENT / "scripts" / "preprocess" / "preprocess_sd35_embeddings.sh"
ME = "preprocess_sd35_embeddings.sh"


def run_wrapper(*args, **settings):
    env = {key: value for key, value in os.environ.items()
           if key not in ("GPU_NUM", "PROMPT_PRESET", "OUTPUT_DIR", "TRAIN_PROMPT_FILE", "TEST_PROMPT_FILE",
                          "PRETRAINED_MODEL", "MIXED_PRECISION", "BATCH_SIZE", "TORCHRUN", "WORLD_SIZE")}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", **settings)
    # from "/" on purpose: defaults must come from the repository, not the working directory
    return subprocess.run(["bash", str(WRAPPER), *args], cwd="/", env=env, capture_output=True, text=True,
                          timeout=240)


@pytest.fixture()
def prompts(tmp_path):
    (tmp_path / "train.txt").write_text("a red apple\na blue car\n\na cat on a mat\n")
    (tmp_path / "test.txt").write_text("a green tree\n")
    return {"TRAIN_PROMPT_FILE": str(tmp_path / "train.txt"), "TEST_PROMPT_FILE": str(tmp_path / "test.txt")}


@pytest.mark.parametrize("processes", ["1", "2"])
def test_tiny_model_embeddings_land_in_output_dir_and_load(prompts, tmp_path, processes):
    """One process runs plain python; two CPU processes run under torchrun and merge their slices."""
    from rsm_testkit import get_tiny_model

    out = tmp_path / "embeddings"
    result = run_wrapper(PRETRAINED_MODEL=str(get_tiny_model("sd35")), MIXED_PRECISION="no", OUTPUT_DIR=str(out),
                         GPU_NUM=processes, BATCH_SIZE="2", MAIN_PROCESS_PORT="29861", **prompts)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.splitlines()[:4] == [
        f"preset=pickscore processes={processes} mixed_precision=no model={get_tiny_model('sd35')}",
        f"train={prompts['TRAIN_PROMPT_FILE']}", f"test={prompts['TEST_PROMPT_FILE']}", f"output_dir={out}"]
    assert sorted(p.name for p in out.iterdir()) == ["test_embeddings.h5", "train_embeddings.h5"]  # no rank files
    train = PrecomputedEmbeddingDataset(str(out / "train_embeddings.h5"), prompts["TRAIN_PROMPT_FILE"])
    test = PrecomputedEmbeddingDataset(str(out / "test_embeddings.h5"), prompts["TEST_PROMPT_FILE"])
    assert (len(train), len(test)) == (3, 1)
    assert train.prompts == ["a red apple", "a blue car", "a cat on a mat"]


def test_unknown_preset_fails_with_one_line_listing_the_presets():
    result = run_wrapper(PROMPT_PRESET="hpsv2")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [f"{ME}: PROMPT_PRESET must be one of: pickscore ocr geneval (got 'hpsv2')"]


def test_missing_prompt_file_fails_with_one_line_naming_it_and_the_fetch_command(prompts, tmp_path):
    missing = str(tmp_path / "nope" / "test.txt")
    result = run_wrapper(**{**prompts, "TEST_PROMPT_FILE": missing})
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{ME}: prompt file not found: {missing} ")
    assert "python scripts/fetch_data.py --out data --only pickscore" in lines[0]


@pytest.mark.parametrize("preset, train_name", [("geneval", "train_metadata.jsonl"), ("ocr", "train.txt")])
def test_default_paths_are_the_ones_the_trainer_config_reads(preset, train_name):
    """Without TRAIN/TEST_PROMPT_FILE the wrapper looks where apply_reward_preset points the trainer."""
    from ml_collections import ConfigDict

    spec = importlib.util.spec_from_file_location("presets_for_wrapper", COMPONENT / "config" / "sd3_reward_presets.py")
    presets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(presets)

    trainer = presets.apply_reward_preset(ConfigDict({"train": {}, "sample": {}}), preset, "branch",
                                          str(COMPONENT))
    expected = os.path.normpath(trainer.train_prompt_file_path)
    if os.path.exists(expected):
        pytest.skip(f"{expected} exists in this checkout")
    assert os.path.basename(expected) == train_name
    result = run_wrapper(PROMPT_PRESET=preset)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"{ME}: prompt file not found: {expected} (fetch the prompt sets: "
                                     f"cd {COMPONENT.parent} && python scripts/fetch_data.py --out data --only {preset})")
    # ... and would write where the trainer reads the embeddings
    help_text = run_wrapper("--help").stdout
    cache = os.path.normpath(os.path.dirname(trainer.train_hdf5_path))
    assert cache == f"{COMPONENT.parent}/cache/sd35_embeddings/{preset}"
    assert f"OUTPUT_DIR         default {COMPONENT.parent}/cache/sd35_embeddings/<preset>" in help_text


def test_help_lists_every_setting_and_bad_values_fail_with_one_line():
    result = run_wrapper("--help")
    assert result.returncode == 0 and result.stdout.startswith("usage:")
    for name in ("PROMPT_PRESET", "GPU_NUM", "MIXED_PRECISION", "PRETRAINED_MODEL", "OUTPUT_DIR", "TRAIN_PROMPT_FILE",
                 "TEST_PROMPT_FILE", "BATCH_SIZE", "scripts/fetch_data.py"):
        assert name in result.stdout, name
    for settings, message in [({"GPU_NUM": "0"}, "GPU_NUM must be a positive integer (got '0')"),
                              ({"MIXED_PRECISION": "fp8"}, "MIXED_PRECISION must be one of: no fp16 bf16 (got 'fp8')"),
                              ({"BATCH_SIZE": "x"}, "BATCH_SIZE must be a positive integer (got 'x')")]:
        bad = run_wrapper(**settings)
        assert bad.returncode == 1 and bad.stderr.splitlines() == [f"{ME}: {message}"]
    other = run_wrapper("--gpus")
    assert other.returncode == 1 and other.stderr.startswith(f"{ME}: unknown argument: --gpus")
