"""RSM "ours" of Figure 5(a, b) (upstream `config/hpsv2_geneval_ours.py`): the pruned baseline with exactly three
keys changed (`python config/diff.py` prints them with their reasons).

    torchrun --standalone --nproc_per_node=4 train_vggflow.py --config=config/hpsv2_geneval_ours.py --exp_name=OURS
"""
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
    config = default_config().preset("from_jsonl", "hpscore", {"path": "geneval/train_metadata.jsonl", "prompt_key": "prompt"})
    config.logging.save_freq = 50

    config.training.use_saved_rgrad_x1 = True   # estimator: terminal reward gradient, computed once per trajectory
    config.model.eta_mode = 'linear'            # temporal weight: 1 - sigma instead of (1 - sigma)^2
    config.model.reward_scale = 1.5 * 1e7       # strength: beta = 1.5e7 instead of 3e7
    return config
