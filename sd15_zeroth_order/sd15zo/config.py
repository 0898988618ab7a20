"""The trainers' config: upstream's flat YAML keys (spec §2.3), typed, with defaults equal to the paper presets,
validated at load with one line naming the key (contract §2), and the per-epoch budgets derived from them.

    python -m sd15zo.config diff configs/train/hpsv2_1_lora_grpo.yaml configs/train/base_grpo_pr_uwsigma_lora10.yaml
    python -m sd15zo.config check --trainer grpo_pr --config configs/train/base_grpo_pr_uwsigma_lora10.yaml \
        [--set key=value ...] [--tiny]

Loading (upstream: PyYAML safe loader, a flat namespace, no schema): a YAML 1.1 float written without a dot
(`1e-4`) is a string to PyYAML; float keys take such strings as floats. `--set key=value` values are read as
YAML (`null`, `true`, `[4, 0, 0]`, `{hps_v2: -1.0}`); `--set reward_options.hps_v2.weights=/path` sets one entry
of a dict key. Relative paths in a config file are relative to the component folder (`sd15_zeroth_order/`), so the
paper commands work from anywhere; paths given on the command line are relative to where the user is.

Keys of the other trainer are refused (`sample_batch_size` is the baseline's, `exploration_k` the RSM
trainer's), and so are keys no trainer reads when set to anything but their preset value (contract §2).
Pure Python except `validate_sigma`: importing this module does not import torch.
"""
from __future__ import annotations

import copy
import difflib
import math
import os
import sys
from dataclasses import asdict, dataclass
from typing import Any, Optional

COMPONENT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_ROOT = os.path.dirname(COMPONENT_ROOT)
TRAINERS = ("grpo", "grpo_pr")
TRAINER_SCRIPTS = {"grpo": "train_grpo.py", "grpo_pr": "train_grpo_pr.py"}
PRESETS = {"grpo": "configs/train/hpsv2_1_lora_grpo.yaml", "grpo_pr": "configs/train/base_grpo_pr_uwsigma_lora10.yaml"}
WITHDRAWN_MODELS = {"runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5"}

ALGORITHMS = ("ddpo", "logrho", "vw", "uw-sigma", "uw-lambda")
RATIO_ALGORITHMS = ("ddpo", "logrho")
# The const_weight / weight_scale_factor of each algorithm when a config leaves them out (upstream config comment:
# "null, 4.5 (uw-sigma), 0.5168997049331665 (uw-lambda)" and "1.0, 8.70575076181 (uw-sigma)").
DEFAULT_CONST_WEIGHT = {"uw-sigma": 4.5, "uw-lambda": 0.5168997049331665}
DEFAULT_WEIGHT_SCALE = {"uw-sigma": 8.70575076181}
# Upstream reward factory name -> (shared_rewards name, its options reproducing upstream's scoring, spec §5.1).
REWARD_FNS = {
    "hps_v2": ("hpsv2", {"version": "v2.1", "path": "pil", "amp_dtype": "float16"}),
    "aesthetic_score": ("aesthetic", {"path": "pil"}),
    "clipScore": ("clipscore", {}),
    "pickScore": ("pickscore", {"divisor": 1.0}),
    "jpeg_compressibility": ("jpeg_compressibility", {"divisor": 1.0}),
    "jpeg_incompressibility": ("jpeg_incompressibility", {}),
}
UNSUPPORTED_REWARDS = {"qwen_bertscore": "it needs upstream's LLaVA/BERTScore server, which this repository does not "
                                        "ship; use hps_v2 (the paper's reward) or another of: "}


class ConfigError(ValueError):
    """A config value, path or combination that cannot run; the message is one line naming the key."""


@dataclass(frozen=True)
class Key:
    default: Any
    kind: str            # str, int, float, bool, choice, opt_int, opt_float, opt_str, path, opt_path, schedule, reward, dict
    trainers: tuple = TRAINERS
    choices: tuple = ()
    doc: str = ""


B, R = ("grpo",), ("grpo_pr",)
PRESET_EXPLORATION_K = [4 if i % 10 == 0 else 0 for i in range(50)]  # k = 4 at steps 0, 10, 20, 30, 40
KEYS: dict[str, Key] = {
    # model load / save
    "pretrained_model": Key("runwayml/stable-diffusion-v1-5", "str", doc="hub id or local diffusers SD1.5 folder"),
    "revision": Key("main", "str", doc="hub revision of every subfolder"),
    "variant": Key(None, "opt_str", doc="weight variant of unet and vae (e.g. fp16)"),
    "resume_from_checkpoint": Key(None, "opt_path", doc="a checkpoint-<n> folder or a run folder to continue"),
    "run_name": Key(None, "opt_str", doc="run folder name under logging_dir; null: a timestamp"),
    "save_freq": Key(1, "int", doc="save after every save_freq-th epoch (and after the last)"),
    "use_lora": Key(True, "bool", doc="LoRA on the UNet attention (true) or the whole UNet (false)"),
    "prompt_file": Key("../data/dancegrpo/prompts.txt", "path", doc="training and eval prompts, one a line"),
    # evaluation
    "eval_freq": Key(10, "int", doc="evaluate after every eval_freq-th epoch (and after the last)"),
    "eval_num_batches": Key(4, "int"),
    "eval_batch_size": Key(None, "opt_int", doc="null: sample_batch_size (grpo) / collection_batch_size (grpo_pr)"),
    "eval_num_steps": Key(None, "opt_int", doc="null: sample_num_steps"),
    "eval_seed": Key(None, "opt_int", doc="null: seed"),
    "eval_prompt_seed": Key(None, "opt_int", doc="null: eval_seed"),
    "eval_noise_seed": Key(None, "opt_int", doc="null: eval_seed"),
    # the algorithm
    "reward_fn": Key("hps_v2", "reward", doc="an upstream reward name, or {name: weight, ...}"),
    "algorithm": Key("uw-sigma", "choice", choices=ALGORITHMS),
    "const_weight": Key("by_algorithm", "opt_float", doc="4.5 (uw-sigma), 0.5168997049331665 (uw-lambda), null"),
    "noise_matching_precision": Key("bad", "choice", choices=("best", "bad", "worst")),
    "train_do_clip": Key(True, "bool"),
    "train_clip_range": Key(1e-4, "float"),
    "weight_scale_factor": Key("by_algorithm", "float", doc="8.70575076181 (uw-sigma), 1.0 otherwise"),
    # budgets
    "sample_batch_size": Key(8, "int", B, doc="images per sampling call, per process"),
    "num_prompts_per_epoch": Key(8, "int"),
    "num_generations_per_prompt": Key({"grpo": 16, "grpo_pr": 5}, "int"),
    "train_batch_size": Key(4, "int", B, doc="trajectories per training micro-batch"),
    "train_gradient_accumulation_steps": Key(16, "int", B, doc="micro-batches per optimizer update"),
    "learning_rate": Key(3e-4, "float"),
    "num_train_epochs": Key(300, "int"),
    # sampling
    "sample_eta": Key(1.0, "float"),
    "sample_cfg_scale": Key(5.0, "float"),
    "sample_rg_scale": Key(1.0, "float", doc="uw-lambda's lambda without const_weight; not reachable (refused)"),
    "sample_num_steps": Key(50, "int"),
    # training
    "train_timestep_fraction": Key(1.0, "float"),
    "clip_sample": Key(False, "bool", doc="clamp the predicted x0 to ±clip_sample_range in every step"),
    "clip_sample_range": Key(1.0, "float"),
    "thresholding": Key(False, "bool", doc="not implemented (no trainer upstream sets it)"),
    "train_num_inner_epochs": Key(1, "int"),
    "train_cfg": Key(True, "bool"),
    "train_adv_clip_max": Key(5.0, "float"),
    "train_max_grad_norm": Key(1.0, "float"),
    "gradient_checkpointing": Key(False, "bool"),
    "enable_xformers_memory_efficient_attention": Key(False, "bool"),
    "rank": Key(16, "int", doc="LoRA rank (alpha = rank)"),
    "scale_lr": Key(False, "bool"),
    "adam_beta1": Key(0.9, "float"),
    "adam_beta2": Key(0.999, "float"),
    "adam_weight_decay": Key(1e-4, "float"),
    "adam_epsilon": Key(1e-8, "float"),
    "use_8bit_adam": Key(False, "bool"),
    "allow_tf32": Key(True, "bool"),
    "mixed_precision": Key("fp16", "choice", choices=("no", "fp16", "bf16")),
    "seed": Key(42, "int"),
    "logging_dir": Key("logs", "path", doc="run folders go to <logging_dir>/<run_name>/"),
    "hub_token": Key(None, "opt_str", doc="refused with report_to=wandb (upstream's guard)"),
    "hub_model_id": Key(None, "opt_str", doc="not read (refused when set)"),
    "report_to": Key("wandb", "choice", choices=("wandb", "none")),
    "debug": Key(False, "bool", doc="not read (refused when true)"),
    # the RSM trainer
    "sampling_mode": Key("ddim_branching", "str", R),
    "group_strategy": Key("prompt", "choice", R, choices=("prompt", "seed", "batch")),
    "exploration_k": Key(PRESET_EXPLORATION_K, "schedule", R, doc="int or one int per sampling step"),
    "collection_batch_size": Key(8, "int", R, doc="root trajectories per rollout call, per process"),
    "latent_chunk_size": Key(2, "int", R, doc="rows per UNet/VAE call in the branching sampler"),
    "policy_update_row_batch_size": Key(4, "opt_int", R, doc="rows per micro-batch; null: latent_chunk_size x T"),
    "updates_per_epoch": Key(2, "int", R, doc="optimizer updates per inner epoch"),
    "use_ode_kl_anchor": Key(True, "bool", R),
    "ode_kl_anchor_beta": Key(0.00008, "float", R),
    "anchor_row_max_ratio": Key(0.10, "float", R),
    # added by this implementation (the same in both presets)
    "reward_options": Key({}, "dict", doc="shared_rewards options per reward, e.g. {hps_v2: {weights: /path}}"),
    "reward_score_dtype": Key("float32", "choice", choices=("float32", "float16"),
                              doc="float16 rounds scores as upstream's fp16 HPS dot product did (spec §11 item 15)"),
    "reward_batch_size": Key(64, "opt_int", doc="images per reward call; null: a rollout's images at once"),
    "shared_initial_noise": Key("two_per_epoch", "choice", choices=("two_per_epoch", "none"),
                                doc="two_per_epoch: upstream's two initial latents per epoch (spec §4.4)"),
    "prompt_group_key": Key("decoded", "choice", R, choices=("decoded", "text"),
                            doc="prompt groups by the CLIP-decoded text (upstream) or the exact prompt"),
    "efficient_rollout": Key(True, "bool", R, doc="one UNet call per distinct root state; false: upstream's calls"),
    "train_approx_kl": Key("first_microbatch", "choice",
                           choices=("every_microbatch", "first_microbatch", "never"),
                           doc="reference forwards for the logged approx_kl (upstream: every_microbatch)"),
    "nan_policy": Key("stop", "choice", choices=("stop", "skip")),
    "num_checkpoint_limit": Key(5, "opt_int", doc="newest checkpoints kept; null: all"),
    "resume_ignore_config_changes": Key(False, "bool"),
    "wandb_mode": Key("auto", "choice", choices=("auto", "online", "offline", "disabled"),
                      doc="auto: online when WANDB_API_KEY is set, else off"),
    "wandb_project": Key("ddgrpo-rg-new", "str"),
    "image_log_freq": Key(10, "int", doc="write <run>/images/epoch_<n>.jpg every image_log_freq epochs"),
}
# Keys kept so upstream's YAML files load, read by no trainer here: anything but the preset value is refused.
UNREAD = {"sample_rg_scale": "it is uw-lambda's lambda when const_weight is null, and uw-lambda needs const_weight",
          "thresholding": "dynamic thresholding is not implemented (no upstream trainer turns it on)",
          "hub_model_id": "nothing is pushed to the hub", "debug": "no trainer reads it"}
PATH_KEYS = ("resume_from_checkpoint", "prompt_file", "logging_dir")
DESIGN_NOTES = {
    "sampling_mode": "the sampler: ODE root + one-step SDE branches at scheduled steps, each finished by ODE and scored",
    "exploration_k": "branches per root at each of the 50 steps: k = 4 at steps 0, 10, 20, 30, 40 (t = 981 ... 181)",
    "group_strategy": "advantages per (prompt, branch timestep) group pooled over processes, not per trajectory block",
    "collection_batch_size": "sampling budget: roots per rollout call (replaces sample_batch_size)",
    "latent_chunk_size": "compute only: rows per UNet/VAE call in the branching sampler",
    "policy_update_row_batch_size": "training unit: transition rows per micro-batch (replaces train_batch_size)",
    "updates_per_epoch": "optimizer updates per epoch; accumulation = micro-batches / updates (no carry-over)",
    "use_ode_kl_anchor": "KL to the reference at unbranched ODE root states",
    "ode_kl_anchor_beta": "weight of the ODE anchor",
    "anchor_row_max_ratio": "anchor rows kept per epoch <= 10% of the transition rows",
    "prompt_group_key": "how prompt groups are keyed (decoded CLIP text, as upstream)",
    "efficient_rollout": "compute only: one UNet call per distinct root state",
    "sample_batch_size": "sampling budget: trajectories per sampling call (the branching sampler uses collection_batch_size)",
    "train_batch_size": "training unit: trajectories per micro-batch, each over all trained timesteps",
    "train_gradient_accumulation_steps": "micro-batches per optimizer update (derived from updates_per_epoch in ours)",
    "num_generations_per_prompt": "sampling budget: 16 trajectories per prompt vs 5 roots x 20 branches per prompt",
}


class Config(dict):
    """The resolved config: a flat mapping with attribute access (upstream's namespace)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value

    def to_dict(self) -> dict:
        return copy.deepcopy(dict(self))


# ------------------------------------------------------------------------------------------------ loading

def _fail(message: str):
    raise ConfigError(message)


def read_yaml(path: str, shown: Optional[str] = None) -> dict:
    """A config file as a dict (PyYAML safe loader); one-line errors for a missing, unparsable or non-mapping file
    (naming it as `shown`, what the user typed)."""
    import yaml

    shown = shown or path
    if not os.path.isfile(path):
        _fail(f"--config {shown!r}: no such file (presets: {', '.join(PRESETS.values())})")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        _fail(f"--config {shown!r}:{line} is not valid YAML ({getattr(error, 'problem', None) or error})")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        _fail(f"--config {shown!r}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def parse_set(items) -> dict:
    """`key=value` strings -> {key: YAML-parsed value}; `a.b=v` -> {a: {b: v}} for dict keys."""
    import yaml

    out: dict = {}
    for item in items or []:
        if "=" not in item:
            _fail(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() != "" else ""
        except yaml.YAMLError:
            value = raw
        *path, last = key.split(".")
        target = out
        for part in path:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                _fail(f"--set {key}: {part} was also set as a whole")
        target[last] = value
    return out


def _merge(old: dict, new: dict) -> dict:
    """Nested dicts merged key by key (`--set reward_options.hps_v2.weights=...` keeps the other options)."""
    out = dict(old)
    for key, value in new.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _suggest(key: str, trainer: str) -> str:
    close = difflib.get_close_matches(key, [k for k, v in KEYS.items() if trainer in v.trainers], n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _coerce(key: str, value, spec: Key):
    """The value of `key` in its type; one line naming the key when it has another type."""
    kind = spec.kind
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if value is None and (kind.startswith("opt_") or (kind == "float" and spec.default == "by_algorithm")):
        return None
    if kind in ("float", "opt_float"):
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
            try:
                value = float(value)
            except ValueError:
                _fail(f"{key}={value!r} must be a number")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            _fail(f"{key}={value!r} must be a finite number")
        return float(value)
    if kind in ("int", "opt_int"):
        if not is_int:
            _fail(f"{key}={value!r} must be an integer")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            _fail(f"{key}={value!r} must be true or false")
        return value
    if kind in ("str", "opt_str", "path", "opt_path", "choice"):
        if not isinstance(value, str):
            _fail(f"{key}={value!r} must be a string")
        if kind == "choice" and value not in spec.choices:
            _fail(f"{key}={value!r} is not supported; allowed: {', '.join(spec.choices)}")
        return value
    if kind == "schedule":
        if isinstance(value, (list, tuple)):
            return list(value)
        if is_int:
            return value
        _fail(f"exploration_k={value!r} must be an int or a list of ints (one per sampling step)")
    if kind == "reward":
        if isinstance(value, (str, dict)):
            return value
        _fail(f"reward_fn={value!r} must be a reward name or a mapping of names to weights")
    if kind == "dict":
        if not isinstance(value, dict):
            _fail(f"{key}={value!r} must be a mapping")
        return value
    raise AssertionError(kind)


def _absolute(path: str, base: str) -> str:
    expanded = os.path.expanduser(path)
    return expanded if os.path.isabs(expanded) else os.path.normpath(os.path.join(base, expanded))


def looks_like_local_path(model: str) -> bool:
    expanded = os.path.expanduser(model)
    return os.path.isabs(expanded) or model.startswith((".", "~")) or model.count("/") > 1


def load_config(trainer: str, config_path: Optional[str] = None, sets=(), *, tiny: bool = False,
                model: Optional[str] = None, output_dir: Optional[str] = None, resume: Optional[str] = None,
                cwd: Optional[str] = None) -> "Config":
    """The resolved config of `trainer` from a YAML file (default: its paper preset), the tiny kit's overrides
    (`tiny`), `--set` overrides and the command-line flags, in that order. Raises ConfigError with one line."""
    if trainer not in TRAINERS:
        raise ValueError(trainer)
    cwd = cwd or os.getcwd()
    path = _absolute(config_path, cwd) if config_path else os.path.join(COMPONENT_ROOT, PRESETS[trainer])
    raw = read_yaml(path, config_path)
    sources = [(raw, COMPONENT_ROOT, f"--config {config_path or PRESETS[trainer]}")]
    if tiny:
        sources.append((tiny_overrides(trainer), COMPONENT_ROOT, "--tiny"))
    sources.append((parse_set(sets), cwd, "--set"))
    flags = {}
    if model:
        local = os.path.exists(_absolute(model, cwd)) or looks_like_local_path(model)
        flags["pretrained_model"] = _absolute(model, cwd) if local else model
    if output_dir:
        flags["logging_dir"] = _absolute(output_dir, cwd)
    if resume:
        flags["resume_from_checkpoint"] = _absolute(resume, cwd)
    sources.append((flags, cwd, "flag"))

    values: dict = {}
    for mapping, base, origin in sources:
        for key, value in mapping.items():
            if key not in KEYS:
                _fail(f"{key}: unknown key in {origin}{_suggest(key, trainer)}")
            spec = KEYS[key]
            if trainer not in spec.trainers:
                other = TRAINER_SCRIPTS["grpo" if trainer == "grpo_pr" else "grpo_pr"]
                _fail(f"{key} is a key of {other}, not of {TRAINER_SCRIPTS[trainer]} ({origin}); remove it, or "
                      f"run {other}")
            if spec.kind == "dict" and key in values and isinstance(value, dict):
                value = _merge(values[key], value)
            value = _coerce(key, value, spec)
            if spec.kind in ("path", "opt_path") and value:
                value = _absolute(value, base)
            if key == "pretrained_model" and origin != "flag" and not value.strip() == "":
                candidate = _absolute(value, base)
                if os.path.exists(candidate) or looks_like_local_path(value):
                    value = candidate
            values[key] = value
    config = Config()
    for key, spec in KEYS.items():
        if trainer not in spec.trainers:
            continue
        if key in values:
            config[key] = values[key]
        elif isinstance(spec.default, dict) and spec.kind != "dict":
            config[key] = spec.default[trainer]
        else:
            config[key] = copy.deepcopy(spec.default)
    algorithm = config.algorithm
    if config.const_weight == "by_algorithm":
        config.const_weight = DEFAULT_CONST_WEIGHT.get(algorithm)
    if config.weight_scale_factor in ("by_algorithm", None):
        config.weight_scale_factor = DEFAULT_WEIGHT_SCALE.get(algorithm, 1.0)
    if config.eval_batch_size is None:
        config.eval_batch_size = config["sample_batch_size" if trainer == "grpo" else "collection_batch_size"]
    if config.eval_num_steps is None:
        config.eval_num_steps = config.sample_num_steps
    if trainer == "grpo_pr" and config.policy_update_row_batch_size is None and isinstance(config.latent_chunk_size, int):
        config.policy_update_row_batch_size = config.latent_chunk_size * int(
            config.sample_num_steps * config.train_timestep_fraction)
    if tiny:  # the kit's weights for the rewards the run uses, under what the user gave
        from rsm_testkit import tiny_reward_options

        used = [config.reward_fn] if isinstance(config.reward_fn, str) else list(config.reward_fn)
        for name in used:
            if name in REWARD_FNS:
                kit = tiny_reward_options(REWARD_FNS[name][0])
                config.reward_options = _merge({name: kit}, config.reward_options) if kit else config.reward_options
    config["trainer"] = trainer
    config["tiny"] = bool(tiny)
    config["config_file"] = path
    return config


# ------------------------------------------------------------------------------------------------ tiny mode

# The same commands on the tiny kit: CPU, fp32, a few rows an epoch, 2 updates an epoch as the presets. uw-sigma's
# sigma with const_weight 4.5 is real at every step of the 50-step schedule only (spec §3.4), so the baseline and
# evaluation keep 50 steps; the RSM trainer samples sigma at its branch steps only and runs 10 steps, branching
# (k = 2) at the first four even steps and anchoring at the others.
TINY = {
    "grpo": dict(num_prompts_per_epoch=2, num_generations_per_prompt=2, sample_batch_size=2, train_batch_size=2,
                 train_gradient_accumulation_steps=1, train_timestep_fraction=0.1),  # 4 trained steps of 49
    "grpo_pr": dict(sample_num_steps=10, exploration_k=[2, 0, 2, 0, 2, 0, 2, 0, 0, 0], eval_num_steps=50,
                    num_prompts_per_epoch=2, num_generations_per_prompt=2, collection_batch_size=2,
                    latent_chunk_size=8, policy_update_row_batch_size=4, updates_per_epoch=2),
}


def tiny_overrides(trainer: str) -> dict:
    """What `--tiny` changes: the tiny SD1.5, HPS and prompt list of the test kit (rsm_testkit), 2 epochs, fp32 on a
    CPU, and budgets of a few rows (2 optimizer updates an epoch, as the presets) that save every epoch and evaluate
    after the last. The only place that knows about the kit; the trainers see an ordinary config."""
    try:
        from rsm_testkit import get_tiny_model
    except ImportError:
        _fail("--tiny needs the test kit: pip install -e ci (rsm_testkit), as `make install` does")
    prompts = get_tiny_model("prompt_sets") / "dancegrpo" / "prompts.txt"
    return {"pretrained_model": str(get_tiny_model("sd15")), "revision": "main", "variant": None,
            "prompt_file": str(prompts),
            "num_train_epochs": 2, "save_freq": 1, "eval_freq": 2, "eval_num_batches": 1, "eval_batch_size": 2,
            "mixed_precision": "no", "allow_tf32": False, "logging_dir": "logs/tiny",
            "image_log_freq": 1, **TINY[trainer]}


# ------------------------------------------------------------------------------------------------ validation

def normalize_schedule(exploration_k, num_steps: int) -> list[int]:
    """exploration_k as a list of N non-negative ints (an int is repeated); one line naming the fault."""
    if isinstance(exploration_k, int) and not isinstance(exploration_k, bool):
        if exploration_k < 0:
            _fail(f"exploration_k={exploration_k} must be >= 0")
        return [exploration_k] * num_steps
    if len(exploration_k) != num_steps:
        _fail(f"exploration_k has {len(exploration_k)} entries; it needs one per sampling step, "
              f"sample_num_steps={num_steps} (or one int for every step)")
    for i, k in enumerate(exploration_k):
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            _fail(f"exploration_k[{i}]={k!r} must be a non-negative integer")
    return list(exploration_k)


def _divisors(n: int) -> str:
    found = [d for d in range(1, n + 1) if n % d == 0]
    return ", ".join(map(str, found[:8])) + (", ..." if len(found) > 8 else "")


@dataclass(frozen=True)
class Budget:
    """One epoch's work on one process (spec §2.6)."""
    trainer: str
    calls_per_epoch: int            # sampling / rollout calls (sample_num_batches_per_epoch)
    images_per_call: int            # sample_batch_size / collection_batch_size (roots)
    train_timesteps: int            # T: trained steps per trajectory (grpo: ⌊(N−1)f⌋; grpo_pr: ⌊Nf⌋)
    rows_per_epoch: int             # grpo: trajectories x T micro-rows; grpo_pr: transition rows (= rewards)
    rewards_per_epoch: int          # images scored per epoch
    microbatches_per_epoch: int     # grpo: trajectory micro-batches; grpo_pr: row micro-batches M
    accumulation: int               # backward passes per optimizer update
    updates_per_epoch: int          # per inner epoch
    anchor_rows_per_epoch: int = 0  # grpo_pr raw ODE anchor rows
    anchor_rows_kept: int = 0       # grpo_pr after the anchor_row_max_ratio cap
    mean_active_k: float = 0.0      # grpo_pr k̄

    def summary(self) -> str:
        rsm_only = ("anchor_rows_per_epoch", "anchor_rows_kept", "mean_active_k")
        return " ".join(f"{k}={v}" for k, v in asdict(self).items()
                        if k != "trainer" and (self.trainer == "grpo_pr" or k not in rsm_only))


def _positive(config, key):
    if not (isinstance(config[key], int) and config[key] >= 1):
        _fail(f"{key}={config[key]!r} must be a positive integer")


def validate(config: Config) -> Budget:
    """Every check that needs no file and no model (contract §2), then the epoch's budget. Raises ConfigError."""
    trainer = config.trainer
    algorithm = config.algorithm
    for key in ("save_freq", "eval_freq", "eval_num_batches", "eval_batch_size", "eval_num_steps",
                "num_prompts_per_epoch", "num_generations_per_prompt", "num_train_epochs", "sample_num_steps",
                "train_num_inner_epochs", "rank", "image_log_freq"):
        _positive(config, key)
    if config.num_checkpoint_limit is not None:
        _positive(config, "num_checkpoint_limit")
    if config.reward_batch_size is not None:
        _positive(config, "reward_batch_size")
    for key, low_open in (("learning_rate", True), ("train_clip_range", True), ("train_adv_clip_max", True),
                          ("train_max_grad_norm", True), ("adam_epsilon", True), ("adam_weight_decay", False),
                          ("clip_sample_range", True), ("weight_scale_factor", True)):
        value = config[key]
        if not (value > 0 if low_open else value >= 0):
            _fail(f"{key}={value!r} must be {'>' if low_open else '>='} 0")
    for key in ("adam_beta1", "adam_beta2"):
        if not 0 <= config[key] < 1:
            _fail(f"{key}={config[key]!r} must be in [0, 1)")
    if config.sample_cfg_scale < 0:
        _fail(f"sample_cfg_scale={config.sample_cfg_scale!r} must be >= 0 (<= 1 turns guidance off)")
    for key, reason in UNREAD.items():
        if config[key] != KEYS[key].default:
            _fail(f"{key}={config[key]!r} is not read by this trainer ({reason}); leave it at {KEYS[key].default!r}")
    if not config.pretrained_model.strip():
        _fail("pretrained_model is empty; give a hub id or a local diffusers SD1.5 folder (--model)")
    if config.report_to == "wandb" and config.hub_token is not None:
        _fail("hub_token is set together with report_to=wandb, which would log the token; log in with "
              "`huggingface-cli login` and drop hub_token")
    if not (isinstance(config.seed, int) and not isinstance(config.seed, bool)):
        _fail(f"seed={config.seed!r} must be an integer (the prompt sampler and every generator derive from it)")
    _validate_reward(config)

    # the algorithm and its weights (spec §3.2-§3.4, §11 item 8)
    if algorithm in ("uw-sigma", "uw-lambda"):
        if config.const_weight is None:
            _fail(f"const_weight=null with algorithm={algorithm}: {algorithm} needs the constant weight "
                  f"(--set const_weight={DEFAULT_CONST_WEIGHT[algorithm]!r}, the preset value)")
        if config.const_weight <= 0:
            _fail(f"const_weight={config.const_weight!r} must be > 0")
    elif config.const_weight is not None:
        _fail(f"const_weight={config.const_weight!r} with algorithm={algorithm}: {algorithm} uses "
              f"{'the ratio of Gaussian log-probabilities' if algorithm in RATIO_ALGORITHMS else 'the natural weight w(t)'}"
              f", not a constant weight: --set const_weight=null")
    if algorithm in RATIO_ALGORITHMS:
        for key, preset in (("weight_scale_factor", 1.0), ("train_do_clip", True)):
            if config[key] != preset:
                _fail(f"{key}={config[key]!r} is not read by algorithm={algorithm} (it clips its ratio always and "
                      f"has no noise-matching weight): --set {key}={str(preset).lower()}")
    if not 0 < config.sample_eta <= 1:
        what = ("the log-probability ratio of ddpo/logrho divides by sigma = 0" if algorithm in RATIO_ALGORITHMS
                else "every sampled transition would be deterministic (sigma = 0): no exploration, no advantage")
        _fail(f"sample_eta={config.sample_eta!r} must be in (0, 1]: {what}" if config.sample_eta == 0 else
              f"sample_eta={config.sample_eta!r} must be in (0, 1] (sigma above the DDPM/PCPO value makes "
              f"sqrt(1 - a' - sigma^2) undefined)")
    if not 0 < config.train_timestep_fraction <= 1:
        _fail(f"train_timestep_fraction={config.train_timestep_fraction!r} must be in (0, 1]")
    if config.mixed_precision == "fp16" and config.use_lora is False:
        pass  # full fine-tuning keeps fp32 weights under fp16 autocast, as upstream
    if trainer == "grpo":
        return _budget_grpo(config)
    return _budget_grpo_pr(config)


def _validate_reward(config):
    reward = config.reward_fn
    names = [reward] if isinstance(reward, str) else list(reward)
    if not names:
        _fail("reward_fn is empty; give a reward name (hps_v2 for the paper)")
    for name in names:
        if name in UNSUPPORTED_REWARDS:
            _fail(f"reward_fn={name!r} is not available: {UNSUPPORTED_REWARDS[name]}{', '.join(REWARD_FNS)}")
        if name not in REWARD_FNS:
            _fail(f"reward_fn={name!r} is not supported; allowed: {', '.join(REWARD_FNS)}")
    if isinstance(reward, dict):
        for name, weight in reward.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                _fail(f"reward_fn.{name}={weight!r} must be a finite number (the weight of that reward)")
    for name, options in config.reward_options.items():
        if name not in names:
            _fail(f"reward_options.{name} does not name a reward of reward_fn={reward!r}: reward_options is "
                  "{reward name: {option: value}}, e.g. --set reward_options.hps_v2.weights=/path")
        if not isinstance(options, dict):
            _fail(f"reward_options.{name}={options!r} must be a mapping of option names to values")


def _budget_grpo(config) -> Budget:
    total = config.num_prompts_per_epoch * config.num_generations_per_prompt
    for key in ("sample_batch_size", "train_batch_size", "train_gradient_accumulation_steps"):
        _positive(config, key)
    if total % config.sample_batch_size:
        _fail(f"sample_batch_size={config.sample_batch_size} does not divide num_prompts_per_epoch x "
              f"num_generations_per_prompt = {total} (divisors: {_divisors(total)})")
    if total % config.train_batch_size:
        _fail(f"train_batch_size={config.train_batch_size} does not divide the {total} trajectories of an epoch "
              f"(divisors: {_divisors(total)})")
    micro = total // config.train_batch_size
    accumulation = config.train_gradient_accumulation_steps
    if micro % accumulation:
        _fail(f"train_gradient_accumulation_steps={accumulation} does not divide the {micro} training micro-batches "
              f"of an epoch ({total} trajectories / train_batch_size={config.train_batch_size}), so an update would "
              f"carry over into the next epoch: use a divisor ({_divisors(micro)})")
    steps = int((config.sample_num_steps - 1) * config.train_timestep_fraction)
    if steps < 1:
        _fail(f"train_timestep_fraction={config.train_timestep_fraction} x (sample_num_steps - 1) = "
              f"{(config.sample_num_steps - 1) * config.train_timestep_fraction:g} trains no step (needs >= 1)")
    return Budget("grpo", total // config.sample_batch_size, config.sample_batch_size, steps, total * steps, total,
                  micro, accumulation * steps, micro // accumulation)


def training_schedule(config) -> list[int]:
    schedule = normalize_schedule(config.exploration_k, config.sample_num_steps)
    return schedule[:int(config.sample_num_steps * config.train_timestep_fraction)]


def _budget_grpo_pr(config) -> Budget:
    if str(config.sampling_mode).lower() != "ddim_branching":
        _fail(f"sampling_mode={config.sampling_mode!r}: train_grpo_pr.py samples by branching only "
              "(sampling_mode: ddim_branching)")
    for key in ("collection_batch_size", "latent_chunk_size", "policy_update_row_batch_size", "updates_per_epoch"):
        _positive(config, key)
    if config.use_ode_kl_anchor:
        if config.ode_kl_anchor_beta < 0:
            _fail(f"ode_kl_anchor_beta={config.ode_kl_anchor_beta!r} must be >= 0")
        if not 0 <= config.anchor_row_max_ratio <= 1:
            _fail(f"anchor_row_max_ratio={config.anchor_row_max_ratio!r} must be in [0, 1]")
    n = config.sample_num_steps
    full = normalize_schedule(config.exploration_k, n)
    steps = int(n * config.train_timestep_fraction)
    if steps < 1:
        _fail(f"train_timestep_fraction={config.train_timestep_fraction} x sample_num_steps trains no step")
    schedule = full[:steps]
    if sum(schedule) == 0:
        _fail(f"exploration_k branches at none of the {steps} trained steps (every k is 0 there); give at least one "
              "k > 0")
    total = config.num_prompts_per_epoch * config.num_generations_per_prompt
    calls_key = "collection_batch_size"
    if total % config.collection_batch_size:
        _fail(f"{calls_key}={config.collection_batch_size} does not divide the {total} roots of an epoch "
              f"(num_prompts_per_epoch x num_generations_per_prompt; divisors: {_divisors(total)})")
    calls = total // config.collection_batch_size
    rows = calls * config.collection_batch_size * sum(schedule)
    zero_nonterminal = sum(1 for i, k in enumerate(schedule) if k == 0 and i < n - 1)
    anchors = calls * config.collection_batch_size * zero_nonterminal if config.use_ode_kl_anchor else 0
    per = config.policy_update_row_batch_size
    micro = -(-rows // per)
    updates = config.updates_per_epoch
    if micro % updates:
        _fail(f"updates_per_epoch={updates} does not divide the {micro} micro-batches of an epoch ({rows} rows / "
              f"policy_update_row_batch_size={per}), so an update would carry over into the next epoch "
              f"(no-carry invariant): use a divisor ({_divisors(micro)})")
    kept = min(anchors, anchor_target(rows, anchors, config.anchor_row_max_ratio)) if anchors else 0
    active = [k for k in schedule if k > 0]
    return Budget("grpo_pr", calls, config.collection_batch_size, steps, rows, rows, micro, micro // updates, updates,
                  anchors, kept, sum(active) / len(active))


def anchor_target(num_rows: int, raw_anchor_rows: int, max_ratio: float) -> int:
    """How many ODE anchor rows an epoch keeps: ⌊rows × anchor_row_max_ratio⌋, raised to 1 when the ratio is > 0
    and there are anchor rows (spec §7.2 item 12)."""
    target = int(num_rows * max_ratio)
    if max_ratio > 0.0 and raw_anchor_rows > 0 and target < 1:
        target = 1
    return target


def check_sigma(config, alphas_cumprod, timesteps_of) -> None:
    """The sampler's σ (and c2 = √(1 − a' − σ²)) are real and positive at every stochastic step the run takes (the
    baseline's and evaluation's every step, the RSM trainer's branch steps); else one line naming the timesteps.
    PCPO's σ with const_weight 4.5 is real at every step only on the 50-step SD1.5 schedule: with fewer steps the
    square root goes negative at the second-to-last step (spec §3.4). `timesteps_of(n)` gives the scheduler's n
    inference timesteps."""
    import torch

    from . import schedule as sched

    runs = [(config.eval_num_steps, None, "eval_num_steps")]
    if config.trainer == "grpo":
        runs.append((config.sample_num_steps, None, "sample_num_steps"))
    else:
        branch = [i for i, k in enumerate(normalize_schedule(config.exploration_k, config.sample_num_steps)) if k > 0]
        runs.append((config.sample_num_steps, branch, "sample_num_steps"))
    for n, steps, key in runs:
        t = timesteps_of(n)
        t = t if steps is None else t[steps]
        sigma = sched.step_sigma(alphas_cumprod.double(), t, n, config.sample_eta, config.algorithm,
                                 config.const_weight)
        a, a_prev = sched.step_alphas(alphas_cumprod.double(), t, n)
        bad = t[~(torch.isfinite(sigma) & torch.isfinite(sched.c2(a_prev, sigma)) & (sigma > 0))]
        if bad.numel():
            shown = ", ".join(str(int(v)) for v in bad[-5:])
            fix = ("uw-sigma with const_weight 4.5 is defined at every step of the 50-step schedule only (the preset: "
                   "sample_num_steps = eval_num_steps = 50)" if config.algorithm == "uw-sigma" else
                   "lower sample_eta")
            _fail(f"{key}={n} with algorithm={config.algorithm}, const_weight={config.const_weight!r}, sample_eta="
                  f"{config.sample_eta!r} gives no real sigma at t = {shown} (the square root in the sampler's sigma "
                  f"is negative there, spec §3.4): {fix}")


# ------------------------------------------------------------------------------------------------ diff / check

def diff(path_a: str, path_b: str) -> list[str]:
    """Lines `key: a -> b  # why` for every key that differs between two config files (keys absent from one
    side shown as <absent>), then the derived sampling budgets of both."""
    a, b = read_yaml(path_a), read_yaml(path_b)
    lines = []
    for key in [k for k in KEYS if k in a or k in b] + sorted((set(a) | set(b)) - set(KEYS)):
        left, right = a.get(key, "<absent>"), b.get(key, "<absent>")
        spec = KEYS.get(key)
        if spec is not None and spec.kind in ("float", "opt_float") and isinstance(left, str) and left != "<absent>":
            left = float(left)
        if spec is not None and spec.kind in ("float", "opt_float") and isinstance(right, str) and right != "<absent>":
            right = float(right)
        if left != right:
            note = DESIGN_NOTES.get(key, "")
            lines.append(f"{key}: {_short(left)} -> {_short(right)}" + (f"   # {note}" if note else ""))
    for path in (path_a, path_b):
        trainer = "grpo_pr" if "sampling_mode" in read_yaml(path) else "grpo"
        try:
            budget = validate(load_config(trainer, path))
            lines.append(f"budget {os.path.basename(path)} ({TRAINER_SCRIPTS[trainer]}): {budget.summary()}")
        except ConfigError as error:
            lines.append(f"budget {os.path.basename(path)}: cannot run: {error}")
    return lines


def _short(value) -> str:
    text = repr(value)
    if isinstance(value, list) and len(value) > 8:
        nonzero = [f"{i}:{v}" for i, v in enumerate(value) if v]
        text = f"[{len(value)} entries; nonzero at {', '.join(nonzero)}]"
    return text


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m sd15zo.config", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("diff", help="keys that differ between two config files, each with its reason")
    d.add_argument("a", nargs="?", default=os.path.join(COMPONENT_ROOT, PRESETS["grpo"]))
    d.add_argument("b", nargs="?", default=os.path.join(COMPONENT_ROOT, PRESETS["grpo_pr"]))
    c = sub.add_parser("check", help="load and validate a config as a trainer would; print its budget")
    c.add_argument("--trainer", choices=TRAINERS, required=True)
    c.add_argument("--config", default=None)
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    c.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "diff":
            print("\n".join(diff(args.a, args.b)))
            return 0
        config = load_config(args.trainer, args.config, args.set, tiny=args.tiny)
        print(f"budget: {validate(config).summary()}")
        return 0
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
