"""The other training modes run end to end on the tiny kit, in-process for one epoch: fp16 autocast with the dynamic
loss scale (the presets' mixed_precision, here on a CPU), bf16 autocast, and full UNet fine-tuning (use_lora: false,
frozen reference copy, the UNet saved in the checkpoint)."""
import pytest
import torch

from sd15zo import trainer_grpo, trainer_grpo_pr
from sd15zo.config import load_config


@pytest.mark.parametrize("trainer, sets", [(trainer_grpo_pr, ["mixed_precision=fp16"]),
                                           (trainer_grpo_pr, ["mixed_precision=bf16"]),
                                           (trainer_grpo, ["use_lora=false"])])
def test_one_epoch_trains_saves_and_stays_finite(tmp_path, one_cpu_thread, trainer, sets):
    from accelerate import Accelerator

    name = "grpo_pr" if trainer is trainer_grpo_pr else "grpo"
    config = load_config(name, tiny=True, sets=[f"logging_dir={tmp_path}", "run_name=r", "num_train_epochs=1", *sets])
    run = trainer.train(config, Accelerator(cpu=True))
    assert run.global_step == 2 and all(torch.isfinite(p).all() for p in run.params)
    assert run.scaler.is_enabled() == (config.mixed_precision == "fp16")
    folder = tmp_path / "r" / "checkpoints" / "checkpoint-1"
    state = torch.load(folder / "training_state.pt", weights_only=True)
    assert state["scaler"] == run.scaler.state_dict()
    if not config.use_lora:
        assert (folder / "unet" / "config.json").is_file() and run.models.unet_ref is not None
        assert len(state["params"]) == len(list(run.models.unet.parameters()))
        moved = [not torch.equal(p.detach(), q.detach().float()) for p, q in
                 zip(run.models.unet.parameters(), run.models.unet_ref.parameters())]
        assert any(moved)  # the policy trained, the reference did not
    else:
        assert (folder / "lora" / "pytorch_lora_weights.safetensors").is_file()
