"""The component's YAML configs: load, coerce, override, validate, the tiny kit and the baseline/ours diff.

    python -m sd15fo.config check config/simple_res-nabladb_sd_hps.yaml [--set train.lr=2e-3] [--tiny]
    python -m sd15fo.config diff config/simple_res-nabladb_sd_hps.yaml config/simple_res-nabladb_sd_hps_usez0_basesnr.yaml

A config is the upstream YAML (every key of spec §1.4, same names and values) plus this implementation's keys,
each with a default so an upstream file loads unchanged. YAML 1.1 reads `1e-3` as a string: numeric strings
are coerced where the schema expects a number, and every value is type-checked. A mistake is one `ConfigError`
line naming the key and what it may be, raised before anything heavy happens; an unknown key is refused with
the nearest known name. Pure Python (importing this module does not import torch).

Paths inside a config (logging_dir, data_dir, from_file prompts, a resume checkpoint) that are relative are
relative to the component directory, wherever the command is typed; paths given on the command line (--config,
--output-dir, --model, --resume) are relative to the caller's directory.
"""
from __future__ import annotations

import copy
import difflib
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

COMPONENT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = "config/simple_res-nabladb_sd_hps_usez0_basesnr.yaml"  # upstream's default: "ours"
REQUIRED = object()


class ConfigError(ValueError):
    """A config value no run can use; the message is one line naming the key."""


def _fail(message: str):
    raise ConfigError(message)


# ------------------------------------------------------------------------------------------------ value kinds

_NUMBER = re.compile(r"^[+-]?((\d+(\.\d*)?)|(\.\d+))([eE][+-]?\d+)?$|^[+-]?(inf|infinity|nan)$", re.IGNORECASE)


def _as_float(key, value):
    if isinstance(value, bool):
        _fail(f"{key}={value!r} must be a number, not a bool")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        return float(value.strip())  # YAML 1.1 reads 1e-3 (no dot) as a string
    _fail(f"{key}={value!r} must be a number")


def _as_int(key, value):
    if isinstance(value, bool):
        _fail(f"{key}={value!r} must be an integer, not a bool")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
        return int(value.strip())
    if isinstance(value, float) and value.is_integer():
        return int(value)
    _fail(f"{key}={value!r} must be an integer")


def positive_int(key, value):
    value = _as_int(key, value)
    return value if value >= 1 else _fail(f"{key}={value!r} must be a positive integer")


def number(low=None, high=None, low_open=False, high_open=False):
    """A finite float in the interval given (None = unbounded)."""
    def check(key, value):
        value = _as_float(key, value)
        ok = math.isfinite(value) and (low is None or (value > low if low_open else value >= low))
        ok = ok and (high is None or (value < high if high_open else value <= high))
        if not ok:
            parts = ([f"{'>' if low_open else '>='} {low:g}"] if low is not None else []) + \
                    ([f"{'<' if high_open else '<='} {high:g}"] if high is not None else [])
            _fail(f"{key}={value!r} must be a finite number" + (f" {' and '.join(parts)}" if parts else ""))
        return value
    return check


def boolean(key, value):
    return value if isinstance(value, bool) else _fail(f"{key}={value!r} must be true or false")


def string(key, value):
    return value if isinstance(value, str) and value.strip() else _fail(f"{key}={value!r} must be a non-empty string")


def optional(check):
    def run(key, value):
        return None if value is None else check(key, value)
    return run


def one_of(*allowed):
    def check(key, value):
        return value if value in allowed else _fail(
            f"{key}={value!r} is not supported; allowed: {', '.join(map(str, allowed))}")
    return check


def mapping(key, value):
    if value is None:
        return {}
    return dict(value) if isinstance(value, dict) else _fail(f"{key}={value!r} must be a mapping (key: value)")


def must_be(expected, why):
    def check(key, value):
        return value if value == expected else _fail(f"{key}={value!r} is not supported: {why}")
    return check


def strength_value(key, value):
    from .choices import ModeError, parse_strength

    if isinstance(value, str) and not _NUMBER.match(value.strip()):
        try:
            return parse_strength(value)
        except ModeError as error:
            _fail(str(error))
    if isinstance(value, bool):
        _fail(f"{key}={value!r} must be a number or 'sigma', not a bool")
    value = _as_float(key, value)
    return value if math.isfinite(value) else _fail(f"{key}={value!r} must be a finite number or 'sigma'")


def reward_mode(key, value):
    from .choices import ModeError, parse_reward_mode

    try:
        return parse_reward_mode(value)
    except ModeError as error:
        _fail(str(error))


# ------------------------------------------------------------------------------------------------ the schema

REPORT_TO = ("none", "wandb", "tensorboard")
MIXED_PRECISION = ("no", "fp32", "fp16", "bf16")
WANDB_MODES = ("auto", "online", "offline", "disabled")
NAN_POLICIES = ("stop", "skip")
PROMPT_FNS = ("geneval", "from_file", "hpd_photo_painting")
DEVICES = ("auto", "cpu", "cuda")

# dotted key -> (check, default). REQUIRED = the reference indexes it directly (spec §1.4 "KeyError").
SCHEMA: dict[str, tuple[Callable, Any]] = {
    "model.pretrained": (string, REQUIRED),
    "model.revision": (string, REQUIRED),
    "model.variant": (optional(string), REQUIRED),
    "model.resume_from_checkpoint": (optional(string), REQUIRED),
    "model.use_lora": (must_be(True, "only the LoRA policy is implemented (as upstream); set it to true"), REQUIRED),
    "model.lora_rank": (positive_int, REQUIRED),
    "model.lora_alpha": (number(0, low_open=True), REQUIRED),
    "model.use_xformers": (boolean, True),
    "sample.batch_size": (positive_int, REQUIRED),
    "sample.num_batches_per_epoch": (positive_int, REQUIRED),
    "sample.eta": (number(0, low_open=True), REQUIRED),  # σ = 0 has no log-density or score (spec §9 item 7)
    "sample.cfg_scale": (number(1, low_open=True), REQUIRED),  # guidance ≤ 1 crashed upstream (§9 item 8)
    "sample.num_steps": (positive_int, REQUIRED),
    "train.max_epochs": (positive_int, REQUIRED),
    "train.batch_size": (positive_int, REQUIRED),
    "train.gradient_accumulation_steps": (positive_int, REQUIRED),
    "train.lr": (number(0, low_open=True), REQUIRED),
    "train.gradscaler_growth_interval": (positive_int, REQUIRED),
    "train.timestep_fraction": (number(0, 1, low_open=True), REQUIRED),
    "train.low_var_subsampling": (boolean, REQUIRED),
    "train.cfg": (must_be(True, "training without guidance was never implemented upstream (the latents are "
                                "doubled, the embeddings not); set it to true"), REQUIRED),
    "train.num_inner_epochs": (positive_int, REQUIRED),
    "train.pretrained_strength": (strength_value, REQUIRED),
    "train.pretrained_strength_sigma_scale": (number(0, low_open=True), 1.0),
    "train.reward_scale": (number(0, low_open=True), REQUIRED),
    "train.reward_adaptive_mode": (reward_mode, REQUIRED),
    "train.reward_adaptive_sigma_scale": (number(0, low_open=True), 1.0),
    "train.use_z0": (boolean, False),
    "train.forward_loss_scale": (number(0), REQUIRED),
    "train.unet_reg_scale": (number(0), REQUIRED),
    "train.normalize_unet_reg_by_one_minus_alpha_bar_t": (boolean, False),
    "train.gradient_checkpointing": (boolean, REQUIRED),
    "train.max_grad_norm": (number(0, low_open=True), REQUIRED),
    "train.adam.use_8bit": (boolean, REQUIRED),
    "train.adam.beta1": (number(0, 1, high_open=True), REQUIRED),
    "train.adam.beta2": (number(0, 1, high_open=True), REQUIRED),
    "train.adam.weight_decay": (number(0), REQUIRED),
    "train.adam.epsilon": (number(0, low_open=True), REQUIRED),
    "eval.freq": (positive_int, REQUIRED),
    "eval.num_batches": (positive_int, REQUIRED),
    "eval.batch_size": (positive_int, REQUIRED),
    "eval.num_steps": (positive_int, REQUIRED),
    "save_freq": (positive_int, REQUIRED),
    "logging_dir": (string, "logs"),
    "report_to": (one_of(*REPORT_TO), "none"),
    "reward_fn": (string, REQUIRED),
    "reward_fn_kwargs": (mapping, {}),
    "prompt_fn": (one_of(*PROMPT_FNS), REQUIRED),
    "prompt_fn_kwargs": (mapping, {}),
    "eval_prompt_fn_kwargs": (optional(mapping), None),
    "per_prompt_stat_tracking": (must_be(None, "this trainer computes no advantages (residual ∇-DB regresses "
                                               "scores); leave it null"), REQUIRED),
    "allow_tf32": (boolean, REQUIRED),
    "mixed_precision": (one_of(*MIXED_PRECISION), REQUIRED),
    "seed": (lambda k, v: _as_int(k, v), 42),
    "use_pcpo": (must_be(False, "the PCPO variance is not part of residual ∇-DB (upstream injects False)"), False),
    # ---- this implementation's keys (not upstream) ----
    "parity": (boolean, True),
    "train.cache_z0_reward_grad": (boolean, True),
    "eval.fixed_key": (boolean, False),
    "run_name": (optional(string), None),
    "data_dir": (string, "../data"),
    "device": (one_of(*DEVICES), "auto"),
    "num_checkpoint_limit": (optional(positive_int), None),
    "nan_policy": (one_of(*NAN_POLICIES), "stop"),
    "resume_ignore_config_changes": (boolean, False),
    "wandb.project": (string, "sd-align"),
    "wandb.entity": (optional(string), None),
    "wandb.mode": (one_of(*WANDB_MODES), "auto"),
}
# keys whose value is a mapping of free-form options (not walked into)
FREE_FORM = ("reward_fn_kwargs", "prompt_fn_kwargs", "eval_prompt_fn_kwargs", "per_prompt_stat_tracking")
PATH_KEYS = ("logging_dir", "data_dir", "model.resume_from_checkpoint")

# What parity mode keeps (spec §12): each quirk of the reference that changes numbers or files, and what
# clean mode (parity: false) does instead.
PARITY_QUIRKS = {
    "helper σ stride": "1000 // L = 19 for the 51-column timestep matrix (spec §4.6, §9 item 4); clean: T // N = 20",
    "duplicate final transition": "the last trunk's first pick may repeat step N-1 (spec §5.2, §9 item 27); clean: "
                                  "drawn among the trunk's other steps",
    "bf16 GradScaler": "bf16 runs scale the loss like fp16 (spec §2.3); clean: a scaler only for fp16",
    "conv_out file": "each checkpoint also holds the frozen conv_out weights and the LoRA under upstream's file name "
                     "(spec §5.6, §9 item 10); clean: only the diffusers LoRA and the training state",
}

# Why the paper's two configs differ (python -m sd15fo.config diff).
DIFF_REASONS = {
    "train.use_z0": "value-gradient estimator: ours uses the terminal sample, Ψ = ∇_z0 r(D(z0)), computed once per "
                    "trajectory; the baseline a one-step lookahead through x̂0_θ(x', t') (an extra UNet pass)",
    "train.pretrained_strength": "temporal weight: ours scales both transition scores by k_t = a·σ'_t, so the loss "
                                 "weighs steps by C1 ∝ σ'_t² instead of the baseline's 1",
    "train.reward_adaptive_mode": "guidance weight: ours g = β·b·σ'_t·Ψ, which with k_t = a·σ'_t makes the target "
                                  "γ = β·b/a constant in t; the baseline g = β·ᾱ_t'·Ψ",
    "train.lr": "ours trains at 4e-3, the baseline at 1e-3 (upstream configs)",
    "train.max_epochs": "upstream configs: 101 epochs for the baseline, 100 for ours",
    "eval.freq": "upstream evaluates the baseline every 25 epochs and ours only at epoch 0; the paper's curves "
                 "come from evaluating checkpoints afterwards (evaluate.py)",
    "eval.num_batches": "upstream eval budget: 64 batches per process for the baseline, 8 for ours",
}


def _split(dotted):
    return dotted.split(".")


def get(config: dict, dotted: str, default=None):
    node = config
    for part in _split(dotted):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def put(config: dict, dotted: str, value) -> None:
    parts = _split(dotted)
    node = config
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if dotted in FREE_FORM or dotted in SCHEMA:
            yield dotted, value
        elif isinstance(value, dict):
            yield from _leaves(value, dotted + ".")
        else:
            yield dotted, value


def _unknown_key(key: str) -> str:
    close = difflib.get_close_matches(key, list(SCHEMA), n=1, cutoff=0.6)
    return f"no config key {key}" + (f" (did you mean {close[0]}?)" if close else "")


# ------------------------------------------------------------------------------------------------ loading

@dataclass
class Loaded:
    """A validated config: `values` (plain nested dict, as the trainer reads it) and where it came from."""
    values: dict
    path: str
    config_id: str


def read_yaml(path: str) -> dict:
    import yaml

    if not os.path.isfile(path):
        _fail(f"--config={path!r}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as error:
        _fail(f"--config={path!r}: not valid YAML ({' '.join(str(error).split())[:200]})")
    if not isinstance(data, dict):
        _fail(f"--config={path!r}: expected a mapping of keys at the top level")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` with the value read as YAML (`train.lr=4e-3`, `model.variant=null`, `report_to=none`)."""
    import yaml

    if "=" not in text:
        _fail(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(data: dict, overrides: list) -> None:
    for text in overrides or []:
        key, value = parse_override(text)
        if key not in SCHEMA and key not in FREE_FORM and not any(key.startswith(f + ".") for f in FREE_FORM):
            _fail(_unknown_key(key) + "; check the --set key=value overrides")
        put(data, key, value)


def resolve(data: dict) -> dict:
    """Check every key and value; return a new dict holding every schema key (defaults filled in)."""
    for key, _ in _leaves(data):
        if key not in SCHEMA and key not in FREE_FORM:
            _fail(_unknown_key(key))
    values: dict = {}
    for key, (check, default) in SCHEMA.items():
        raw = get(data, key, REQUIRED)
        if raw is REQUIRED:
            if default is REQUIRED:
                _fail(f"{key} is missing: the config must set it (see config/simple_res-nabladb_sd_hps.yaml)")
            raw = copy.deepcopy(default)
        put(values, key, check(key, raw))
    cross_checks(values)
    return values


def cross_checks(values: dict) -> None:
    """What needs several keys: the batch arithmetic (every rank), the timestep subsampling, the reward."""
    from .choices import reward_options

    sample, train = values["sample"], values["train"]
    per_rank = sample["batch_size"] * sample["num_batches_per_epoch"]
    micro = train["batch_size"] * train["gradient_accumulation_steps"]
    if per_rank % train["batch_size"]:
        _fail(f"sample.batch_size x sample.num_batches_per_epoch = {per_rank} trajectories per process do not split "
              f"into micro-batches of train.batch_size={train['batch_size']}")
    if per_rank % micro:
        micro_batches = per_rank // train["batch_size"]
        wanted = train["gradient_accumulation_steps"]
        fits = min((d for d in range(1, micro_batches + 1) if micro_batches % d == 0), key=lambda d: (abs(d - wanted), d))
        _fail(f"sample.batch_size x sample.num_batches_per_epoch = {per_rank} trajectories per process are "
              f"{micro_batches} micro-batches of train.batch_size={train['batch_size']}, not a whole number of "
              f"optimizer steps of train.gradient_accumulation_steps={train['gradient_accumulation_steps']}; e.g. "
              f"--set train.gradient_accumulation_steps={fits}")
    steps, fraction = sample["num_steps"], train["timestep_fraction"]
    trunks = int(steps * fraction)
    if trunks < 1:
        _fail(f"train.timestep_fraction={fraction!r} trains int({steps} x {fraction}) = 0 of the sample.num_steps="
              f"{steps} steps; raise it to at least {1 / steps:g}")
    if train["low_var_subsampling"] and fraction < 1 and steps % trunks:
        _fail(f"train.low_var_subsampling=true needs int(sample.num_steps x train.timestep_fraction) = {trunks} "
              f"to divide sample.num_steps={steps} (equal trunks)")
    for key in ("sample.num_steps", "eval.num_steps"):
        if get(values, key) > 1000:
            _fail(f"{key}={get(values, key)} exceeds the scheduler's 1000 training timesteps")
    try:
        reward_options(values["reward_fn"], values["reward_fn_kwargs"])
    except ValueError as error:
        _fail(str(error))
    if values["prompt_fn"] == "geneval":
        for key in ("prompt_fn_kwargs", "eval_prompt_fn_kwargs"):
            kwargs = values[key] or {}
            unknown = set(kwargs) - {"split"}
            if unknown:
                _fail(f"{key}.{sorted(unknown)[0]} is not an argument of prompt_fn='geneval' (it takes split)")
            if kwargs.get("split", "train") not in ("train", "test"):
                _fail(f"{key}.split={kwargs['split']!r} is not supported; allowed: train, test")
    if values["prompt_fn"] == "from_file" and not values["prompt_fn_kwargs"].get("path"):
        _fail("prompt_fn='from_file' needs prompt_fn_kwargs.path (a text file, one prompt a line)")


def component_path(path: Optional[str]) -> Optional[str]:
    """A config path made absolute: relative ones are relative to the component directory."""
    if path is None:
        return None
    expanded = os.path.expanduser(path)
    return expanded if os.path.isabs(expanded) else os.path.normpath(os.path.join(COMPONENT_ROOT, expanded))


def caller_path(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def looks_like_path(value: str) -> bool:
    return value.startswith((".", "/", "~")) or os.path.exists(os.path.expanduser(value)) or value.count("/") > 1


def load(config_path: Optional[str] = None, overrides: Optional[list] = None, *, tiny: bool = False,
         output_dir: Optional[str] = None, model: Optional[str] = None, run_name: Optional[str] = None,
         resume: Optional[str] = None) -> Loaded:
    """Read, apply --tiny, then --set overrides and the flags, validate and resolve paths. Raises ConfigError."""
    path = caller_path(config_path) if config_path else os.path.join(COMPONENT_ROOT, DEFAULT_CONFIG)
    data = read_yaml(path)
    name = os.path.splitext(os.path.basename(path))[0]
    if tiny:  # the kit's weights for the reward the run ends up with (an override may choose another)
        peek = copy.deepcopy(data)
        apply_overrides(peek, overrides)
        apply_tiny(data, peek.get("reward_fn", "hpsv2_score_diff"))
    apply_overrides(data, overrides)
    if output_dir:
        put(data, "logging_dir", caller_path(output_dir))
    if model:
        put(data, "model.pretrained", caller_path(model) if looks_like_path(model) else model)
    if run_name:
        put(data, "run_name", run_name)
    if resume:
        put(data, "model.resume_from_checkpoint", caller_path(resume))
    values = resolve(data)
    for key in PATH_KEYS:
        put(values, key, component_path(get(values, key)))
    if values["prompt_fn"] == "from_file":
        values["prompt_fn_kwargs"]["path"] = component_path(values["prompt_fn_kwargs"]["path"])
    if looks_like_path(values["model"]["pretrained"]):
        values["model"]["pretrained"] = component_path(values["model"]["pretrained"])
    return Loaded(values, path, ("tiny:" if tiny else "") + name)


# ------------------------------------------------------------------------------------------------ tiny kit

TINY_VALUES = {
    # the same run on the tiny kit: 64 px SD1.5 in miniature, the tiny differentiable HPS, the kit's prompt
    # sets; fp32 on a CPU; per process 2 trajectories an epoch (2 batches of 1), two optimizer steps an epoch as
    # the paper (GA 1 instead of 32), each over the trajectory's K = 11 transitions of the 50 sampling steps;
    # two epochs; evaluation of 2 prompts at 10 steps.
    "mixed_precision": "no",
    "allow_tf32": False,
    "sample.batch_size": 1,
    "sample.num_batches_per_epoch": 2,
    "train.batch_size": 1,
    "train.gradient_accumulation_steps": 1,
    "train.max_epochs": 2,
    "eval.batch_size": 2,
    "eval.num_batches": 1,
    "eval.num_steps": 10,
    "report_to": "none",
    "device": "cpu",
}


def apply_tiny(data: dict, reward_fn: str = "hpsv2_score_diff") -> None:
    """Point a config at the tiny kit (rsm_testkit): model, reward weights, prompts, budget. The only place
    that knows about tiny models; the trainer sees an ordinary config."""
    from rsm_testkit import get_tiny_model, tiny_reward_options

    put(data, "model.pretrained", str(get_tiny_model("sd15")))
    put(data, "model.revision", "main")
    put(data, "model.variant", None)
    shared = {"hpsv2_score_diff": "hpsv2", "aesthetic_score_diff": "aesthetic"}.get(reward_fn)
    if shared:
        data["reward_fn_kwargs"] = dict(tiny_reward_options(shared))
    put(data, "data_dir", str(get_tiny_model("prompt_sets")))
    for key, value in TINY_VALUES.items():
        put(data, key, value)
    put(data, "logging_dir", os.path.join("logs", "tiny"))


# ------------------------------------------------------------------------------------------------ diff

def flat(values: dict) -> dict:
    return {key: value for key, value in _leaves(values)}


def diff(path_a: str, path_b: str) -> list[tuple[str, Any, Any, str]]:
    """[(key, value in a, value in b, reason)] for the keys whose resolved values differ."""
    a, b = flat(resolve(read_yaml(path_a))), flat(resolve(read_yaml(path_b)))
    return [(key, a.get(key), b.get(key), DIFF_REASONS.get(key, "no reason recorded"))
            for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m sd15fo.config", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a config (with overrides) and print it resolved")
    check.add_argument("config")
    check.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    check.add_argument("--tiny", action="store_true")
    compare = sub.add_parser("diff", help="the keys two configs set differently, each with its reason")
    compare.add_argument("a")
    compare.add_argument("b")
    args = parser.parse_args(argv)
    try:
        if args.command == "diff":
            rows = diff(caller_path(args.a), caller_path(args.b))
            width = max((len(key) for key, *_ in rows), default=0)
            print(f"{len(rows)} keys differ: {os.path.basename(args.a)} -> {os.path.basename(args.b)}")
            for key, old, new, reason in rows:
                print(f"  {key:<{width}}  {old!r} -> {new!r}\n  {'':<{width}}  # {reason}")
            return 0
        loaded = load(args.config, args.set, tiny=args.tiny)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    import json

    print(json.dumps(loaded.values, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
