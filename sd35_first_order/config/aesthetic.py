"LAION aesthetic score on simple animal names (upstream `config/aesthetic.py`)."
import importlib.util
import os


def default_config():
    """config/default_config.py, loaded by path: ml_collections loads this file by path from any directory."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_config.py")
    spec = importlib.util.spec_from_file_location("sd35fo_default_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config():
    config = default_config().preset("simple_animals", "aesthetic_score")
    return config
