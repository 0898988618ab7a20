"""Per-reward settings (spec §2.5): sampling budget, schedule of saves/evals, KL settings, prompt set and
the reward mix. Budgets and frequencies are upstream's (rsm `config/sd3_reward_presets.py`).

`reference_world_size` is the number of processes a preset's budget was written for (upstream's
`gpu_count`). Upstream divided by it whatever `--num-processes` said; here it only fixes the global
images per epoch, and `sd35zo.config_check.derive_budgets` splits those over the actual world size.

Rewards served by another process (geneval, deqa, qwenvl, unifiedreward) are clients: their URL is a
config key whose default comes from an environment variable, so
`--config.reward_options.geneval.url=...` and `TEMPFLOW_GENEVAL_REWARD_URL=...` both work.
"""
import os

REWARDS = ("geneval", "ocr", "pickscore", "deqa", "imagereward", "qwenvl", "aesthetic",
           "jpeg_compressibility", "unifiedreward")

# Upstream's fallback preset: 2 GPUs, save/eval every 20 epochs, 301 epochs, KL beta 0.01.
_FALLBACK = {"reference_world_size": 2, "save_freq": 20, "eval_freq": 20, "num_epochs": 301, "beta": 0.01,
             # (prompts per epoch, images per prompt), global
             "budget": {"default": (16, 24), "branch": (16, 4)}}

# Only the rewards that differ from the fallback are listed.
_OVERRIDES = {
    # The paper's Figure 4(a) runs: 4 GPUs, 1081 epochs, beta 0.004, 48 prompts per epoch.
    "geneval": {"reference_world_size": 4, "save_freq": 60, "eval_freq": 60, "num_epochs": 1081, "beta": 0.004,
                "budget": {"default": (48, 24), "branch": (48, 4)}},
    "aesthetic": {"save_freq": 30, "eval_freq": 30, "num_epochs": 151},
}


def preset(reward):
    """The fallback preset with the reward's overrides applied (a fresh dict)."""
    if reward not in REWARDS:
        raise ValueError(f"reward={reward!r} is not supported; allowed: {', '.join(REWARDS)}")
    merged = {**_FALLBACK, **_OVERRIDES.get(reward, {})}
    merged["budget"] = dict(merged["budget"])
    return merged


def prompt_set(reward):
    """(prompt-set folder under <repo>/data/, prompt_fn, train file, test file) for the reward's prompts."""
    if reward == "geneval":
        return "geneval", "geneval", "train_metadata.jsonl", "test_metadata.jsonl"
    # OCR prompts quote the text to render; every other reward trains on the PickScore prompt list.
    folder = "ocr" if reward == "ocr" else "pickscore"
    return folder, "general_ocr", "train.txt", "test.txt"


def reward_weights(reward):
    """`reward_fn`: weight of each scorer in the training reward."""
    if reward == "geneval":
        return {"geneval": 1.0, "pickscore": 0.0}  # PickScore is scored only to be logged
    return {reward: 1.0}


def service_url(env_var, default):
    return os.environ.get(env_var) or default


def reward_options(name):
    """Keyword options for `shared_rewards.load_reward(name, ...)` matching the upstream SD3.5 scorers."""
    if name == "geneval":
        # upstream client default: TEMPFLOW_GENEVAL_REWARD_URL or 127.0.0.1:18085; training scores strictly.
        # retry_timeout_s (ours): how long the client keeps retrying a server that went away (a restart reloads
        # the detector), instead of ending the run
        return {"url": service_url("TEMPFLOW_GENEVAL_REWARD_URL", "http://127.0.0.1:18085"), "only_strict": True,
                "retry_timeout_s": 120.0}
    if name == "deqa":
        return {"url": service_url("TEMPFLOW_DEQA_REWARD_URL", "http://127.0.0.1:18086")}
    if name == "unifiedreward":
        # upstream hard-coded this OpenAI-compatible sglang endpoint, key and model
        return {"url": service_url("TEMPFLOW_UNIFIEDREWARD_URL", "http://127.0.0.1:17140/v1"),
                "api_key": "flowgrpo", "model": "UnifiedReward-7b-v1.5"}
    if name == "qwenvl":
        # upstream ran Qwen2.5-VL-7B in the trainer; here it is an OpenAI-compatible server (port is ours)
        return {"url": service_url("TEMPFLOW_QWENVL_REWARD_URL", "http://127.0.0.1:17141/v1"),
                "model": "Qwen/Qwen2.5-VL-7B-Instruct"}
    if name == "pickscore":
        return {"divisor": 26.0}   # upstream SD3.5 scorer divides logit_scale * cos by 26
    if name == "jpeg_compressibility":
        return {"divisor": 500.0}  # upstream: -(kB) / 500
    if name == "aesthetic":
        return {"path": "pil"}     # upstream scores PIL images through CLIPProcessor
    return {}


def apply_reward_preset(config, reward, sampler, root):
    """Step 4 of the build (spec §2.2): everything the reward decides. `root` = component directory."""
    chosen = preset(reward)
    folder, prompt_fn, train_file, test_file = prompt_set(reward)
    # prompt sets live where `python scripts/fetch_data.py --out data` (repository root) writes them
    dataset_dir = os.path.normpath(os.path.join(root, "..", "data", folder))
    cache_dir = os.path.join(root, "..", "cache", "sd35_embeddings", folder)
    config.dataset = dataset_dir
    config.train_prompt_file_path = os.path.join(dataset_dir, train_file)
    config.test_prompt_file_path = os.path.join(dataset_dir, test_file)
    config.train_hdf5_path = os.path.join(cache_dir, "train_embeddings.h5")
    config.test_hdf5_path = os.path.join(cache_dir, "test_embeddings.h5")
    config.prompt_fn = prompt_fn
    config.reward_fn = reward_weights(reward)
    config.reward_options = {name: reward_options(name) for name in config.reward_fn}
    if reward == "geneval":
        # GenEval runs use the exact KL denominator and the ODE-backbone KL anchors.
        config.train.heuristic_kldenom_trick = False
        config.train.use_ode_kl_anchor = True

    config.reference_world_size = chosen["reference_world_size"]
    config.save_freq = chosen["save_freq"]
    config.eval_freq = chosen["eval_freq"]
    config.num_epochs = chosen["num_epochs"]
    config.train.beta = chosen["beta"]
    config.sample.num_prompt_per_epoch, config.sample.num_image_per_prompt = chosen["budget"][sampler]
    return config
