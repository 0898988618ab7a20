"""The YAML configs: the shipped files parse to the spec's tables, overrides and coercion, one-line refusals naming
the key, the tiny kit, and the baseline/ours diff (spec §1.4-1.7, §9, §11 item 19; contract §2)."""
import subprocess
import sys
from pathlib import Path

import pytest

from sd15fo import config
from sd15fo.config import ConfigError

COMPONENT = Path(__file__).resolve().parents[1]
PRUNED, OURS = "config/simple_res-nabladb_sd_hps.yaml", "config/simple_res-nabladb_sd_hps_usez0_basesnr.yaml"

# spec §1.4: every upstream key with its value in both configs (pruned, ours)
SPEC_TABLE = {
    "model.pretrained": ("runwayml/stable-diffusion-v1-5",) * 2, "model.revision": ("main",) * 2,
    "model.variant": (None, None), "model.resume_from_checkpoint": (None, None), "model.use_lora": (True, True),
    "model.lora_rank": (8, 8), "model.lora_alpha": (8.0, 8.0), "model.use_xformers": (True, True),
    "sample.batch_size": (8, 8), "sample.num_batches_per_epoch": (8, 8), "sample.eta": (1.0, 1.0),
    "sample.cfg_scale": (5.0, 5.0), "sample.num_steps": (50, 50), "train.max_epochs": (101, 100),
    "train.batch_size": (1, 1), "train.gradient_accumulation_steps": (32, 32), "train.lr": (1e-3, 4e-3),
    "train.gradscaler_growth_interval": (2000, 2000), "train.timestep_fraction": (0.2, 0.2),
    "train.low_var_subsampling": (True, True), "train.cfg": (True, True), "train.num_inner_epochs": (1, 1),
    "train.pretrained_strength": (1.0, "sigma"), "train.pretrained_strength_sigma_scale": (1.0, 1.0),
    "train.reward_scale": (5e5, 5e5), "train.reward_adaptive_mode": ("squared", "sigma"),
    "train.reward_adaptive_sigma_scale": (1.0, 1.0), "train.use_z0": (False, True), "train.forward_loss_scale": (1.0, 1.0),
    "train.unet_reg_scale": (100.0, 100.0), "train.normalize_unet_reg_by_one_minus_alpha_bar_t": (False, False),
    "train.gradient_checkpointing": (False, False), "train.max_grad_norm": (1.0, 1.0), "train.adam.use_8bit": (False, False),
    "train.adam.beta1": (0.9, 0.9), "train.adam.beta2": (0.999, 0.999), "train.adam.weight_decay": (1e-4, 1e-4),
    "train.adam.epsilon": (1e-8, 1e-8), "eval.freq": (25, 100), "eval.num_batches": (64, 8), "eval.batch_size": (8, 8),
    "eval.num_steps": (50, 50), "save_freq": (1, 1), "report_to": ("wandb", "wandb"),
    "reward_fn": ("hpsv2_score_diff",) * 2, "reward_fn_kwargs": ({}, {}), "prompt_fn": ("geneval",) * 2,
    "prompt_fn_kwargs": ({}, {}), "per_prompt_stat_tracking": (None, None), "allow_tf32": (True, True),
    "mixed_precision": ("bf16", "bf16"), "seed": (42, 42), "use_pcpo": (False, False),
}


@pytest.mark.parametrize("which, column", [(PRUNED, 0), (OURS, 1)])
def test_shipped_configs_hold_the_spec_values(which, column):
    values = config.load(which).values
    for key, expected in SPEC_TABLE.items():
        assert config.get(values, key) == expected[column], key
    assert values["logging_dir"] == str(COMPONENT / "logs")
    assert values["parity"] is True and values["train"]["cache_z0_reward_grad"] is True


def test_the_two_configs_differ_in_the_spec_keys_and_the_diff_gives_each_a_reason():
    rows = config.diff(str(COMPONENT / PRUNED), str(COMPONENT / OURS))
    assert [key for key, *_ in rows] == sorted(["train.max_epochs", "train.lr", "train.pretrained_strength",
                                                "train.reward_adaptive_mode", "train.use_z0", "eval.freq",
                                                "eval.num_batches"])
    assert all(reason != "no reason recorded" for *_, reason in rows)
    done = subprocess.run([sys.executable, "-m", "sd15fo.config", "diff", PRUNED, OURS], cwd=COMPONENT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("7 keys differ")
    assert "train.use_z0                False -> True" in done.stdout and "terminal sample" in done.stdout


def test_yaml_11_numeric_strings_are_coerced_and_overrides_are_typed(tmp_path):
    text = (COMPONENT / PRUNED).read_text().replace("lr: !!float 1e-3", "lr: 1e-3").replace("eta: 1.0", "eta: '1'")
    path = tmp_path / "c.yaml"
    path.write_text(text)
    values = config.load(str(path), ["train.reward_scale=2e5", "train.adam.beta1=0.8", "model.variant=fp16"]).values
    assert values["train"]["lr"] == 1e-3 and values["sample"]["eta"] == 1.0
    assert values["train"]["reward_scale"] == 2e5 and values["train"]["adam"]["beta1"] == 0.8
    assert values["model"]["variant"] == "fp16"


def _error(overrides, which=OURS):
    with pytest.raises(ConfigError) as error:
        config.load(which, overrides)
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("override, message", [
    ("sample.eta=0", "sample.eta=0.0 must be a finite number > 0"),
    ("sample.cfg_scale=1.0", "sample.cfg_scale=1.0 must be a finite number > 1"),
    ("train.cfg=false", "train.cfg=False is not supported: training without guidance"),
    ("train.reward_adaptive_mode=linear", "train.reward_adaptive_mode='linear' is not supported"),
    ("train.reward_adaptive_mode=3sigma", "use train.reward_adaptive_mode='sigma' with train.reward_adaptive_sigma_scale=3.0"),
    ("train.pretrained_strength=3sigma", "use train.pretrained_strength='sigma' with train.pretrained_strength_sigma_scale=3.0"),
    ("train.pretrained_strength=true", "train.pretrained_strength=True must be a number or 'sigma', not a bool"),
    ("train.reward_adaptive_sigma_scale=0", "train.reward_adaptive_sigma_scale=0.0 must be a finite number > 0"),
    ("train.pretrained_strength_sigma_scale=.inf", "train.pretrained_strength_sigma_scale=inf must be a finite number > 0"),
    ("train.gradient_accumulation_steps=30", "e.g. --set train.gradient_accumulation_steps=32"),
    ("train.timestep_fraction=0.01", "train.timestep_fraction=0.01 trains int(50 x 0.01) = 0"),
    ("train.timestep_fraction=0.3", "needs int(sample.num_steps x train.timestep_fraction) = 15 to divide"),
    ("train.lrr=1", "no config key train.lrr (did you mean train.lr?)"),
    ("model.use_lora=false", "model.use_lora=False is not supported"),
    ("mixed_precision=fp8", "mixed_precision='fp8' is not supported; allowed: no, fp32, fp16, bf16"),
    ("report_to=comet", "report_to='comet' is not supported; allowed: none, wandb, tensorboard"),
    ("reward_fn=pickScore", "reward_fn='pickScore' has no gradient"),
    ("reward_fn_kwargs.cache_dir=/x", "reward_fn_kwargs.cache_dir is not an option of hpsv2_score_diff"),
    ("per_prompt_stat_tracking={buffer_size: 16, min_count: 4}", "this trainer computes no advantages"),
    ("use_pcpo=true", "the PCPO variance is not part of residual"),
    ("prompt_fn_kwargs.split=val", "prompt_fn_kwargs.split='val' is not supported"),
    ("sample.batch_size=2.5", "sample.batch_size=2.5 must be an integer"),
    ("train.low_var_subsampling=yes please", "must be true or false"),
])
def test_bad_values_are_one_line_naming_the_key(override, message):
    assert message in _error([override])


def test_a_missing_upstream_key_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text((COMPONENT / PRUNED).read_text().replace("  reward_scale: !!float 5e5  # β\n", ""))
    with pytest.raises(ConfigError, match="train.reward_scale is missing"):
        config.load(str(path))


def test_upstream_file_without_this_implementations_keys_loads_with_defaults(tmp_path):
    text = (COMPONENT / OURS).read_text().split("# ---- this implementation's keys")[0]
    text = text.replace("  cache_z0_reward_grad: true", "  #")
    path = tmp_path / "upstream.yaml"
    path.write_text(text)
    values = config.load(str(path)).values
    assert values["parity"] is True and values["nan_policy"] == "stop" and values["wandb"]["mode"] == "auto"


def test_tiny_points_at_the_kit_and_keeps_the_algorithm():
    tiny, paper = config.load(OURS, tiny=True).values, config.load(OURS).values
    assert "sd15" in tiny["model"]["pretrained"] and "hps" in tiny["reward_fn_kwargs"]["weights"]
    assert tiny["mixed_precision"] == "no" and tiny["report_to"] == "none" and tiny["train"]["max_epochs"] == 2
    for key in ("train.pretrained_strength", "train.reward_adaptive_mode", "train.use_z0", "train.lr", "train.reward_scale",
                "sample.num_steps", "sample.cfg_scale", "train.timestep_fraction", "train.unet_reg_scale"):
        assert config.get(tiny, key) == config.get(paper, key), key


def test_check_command_prints_the_resolved_config_or_the_error():
    ok = subprocess.run([sys.executable, "-m", "sd15fo.config", "check", PRUNED, "--set", "train.lr=2e-3"],
                        cwd=COMPONENT, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and '"lr": 0.002' in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "sd15fo.config", "check", PRUNED, "--set", "sample.eta=-1"],
                         cwd=COMPONENT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and bad.stderr.strip() == "error: sample.eta=-1.0 must be a finite number > 0"
