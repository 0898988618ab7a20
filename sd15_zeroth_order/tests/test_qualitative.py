"""The qualitative script: checkpoints x seeds grids through diffusers' own LoRA loading (ours and upstream's
checkpoint_<e>.pt), same seeds in every row, one-line input errors before any model loads."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sd15zo import checkpoints, models as sd_models
from sd15zo.config import load_config
from sd15zo.qualitative import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, one_cpu_thread):
    """A run folder with checkpoint-3: the tiny SD1.5 with a clearly perturbed LoRA."""
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("qual") / "run"
    config = load_config("grpo_pr", tiny=True)
    (root / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(config.to_dict()))
    models = sd_models.load_models(config, "cpu")
    torch.manual_seed(0)
    for p in sd_models.add_lora(models.unet, 16):
        with torch.no_grad():
            p.add_(0.3 * torch.randn_like(p))
    checkpoints.save_lora(models.unet, str(root / "checkpoints" / "checkpoint-3" / "lora"))
    torch.save({"lora_weights": get_peft_model_state_dict(models.unet),
                "optimizer_state": {"optimizer": {}, "epoch": 2, "global_step": 6}}, root / "checkpoint_2.pt")
    return root


def test_grids_hold_every_epoch_and_seed_and_the_lora_changes_the_images(run_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["--run", str(run_dir), "--epochs", "0", "3", "--checkpoint-file", str(run_dir / "checkpoint_2.pt"),
                 "--prompt", "a cat", "--images-per-prompt", "2", "--steps", "4", "--output-dir", str(out)]) == 0
    grid = Image.open(out / "grid_prompt00.png")
    single = Image.open(out / "prompt00_epoch0000_seed0.png")
    assert grid.size == (2 * single.width, 3 * single.height)  # rows: epochs 0, 3 and the upstream file (epoch 3)
    base = np.asarray(single, dtype=np.float32)
    trained = np.asarray(Image.open(out / "prompt00_epoch0003_seed0.png"), dtype=np.float32)
    assert np.abs(base - trained).mean() > 1.0  # the LoRA loaded at strength changes the picture
    assert (out / "grid_prompt00.txt").read_text() == "a cat\n"


def test_missing_checkpoints_and_prompts_are_one_line_errors(run_dir, capsys):
    assert main(["--run", str(run_dir), "--epochs", "5", "--prompt", "x"]) == 1
    assert capsys.readouterr().err.strip() == (f"error: epoch 5: no {run_dir}/checkpoints/checkpoint-5/lora/"
                                               "pytorch_lora_weights.safetensors (saved checkpoints: 3)")
    assert main(["--run", str(run_dir), "--epochs", "0"]) == 1
    assert "no prompt" in capsys.readouterr().err
