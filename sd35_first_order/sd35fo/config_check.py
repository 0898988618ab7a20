"""Config validation (spec §1.3-1.7, §10 C3/C7/C8/I1): every value a run cannot use is one `ConfigError` line
naming the key, raised before any model loads. Pure Python (no torch import), so checking is instant.

    python -m sd35fo.config_check --config=config/hpsv2_geneval_ours.py [--config.<key>=<value> ...]

`budget(config)` is the per-process epoch arithmetic (spec §1.7): trajectories, micro-batches, optimizer steps,
trained timesteps K and the loss divisor A·K.
"""
from __future__ import annotations

import inspect
import math
import os
import sys
from dataclasses import asdict, dataclass

COMPONENT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_ROOT = os.path.dirname(COMPONENT_ROOT)

ETA_MODES = ("quad", "linear", "constant")
VALUE_NET_PARAMS = ("lora", "copy", "small")
MIXED_PRECISIONS = ("bf16", "fp16", "no", "fp32")
FINITE_DIFFERENCES = ("bf16", "fp32", "jvp")
NAN_POLICIES = ("stop", "skip")
WANDB_MODES = ("auto", "online", "offline", "disabled")
EVAL_DECODERS = ("taesd", "vae")
REWARD_FNS = ("hpscore", "pickscore", "imagereward", "aesthetic_score")
WANDB_KEY_PLACEHOLDER = "YOUR_WANDB_API_KEY"
# Value-net UNet ('small'): diffusers' UNet2DConditionModel groups its norms by 32 channels.
UNET_NORM_GROUPS = 32

# Kept from upstream so its override names stay valid, read by nothing (spec §10 I9): a changed value is refused.
UNREAD_KEYS = {"experiment.method": "Nabla-DB", "logging.save_json": True}
# Keys read only in some configurations: changing one where it has no effect is refused, not ignored.
VALUE_NET_KEYS = ("training.coeff_terminal", "training.detach_dir", "training.finite_differences",
                  "model.value_net_param", "quirks.value_net_negative_embeds")
SMALL_VALUE_NET_KEYS = ("model.value_layers_per_block", "model.value_channel_width")
SUBSAMPLING_KEYS = ("sampling.low_var_subsampling", "quirks.clamp_step_zero")
EVAL_KEYS = ("eval.every_epochs", "eval.prompt_fn", "eval.prompt_fn_kwargs.path", "eval.prompt_fn_kwargs.prompt_key",
             "eval.decoder")
HPD_COMBINED = ("hpd_photo_painting", "hpd_photo_anime", "hpd_photo_concept")

BOOL_KEYS = ("training.allow_tf32", "training.reward_masking", "training.use_jvp", "training.detach_dir",
             "training.quantile_clipping", "training.use_saved_rgrad_x1", "training.gradient_checkpointing",
             "model.use_value_net", "sampling.low_var_subsampling", "pretrained.autoencodertiny", "logging.use_wandb",
             "logging.save_json", "saving.resume_ignore_config_changes", "eval.enabled")


class ConfigError(ValueError):
    """A config value or input path a run cannot use; the message is one line naming the key."""


def _require(ok, message):
    if not ok:
        raise ConfigError(message)


def get(config, dotted, default=None):
    node = config
    for part in dotted.split("."):
        if part not in node:
            return default
        node = node[part]
    return node


def _int(key, value, low=1):
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= low,
             f"{key}={value!r} must be an integer >= {low}")


def _number(key, value, low=None, high=None, low_open=False, high_open=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    bounds = [f"{'>' if low_open else '>='} {low}" if low is not None else "",
              f"{'<' if high_open else '<='} {high}" if high is not None else ""]
    _require(ok, f"{key}={value!r} must be a finite number {' and '.join(b for b in bounds if b)}".rstrip())


def _one_of(key, value, allowed):
    _require(value in allowed, f"{key}={value!r} is not supported; allowed: {', '.join(map(str, allowed))}")


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def _defaults():
    import importlib.util

    path = os.path.join(COMPONENT_ROOT, "config", "default_config.py")
    spec = importlib.util.spec_from_file_location("sd35fo_default_config_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_default_configs()


def num_train_timesteps(num_steps, fraction):
    """K (spec §5.1 step 2): int(N·f), plus one slot for the terminal step when that is not N."""
    k = int(num_steps * fraction)
    return k if k == num_steps else k + 1


@dataclass(frozen=True)
class Budget:
    """One epoch on one process (spec §1.7)."""
    world_size: int
    trajectories_per_epoch: int     # B = sampling.batch_size x num_batches_per_epoch
    micro_batches_per_epoch: int    # B / training.batch_size, per inner epoch
    optimizer_steps_per_epoch: int  # micro-batches / gradient_accumulation_steps x num_inner_epochs
    train_timesteps: int            # K
    loss_divisor: int               # gradient_accumulation_steps x K
    global_trajectories_per_epoch: int

    def summary(self):
        return " ".join(f"{k}={v}" for k, v in asdict(self).items())


def budget(config, world_size=1):
    sampling, training = config.sampling, config.training
    per_process = sampling.batch_size * sampling.num_batches_per_epoch
    micro = per_process // training.batch_size
    k = num_train_timesteps(sampling.num_steps, config.model.timestep_fraction)
    return Budget(world_size, per_process, micro,
                  micro // training.gradient_accumulation_steps * training.num_inner_epochs, k,
                  training.gradient_accumulation_steps * k, per_process * world_size)


def _check_kwargs(key, function, kwargs, name):
    """`kwargs` fit `function`'s signature: no unknown names, every required argument given."""
    parameters = inspect.signature(function).parameters
    for arg in kwargs:
        _require(arg in parameters, f"{key}.{arg}: {name}() takes no argument {arg!r}; it takes "
                                    f"{', '.join(parameters) or 'none'}")
    for arg, p in parameters.items():
        _require(p.default is not inspect.Parameter.empty or arg in kwargs,
                 f"{key}.{arg} is missing: {name}() needs it")


def eval_prompt_kwargs(config):
    """The evaluation prompt function's kwargs: eval.prompt_fn_kwargs without the entries left at their default
    (the defaults exist so the keys can be overridden from the command line)."""
    defaults = {"path": "", "prompt_key": "prompt"}
    kwargs = dict(_plain(config.eval.prompt_fn_kwargs))
    return {k: v for k, v in kwargs.items() if k not in defaults or v != defaults[k]}


def _plain(value):
    return value.to_dict() if hasattr(value, "to_dict") else value


def validate(config, world_size=1):
    """Every check that needs no file and no model. Raises ConfigError."""
    from . import prompts

    training, model, sampling = config.training, config.model, config.sampling
    _require("seed" in config and isinstance(config.seed, int) and not isinstance(config.seed, bool),
             f"seed={config.get('seed')!r} must be an integer (--seed)")
    for key in BOOL_KEYS + tuple(f"quirks.{k}" for k in config.quirks):
        _require(isinstance(get(config, key), bool), f"{key}={get(config, key)!r} must be True or False")
    _number("training.lr", training.lr, 0.0, low_open=True)
    _number("training.adam_beta1", training.adam_beta1, 0.0, 1.0, high_open=True)
    _number("training.adam_beta2", training.adam_beta2, 0.0, 1.0, high_open=True)
    _number("training.adam_weight_decay", training.adam_weight_decay, 0.0)
    _number("training.adam_epsilon", training.adam_epsilon, 0.0, low_open=True)
    _number("training.max_grad_norm", training.max_grad_norm, 0.0, low_open=True)
    _int("training.num_inner_epochs", training.num_inner_epochs)
    _int("training.batch_size", training.batch_size)
    _int("training.gradient_accumulation_steps", training.gradient_accumulation_steps)
    _int("training.num_epochs", training.num_epochs)
    _one_of("training.mixed_precision", training.mixed_precision, MIXED_PRECISIONS)
    _int("training.gradscaler_growth_interval", training.gradscaler_growth_interval)
    _number("training.coeff_terminal", training.coeff_terminal, 0.0)
    _one_of("training.finite_differences", training.finite_differences, FINITE_DIFFERENCES)
    _one_of("training.nan_policy", training.nan_policy, NAN_POLICIES)
    _int("model.lora_rank", model.lora_rank)
    _number("model.reward_scale", model.reward_scale, 0.0, low_open=True)
    _number("model.timestep_fraction", model.timestep_fraction, 0.0, 1.0, low_open=True)
    _number("model.unet_reg_scale", model.unet_reg_scale, 0.0)
    _one_of("model.eta_mode", model.eta_mode, ETA_MODES)
    _one_of("model.value_net_param", model.value_net_param, VALUE_NET_PARAMS)
    _int("model.value_layers_per_block", model.value_layers_per_block)
    width = model.value_channel_width
    _require(isinstance(width, (tuple, list)) and len(width) >= 1 and all(
        isinstance(c, int) and not isinstance(c, bool) and c > 0 and c % UNET_NORM_GROUPS == 0 for c in width),
        f"model.value_channel_width={width!r} must be a tuple of positive multiples of {UNET_NORM_GROUPS} "
        "(the UNet's norm groups), e.g. (64, 128, 256, 256)")
    _int("sampling.num_steps", sampling.num_steps)
    _number("sampling.guidance_scale", sampling.guidance_scale)
    _require(sampling.guidance_scale > 1.0,
             f"sampling.guidance_scale={sampling.guidance_scale!r} must be > 1: the trainer always runs the "
             "classifier-free-guided velocity (upstream crashed mid-epoch on <= 1, spec §10 C7)")
    _int("sampling.batch_size", sampling.batch_size)
    _int("sampling.num_batches_per_epoch", sampling.num_batches_per_epoch)
    for key in ("pretrained.model", "pretrained.revision", "pretrained.autoencodertiny_model", "saving.output_dir",
                "logging.proj_name", "logging.wandb_dir"):
        value = get(config, key)
        _require(isinstance(value, str) and value.strip(), f"{key}={value!r} must be a non-empty string")
    _int("logging.save_freq", config.logging.save_freq)
    _int("logging.num_checkpoint_limit", config.logging.num_checkpoint_limit)
    _one_of("logging.wandb_mode", config.logging.wandb_mode, WANDB_MODES)
    _require(config.logging.wandb_key == WANDB_KEY_PLACEHOLDER,
             "logging.wandb_key is set in the config: export WANDB_API_KEY=<key> instead (a key in a config ends up "
             f"in config.json and wandb's run config); leave logging.wandb_key at {WANDB_KEY_PLACEHOLDER!r}")
    _require(not (config.logging.wandb_mode == "online" and not os.environ.get("WANDB_API_KEY")),
             "logging.wandb_mode='online' needs WANDB_API_KEY in the environment (or use 'offline' / 'auto')")
    for key, original in UNREAD_KEYS.items():
        _require(get(config, key) == original,
                 f"{key}={get(config, key)!r} is read by nothing (upstream key kept for compatibility); leave it at "
                 f"{original!r}")
    _require(isinstance(config.saving.resume_from, str), "saving.resume_from must be a path string")

    # the prompt function and its arguments, the reward
    _one_of("experiment.prompt_fn", config.experiment.prompt_fn, tuple(prompts.TRAIN_PROMPT_FNS))
    _check_kwargs("experiment.prompt_fn_kwargs", prompts.TRAIN_PROMPT_FNS[config.experiment.prompt_fn],
                  _plain(config.experiment.prompt_fn_kwargs), config.experiment.prompt_fn)
    _one_of("experiment.reward_fn", config.experiment.reward_fn, REWARD_FNS)
    _require(isinstance(config.experiment.data_dir, str), "experiment.data_dir must be a path string")

    # combinations upstream failed on late (spec §10 C3, C8)
    _require(not (training.use_saved_rgrad_x1 and model.use_value_net),
             "training.use_saved_rgrad_x1=True cannot be combined with model.use_value_net=True: the value net's "
             "consistency loss needs the lookahead reward gradients at every state (spec §10 C8)")
    per_process = sampling.batch_size * sampling.num_batches_per_epoch
    _require(per_process % training.batch_size == 0,
             f"training.batch_size={training.batch_size} must divide the {per_process} trajectories a process samples "
             f"per epoch (sampling.batch_size x sampling.num_batches_per_epoch); allowed: "
             f"{', '.join(map(str, _divisors(per_process)))}")
    micro = per_process // training.batch_size
    _require(micro % training.gradient_accumulation_steps == 0,
             f"training.gradient_accumulation_steps={training.gradient_accumulation_steps} must divide the {micro} "
             f"micro-batches per epoch ({per_process} trajectories / training.batch_size={training.batch_size}): "
             f"leftover gradients would be dropped (spec §10 C3); allowed: {', '.join(map(str, _divisors(micro)))}")
    if model.timestep_fraction < 1 and sampling.low_var_subsampling:
        trunks = int(sampling.num_steps * model.timestep_fraction)
        _require(trunks >= 1 and sampling.num_steps % trunks == 0,
                 f"model.timestep_fraction={model.timestep_fraction!r} gives {trunks} trunks of the "
                 f"{sampling.num_steps} steps; low-variance subsampling needs at least one trunk and trunks that "
                 f"divide sampling.num_steps (allowed fractions: "
                 f"{', '.join(f'{d}/{sampling.num_steps}' for d in _divisors(sampling.num_steps))})")
    if config.eval.enabled:
        _one_of("eval.prompt_fn", config.eval.prompt_fn, tuple(prompts.EVAL_PROMPT_FNS))
        _check_kwargs("eval.prompt_fn_kwargs", prompts.EVAL_PROMPT_FNS[config.eval.prompt_fn],
                      eval_prompt_kwargs(config), config.eval.prompt_fn)
        _int("eval.every_epochs", config.eval.every_epochs)
        _one_of("eval.decoder", config.eval.decoder, EVAL_DECODERS)
    _require(training.detach_dir,
             "training.detach_dir=False has no effect: the perturbed state x + eps d of the spatial finite difference "
             "is detached whatever this flag says (upstream, spec §5.5 step 8); leave it True")
    _require(not (model.use_value_net and training.finite_differences != "bf16"
                  and training.mixed_precision != "no"),
             f"training.finite_differences={training.finite_differences!r} needs fp32 weights "
             f"(training.mixed_precision='no'; it is {training.mixed_precision!r}): half-precision weights round the "
             "eps-perturbed inputs of its reward-gradient differences away")
    _check_conditional_keys(config)
    _int("world_size", world_size)
    return budget(config, world_size)


def _check_conditional_keys(config):
    """A key that has no effect in this configuration must keep its default (contract §2: nothing is accepted
    and ignored)."""
    defaults = _defaults()
    missing = object()

    def refuse_changed(keys, why):
        for key in keys:
            value, default = get(config, key, missing), get(defaults, key, missing)
            if value is not missing and default is not missing and _plain(value) != _plain(default):
                raise ConfigError(f"{key}={_plain(value)!r} has no effect {why}; leave it at {_plain(default)!r}")

    if not config.model.use_value_net:
        refuse_changed(VALUE_NET_KEYS + SMALL_VALUE_NET_KEYS, "without model.use_value_net=True")
    elif config.model.value_net_param != "small":
        refuse_changed(SMALL_VALUE_NET_KEYS, f"with model.value_net_param={config.model.value_net_param!r} (only 'small')")
    if config.model.timestep_fraction >= 1:
        refuse_changed(SUBSAMPLING_KEYS, "with model.timestep_fraction=1.0 (every step is trained in order)")
    if not config.eval.enabled:
        refuse_changed(EVAL_KEYS, "with eval.enabled=False")
    if not config.pretrained.autoencodertiny:
        refuse_changed(("pretrained.autoencodertiny_model",), "with pretrained.autoencodertiny=False")
    if config.training.mixed_precision != "fp16":
        refuse_changed(("training.gradscaler_growth_interval",),
                       f"with training.mixed_precision={config.training.mixed_precision!r} (the GradScaler is fp16-only)")
    if config.experiment.prompt_fn not in HPD_COMBINED:
        refuse_changed(("quirks.hpd_list_growth",), f"with experiment.prompt_fn={config.experiment.prompt_fn!r}")
    if not config.logging.use_wandb:
        refuse_changed(("logging.wandb_mode",), "with logging.use_wandb=False")


def unknown_key_message(error, argv=None):
    """`no config key training.lrr (did you mean training.lr?)` for an override of a key that does not exist."""
    import re

    text = str(error)
    names = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text.split("Did you mean")[0])
    missing = names[0] if names else text
    suggestion = re.search(r'Did you mean "([^"]+)"', text)
    dotted = missing
    for arg in argv if argv is not None else sys.argv:
        key = arg.split("=", 1)[0]
        if key.startswith("--config.") and re.search(rf"(^|\.){re.escape(missing)}(\.|$)", key[len("--config."):]):
            dotted = key[len("--config."):]
            break
    message = f"no config key {dotted}"
    if suggestion:
        message += f" (did you mean {dotted.replace(missing, suggestion.group(1), 1)}?)"
    return message + "; check the --config.<key>=<value> overrides"


def root_message(error):
    """One line for the user: the ConfigError behind `error` if there is one (ml_collections folds errors raised
    in get_config into its own), an unknown override key, else the last line of the message."""
    cause, deepest = error, None
    while cause is not None:
        if isinstance(cause, ConfigError):
            deepest = cause
        cause = cause.__cause__ or cause.__context__
    if deepest is not None:
        return str(deepest).splitlines()[0]
    if isinstance(error, (KeyError, AttributeError)):
        return unknown_key_message(error)
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "ConfigError: " in line:
            return line.split("ConfigError: ", 1)[1]
    return lines[-1] if lines else type(error).__name__
