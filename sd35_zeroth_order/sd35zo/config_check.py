"""Config validation and the per-epoch budgets derived from the actual world size (spec §2.5, §2.7, §4.6, §7.9).

A reward preset fixes the *global* work per epoch (prompts x images per prompt); how many rollouts each
process runs, how many rows it trains on, how they pack into microbatches and how many microbatches one
optimizer step accumulates all follow from the number of processes. Upstream divided by a GPU count stored
in the preset whatever `--num-processes` said (spec §7.10.6); here the division uses the real world size,
so 1 GPU runs the 4-GPU recipe with 4x the accumulation (the same rows per optimizer step; see
`derive_budgets`).

Every failure is one line naming the key and what it may be, raised as `ConfigError` at load time, before
any model is built. Pure Python: importing this module does not import torch.

    WORLD_SIZE=4 python -m sd35zo.config_check --config config/sd3_matrix.py:<id> [--config.key=value ...]

That command (which the launcher runs before it starts any process) also checks the files, the model and the
run folder the trainer will use: `--paths-warn` reports a problem there without failing (the launcher's
--dry-run), `--skip-run-folder` leaves the run folder to the first node of a multi-node job.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import asdict, dataclass

COMPONENT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SAMPLING_MODES = ("default", "sde_branching")
LOSS_TYPES = ("ppo", "matching")
REWEIGHT_TYPES = ("base", "tempflow_reweight", "pcpo_reweight", "grpo_guard", "fair_clip", "fair_clip2")
PPO_REWEIGHT_TYPES = REWEIGHT_TYPES[:-1]  # the PPO ratio has no fair_clip2 form (upstream raises mid-epoch)
GROUP_STRATEGIES = ("seed", "prompt", "batch")
PROMPT_FNS = ("general_ocr", "geneval")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
WANDB_MODES = ("auto", "online", "offline", "disabled")
REWARD_NAMES = ("geneval", "ocr", "pickscore", "deqa", "imagereward", "qwenvl", "aesthetic",
                "jpeg_compressibility", "unifiedreward")
PATH_KEYS = ("train_hdf5_path", "train_prompt_file_path", "test_hdf5_path", "test_prompt_file_path")
DEFAULT_UPDATES_PER_EPOCH = 2  # the default trainer splits an epoch's batches into 2 optimizer steps


class ConfigError(ValueError):
    """A config value that no trainer can run; the message is one line naming the key."""


def _require(ok, message):
    if not ok:
        raise ConfigError(message)


def _one_of(key, value, allowed):
    _require(value in allowed, f"{key}={value!r} is not supported; allowed: {', '.join(map(str, allowed))}")


def _positive_int(key, value):
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
             f"{key}={value!r} must be a positive integer")


def _number(key, value, low=None, high=None, low_open=False, high_open=True):
    """A finite real in [low, high) (or (low, ...) with low_open); bounds None are unbounded."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
    hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
    _require(ok, f"{key}={value!r} must be a finite number {' and '.join(x for x in (lo, hi) if x)}".rstrip())


def _boolean(key, value):
    _require(isinstance(value, bool), f"{key}={value!r} must be True or False")


# Keys kept from upstream's config so its override names stay valid, but read by no trainer here (spec
# §7.10.8): a value other than the one its config id gives is refused instead of being silently ignored.
UNREAD_KEYS = ("logdir", "dataset", "fsdp_optimizer_offload", "prompt_fn_kwargs", "train.clip_range_lt",
               "train.clip_range_gt", "train.timestep_shift", "sample.batch_size", "sample.branch_batch_size",
               "sample.same_latent")
UNREAD_BY_BRANCH = ("per_prompt_stat_tracking", "train.gradient_accumulation_steps")
# Keys the budget derivation writes from the number of processes; an override would be overwritten.
DERIVED_KEYS = {"world_size": "the number of processes the run starts",
                "sample.num_batches_per_epoch": "sample.num_prompt_per_epoch x sample.num_image_per_prompt / "
                                                "(images per rollout x processes)"}
DERIVED_BY_DEFAULT = {"train.gradient_accumulation_steps": "sample.num_batches_per_epoch / 2 (two optimizer "
                                                           "steps an epoch)"}
BOOL_KEYS = ("allow_tf32", "use_lora", "activation_checkpointing", "per_prompt_stat_tracking",
             "resume_ignore_config_changes", "sample.global_std", "train.use_8bit_adam", "train.cfg",
             "train.heuristic_kldenom_trick", "train.use_ode_kl_anchor", "train.ema", "train.ema_once_per_step")
NAN_POLICIES = ("stop", "skip")


def is_branch(config):
    return config.sample.sampling_mode == "sde_branching"


def train_steps(config):
    """T: transitions trained per trajectory, int(num_steps * timestep_fraction) (9 for 10 steps x 0.99)."""
    return int(config.sample.num_steps * config.train.timestep_fraction)


def normalize_exploration_schedule(exploration_k, num_steps):
    """Number of SDE branches k_i per transition i = 0..N-2, as a list of length N - 1 (spec §3.5).

    An int k >= 1 is repeated; a list of N - 1 entries is used as is; a list of N entries (upstream's
    profile format, one per sampling step) drops its last entry: the step to sigma = 0 has no transition
    after it to finish a branch by ODE. Torch-free, so the launcher can check a config in a blink.
    """
    _require(isinstance(num_steps, int) and not isinstance(num_steps, bool) and num_steps >= 2,
             f"sample.num_steps must be an integer >= 2 so a branch has a transition, got {num_steps!r}")
    if isinstance(exploration_k, int) and not isinstance(exploration_k, bool):
        _require(exploration_k >= 1, f"sample.exploration_k as an int must be >= 1, got {exploration_k}")
        return [exploration_k] * (num_steps - 1)
    _require(isinstance(exploration_k, (list, tuple)),
             f"sample.exploration_k must be an int or a list of ints, got {type(exploration_k).__name__}")
    _require(len(exploration_k) in (num_steps, num_steps - 1),
             f"sample.exploration_k has {len(exploration_k)} entries; allowed: {num_steps} (one per step, last "
             f"dropped) or {num_steps - 1} (one per transition) as the list length")
    schedule = list(exploration_k[:num_steps - 1])
    for i, k in enumerate(schedule):
        _require(isinstance(k, int) and not isinstance(k, bool) and k >= 0,
                 f"sample.exploration_k[{i}] must be a non-negative integer, got {k!r}")
    return schedule


def training_schedule(config):
    """The branch counts of the T trained transitions."""
    return normalize_exploration_schedule(config.sample.exploration_k, config.sample.num_steps)[:train_steps(config)]


def validate(config):
    """Checks that do not depend on the world size. Raises ConfigError."""
    sample, train = config.sample, config.train
    _one_of("sample.sampling_mode", sample.sampling_mode, SAMPLING_MODES)
    _one_of("train.loss_type", train.loss_type, LOSS_TYPES)
    _one_of("train.reweight_type", train.reweight_type, REWEIGHT_TYPES)
    if train.loss_type == "ppo":
        _require(train.reweight_type in PPO_REWEIGHT_TYPES,
                 f"train.reweight_type={train.reweight_type!r} is defined only for train.loss_type='matching' "
                 f"(--reweight fairclip2 needs --loss matching); with ppo allowed: {', '.join(PPO_REWEIGHT_TYPES)}")
    _one_of("mixed_precision", config.mixed_precision, MIXED_PRECISIONS)
    _one_of("prompt_fn", config.prompt_fn, PROMPT_FNS)
    _one_of("wandb.mode", config.wandb.mode, WANDB_MODES)
    for key in PATH_KEYS:
        _require(bool(config[key]), f"{key} is empty; set it to a file path")
    _require(len(config.reward_fn) > 0, "reward_fn is empty; give at least one reward name -> weight")
    for name in config.reward_fn:
        _one_of("reward_fn", name, REWARD_NAMES)
    _positive_int("sample.num_steps", sample.num_steps)
    _positive_int("sample.eval_num_steps", sample.eval_num_steps)
    _require(0.0 < train.timestep_fraction <= 1.0 and train_steps(config) >= 1,
             f"train.timestep_fraction={train.timestep_fraction!r} must be in (0, 1] and train at least one of "
             f"the {sample.num_steps} steps")
    _positive_int("sample.num_prompt_per_epoch", sample.num_prompt_per_epoch)
    _positive_int("sample.num_image_per_prompt", sample.num_image_per_prompt)
    _positive_int("sample.test_batch_size", sample.test_batch_size)
    _positive_int("train.num_inner_epochs", train.num_inner_epochs)
    _positive_int("num_epochs", config.num_epochs)
    _positive_int("save_freq", config.save_freq)
    _positive_int("eval_freq", config.eval_freq)
    _positive_int("resolution", config.resolution)
    _require(config.resolution % 16 == 0, f"resolution={config.resolution!r} must be a multiple of 16 "
             "(VAE factor 8 x transformer patch 2)")
    _require(isinstance(config.seed, int) and not isinstance(config.seed, bool), f"seed={config.seed!r} must be an integer")
    for key in BOOL_KEYS:
        _boolean(key, _get(config, key))
    _number("train.learning_rate", train.learning_rate, 0.0, low_open=True)
    _number("train.adam_beta1", train.adam_beta1, 0.0, 1.0)
    _number("train.adam_beta2", train.adam_beta2, 0.0, 1.0)
    _number("train.adam_epsilon", train.adam_epsilon, 0.0, low_open=True)
    _number("train.adam_weight_decay", train.adam_weight_decay, 0.0)
    _number("train.max_grad_norm", train.max_grad_norm, 0.0, low_open=True)
    _number("train.clip_range", train.clip_range, 0.0, low_open=True)
    _number("train.adv_clip_max", train.adv_clip_max, 0.0, low_open=True)
    _number("train.beta", train.beta, 0.0)
    _number("sample.noise_level", sample.noise_level, 0.0, low_open=True)  # sigma_t = 0 has no log-probability
    _number("sample.guidance_scale", sample.guidance_scale, 0.0, low_open=True)
    _positive_int("train.ema_update_interval", train.ema_update_interval)
    _positive_int("num_checkpoint_limit", config.num_checkpoint_limit)
    _one_of("nan_policy", config.nan_policy, NAN_POLICIES)
    _require(isinstance(config.pretrained.model, str) and config.pretrained.model.strip(),
             "pretrained.model is empty; give a hub id or a local diffusers directory (--model)")
    _require(isinstance(config.pretrained.revision, str) and config.pretrained.revision.strip(),
             f"pretrained.revision={config.pretrained.revision!r} must be a hub branch, tag or commit (default 'main')")
    if not is_branch(config):
        _positive_int("sample.train_batch_size", sample.get("train_batch_size"))
        return
    _one_of("sample.group_strategy", sample.get("group_strategy"), GROUP_STRATEGIES)
    _positive_int("sample.collection_batch_size", sample.get("collection_batch_size"))
    _positive_int("latent_chunk_size", config.get("latent_chunk_size"))
    _positive_int("train.updates_per_epoch", train.get("updates_per_epoch"))
    _require(sample.get("exploration_k") is not None, "sample.exploration_k is missing; the branch sampler needs it")
    _require(any(k > 0 for k in training_schedule(config)),
             f"sample.exploration_k={list(sample.exploration_k)} branches at none of the {train_steps(config)} "
             "trained transitions; give at least one k > 0")


@dataclass(frozen=True)
class RolloutBudget:
    world_size: int
    images_per_epoch: int       # global trajectories (prompts x images per prompt)
    images_per_rollout: int     # per process: sample.train_batch_size (default) or collection_batch_size B
    rollouts_per_epoch: int     # per process: sample.num_batches_per_epoch


def rollout_budget(config, world_size):
    """Rollouts per process per epoch = global images / (images per rollout x processes); must divide."""
    _positive_int("world_size", world_size)
    sample = config.sample
    per_rollout = sample.collection_batch_size if is_branch(config) else sample.train_batch_size
    per_rollout_key = "sample.collection_batch_size" if is_branch(config) else "sample.train_batch_size"
    total = sample.num_prompt_per_epoch * sample.num_image_per_prompt
    _require(total % (per_rollout * world_size) == 0,
             f"sample.num_prompt_per_epoch x sample.num_image_per_prompt = {total} images per epoch do not split "
             f"into rollouts of {per_rollout} ({per_rollout_key}) on {world_size} processes")
    return RolloutBudget(world_size, total, per_rollout, total // (per_rollout * world_size))


@dataclass(frozen=True)
class Budget:
    """One epoch's work on one process (global where the name says so)."""
    world_size: int
    rollouts_per_epoch: int          # sample.num_batches_per_epoch
    images_per_rollout: int
    images_per_epoch_global: int
    train_steps: int                 # T
    rows_per_epoch: int              # trained transition rows (branch: one per branch; default: sample x step)
    anchor_rows_per_epoch: int       # ODE-backbone KL anchor rows (branch with use_ode_kl_anchor)
    microbatch_rows: int             # rows per backward pass: U = latent_chunk_size x T, or train_batch_size
    microbatches_per_epoch: int      # backward passes per inner epoch
    padding_rows: int                # masked copies that fill the last microbatch (branch)
    gradient_accumulation: int       # backward passes per optimizer step
    updates_per_epoch: int           # optimizer steps per inner epoch
    optimizer_steps_total: int       # over num_epochs x num_inner_epochs

    def summary(self):
        return " ".join(f"{key}={value}" for key, value in asdict(self).items())


def working_world_sizes(config, candidates=range(1, 9)):
    """The world sizes among `candidates` on which an epoch of `config` splits into whole optimizer steps."""
    ok = []
    for world_size in candidates:
        try:
            _split_epoch(config, world_size)
        except ConfigError:
            continue
        ok.append(world_size)
    return ok


def derive_budgets(config, world_size):
    """The epoch arithmetic of spec §1.5 / §4.6 / §4.7 for `world_size` processes. Raises ConfigError when an
    epoch cannot be split into whole optimizer steps (upstream's "no-carry" rule: no microbatch is carried
    over to the next update or the next epoch); the message lists the world sizes that would work.

    Branch trainer: rows = rollouts x B x sum(k_i > 0); microbatches = ceil(rows / (L x T)) (the last one
    padded with masked rows); accumulation = microbatches / train.updates_per_epoch, which must divide.
    Default trainer: rollouts must be even (2 optimizer steps per epoch, each accumulating half the
    rollouts, each rollout contributing one backward pass per trained step).

    Single-GPU preset: the paper run has 5760 rows per epoch globally: 4 processes x 14 microbatches of 108
    rows, 7 per optimizer step; on 1 process 54 microbatches, 27 per step. Both take 2 optimizer steps per
    epoch over the same 2880 rows each (only the padding differs: 72 masked rows on each of 4 processes vs
    72 on one), so `--num-processes 1` is the same effective batch by accumulation.
    """
    try:
        return _split_epoch(config, world_size)
    except ConfigError as error:
        works = working_world_sizes(config)
        raise ConfigError(f"{error}; world sizes that work: {', '.join(map(str, works)) or 'none up to 8'}") from None


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def _split_fixes(rows, steps, chunk, updates):
    """The overrides that make `rows` split into whole optimizer steps: the nearest updates_per_epoch, and the
    largest smaller latent_chunk_size that keeps `updates` steps (the same rows per step, smaller microbatches)."""
    micro = math.ceil(rows / (chunk * steps))
    nearest = min((d for d in _divisors(micro) if d > 1), key=lambda d: (abs(d - updates), d), default=1)
    fixes = [f"--config.train.updates_per_epoch={nearest} ({nearest} optimizer steps an epoch)"]
    smaller = next((c for c in range(chunk - 1, 0, -1) if math.ceil(rows / (c * steps)) % updates == 0), None)
    if smaller is not None:
        fixes.append(f"--config.latent_chunk_size={smaller} (keeps {updates} steps an epoch)")
    return "; to run on this many processes pass " + " or ".join(fixes)


def _split_epoch(config, world_size):
    rollout = rollout_budget(config, world_size)
    steps = train_steps(config)
    epochs = config.num_epochs * config.train.num_inner_epochs
    if not is_branch(config):
        rollouts = rollout.rollouts_per_epoch
        _require(rollouts % DEFAULT_UPDATES_PER_EPOCH == 0,
                 f"sample.num_batches_per_epoch={rollouts} (= {rollout.images_per_epoch} images / "
                 f"({rollout.images_per_rollout} sample.train_batch_size x {world_size} processes)) must be even "
                 f"for the default trainer's 2 updates per epoch")
        micro = rollouts * steps  # one backward pass per (rollout, trained step)
        return Budget(world_size, rollouts, rollout.images_per_rollout, rollout.images_per_epoch, steps,
                      rows_per_epoch=rollouts * rollout.images_per_rollout * steps, anchor_rows_per_epoch=0,
                      microbatch_rows=rollout.images_per_rollout, microbatches_per_epoch=micro, padding_rows=0,
                      gradient_accumulation=micro // DEFAULT_UPDATES_PER_EPOCH,
                      updates_per_epoch=DEFAULT_UPDATES_PER_EPOCH,
                      optimizer_steps_total=DEFAULT_UPDATES_PER_EPOCH * epochs)

    schedule = training_schedule(config)
    rollouts, batch = rollout.rollouts_per_epoch, rollout.images_per_rollout
    # a step with k > 0 adds k branch rows per trajectory; a step with k = 0 adds none, and with
    # use_ode_kl_anchor one KL-anchor row on the ODE backbone instead
    rows = rollouts * batch * sum(schedule)
    anchors = rollouts * batch * schedule.count(0) if config.train.use_ode_kl_anchor else 0
    unit = config.latent_chunk_size * steps
    micro = math.ceil(rows / unit)
    updates = config.train.updates_per_epoch
    _require(micro % updates == 0,
             f"train.updates_per_epoch={updates} must divide the {micro} microbatches per epoch (ceil({rows} rows / "
             f"{unit} = latent_chunk_size x T)) on {world_size} processes; allowed train.updates_per_epoch: "
             f"{', '.join(map(str, _divisors(micro)))}{_split_fixes(rows, steps, config.latent_chunk_size, updates)}")
    return Budget(world_size, rollouts, batch, rollout.images_per_epoch, steps, rows_per_epoch=rows,
                  anchor_rows_per_epoch=anchors, microbatch_rows=unit, microbatches_per_epoch=micro,
                  padding_rows=micro * unit - rows, gradient_accumulation=micro // updates,
                  updates_per_epoch=updates, optimizer_steps_total=updates * epochs)


def write_derived_keys(config, world_size):
    """Write the keys that follow from the budget for `world_size` processes, without judging them:
    `world_size`, `sample.num_batches_per_epoch` and, for the default trainer, the optimizer's
    `train.gradient_accumulation_steps` (in rollouts; accelerate multiplies it by T). `get_config` calls
    this so that a config that cannot run yet can still be fixed by command-line overrides; `finalize`
    judges the result."""
    sample = config.sample
    per_rollout = sample.collection_batch_size if is_branch(config) else sample.train_batch_size
    rollouts = max(sample.num_prompt_per_epoch * sample.num_image_per_prompt // (per_rollout * world_size), 1)
    config.world_size = world_size
    sample.num_batches_per_epoch = rollouts
    if not is_branch(config):
        config.train.gradient_accumulation_steps = max(rollouts // DEFAULT_UPDATES_PER_EPOCH, 1)


def finalize(config, world_size):
    """Validate, refuse values of keys no trainer reads, check that an epoch splits into whole optimizer steps
    on `world_size` processes, write the derived keys and return the Budget. Raises ConfigError.

    Trainers call this once, after command-line overrides and before building any model, with the real
    number of processes; `scripts/single_node/run_sd3.sh` calls it (through `main`) before launching.
    """
    validate(config)
    check_unread_and_derived_keys(config)
    budget = derive_budgets(config, world_size)
    write_derived_keys(config, world_size)
    return budget


def _get(config, dotted, default=None):
    node = config
    for part in dotted.split("."):
        if part not in node:
            return default
        node = node[part]
    return node


def pristine_config(config_id):
    """The config the matrix builds for `config_id` (`sd3...` or `tiny:sd3...`) in this process's environment,
    or None for a config written by hand. Loaded by path, like ml_collections loads it."""
    if not config_id:
        return None
    import importlib.util

    path = os.path.join(COMPONENT_ROOT, "config", "sd3_matrix.py")
    spec = importlib.util.spec_from_file_location("sd35zo_pristine_matrix", path)
    matrix = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(matrix)
    return matrix.get_config(config_id)


def check_unread_and_derived_keys(config, pristine=None):
    """Refuse a changed value of a key that is read by no trainer (UNREAD_KEYS) or written by the budget
    derivation (DERIVED_KEYS): either would be accepted and ignored. "Changed" = different from what the
    config's own id builds; `train.batch_size` may also equal the batch the trainer really uses."""
    pristine = pristine if pristine is not None else pristine_config(config.get("config_id", ""))
    if pristine is None:
        return
    missing = object()
    unread = UNREAD_KEYS + (UNREAD_BY_BRANCH if is_branch(config) else ())
    for key in unread:
        value, original = _get(config, key, missing), _get(pristine, key, missing)
        if value is not missing and original is not missing and value != original:
            raise ConfigError(f"{key}={_plain(value)!r} is not read by this trainer (upstream key kept for "
                              f"compatibility); leave it at {_plain(original)!r}")
    derived = {**DERIVED_KEYS, **({} if is_branch(config) else DERIVED_BY_DEFAULT)}
    for key, source in derived.items():
        value, original = _get(config, key, missing), _get(pristine, key, missing)
        if value is not missing and original is not missing and value != original:
            raise ConfigError(f"{key}={value!r} is derived ({key} = {source}); change those instead")
    used = config.latent_chunk_size if is_branch(config) else config.sample.train_batch_size
    used_key = "latent_chunk_size" if is_branch(config) else "sample.train_batch_size"
    batch = config.train.batch_size
    _require(batch == pristine.train.batch_size or batch == used,
             f"train.batch_size={batch!r} is not read: this trainer's batch is {used_key}={used!r} "
             f"(set {used_key}, or train.batch_size to the same value)")


def _plain(value):
    return value.to_dict() if hasattr(value, "to_dict") else value


def run_path(path):
    """A path from the config as an absolute path; relative ones are relative to the component directory."""
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(COMPONENT_ROOT, path))


def main(argv=None):
    """Load a config exactly as a trainer process does (ml_collections flags + overrides, WORLD_SIZE from the
    environment as accelerate sets it), finalize it and print its budget; exit 1 with the one-line reason
    when it cannot run."""
    from absl import flags
    from ml_collections import config_flags

    argv = list(sys.argv if argv is None else argv)
    paths_warn, skip_run_folder = "--paths-warn" in argv, "--skip-run-folder" in argv
    argv = [arg for arg in argv if arg not in ("--paths-warn", "--skip-run-folder")]
    sys.argv = argv  # config_flags finds the override flags by reading sys.argv when defined
    registry = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file[:argument]", flag_values=registry,
                                    lock_config=False)
    try:
        registry(argv)
        config = registry.config
        _require(config is not None, "--config is required")
        budget = finalize(config, int(os.environ.get("WORLD_SIZE") or config.reference_world_size))
    except Exception as error:  # noqa: BLE001 - absl wraps errors raised inside get_config and overrides
        print(f"config error: {_root_message(error)}", file=sys.stderr)
        return 1
    print(f"budget: {budget.summary()}")
    try:  # what the trainer checks next, before its models load: files, model, run folder, resume state
        from . import checkpoints, preflight, run_folder

        preflight.check_all(config)
        if skip_run_folder:
            return 0
        plan = run_folder.plan_run(config, checkpoints.load_state, checkpoints.math_key_diff)
    except ConfigError as error:
        print(f"{'warning' if paths_warn else 'error'}: {error}", file=sys.stderr)
        return 0 if paths_warn else 1
    print(f"run folder: {plan.run_dir}" + (f" (resuming {plan.resume_dir})" if plan.resume_dir else ""))
    return 0


def unknown_key_message(error, argv=None):
    """`no config key train.learnign_rate (did you mean train.learning_rate?)` for the KeyError/AttributeError
    ml_collections raises on an override of a key that does not exist (its text nests reprs and quotes)."""
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


def _root_message(error):
    """One line for the user: the ConfigError behind `error` if there is one (ml_collections folds the
    traceback of an error raised in get_config into its own message), else the last line of the message."""
    cause, deepest = error, None
    while cause is not None:  # ml_collections re-raises our ConfigError with its own text: take the innermost
        if isinstance(cause, ConfigError):
            deepest = cause
        cause = cause.__cause__ or cause.__context__
    if deepest is not None and not str(deepest).startswith("Error whilst parsing"):
        return str(deepest).splitlines()[0]
    if isinstance(error, (KeyError, AttributeError)):  # ml_collections: override of a key that does not exist
        return unknown_key_message(error)
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    marker = f"{ConfigError.__name__}: "
    for line in lines:
        if marker in line:
            return line.split(marker, 1)[1]
    return lines[-1] if lines else type(error).__name__


if __name__ == "__main__":
    # run the package's copy of this module, so ConfigError raised by the modules it calls is the one caught here
    from sd35zo.config_check import main as package_main

    sys.exit(package_main())
