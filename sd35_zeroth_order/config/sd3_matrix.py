"""The SD3.5 run matrix: one config per id `sd3.<profile>.<sampler>.<reward>.<loss>.<reweight>` (spec §2).

    --config config/sd3_matrix.py:sd3.lowsnr2.branch.geneval.matching.fairclip2        # the paper's "Ours"
    --config config/sd3_matrix.py:sd3.base.default.geneval.ppo.base --config.seed=1    # any key overridable
    --config config/sd3_matrix.py:tiny:sd3.lowsnr2.branch.geneval.matching.fairclip2   # same run, tiny kit

Build order (spec §2.2): base defaults -> SD3 block -> sampler block -> reward preset -> objective ->
save_dir. Baseline and ours differ only in the keys the paper changes; `python config/sd3_matrix.py diff
<id> <id>` prints them. Values are validated here, at load, by `sd35zo.config_check`; the budget split
for the actual number of processes is checked by `config_check.finalize` after overrides.

Budgets: a reward preset fixes the global images per epoch; rollouts, microbatches and accumulation per
process follow from the real world size (WORLD_SIZE, set by accelerate), so one GPU runs the paper's
4-GPU recipe with the same rows per optimizer step by accumulating 27 microbatches instead of 7.
"""
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # sd35_zeroth_order/
if ROOT not in sys.path:  # ml_collections loads this file by path; the checks live in the package
    sys.path.insert(0, ROOT)

from sd35zo import config_check  # noqa: E402


def _load_sibling(name):
    spec = importlib.util.spec_from_file_location(f"sd35_config_{name}", os.path.join(ROOT, "config", f"{name}.py"))
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


base = _load_sibling("base")
presets = _load_sibling("sd3_reward_presets")

# exploration_k per profile: branches per step, 10 entries for the 10 sampling steps; the last entry has
# no transition after it and is dropped by the trainer (spec §2.3, values from upstream sd3_matrix.py).
#            step: 0   1   2   3   4   5   6   7   8   9
PROFILES = {"base":     [6,  6,  6,  6,  6,  6,  6,  6,  6,  6],   # uniform, sum 54
            "highsnr":  [3,  3,  4,  5,  6,  7,  7,  8, 11,  6],   # more branches late (high SNR)
            "highsnr2": [4,  5,  5,  6,  7,  8,  9, 10,  0,  6],
            "base2":    [7,  7,  7,  7,  7,  7,  6,  6,  0,  6],
            "lowsnr":   [6,  6,  8, 10, 11, 13,  0,  0,  0,  6],   # more branches early (low SNR)
            "lowsnr2":  [6,  6,  8, 10,  0,  0,  0,  0,  0,  6]}   # the paper: only the 4 noisiest steps, sum 30
SAMPLERS = ("default", "branch")
REWARDS = presets.REWARDS
LOSSES = ("ppo", "matching")
# --reweight spelling -> train.reweight_type (spec §2.6)
REWEIGHTS = dict(base="base", tempflow="tempflow_reweight", pcpo="pcpo_reweight", guard="grpo_guard",
                 fairclip="fair_clip", fairclip2="fair_clip2")
FIELDS = (("profile", tuple(PROFILES)), ("sampler", SAMPLERS), ("reward", REWARDS), ("loss", LOSSES),
          ("reweight", tuple(REWEIGHTS)))
TINY_PREFIX = "tiny:"
TINY_BUDGET = {"default": (2, 2), "branch": (2, 2)}  # (prompts, images per prompt) per epoch, global
TINY_CHUNK = 4  # latent_chunk_size on the tiny kit


def parse_config_id(config_id):
    """`sd3.<profile>.<sampler>.<reward>.<loss>.<reweight>` -> dict of the five fields."""
    parts = config_id.split(".")
    if len(parts) != 6 or parts[0] != "sd3":
        raise config_check.ConfigError(
            f"config id {config_id!r} must be sd3.<profile>.<sampler>.<reward>.<loss>.<reweight>")
    fields = dict(zip((name for name, _ in FIELDS), parts[1:]))
    for name, allowed in FIELDS:
        if fields[name] not in allowed:
            raise config_check.ConfigError(
                f"{name}={fields[name]!r} in config id {config_id!r} is not supported; allowed: {', '.join(allowed)}")
    return fields


def list_config_ids():
    """All 6 * 2 * 9 * 2 * 6 = 1296 ids, including those that validation rejects."""
    ids = [()]
    for _, allowed in FIELDS:
        ids = [prefix + (value,) for prefix in ids for value in allowed]
    return ["sd3." + ".".join(parts) for parts in ids]


# Step 2: SD3.5-Medium at 512 px, 10 sampling steps, LoRA + EMA (upstream sd3_matrix's common block).
SD3_COMMON = {
    "pretrained.model": "stabilityai/stable-diffusion-3.5-medium",
    "dataset": os.path.join(ROOT, "dataset", "pickscore"),  # every reward preset replaces it
    "use_lora": True, "resolution": 512, "activation_checkpointing": True,
    "sample.num_steps": 10, "sample.eval_num_steps": 40, "sample.guidance_scale": 4.5,
    "sample.batch_size": 8,  # unused
    "sample.num_batches_per_epoch": 4, "sample.group_strategy": "prompt",
    "train.batch_size": 4, "train.gradient_accumulation_steps": 2, "train.heuristic_kldenom_trick": True,
    "train.ema": True, "save_freq": 50, "eval_freq": 50, "num_epochs": 301,
    "prompt_fn": "general_ocr", "reward_fn": {"pickscore": 1.0}, "per_prompt_stat_tracking": True,
}
# Step 3 (spec §2.4). Both samplers train T = int(10 x 0.99) = 9 of the 10 transitions, one inner epoch.
SAMPLER_COMMON = {"sample.test_batch_size": 16, "train.num_inner_epochs": 1, "train.timestep_fraction": 0.99}
SAMPLER_BLOCKS = {
    # Flow-GRPO: whole SDE trajectories, 32 images per rollout per process, batch-std advantages
    "default": {"sample.sampling_mode": "default", "sample.train_batch_size": 32, "train.batch_size": 32,
                "sample.global_std": True, "sample.same_latent": False},  # same_latent: unused
    # ODE backbone with k_i one-step SDE branches at step i, B = 4 initial noises per rollout, the
    # transformer sees L = 12 branch rows per call, a microbatch is L x T rows, 2 optimizer steps per epoch
    "branch": {"sample.sampling_mode": "sde_branching", "sample.global_std": False,
               "sample.collection_batch_size": 4, "latent_chunk_size": 12, "train.batch_size": 12,
               "train.updates_per_epoch": 2,
               "sample.branch_batch_size": 12},  # unused
}


_SAMPLER_KEYS = {key.split(".")[-1] for block in SAMPLER_BLOCKS.values() for key in block} | {"train_batch_size",
                                                                                            "group_strategy"}


def _assign(config, values):
    """Set dotted keys (`"sample.num_steps"`) on a ConfigDict, creating leaf keys that do not exist yet."""
    for dotted, value in values.items():
        *parents, leaf = dotted.split(".")
        node = config
        for name in parents:
            node = node[name]
        node[leaf] = value


def _sampler_block(config, sampler, profile):
    _assign(config, SAMPLER_COMMON)
    _assign(config, SAMPLER_BLOCKS[sampler])
    if sampler == "branch":
        config.sample.exploration_k = list(PROFILES[profile])
        del config.sample["train_batch_size"]  # the branch trainer has no such batch; a stale value would mislead


def world_size_at_load(config):
    """The number of processes this config is resolved for: accelerate/torchrun export WORLD_SIZE to every
    process they start; outside a launch (tests, --dry-run checks) the preset's reference world size."""
    return int(os.environ.get("WORLD_SIZE") or config.reference_world_size)


def build_config(profile, sampler, reward, loss, reweight, world_size=None):
    """The resolved, validated config of one matrix cell (spec §2.2), budgets derived for `world_size`."""
    config = _assemble(profile, sampler, reward, loss, reweight)
    _check_and_derive(config, world_size)
    return config


def _check_and_derive(config, world_size):
    """Reject values no trainer accepts now; write the budget keys for the world size. Whether an epoch splits
    into whole optimizer steps is judged by `config_check.finalize` after command-line overrides (a failing
    split can be fixed by one, e.g. --config.train.updates_per_epoch=3), which the launcher runs before
    `accelerate launch` and the trainers run at start-up."""
    config_check.validate(config)
    config_check.write_derived_keys(config, world_size or world_size_at_load(config))


def _assemble(profile, sampler, reward, loss, reweight):
    config = base.get_config()
    _assign(config, SD3_COMMON)
    _sampler_block(config, sampler, profile)
    presets.apply_reward_preset(config, reward, sampler, ROOT)
    config.train.loss_type = loss
    config.train.reweight_type = REWEIGHTS[reweight]
    if sampler == "branch":
        config.sample.group_strategy = "seed"  # advantages per (initial noise, step): the k_i branches
    config.save_dir = f"../logs/sd3/{profile}/{sampler}/{reward}/{loss}_{reweight}"
    config.config_id = f"sd3.{profile}.{sampler}.{reward}.{loss}.{reweight}"
    return config


def tiny(config_id, world_size=None):
    """The same cell on the tiny test kit: tiny SD3 and reward checkpoints, 64 px, fp32, a budget that runs on
    one CPU process (or two) in seconds. The only place that knows about tiny models; trainers see an
    ordinary config."""
    from rsm_testkit import get_tiny_model, tiny_reward_options  # test kit, installed from ci/

    fields = parse_config_id(config_id)
    config = _assemble(**fields)
    config.pretrained.model = str(get_tiny_model("sd35"))
    config.reward_options = {name: {**config.reward_options[name].to_dict(), **tiny_reward_options(name)}
                             for name in config.reward_fn}
    config.resolution = 64
    config.mixed_precision = "no"
    config.allow_tf32 = False
    config.activation_checkpointing = False
    config.reference_world_size = 1
    config.num_epochs = 2
    config.save_freq = 1
    config.eval_freq = 1
    config.sample.eval_num_steps = 10
    config.sample.test_batch_size = 2
    config.sample.num_prompt_per_epoch, config.sample.num_image_per_prompt = TINY_BUDGET[fields["sampler"]]
    if fields["sampler"] == "default":
        config.sample.train_batch_size = config.train.batch_size = 1
    else:
        config.sample.collection_batch_size = 2  # one rollout holds a prompt's 2 images (BranchPromptSampler needs ipp | B x processes)
        config.latent_chunk_size = config.train.batch_size = TINY_CHUNK
    # the kit's tiny prompt set of this reward and its embeddings by the tiny text encoders (built once, cached
    # beside the tiny models): no fetch_data.py or preprocessing needed
    from sd35zo.tiny_data import tiny_embeddings, tiny_prompt_files

    folder, _, train_file, test_file = presets.prompt_set(fields["reward"])
    config.train_prompt_file_path, config.test_prompt_file_path = tiny_prompt_files(folder, train_file, test_file)
    config.train_hdf5_path, config.test_hdf5_path = tiny_embeddings(folder, train_file, test_file)
    config.dataset = os.path.dirname(config.train_prompt_file_path)
    config.train.ema_update_interval = 1  # a tiny run takes a few optimizer steps; the EMA must still move
    config.wandb.mode = "disabled"
    config.config_id = TINY_PREFIX + config_id
    config.save_dir = "../logs/tiny/" + config.save_dir[len("../logs/"):]
    _check_and_derive(config, world_size)
    return config


def get_config(name):
    """Entry point for ml_collections: `name` is a config id, optionally prefixed with `tiny:`."""
    if name.startswith(TINY_PREFIX):
        return tiny(name[len(TINY_PREFIX):])
    return build_config(**parse_config_id(name))


# Why each key that separates the baselines from ours changes (printed by `diff`).
DESIGN_NOTES = {
    "sample.exploration_k": "profile: which transitions branch and how often (lowsnr2: k = 6,6,8,10 at the 4 noisiest)",
    "train.loss_type": "objective: GRPO clipped ratio (ppo) or RSM score matching with a hinge (matching)",
    "train.reweight_type": "per-timestep trust region / gradient scale",
    "sample.sampling_mode": "sampler: full SDE trajectories (default) or ODE backbone + one-step branches",
    "sample.num_image_per_prompt": "sampling budget: noises per prompt (branches add the group size)",
    "sample.num_batches_per_epoch": "sampling budget: rollouts per epoch per process (derived)",
    "train.gradient_accumulation_steps": "default trainer: rollouts per optimizer step (derived); unused by branch",
    "save_dir": "run folder named after the id",
    "config_id": "the id itself",
}


def changed_keys(a, b):
    """{key: (value in a, value in b)} for every flattened key whose value differs (or exists in one only)."""
    flat_a, flat_b = _flatten(a.to_dict()), _flatten(b.to_dict())
    missing = "<absent>"
    return {key: (flat_a.get(key, missing), flat_b.get(key, missing))
            for key in sorted(set(flat_a) | set(flat_b)) if flat_a.get(key, missing) != flat_b.get(key, missing)}


def _flatten(tree, prefix=""):
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


if __name__ == "__main__":
    # python config/sd3_matrix.py list | show <id> | diff <id_a> <id_b>
    command, args = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("list", [])
    if command == "list":
        print("\n".join(list_config_ids()))
    elif command == "show":
        print(get_config(args[0]))
    elif command == "diff":
        for key, (left, right) in changed_keys(get_config(args[0]), get_config(args[1])).items():
            note = DESIGN_NOTES.get(key) or ("sampler block (spec 2.4)" if key.split(".")[-1] in _SAMPLER_KEYS else "")
            print(f"{key}: {left!r} -> {right!r}" + (f"  # {note}" if note else ""))
    else:
        sys.exit("usage: python config/sd3_matrix.py list | show <id> | diff <id_a> <id_b>")
