"""The command line of `train_vggflow.py` (spec §1.2 plus what upstream lacked):

    python train_vggflow.py --config=config/<preset>.py [--config.<section>.<key>=<value> ...] [--exp_name=NAME]
        [--seed=0] [--output_dir=DIR] [--model=ID_OR_DIR] [--taesd=ID_OR_DIR] [--data_dir=DIR] [--resume=PATH]
        [--device=auto|cpu|cuda] [--tiny] [--check]

One process without a launcher; under `torchrun` (one node or several, its own flags) every process joins the group
(NCCL on GPUs, gloo on CPUs). A user's mistake and a diverged run end with one line `error: ...` on stderr (global
rank 0, and the process it happened on) and exit status 1 on every process; tracebacks are for bugs. Relative paths
are relative to the working directory, as upstream.
"""
from __future__ import annotations

import logging
import os
import re
import sys

EXAMPLE = "--config=config/hpsv2_geneval_ours.py"


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


def fail(message: str, here: bool = False) -> None:
    """`error: <message>` on stderr of global rank 0 (and of the process the error happened on, `here`, so a
    failure on another node shows on that node's console too); exit status 1."""
    if _is_main() or here:
        print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def config_overrides(argv) -> list:
    """The dotted keys given as `--config.<key>=value` (or `--config.<key> value`) on the command line."""
    keys = []
    for arg in argv:
        match = re.match(r"^--config\.([A-Za-z0-9_.]+)", arg)
        if match:
            keys.append(match.group(1))
    return keys


def _absolute_if_path(value):
    expanded = os.path.expanduser(value)
    return os.path.abspath(expanded) if (os.path.exists(expanded) or value.startswith((".", "/", "~"))) else value


def quiet_libraries() -> None:
    """Our logger at INFO on the main process (WARNING elsewhere); the libraries' chatter (load progress bars,
    open_clip's INFO lines, dtype notices) off."""
    import warnings

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    ours = logging.getLogger("sd35fo")
    ours.addHandler(handler)
    ours.setLevel(logging.INFO if _is_main() else logging.WARNING)
    ours.propagate = False
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", message=".*torch_dtype.*is deprecated", category=FutureWarning)
    try:
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except (ImportError, AttributeError):
        pass


def define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "preset file, e.g. config/hpsv2_geneval_ours.py", lock_config=False)
    flags.DEFINE_string("exp_name", "", "free text in the run name <reward>_vggflow_<exp_name>_seed<seed>")
    flags.DEFINE_integer("seed", 0, "seed (config.seed)")
    flags.DEFINE_string("output_dir", None, "root of run folders (config saving.output_dir)")
    flags.DEFINE_string("model", None, "SD3.5 pipeline: hub id or local diffusers folder (config pretrained.model)")
    flags.DEFINE_string("taesd", None, "TAESD3: hub id or local folder (config pretrained.autoencodertiny_model)")
    flags.DEFINE_string("data_dir", None, "folder of prompt files in fetch_data.py's layout (config experiment.data_dir)")
    flags.DEFINE_string("resume", None, "checkpoint-<n> folder or run folder to continue (config saving.resume_from)")
    flags.DEFINE_enum("device", "auto", ["auto", "cpu", "cuda"], "where to train (auto: CUDA when available)")
    flags.DEFINE_bool("tiny", False, "the same command on the tiny test kit (random tiny models, tiny budgets, CPU)")
    flags.DEFINE_bool("check", False, "validate the config, files and run folder, print the budget, and exit")
    return flags.FLAGS


def resolve_config(flags_values, argv):
    """The config of the parsed flags: --seed/--exp_name/--output_dir/... applied, --tiny applied to every key not
    given on the command line, the run name set. Raises ConfigError."""
    from . import tiny
    from .config_check import ConfigError
    from .run_folder import run_name

    config = flags_values.config
    if config is None:
        raise ConfigError(f"--config is required, e.g. {EXAMPLE} (the presets are in config/)")
    user_keys = config_overrides(argv)
    config.seed = flags_values.seed
    config.exp_name = flags_values.exp_name
    config.preset = os.path.basename(flags_values["config"].config_filename) if hasattr(
        flags_values["config"], "config_filename") else ""
    if flags_values.tiny:
        tiny.apply(config, user_keys + [k for k, flag in (("saving.output_dir", "output_dir"), ("pretrained.model", "model"),
                                                          ("pretrained.autoencodertiny_model", "taesd"),
                                                          ("experiment.data_dir", "data_dir"))
                                        if flags_values[flag].present])
    else:
        config.tiny = False
    for flag, key in (("output_dir", "saving.output_dir"), ("model", "pretrained.model"),
                      ("taesd", "pretrained.autoencodertiny_model"), ("data_dir", "experiment.data_dir"),
                      ("resume", "saving.resume_from")):
        value = flags_values[flag].value
        if value is not None:
            section, leaf = key.split(".")
            config[section][leaf] = _absolute_if_path(value) if value else value
    config.saving.output_dir = os.path.abspath(os.path.expanduser(config.saving.output_dir))
    config.run_name = run_name(config)
    return config


def main(argv=None) -> None:
    argv = list(sys.argv if argv is None else argv)
    quiet_libraries()
    from .config_check import ConfigError, root_message

    flags_values = define_flags()
    try:
        flags_values(argv)
        config = resolve_config(flags_values, argv)
    except ConfigError as error:
        fail(str(error))
    except Exception as error:  # noqa: BLE001 - absl/ml_collections wrap errors of get_config and of overrides
        fail(root_message(error))
    if flags_values.check:
        sys.exit(check(config, bool(flags_values["exp_name"].present)))
    from . import distributed
    from .trainer import DivergenceError, train

    try:
        dist = distributed.from_environment("cpu" if (flags_values.tiny and not flags_values["device"].present)
                                            else flags_values.device)
    except RuntimeError as error:  # before the process group: each process says it
        fail(str(error), here=True)
    try:
        train(config, dist, name_given=bool(flags_values["exp_name"].present))
    except (ConfigError, DivergenceError) as error:
        fail(str(error), here=getattr(error, "print_here", False))
    finally:
        distributed.shutdown()


def check(config, name_given: bool) -> int:
    """--check: what the trainer checks before its models load, then the budget and the run folder."""
    from . import checkpoints, preflight, run_folder
    from .config_check import ConfigError, validate

    try:
        budget = validate(config, int(os.environ.get("WORLD_SIZE", "1")))
        preflight.check_all(config)
        plan = run_folder.plan_run(config, checkpoints.load_state, checkpoints.math_key_diff, name_given)
    except ConfigError as error:
        fail(str(error))
    print(f"budget: {budget.summary()}")
    print(f"run folder: {plan.run_dir}" + (f" (resuming {plan.resume_dir})" if plan.resume_dir else ""))
    return 0
