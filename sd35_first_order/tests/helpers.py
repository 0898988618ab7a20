"""Building configs as `train_vggflow.py` does, without a command line."""
import importlib.util
from pathlib import Path

from sd35fo import tiny
from sd35fo.run_folder import run_name

ROOT = Path(__file__).resolve().parents[1]


def paper_config(name="hpsv2_geneval_ours", exp_name="OURS", use_tiny=True, **overrides):
    """The preset `name` as the trainer sees it with `--tiny` (unless use_tiny=False), `--seed=0`,
    `--exp_name=<exp_name>` and `--config.<a>.<b>=v` overrides given as `a__b=v`."""
    spec = importlib.util.spec_from_file_location(f"preset_{name}", ROOT / "config" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.seed, config.exp_name, config.preset = 0, exp_name, f"{name}.py"
    if use_tiny:
        tiny.apply(config, [k.replace("__", ".") for k in overrides])
    else:
        config.tiny = False
    for key, value in overrides.items():
        *parents, leaf = key.split("__")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    config.run_name = run_name(config)
    return config
