"""Spec §12.23-24: the prompt functions (upstream's slicing and counts on files shaped like the real ones, the fixed
HPD growth, one-line errors) and the preset rewards (differentiable, (B,) outputs, upstream's preprocessing options)."""
import json
import random

import pytest
import torch

from sd35fo import prompts
from sd35fo.prompts import PromptFileError, PromptSource, eval_items

# DrawBench's categories in the real drawbench.json / "DrawBench Prompts.csv" (200 rows, 183 once Misspellings and
# Rare Words are dropped): the training slice keeps all but the first 2 of each category -> 165
DRAWBENCH_COUNTS = {"Colors": 25, "Conflicting": 10, "Counting": 19, "DALL-E": 20, "Descriptions": 20,
                    "Gary Marcus et al. ": 10, "Positional": 20, "Reddit": 38, "Text": 21, "Misspellings": 10,
                    "Rare Words": 7}


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "drawbench").mkdir()
    table = {f"{c} prompt {i}": {"category": c} for c, n in DRAWBENCH_COUNTS.items() for i in range(n)}
    (tmp_path / "drawbench" / "drawbench.json").write_text(json.dumps(table))
    (tmp_path / "hpdv2").mkdir()
    for style in prompts.HPD_STYLES:
        (tmp_path / "hpdv2" / f"benchmark_{style}.json").write_text(json.dumps([f"{style} {i}" for i in range(800)]))
    (tmp_path / "geneval").mkdir()
    rows = [{"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": f"a photo of dog {i}"}
            for i in range(5)]
    (tmp_path / "geneval" / "train_metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    return str(tmp_path)


def test_24_drawbench_yields_165_and_hpd_3160_prompts(data_dir):
    assert len(prompts.drawbench().prompts(data_dir)) == 165
    assert len(prompts.hpd().prompts(data_dir)) == 4 * 790
    assert len(prompts.hpd_photo_painting().prompts(data_dir)) == 2 * 790
    assert prompts.hpd_photo().prompts(data_dir)[0] == "photo 10"  # the first 10 are skipped
    items = eval_items("drawbench", {}, data_dir)
    assert len(items) == 165 and items[0] == ("Colors prompt 2", {})  # evaluation slices the same way (upstream)


def test_24_from_jsonl_returns_only_the_prompt_values_in_order(data_dir):
    source = PromptSource("from_jsonl", {"path": "geneval/train_metadata.jsonl"}, data_dir)
    rng = random.Random(0)
    drawn = [source.draw(rng) for _ in range(20)]
    assert {p for p, _ in drawn} <= {f"a photo of dog {i}" for i in range(5)} and all(m == {} for _, m in drawn)
    assert eval_items("from_jsonl", {"path": "geneval/train_metadata.jsonl"}, data_dir) == [
        (f"a photo of dog {i}", {}) for i in range(5)]


def test_24_combined_hpd_sets_do_not_grow_unless_the_quirk_asks(data_dir):
    fixed = PromptSource("hpd_photo_painting", {}, data_dir)
    grown = PromptSource("hpd_photo_painting", {}, data_dir, hpd_growth=True)
    rng_a, rng_b = random.Random(1), random.Random(1)
    draws_fixed = [fixed.draw(rng_a)[0] for _ in range(400)]
    draws_grown = [grown.draw(rng_b)[0] for _ in range(400)]
    share = lambda draws: sum(p.startswith("paintings") for p in draws[200:]) / 200  # noqa: E731
    assert 0.35 < share(draws_fixed) < 0.65  # photo and paintings equally likely at every draw
    assert share(draws_grown) > 0.95  # upstream: draw k chooses among photo + (k+1) x paintings (spec §10 N5)
    assert grown.state_dict() == {"calls": 400}


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a"}\n{"caption": "b"}\n', "line 2 has no 'prompt' key"),
    ("", "no prompts found (empty file)"),
])
def test_24_from_jsonl_refuses_a_missing_key_or_an_empty_file(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(PromptFileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PromptSource("from_jsonl", {"path": str(path)}).check()


def test_a_missing_file_names_the_fetch_command(tmp_path):
    with pytest.raises(PromptFileError, match=r"run python scripts/fetch_data.py --only hpdv2"):
        PromptSource("hpd", {}, str(tmp_path)).check()
    with pytest.raises(PromptFileError, match=r"run python sd35_first_order/scripts/fetch_assets.py"):
        PromptSource("simple_animals", {}, str(tmp_path)).check()


PRESET_REWARDS = {"hpscore": "hpsv2", "pickscore": "pickscore", "imagereward": "imagereward", "aesthetic_score": "aesthetic"}


@pytest.mark.parametrize("reward_fn", list(PRESET_REWARDS))
def test_23_preset_rewards_are_differentiable_fp32_and_use_upstreams_preprocessing(reward_fn, one_cpu_thread):
    import importlib.util
    from pathlib import Path

    from rsm_testkit import tiny_reward_options

    from sd35fo.rewards import build_reward

    spec = importlib.util.spec_from_file_location("defaults", Path(__file__).resolve().parents[1] / "config" / "default_config.py")
    defaults = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(defaults)
    options = {**defaults.REWARD_OPTIONS[reward_fn], **tiny_reward_options(PRESET_REWARDS[reward_fn])}
    reward = build_reward(reward_fn, options, "cpu")
    assert not any(p.requires_grad for p in _modules_parameters(reward))  # frozen (spec §10 C4)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    scores, _ = reward(images, ["a red apple", "a cat"], [{}, {}])
    assert scores.shape == (2,) and scores.dtype == torch.float32
    (grad,) = torch.autograd.grad(scores.sum(), images)
    assert grad.abs().max() > 0
    expected = {"hpscore": ("antialias", True), "pickscore": ("resize_mode", "pad"),
                "imagereward": ("max_length", 512), "aesthetic_score": ("resize_mode", "squash")}[reward_fn]
    assert options[expected[0]] == expected[1]


def _modules_parameters(reward):
    found = []
    for value in vars(reward).values():
        if isinstance(value, torch.nn.Module):
            found.extend(value.parameters())
    return found


def test_fetch_assets_writes_the_two_upstream_lists_where_the_prompt_functions_read_them(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    component = Path(__file__).resolve().parents[1]
    assets = tmp_path / "mirror" / "jaylee2000" / "rsm" / "e8be3df6a5f86a57981b64130c9a5c1cdeef9071" / "sd35_first_order" / "lib" / "assets"
    assets.mkdir(parents=True)
    (assets / "simple_animals.txt").write_text("cat\ndog\n")
    (assets / "imagenet_classes.txt").write_text("".join(f"class {i}\n" for i in range(1000)))
    done = subprocess.run([sys.executable, "scripts/fetch_assets.py", "--out", str(tmp_path / "data"), "--source-root",
                           str(tmp_path / "mirror")], cwd=component, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    data = str(tmp_path / "data")
    assert prompts.simple_animals().prompts(data) == ["cat", "dog"]
    assert len(prompts.imagenet_dogs().prompts(data)) == 269 - 151


def test_generated_prompt_sets_need_inflect_or_say_so(tmp_path):
    import importlib.util

    (tmp_path / "nouns.txt").write_text("cat\ndog\n")
    source = PromptSource("counting", {"nouns_file": str(tmp_path / "nouns.txt"), "low": 1, "high": 3})
    if importlib.util.find_spec("inflect") is None:
        with pytest.raises(PromptFileError, match=r"need the inflect package \(pip install inflect\)"):
            source.check()
    else:
        source.check()
        prompt, metadata = source.draw(random.Random(0))
        assert metadata["answers"][1] in ("cat", "dog") and prompt.split()[0] in ("one", "two", "three")
