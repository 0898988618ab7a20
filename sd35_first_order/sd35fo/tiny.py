"""`--tiny`: the same command on the test kit (rsm_testkit), on a CPU, on a fresh clone (TRAINER_CONTRACT.md §1).

It points the config at the kit's tiny SD3.5 pipeline, tiny TAESD3 and tiny reward backbones, at prompt files made
from the kit's tiny prompt sets (built once into the tiny-model cache, `sd35fo_prompt_data-<hash>`), and shrinks
the budgets: 10 Euler steps, 2 trajectories per epoch in micro-batches of 1 accumulated 2 (one optimizer step an
epoch, as the paper runs), 2 epochs, fp32, a checkpoint and an evaluation every epoch. Anything given with
`--config.<key>=...` on the command line wins. The only module that knows about the kit.
"""
from __future__ import annotations

import inspect
import json

from .rewards import SHARED_NAME

# tiny budgets (keys absent from the command line take these)
TINY_VALUES = {
    "training.mixed_precision": "no",
    "training.allow_tf32": False,
    "training.num_epochs": 2,
    "sampling.num_steps": 10,
    "sampling.batch_size": 2,
    "sampling.num_batches_per_epoch": 1,
    "training.batch_size": 1,
    "training.gradient_accumulation_steps": 2,
    "logging.save_freq": 1,
    "eval.enabled": True,
    "eval.every_epochs": 1,
    "eval.prompt_fn": "from_jsonl",
    "eval.prompt_fn_kwargs.path": "geneval/test_metadata.jsonl",
    "saving.output_dir": "./saved_models/tiny/",
}
HPD_RESERVED = 10  # HPD benchmark files start with 10 prompts the prompt functions skip


def _given(key, user_keys):
    return any(k == key or k.startswith(key + ".") for k in user_keys)


def _assign(config, dotted, value):
    *parents, leaf = dotted.split(".")
    node = config
    for name in parents:
        node = node[name]
    node[leaf] = value


def prompt_data_dir() -> str:
    """A data folder in fetch_data.py's layout, every file made from the kit's tiny prompt sets."""
    from rsm_testkit import cached_artifact, get_tiny_model

    kit = get_tiny_model("prompt_sets")

    def lines(path):
        return [line.strip() for line in (kit / path).read_text(encoding="utf-8").splitlines() if line.strip()]

    def build(out):
        plain = lines("pickscore/train.txt") + lines("pickscore/test.txt")
        for name in ("train_metadata.jsonl", "test_metadata.jsonl"):
            (out / "geneval").mkdir(parents=True, exist_ok=True)
            (out / "geneval" / name).write_text((kit / "geneval" / name).read_text(encoding="utf-8"), encoding="utf-8")
        (out / "pickscore").mkdir()
        (out / "pickscore" / "train.txt").write_text("\n".join(lines("pickscore/train.txt")) + "\n", encoding="utf-8")
        (out / "hpdv2").mkdir()
        for style in ("anime", "concept-art", "paintings", "photo"):
            prompts = [f"{p}, {style}" for p in (plain * 3)[:HPD_RESERVED + len(plain)]]
            (out / "hpdv2" / f"benchmark_{style}.json").write_text(json.dumps(prompts), encoding="utf-8")
        (out / "drawbench").mkdir()
        table = {p: {"category": "Colors" if i % 2 else "Reddit"} for i, p in enumerate(plain)}
        (out / "drawbench" / "drawbench.json").write_text(json.dumps(table, indent=1), encoding="utf-8")
        (out / "sd35_first_order").mkdir()
        (out / "sd35_first_order" / "simple_animals.txt").write_text("\n".join(plain) + "\n", encoding="utf-8")
        (out / "sd35_first_order" / "imagenet_classes.txt").write_text(
            "\n".join(plain[i % len(plain)] for i in range(1000)) + "\n", encoding="utf-8")

    return str(cached_artifact("sd35fo_prompt_data", (inspect.getsource(prompt_data_dir), str(kit)), build))


def apply(config, user_keys=()) -> None:
    """Point `config` at the tiny kit; keys in `user_keys` (given on the command line) are left as they are."""
    from rsm_testkit import get_tiny_model, tiny_reward_options

    values = dict(TINY_VALUES)
    values["pretrained.model"] = str(get_tiny_model("sd35"))
    values["pretrained.autoencodertiny_model"] = str(get_tiny_model("taesd3"))
    values["experiment.data_dir"] = prompt_data_dir()
    eval_given = _given("eval.enabled", user_keys)  # the user decides about evaluation: no tiny eval settings
    for key, value in values.items():
        if not _given(key, user_keys) and not (eval_given and key.startswith("eval.")):
            _assign(config, key, value)
    for option, value in tiny_reward_options(SHARED_NAME[config.experiment.reward_fn]).items():
        if not _given(f"experiment.reward_options.{option}", user_keys):
            config.experiment.reward_options[option] = value
    config.tiny = True
