"""The pruned VGG-Flow baseline of Figure 5(a, b) (upstream `config/hpsv2_geneval.py`): HPSv2.1 reward on
GenEval training prompts (GenEval only supplies prompt text), one-step lookahead reward gradient at every
training timestep, eta = (1 - sigma)^2, beta = 3e7, no value net.

    torchrun --standalone --nproc_per_node=4 train_vggflow.py --config=config/hpsv2_geneval.py --exp_name=PRUNED_BASELINE
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
    return config
