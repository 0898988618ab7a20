"""Defaults shared by every SD3.5 run (spec §2.1); `sd3_matrix.py` layers the SD3 block, sampler, reward
preset and objective on top. Keys and values are upstream's (rsm `config/base.py`), so configs written for
upstream keep their meaning; the keys marked "ours" are additions for what upstream hard-coded.

Keys that no trainer reads (kept so upstream key names stay valid overrides) say "unused" below; setting one
to another value than its config id gives is refused at start-up (sd35zo/config_check.py, UNREAD_KEYS).
"""
import ml_collections
from ml_collections.config_dict import placeholder


def get_config():
    sample = {
        "num_steps": 40,             # SDE steps per training rollout (SD3 block sets 10)
        "eval_num_steps": 40,        # ODE steps for evaluation images
        "guidance_scale": 4.5,       # CFG scale for sampling, training and evaluation
        "train_batch_size": 1,       # default sampler: images per rollout per process
        "num_image_per_prompt": 1,   # group size of the prompt-grouped advantages
        "num_prompt_per_epoch": 1,   # global prompts per epoch (derives num_batches_per_epoch)
        "test_batch_size": 1,
        "num_batches_per_epoch": 2,  # rollouts per epoch per process (re-derived by the reward preset)
        "global_std": False,         # normalise advantages by the batch std instead of the group std
        "noise_level": 0.7,          # SDE noise scale a in sigma_t = a * sqrt(sigma / (1 - sigma))
        "sampling_mode": "default",  # "default" (full SDE trajectory) or "sde_branching"
    }
    train = {
        "batch_size": 1,              # must equal the batch the trainer uses (checked; see config_check)
        "use_8bit_adam": False,       # bitsandbytes AdamW8bit instead of torch AdamW (needs bitsandbytes)
        "learning_rate": 3e-4,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_weight_decay": 1e-4,
        "adam_epsilon": 1e-8,
        "gradient_accumulation_steps": 1,
        "max_grad_norm": 1.0,
        "num_inner_epochs": 1,
        "cfg": True,                  # the training forward uses CFG as sampling does; False = conditional only
        "adv_clip_max": 5,            # advantages are clipped to [-5, 5]
        "clip_range": 1e-4,           # PPO ratio clip / matching hinge margin eps_c
        "clip_range_lt": 1e-4,        # unused
        "clip_range_gt": 1e-4,        # unused
        "timestep_shift": 3.0,        # unused (the scheduler's own shift is used)
        "timestep_fraction": 1.0,     # T = int(num_steps * timestep_fraction) trained transitions
        "beta": 0.0,                  # KL coefficient
        "heuristic_kldenom_trick": True,
        "use_ode_kl_anchor": False,
        "lora_path": placeholder(str),  # warm-start LoRA directory; None = fresh adapter
        "ema": False,
        # ours: True = move the EMA once per optimizer step; False = upstream's cadence (once per training
        # batch in train_sd3.py, once per microbatch in train_sd3_pr.py, spec §7.3)
        "ema_once_per_step": False,
        # ours: optimizer steps between EMA updates (upstream: update_step_interval=8); the tiny config sets 1 so
        # its few steps move the EMA the checkpoints are saved from
        "ema_update_interval": 8,
        "loss_type": "ppo",
        "reweight_type": "base",
    }
    return ml_collections.ConfigDict({
        "run_name": "",               # empty: the trainer names the run by its start time
        "num_epochs": 100000,
        "resume_from": "",
        "seed": 42,
        "logdir": "logs",             # unused (runs go to save_dir/run_name)
        "save_freq": 20,
        "eval_freq": 100,
        "num_checkpoint_limit": 5,    # newest checkpoint-<n> folders kept in a run (older ones are deleted)
        "mixed_precision": "fp16",
        "allow_tf32": True,
        "use_lora": True,
        "dataset": "",                # unused: where the prompt files live (the *_prompt_file_path keys are read)
        "resolution": 768,
        "activation_checkpointing": False,
        "fsdp_optimizer_offload": False,  # unused
        "train_hdf5_path": "",
        "train_prompt_file_path": "",
        "test_hdf5_path": "",
        "test_prompt_file_path": "",
        # model: hub id or local diffusers directory; revision: the hub branch, tag or commit to load
        "pretrained": {"model": "runwayml/stable-diffusion-v1-5", "revision": "main"},
        "sample": sample,
        "train": train,
        "prompt_fn": "imagenet_animals",
        "prompt_fn_kwargs": {},       # unused
        "reward_fn": {},
        "save_dir": "",
        "per_prompt_stat_tracking": True,
        # ours: logging is optional; "auto" = online with WANDB_API_KEY set, off otherwise ("offline" on request).
        "wandb": {"mode": "auto", "project": "tempflow_grpo"},
        # ours: keyword options for shared_rewards.load_reward, one dict per reward in reward_fn.
        "reward_options": {},
        # ours: what a non-finite loss, gradient norm or LoRA weight does: "stop" the run at that step (naming
        # the last good checkpoint) or "skip" that optimizer step (counted as skipped_steps)
        "nan_policy": "stop",
        # ours: resuming refuses a checkpoint whose config differs in keys that change the math; True allows it
        "resume_ignore_config_changes": False,
        "config_id": "",              # ours: the matrix id this config was built from (set by sd3_matrix.py)
    })
