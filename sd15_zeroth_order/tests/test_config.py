"""The config (spec §2; contract §2): the presets hold upstream's keys and values, YAML 1.1 float strings are floats,
`--set` overrides, the derived budgets are spec §2.6's, and every invalid combination is one line naming the key
(with the fix where there is one) before anything loads."""
import os
from pathlib import Path

import pytest

from sd15zo import config as cfg
from sd15zo.config import ConfigError, load_config, validate

COMPONENT = Path(__file__).resolve().parents[1]
# spec §2.3: the values both presets share (upstream's YAML files)
COMMON = dict(pretrained_model="runwayml/stable-diffusion-v1-5", revision="main", variant=None,
              resume_from_checkpoint=None, run_name=None, save_freq=1, use_lora=True, eval_freq=10, eval_num_batches=4,
              eval_batch_size=8, eval_num_steps=50, reward_fn="hps_v2", algorithm="uw-sigma", const_weight=4.5,
              noise_matching_precision="bad", train_do_clip=True, train_clip_range=1e-4,
              weight_scale_factor=8.70575076181, num_prompts_per_epoch=8, learning_rate=3e-4, num_train_epochs=300,
              sample_eta=1.0, sample_cfg_scale=5.0, sample_rg_scale=1.0, sample_num_steps=50,
              train_timestep_fraction=1.0, clip_sample=False, clip_sample_range=1.0, thresholding=False,
              train_num_inner_epochs=1, train_cfg=True, train_adv_clip_max=5.0, train_max_grad_norm=1.0,
              gradient_checkpointing=False, enable_xformers_memory_efficient_attention=False, rank=16, scale_lr=False,
              adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=1e-4, adam_epsilon=1e-8, use_8bit_adam=False,
              allow_tf32=True, mixed_precision="fp16", seed=42, hub_token=None, hub_model_id=None, report_to="wandb",
              debug=False)
BASELINE = dict(sample_batch_size=8, num_generations_per_prompt=16, train_batch_size=4,
                train_gradient_accumulation_steps=16)
OURS = dict(num_generations_per_prompt=5, sampling_mode="ddim_branching", group_strategy="prompt",
            exploration_k=[4 if i % 10 == 0 else 0 for i in range(50)], collection_batch_size=8, latent_chunk_size=2,
            policy_update_row_batch_size=4, updates_per_epoch=2, use_ode_kl_anchor=True, ode_kl_anchor_beta=0.00008,
            anchor_row_max_ratio=0.10)


@pytest.mark.parametrize("trainer, own", [("grpo", BASELINE), ("grpo_pr", OURS)])
def test_presets_hold_every_upstream_key_with_upstreams_value(trainer, own):
    config = load_config(trainer)
    for key, value in {**COMMON, **own}.items():
        assert config[key] == value, key
        assert type(config[key]) is type(value), key  # !!float 1e-4 and plain 1.0 alike are floats
    assert config.prompt_file == str(COMPONENT.parent / "data" / "dancegrpo" / "prompts.txt")
    assert config.logging_dir == str(COMPONENT / "logs")
    other = OURS if trainer == "grpo" else BASELINE
    assert not (set(other) - set(COMMON) - {"num_generations_per_prompt"}) & set(config)


def test_yaml_1_1_float_strings_are_floats(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1e-4\ntrain_clip_range: '2e-4'\nsample_eta: 1\n")
    config = load_config("grpo", str(path))
    assert (config.learning_rate, config.train_clip_range, config.sample_eta) == (1e-4, 2e-4, 1.0)
    assert config.num_prompts_per_epoch == 8  # absent keys take the preset values


def test_set_overrides_read_values_as_yaml_and_reach_dict_entries(tmp_path):
    config = load_config("grpo_pr", sets=["learning_rate=1e-4", "run_name=a", "exploration_k=2",
                                          "reward_options.hps_v2.weights=/w", "reward_options.hps_v2.version=v2.0",
                                          "policy_update_row_batch_size=null"])
    assert config.learning_rate == 1e-4 and config.run_name == "a" and config.exploration_k == 2
    assert config.reward_options == {"hps_v2": {"weights": "/w", "version": "v2.0"}}
    assert config.policy_update_row_batch_size == 2 * 50  # null: latent_chunk_size x trained steps (upstream)


def test_paths_in_files_are_relative_to_the_component_and_on_the_command_line_to_the_caller(tmp_path):
    (tmp_path / "model").mkdir()
    config = load_config("grpo", sets=["prompt_file=p.txt"], model="model", output_dir="out", cwd=str(tmp_path))
    assert config.prompt_file == str(tmp_path / "p.txt") and config.logging_dir == str(tmp_path / "out")
    assert config.pretrained_model == str(tmp_path / "model")
    assert load_config("grpo", model="org/sd15", cwd=str(tmp_path)).pretrained_model == "org/sd15"  # a hub id
    path = tmp_path / "c.yaml"
    path.write_text("prompt_file: mine.txt\n")
    assert load_config("grpo", str(path)).prompt_file == str(COMPONENT / "mine.txt")


def test_budgets_are_spec_2_6s():
    b = validate(load_config("grpo"))
    assert (b.calls_per_epoch, b.train_timesteps, b.microbatches_per_epoch, b.accumulation, b.updates_per_epoch) == \
        (16, 49, 32, 16 * 49, 2)
    r = validate(load_config("grpo_pr"))
    assert (r.calls_per_epoch, r.rows_per_epoch, r.anchor_rows_per_epoch, r.anchor_rows_kept) == (5, 800, 1760, 80)
    assert (r.microbatches_per_epoch, r.accumulation, r.updates_per_epoch, r.mean_active_k) == (200, 100, 2, 4.0)


def _error(trainer, *sets):
    with pytest.raises(ConfigError) as error:
        validate(load_config(trainer, sets=list(sets)))
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("trainer, sets, expected", [
    ("grpo", ["algorithm=ppo"], "algorithm='ppo' is not supported; allowed: ddpo, logrho, vw, uw-sigma, uw-lambda"),
    ("grpo", ["const_weight=null"], "const_weight=null with algorithm=uw-sigma: uw-sigma needs the constant weight "
                                    "(--set const_weight=4.5, the preset value)"),
    ("grpo_pr", ["algorithm=uw-lambda", "const_weight=null"], "--set const_weight=0.5168997049331665"),
    ("grpo", ["algorithm=vw"], "const_weight=4.5 with algorithm=vw: vw uses the natural weight w(t), not a constant "
                               "weight: --set const_weight=null"),
    ("grpo", ["algorithm=ddpo", "const_weight=null"], "weight_scale_factor=8.70575076181 is not read by "
                                                      "algorithm=ddpo"),
    ("grpo", ["sample_eta=0"], "sample_eta=0.0 must be in (0, 1]: every sampled transition would be deterministic"),
    ("grpo", ["algorithm=logrho", "const_weight=null", "weight_scale_factor=1", "sample_eta=0"],
     "the log-probability ratio of ddpo/logrho divides by sigma = 0"),
    ("grpo_pr", ["collection_batch_size=3"], "collection_batch_size=3 does not divide the 40 roots of an epoch"),
    ("grpo_pr", ["updates_per_epoch=3"], "updates_per_epoch=3 does not divide the 200 micro-batches of an epoch (800 "
                                         "rows / policy_update_row_batch_size=4)"),
    ("grpo_pr", ["exploration_k=[4, 0]"], "exploration_k has 2 entries; it needs one per sampling step, "
                                          "sample_num_steps=50"),
    ("grpo_pr", ["exploration_k=-1"], "exploration_k=-1 must be >= 0"),
    ("grpo_pr", ["exploration_k=0"], "exploration_k branches at none of the 50 trained steps"),
    ("grpo_pr", ["sampling_mode=trajectories"], "sampling_mode='trajectories': train_grpo_pr.py samples by branching"),
    ("grpo_pr", ["group_strategy=prompts"], "group_strategy='prompts' is not supported; allowed: prompt, seed, batch"),
    ("grpo_pr", ["anchor_row_max_ratio=1.5"], "anchor_row_max_ratio=1.5 must be in [0, 1]"),
    ("grpo", ["train_batch_size=5"], "train_batch_size=5 does not divide the 128 trajectories"),
    ("grpo", ["sample_batch_size=6"], "sample_batch_size=6 does not divide"),
    ("grpo", ["train_gradient_accumulation_steps=5"], "train_gradient_accumulation_steps=5 does not divide the 32 "
                                                       "training micro-batches"),
    ("grpo", ["sample_rg_scale=2.0"], "sample_rg_scale=2.0 is not read by this trainer"),
    ("grpo", ["thresholding=true"], "thresholding=True is not read by this trainer"),
    ("grpo", ["hub_token=abc"], "hub_token is set together with report_to=wandb"),
    ("grpo", ["reward_fn=qwen_bertscore"], "reward_fn='qwen_bertscore' is not available"),
    ("grpo", ["reward_fn=hps"], "reward_fn='hps' is not supported; allowed: hps_v2"),
    ("grpo", ["reward_options.weights=/w"], "reward_options.weights does not name a reward of reward_fn='hps_v2'"),
    ("grpo", ["reward_options.hps_v2=3"], "reward_options.hps_v2=3 must be a mapping"),
    ("grpo", ["seed=null"], "seed=None must be an integer"),
    ("grpo", ["learning_rate=-1"], "learning_rate=-1.0 must be > 0"),
    ("grpo", ["rank=0"], "rank=0 must be a positive integer"),
    ("grpo", ["use_lora=yes please"], "use_lora='yes please' must be true or false"),
])
def test_invalid_configs_fail_at_load_with_one_line_naming_the_key(trainer, sets, expected):
    assert expected in _error(trainer, *sets)


def test_unknown_keys_and_keys_of_the_other_trainer_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"learnig_rate: unknown key in --set \(did you mean learning_rate\?\)"):
        load_config("grpo", sets=["learnig_rate=1"])
    with pytest.raises(ConfigError, match="exploration_k is a key of train_grpo_pr.py, not of train_grpo.py"):
        load_config("grpo", sets=["exploration_k=2"])
    with pytest.raises(ConfigError, match="sample_batch_size is a key of train_grpo.py"):
        load_config("grpo_pr", sets=["sample_batch_size=8"])
    with pytest.raises(ConfigError, match="no such file"):
        load_config("grpo", "does/not/exist.yaml")


def test_pcpo_sigma_check_names_the_steps_without_a_real_sigma(sd15_scheduler):
    from sd15zo.schedule import inference_timesteps

    def timesteps_of(n):
        return inference_timesteps(sd15_scheduler, n)

    cfg.check_sigma(load_config("grpo"), sd15_scheduler.alphas_cumprod, timesteps_of)  # the preset is fine
    config = load_config("grpo", sets=["sample_num_steps=20"])
    with pytest.raises(ConfigError, match=r"sample_num_steps=20 .* no real sigma at t = 51 .* 50-step schedule only"):
        cfg.check_sigma(config, sd15_scheduler.alphas_cumprod, timesteps_of)
    config = load_config("grpo", sets=["const_weight=0.5168997049331665"])
    with pytest.raises(ConfigError, match=r"no real sigma at t = 81, 61, 41, 21, 1"):
        cfg.check_sigma(config, sd15_scheduler.alphas_cumprod, timesteps_of)
    # the RSM trainer draws sigma at its branch steps only: 10 steps branching at 0-6 are fine (the tiny config)
    cfg.check_sigma(load_config("grpo_pr", tiny=True), sd15_scheduler.alphas_cumprod, timesteps_of)


def test_config_diff_prints_the_rsm_keys_with_reasons_and_both_budgets():
    lines = cfg.diff(os.path.join(COMPONENT, cfg.PRESETS["grpo"]), os.path.join(COMPONENT, cfg.PRESETS["grpo_pr"]))
    keys = [line.split(":")[0] for line in lines if not line.startswith("budget")]
    assert keys == ["sample_batch_size", "num_generations_per_prompt", "train_batch_size",
                    "train_gradient_accumulation_steps", "sampling_mode", "group_strategy", "exploration_k",
                    "collection_batch_size", "latent_chunk_size", "policy_update_row_batch_size", "updates_per_epoch",
                    "use_ode_kl_anchor", "ode_kl_anchor_beta", "anchor_row_max_ratio", "prompt_group_key",
                    "efficient_rollout"]
    assert all("   # " in line for line in lines if not line.startswith("budget"))
    assert any(line.startswith("num_generations_per_prompt: 16 -> 5   # sampling budget") for line in lines)
    assert any(line.startswith("budget base_grpo_pr_uwsigma_lora10.yaml (train_grpo_pr.py): calls_per_epoch=5")
               and "rows_per_epoch=800" in line for line in lines)


def test_tiny_mode_points_at_the_kit_and_keeps_two_updates_an_epoch():
    for trainer in cfg.TRAINERS:
        config = load_config(trainer, tiny=True)
        assert "sd15-" in config.pretrained_model and "hps-" in config.reward_options["hps_v2"]["weights"]
        assert config.prompt_file.endswith(os.path.join("dancegrpo", "prompts.txt")) and config.tiny
        assert config.mixed_precision == "no" and config.num_train_epochs == 2
        assert validate(config).updates_per_epoch == 2
    user = load_config("grpo", tiny=True, sets=["num_train_epochs=5", "reward_fn={hps_v2: -1.0}",
                                                "reward_options.hps_v2.version=v2.0"])  # --set wins over --tiny
    assert user.num_train_epochs == 5 and user.reward_fn == {"hps_v2": -1.0}
    assert user.reward_options["hps_v2"]["version"] == "v2.0" and "weights" in user.reward_options["hps_v2"]


def test_demo_json_runs_the_two_paper_commands_with_valid_overrides():
    import json

    demo = json.loads((COMPONENT / "demo.json").read_text())
    assert [r["name"] for r in demo["runs"]] == ["baseline", "ours"]
    for run, trainer in zip(demo["runs"], ("grpo", "grpo_pr")):
        command = [part.format(python="python", save_dir="/tmp/demo", name=run["name"], epochs=demo["epochs"])
                   for part in run["command"]]
        assert command[1] == cfg.TRAINER_SCRIPTS[trainer] and (COMPONENT / command[1]).is_file()
        assert command[3] == cfg.PRESETS[trainer] and "--tiny" in command
        sets = [command[i + 1] for i, part in enumerate(command) if part == "--set"]
        validate(load_config(trainer, command[3], sets, tiny=True, cwd=str(COMPONENT)))
