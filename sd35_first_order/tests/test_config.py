"""The presets (spec §1.3-1.7): upstream's keys and values, the three keys that separate ours from the pruned
baseline, the diff command, and validation that names the key in one line (spec §10 C3, C7, C8, I1)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from sd35fo import config_check
from sd35fo.config_check import ConfigError, budget, validate

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("hpsv2", "hpsv2_geneval", "hpsv2_geneval_ours", "aesthetic", "imagereward", "pickscore")


def preset(name, **overrides):
    spec = importlib.util.spec_from_file_location(f"preset_{name}", ROOT / "config" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.seed = 0
    for key, value in overrides.items():
        section, leaf = key.split("__", 1)
        node = config[section]
        *parents, last = leaf.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    return config


# spec §1.3: every key of default_config.py with its upstream default
UPSTREAM_DEFAULTS = {
    "training.lr": 5e-4, "training.adam_beta1": 0.9, "training.adam_beta2": 0.999, "training.adam_weight_decay": 1e-2,
    "training.adam_epsilon": 1e-8, "training.max_grad_norm": 1.0, "training.num_inner_epochs": 1,
    "training.batch_size": 4, "training.gradient_accumulation_steps": 2, "training.num_epochs": 201,
    "training.mixed_precision": "bf16", "training.allow_tf32": True, "training.gradscaler_growth_interval": 2000,
    "training.coeff_terminal": 1000.0, "training.reward_masking": False, "training.use_jvp": False,
    "training.detach_dir": True, "training.quantile_clipping": True, "training.use_saved_rgrad_x1": False,
    "model.lora_rank": 8, "model.reward_scale": 3e7, "model.timestep_fraction": 1.0, "model.value_layers_per_block": 1,
    "model.value_channel_width": (64, 128, 256, 256), "model.unet_reg_scale": 0.0, "model.use_value_net": False,
    "model.eta_mode": "quad", "model.value_net_param": "lora", "experiment.method": "Nabla-DB",
    "sampling.num_steps": 20, "sampling.guidance_scale": 5.0, "sampling.batch_size": 8,
    "sampling.num_batches_per_epoch": 1, "sampling.low_var_subsampling": True,
    "pretrained.model": "stabilityai/stable-diffusion-3.5-medium", "pretrained.revision": "main",
    "pretrained.autoencodertiny": True, "logging.use_wandb": True, "logging.save_freq": 5,
    "logging.num_checkpoint_limit": 500, "logging.save_json": True, "logging.wandb_dir": "./wandb/",
    "logging.wandb_key": "YOUR_WANDB_API_KEY", "logging.proj_name": "vggflow", "saving.output_dir": "./saved_models/",
    "eval.enabled": False, "eval.every_epochs": 1, "eval.prompt_fn": "",
}
PRESET_KEYS = {  # spec §1.4
    "hpsv2": ("hpd_photo_painting", {}, "hpscore", 5),
    "hpsv2_geneval": ("from_jsonl", {"path": "geneval/train_metadata.jsonl", "prompt_key": "prompt"}, "hpscore", 50),
    "hpsv2_geneval_ours": ("from_jsonl", {"path": "geneval/train_metadata.jsonl", "prompt_key": "prompt"}, "hpscore", 50),
    "aesthetic": ("simple_animals", {}, "aesthetic_score", 5),
    "imagereward": ("drawbench", {}, "imagereward", 5),
    "pickscore": ("pap", {}, "pickscore", 5),
}


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_has_upstream_values_and_validates(name):
    config = preset(name)
    changed_by_preset = {"logging.save_freq"} | ({"model.reward_scale", "model.eta_mode", "training.use_saved_rgrad_x1"}
                                                 if name == "hpsv2_geneval_ours" else set())
    for key, value in UPSTREAM_DEFAULTS.items():
        if key not in changed_by_preset:
            assert config_check.get(config, key) == value, key
    prompt_fn, kwargs, reward_fn, save_freq = PRESET_KEYS[name]
    assert (config.experiment.prompt_fn, dict(config.experiment.prompt_fn_kwargs)) == (prompt_fn, kwargs)
    assert (config.experiment.reward_fn, config.logging.save_freq) == (reward_fn, save_freq)
    validate(config)


def test_ours_differs_from_the_pruned_baseline_in_exactly_the_three_paper_keys():
    spec = importlib.util.spec_from_file_location("diff_cmd", ROOT / "config" / "diff.py")
    diff = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diff)
    changed = diff.changed_keys(preset("hpsv2_geneval"), preset("hpsv2_geneval_ours"))
    assert changed == {"training.use_saved_rgrad_x1": (False, True), "model.eta_mode": ("quad", "linear"),
                       "model.reward_scale": (3e7, 1.5e7)}


def test_the_diff_command_prints_the_three_keys_with_their_reasons():
    done = subprocess.run([sys.executable, "config/diff.py"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["model.eta_mode", "model.reward_scale", "training.use_saved_rgrad_x1"]
    assert lines[0].startswith("model.eta_mode: 'quad' -> 'linear'  # temporal weight")
    assert lines[1].startswith("model.reward_scale: 30000000.0 -> 15000000.0  # strength")
    assert lines[2].startswith("training.use_saved_rgrad_x1: False -> True  # estimator")


def test_paper_budget_is_one_update_per_epoch_over_twenty_timesteps():
    """spec §1.7: 8 trajectories -> 2 micro-batches of 4 -> 1 optimizer step; K = 20; loss divisor 2 x 20."""
    for name in ("hpsv2_geneval", "hpsv2_geneval_ours"):
        b = budget(preset(name), world_size=4)
        assert (b.trajectories_per_epoch, b.micro_batches_per_epoch, b.optimizer_steps_per_epoch,
                b.train_timesteps, b.loss_divisor, b.global_trajectories_per_epoch) == (8, 2, 1, 20, 40, 32)
    assert config_check.num_train_timesteps(20, 0.25) == 6  # int(N f) + the terminal slot


@pytest.mark.parametrize("overrides, message", [
    ({"sampling__guidance_scale": 1.0}, "sampling.guidance_scale=1.0 must be > 1"),
    ({"training__use_saved_rgrad_x1": True, "model__use_value_net": True},
     "training.use_saved_rgrad_x1=True cannot be combined with model.use_value_net=True"),
    ({"training__batch_size": 3}, "training.batch_size=3 must divide the 8 trajectories a process samples per epoch "
                                  "(sampling.batch_size x sampling.num_batches_per_epoch); allowed: 1, 2, 4, 8"),
    ({"training__gradient_accumulation_steps": 3},
     "training.gradient_accumulation_steps=3 must divide the 2 micro-batches per epoch"),
    ({"model__eta_mode": "cubic"}, "model.eta_mode='cubic' is not supported; allowed: quad, linear, constant"),
    ({"model__use_value_net": True, "model__value_net_param": "big"},
     "model.value_net_param='big' is not supported; allowed: lora, copy, small"),
    ({"logging__wandb_key": "abc123"}, "logging.wandb_key is set in the config: export WANDB_API_KEY=<key> instead"),
    ({"experiment__method": "VGG"}, "experiment.method='VGG' is read by nothing"),
    ({"model__value_net_param": "small"}, "model.value_net_param='small' has no effect without model.use_value_net=True"),
    ({"training__coeff_terminal": 10.0}, "training.coeff_terminal=10.0 has no effect without model.use_value_net=True"),
    ({"sampling__low_var_subsampling": False},
     "sampling.low_var_subsampling=False has no effect with model.timestep_fraction=1.0"),
    ({"model__timestep_fraction": 0.15}, "model.timestep_fraction=0.15 gives 3 trunks of the 20 steps"),
    ({"eval__enabled": True}, "eval.prompt_fn='' is not supported; allowed: from_file, from_jsonl"),
    ({"eval__prompt_fn": "drawbench"}, "eval.prompt_fn='drawbench' has no effect with eval.enabled=False"),
    ({"eval__enabled": True, "eval__prompt_fn": "drawbench", "eval__prompt_fn_kwargs__path": "x.txt"},
     "eval.prompt_fn_kwargs.path: drawbench() takes no argument 'path'"),
    ({"experiment__prompt_fn_kwargs": {"path": "a.jsonl", "key": "prompt"}},
     "experiment.prompt_fn_kwargs.key: from_jsonl() takes no argument 'key'"),
    ({"experiment__prompt_fn": "counting", "experiment__prompt_fn_kwargs": {}},
     "experiment.prompt_fn_kwargs.nouns_file is missing: counting() needs it"),
    ({"training__mixed_precision": "fp8"}, "training.mixed_precision='fp8' is not supported"),
    ({"training__lr": -1.0}, "training.lr=-1.0 must be a finite number > 0.0"),
    ({"model__use_value_net": True, "training__detach_dir": False}, "training.detach_dir=False has no effect"),
    ({"model__use_value_net": True, "training__batch_size": 1, "training__finite_differences": "fp32"},
     "training.finite_differences='fp32' needs fp32 weights (training.mixed_precision='no'; it is 'bf16')"),
    ({"model__use_value_net": True, "training__finite_differences": "forward"},
     "training.finite_differences='forward' is not supported; allowed: bf16, fp32, jvp"),
    ({"model__use_value_net": True, "model__value_net_param": "small", "model__value_channel_width": (48, 96)},
     "model.value_channel_width=(48, 96) must be a tuple of positive multiples of 32"),
    ({"training__gradscaler_growth_interval": 100}, "training.gradscaler_growth_interval=100 has no effect with "
                                                    "training.mixed_precision='bf16' (the GradScaler is fp16-only)"),
])
def test_bad_values_and_combinations_are_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as error:
        validate(preset("hpsv2_geneval", **overrides))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_an_online_wandb_mode_without_a_key_is_refused(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="logging.wandb_mode='online' needs WANDB_API_KEY"):
        validate(preset("hpsv2_geneval", logging__wandb_mode="online"))


def test_the_value_net_variant_validates_with_upstream_value_net_batches():
    """The upstream comments' value-net setting: batch 1, accumulation 8 (with 8 trajectories: one update)."""
    b = validate(preset("hpsv2_geneval", model__use_value_net=True, training__batch_size=1,
                        training__gradient_accumulation_steps=8))
    assert (b.micro_batches_per_epoch, b.optimizer_steps_per_epoch, b.loss_divisor) == (8, 1, 160)


@pytest.mark.parametrize("use_wandb, mode, key, expected", [
    (True, "auto", None, "disabled"), (True, "auto", "k", "online"), (True, "offline", None, "offline"),
    (False, "auto", "k", "disabled"), (True, "disabled", "k", "disabled"), (True, "online", "k", "online"),
])
def test_wandb_runs_only_with_a_key_or_when_asked_for_offline(monkeypatch, use_wandb, mode, key, expected):
    from sd35fo.trainer import wandb_mode

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")  # the Makefile's export does not turn wandb on
    if key:
        monkeypatch.setenv("WANDB_API_KEY", key)
    assert wandb_mode(preset("hpsv2_geneval", logging__use_wandb=use_wandb, logging__wandb_mode=mode)) == expected
