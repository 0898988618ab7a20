"""scripts/qualitative_results.py on the tiny SD3.5: checkpoints in our diffusers layout and in upstream's PEFT
layout load to exactly the trained adapter, epoch 0 is the plain pipeline, the same latents are used in every
epoch and run, and bad input fails in one line before anything is loaded or written."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from rsm_testkit import get_tiny_model

COMPONENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(COMPONENT, "scripts", "qualitative_results.py")
sys.path.insert(0, COMPONENT)

from sd35zo.qualitative import (GRID_LABEL_LEFT, GRID_LABEL_TOP, QualitativeError, grid_file_name,  # noqa: E402
                                image_file_name, prompt_slug, resolve_checkpoint)

PROMPT = "a photo of a red cat/dog"  # the '/' must not become a path separator
FILE_PROMPT = "a photo of a blue bench"
SEEDS = [42, 43]
SIZE = 64
STEPS = 2


def _script_main():
    """The entry script's main(), imported, for the runs that need no fresh process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("qualitative_results_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script.main


def _run_script(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def _script_args(model, root, out, epochs, prompt_file=None):
    args = ["--pretrained-model", model, "--checkpoint-root", root, "--checkpoint-epochs", *map(str, epochs),
            "--prompt", PROMPT, "--height", str(SIZE), "--width", str(SIZE), "--num-inference-steps", str(STEPS),
            "--images-per-prompt", str(len(SEEDS)), "--output-dir", out]
    return args + (["--prompt-file", prompt_file] if prompt_file else [])


def _perturb_lora_b(module, seed):
    """LoRA B starts at zero (adapter = identity); random B makes the adapter change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator))


def _pixels(path):
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def model():
    return str(get_tiny_model("sd35"))


@pytest.fixture(scope="module")
def checkpoints(model, tmp_path_factory, one_cpu_thread):
    """checkpoint-1: ours (diffusers save_lora_weights in lora/ with the adapter metadata, as save_checkpoint);
    checkpoint-2: upstream PEFT save_pretrained in lora/; checkpoint-3: the same PEFT files directly in it.
    Returns the root and the two trained transformers (with their adapters active) for reference images."""
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig, get_peft_model

    from sd35zo.trainer_branch import add_lora
    from sd35zo.trainer_common import LORA_ALPHA, LORA_RANK, LORA_TARGETS, save_lora

    root = tmp_path_factory.mktemp("run") / "checkpoints"
    ours = SD3Transformer2DModel.from_pretrained(model, subfolder="transformer")
    add_lora(ours)
    _perturb_lora_b(ours, seed=1)
    save_lora(ours, str(root / "checkpoint-1" / "lora"))  # what save_checkpoint writes

    upstream = get_peft_model(SD3Transformer2DModel.from_pretrained(model, subfolder="transformer"),
                              LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, init_lora_weights="gaussian",
                                         target_modules=LORA_TARGETS))
    _perturb_lora_b(upstream, seed=2)
    upstream.save_pretrained(str(root / "checkpoint-2" / "lora"))
    shutil.copytree(root / "checkpoint-2" / "lora", root / "checkpoint-3")
    return str(root), {1: ours, 2: upstream.get_base_model()}  # get_peft_model injected the LoRA in place


def _plain_pipeline_images(model, transformer=None):
    """The stock pipeline with the script's latents: CPU fp32 noise from torch.Generator().manual_seed(seed)."""
    from diffusers import StableDiffusion3Pipeline

    extra = {"transformer": transformer} if transformer is not None else {}
    pipe = StableDiffusion3Pipeline.from_pretrained(model, **extra)
    pipe.set_progress_bar_config(disable=True)
    channels, latent = pipe.transformer.config.in_channels, SIZE // pipe.vae_scale_factor
    noise = torch.cat([torch.randn((1, channels, latent, latent), generator=torch.Generator().manual_seed(s))
                       for s in SEEDS])
    with torch.no_grad():
        images = pipe(prompt=[PROMPT] * len(SEEDS), latents=noise, num_inference_steps=STEPS, guidance_scale=4.5,
                      height=SIZE, width=SIZE, output_type="np").images
    return [np.round(image * 255).astype(np.int16) for image in images]  # the rounding of diffusers' numpy_to_pil


@pytest.fixture(scope="module")
def first_run(model, checkpoints, tmp_path_factory):
    root, _ = checkpoints
    work = tmp_path_factory.mktemp("qualitative")
    prompt_file = work / "metadata.jsonl"
    prompt_file.write_text(json.dumps({"tag": "colors", "prompt": FILE_PROMPT}) + "\n")
    out = str(work / "out")
    result = _run_script(_script_args(model, root, out, [0, 1, 2, 3], str(prompt_file)), cwd=str(work))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _image(out, prompt, seed, epoch):
    return _pixels(os.path.join(out, image_file_name(prompt_slug(prompt), seed, epoch)))


def test_writes_every_image_a_grid_per_prompt_the_config_and_the_prompts(first_run):
    for prompt in (PROMPT, FILE_PROMPT):
        for epoch in (0, 1, 2, 3):
            for seed in SEEDS:
                assert _image(first_run, prompt, seed, epoch).shape == (SIZE, SIZE, 3)
        grid = _pixels(os.path.join(first_run, grid_file_name(prompt_slug(prompt))))
        top, left = GRID_LABEL_TOP, GRID_LABEL_LEFT  # label bands: seeds across the top, epochs down the left
        assert grid.shape == (top + 4 * SIZE, left + len(SEEDS) * SIZE, 3)  # rows = epochs, columns = seeds
        # row 1 (epoch 1), column 1 (seed 43) is that image
        np.testing.assert_array_equal(grid[top + SIZE:top + 2 * SIZE, left + SIZE:], _image(first_run, prompt, SEEDS[1], 1))
        for r in range(4):  # every row and column has its label drawn (dark pixels in its band)
            assert (grid[top + r * SIZE:top + (r + 1) * SIZE, :left] < 128).any(), f"row {r} unlabelled"
        for c in range(len(SEEDS)):
            assert (grid[:top, left + c * SIZE:left + (c + 1) * SIZE] < 128).any(), f"column {c} unlabelled"
    config = json.load(open(os.path.join(first_run, "run_config.json")))
    assert config["seeds"] == SEEDS and config["num_inference_steps"] == STEPS and config["resolved_dtype"] == "fp32"
    assert [c["layout"] for c in config["checkpoints"]] == ["base", "diffusers", "peft", "peft"]
    assert open(os.path.join(first_run, "prompts.txt")).read().splitlines() == [PROMPT, FILE_PROMPT]
    assert all("/" not in name and "\\" not in name for name in os.listdir(first_run))


def test_epoch_0_equals_the_plain_pipeline_with_the_same_latents(model, first_run, one_cpu_thread):
    for seed, expected in zip(SEEDS, _plain_pipeline_images(model)):
        np.testing.assert_array_equal(_image(first_run, PROMPT, seed, 0), expected)


def test_both_checkpoint_layouts_load_exactly_the_trained_adapter(model, checkpoints, first_run, one_cpu_thread):
    _, trained = checkpoints
    for epoch, transformer in trained.items():
        for seed, expected in zip(SEEDS, _plain_pipeline_images(model, transformer)):
            got = _image(first_run, PROMPT, seed, epoch)
            np.testing.assert_array_equal(got, expected, err_msg=f"epoch {epoch}, seed {seed}")
            assert np.abs(got - _image(first_run, PROMPT, seed, 0)).mean() > 2, "the LoRA changed nothing"
    for seed in SEEDS:  # the PEFT files directly in checkpoint-3/ instead of checkpoint-2/lora/
        np.testing.assert_array_equal(_image(first_run, PROMPT, seed, 3), _image(first_run, PROMPT, seed, 2))


def test_a_second_run_gives_identical_images(model, checkpoints, first_run, tmp_path, one_cpu_thread):
    root, _ = checkpoints
    out = str(tmp_path / "again")
    _script_main()(_script_args(model, root, out, [1]))  # in this process: a fresh process is not needed
    for seed in SEEDS:  # same latents whichever other epochs the run holds
        np.testing.assert_array_equal(_image(out, PROMPT, seed, 1), _image(first_run, PROMPT, seed, 1))


def test_a_missing_checkpoint_fails_in_one_line_and_writes_nothing(model, checkpoints, tmp_path, capsys,
                                                                   monkeypatch):
    from diffusers import StableDiffusion3Pipeline

    def no_model_loads(*args, **kwargs):
        raise AssertionError("a model was loaded before the checkpoints were checked")

    monkeypatch.setattr(StableDiffusion3Pipeline, "from_pretrained", no_model_loads)
    root, _ = checkpoints
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_info:
        _script_main()(_script_args(model, root, str(out), [0, 1, 7]))
    assert exit_info.value.code == 2
    missing = os.path.join(root, "checkpoint-7")
    assert capsys.readouterr().err.strip() == f"error: checkpoint directory not found: {missing}"
    assert not out.exists()


def test_checkpoint_root_is_needed_only_beyond_epoch_0(tmp_path):
    assert resolve_checkpoint(None, 0).layout == "base"
    with pytest.raises(QualitativeError, match="--checkpoint-root is required"):
        resolve_checkpoint(None, 5)
    (tmp_path / "checkpoint-5").mkdir()
    with pytest.raises(QualitativeError, match="no LoRA weights in .*checkpoint-5"):
        resolve_checkpoint(str(tmp_path), 5)


def test_prompt_slug_is_path_safe_bounded_and_distinct():
    long = "a " * 500 + "cat"
    slugs = [prompt_slug(p) for p in ("a/b", "a\\b", "a b", "../../etc/passwd", long, long + "s", "   ")]
    assert all(os.sep not in s and "/" not in s and "\\" not in s and not s.startswith(".") for s in slugs)
    assert all(len(s) <= 100 for s in slugs)
    assert len(set(slugs)) == len(slugs)
    assert prompt_slug("A photo of a cat") == prompt_slug("A photo of a cat")


def _args(**overrides):
    """The script's parsed flags with these values (others at their defaults)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("qualitative_results_parser", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--checkpoint-epochs", "0", "--prompt", PROMPT]
    for key, value in overrides.items():
        argv += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return script.build_parser().parse_args(argv)


def test_the_base_model_is_the_runs_own_from_its_config_json(model, tmp_path):
    """A run trained on another base model (here the tiny one) is rendered on it without naming it again."""
    from sd35zo.qualitative import plan

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"pretrained": {"model": model}}))
    args = _args(checkpoint_root=run / "checkpoints", height=SIZE, width=SIZE, output_dir=tmp_path / "out")
    plan(args)  # reads the model's configs: the tiny model's, found through the run's config.json
    assert args.pretrained_model == model and args.images_per_prompt == 8


def test_tiny_renders_on_the_tiny_model_at_64_px_with_two_seeds(model, tmp_path):
    from sd35zo.qualitative import plan

    args = _args(tiny=True, output_dir=tmp_path / "out")
    p = plan(args)
    assert args.pretrained_model == model and (args.height, args.width) == (64, 64) and p.seeds == [42, 43]
