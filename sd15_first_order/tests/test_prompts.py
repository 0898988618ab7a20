"""Which prompt each trajectory gets (spec §5.3, §5.7, §7, §11 item 15)."""
import json
import random

import pytest

from sd15fo.prompts import PromptSource, eval_kwargs, prompt_at, rank_batches, seed_mix


@pytest.fixture
def source(tmp_path):
    (tmp_path / "geneval").mkdir()
    (tmp_path / "geneval" / "train_prompts.txt").write_text("".join(f"train prompt {i}\n" for i in range(50)))
    (tmp_path / "geneval" / "test_metadata.jsonl").write_text(
        "".join(json.dumps({"prompt": f"test prompt {i % 3}", "tag": "single_object"}) + "\n" for i in range(12)))
    return PromptSource(str(tmp_path))


def test_seed_mix_is_the_polynomial_hash_mod_2_63_minus_1():
    assert seed_mix(42) == 42
    assert seed_mix(1, 2) == 1000003 + 2
    assert seed_mix(2**62, 5) == (2**62 * 1000003 + 5) % (2**63 - 1)


def _all_prompts(source, world, key=3, batch=2, batches=3):
    per_rank = [list(rank_batches(source, "geneval", {}, seed=42, salt=21111, key=key, batch_size=batch,
                                  num_batches=batches, rank=r, world_size=world)) for r in range(world)]
    return per_rank


def test_rank_shards_are_disjoint_cover_the_set_and_do_not_depend_on_the_world_size(source):
    for world in (1, 2, 4):
        per_rank = _all_prompts(source, world, batch=1, batches=12 // world)
        flat = {}
        for r, batches in enumerate(per_rank):
            indices = list(range(r, 12, world))
            prompts = [p for prompts, _ in batches for p in prompts]
            assert len(prompts) == len(indices)
            flat.update(zip(indices, prompts))
        assert sorted(flat) == list(range(12))
        assert all(flat[i] == prompt_at(source, "geneval", {}, 42, 21111, 3, i)[0] for i in flat)


def test_prompts_are_deterministic_and_leave_the_global_random_state_alone(source):
    random.seed(123)
    state = random.getstate()
    first = _all_prompts(source, 2)
    assert random.getstate() == state
    assert _all_prompts(source, 2) == first
    assert _all_prompts(source, 2, key=4) != first  # another epoch draws other prompts


def test_geneval_eval_uses_the_test_metadata_prompts_in_file_order(source):
    assert eval_kwargs({"prompt_fn": "geneval", "prompt_fn_kwargs": {}}) == {"split": "test"}
    assert eval_kwargs({"prompt_fn": "geneval", "prompt_fn_kwargs": {}, "eval_prompt_fn_kwargs": {"split": "train"}}) == {"split": "train"}
    prompt, metadata = prompt_at(source, "geneval", {"split": "test"}, 42, 31111, 0, 0)
    assert prompt.startswith("test prompt") and metadata == {}
    with pytest.raises(ValueError, match="split='val'"):
        source.geneval("val")


def test_the_prompt_draw_is_pythons_random_choice_under_the_mixed_seed(source):
    """Bit-exact with the reference: random.seed(mix(mix(seed, salt), key, idx)); random.choice(lines)."""
    lines = [f"train prompt {i}" for i in range(50)]
    random.seed(seed_mix(seed_mix(42, 21111), 7, 5))
    assert prompt_at(source, "geneval", {}, 42, 21111, 7, 5)[0] == random.choice(lines)


def test_hpd_photo_painting_pool_does_not_grow_between_calls(tmp_path):
    (tmp_path / "hpdv2").mkdir()
    for style in ("photo", "paintings"):
        (tmp_path / "hpdv2" / f"benchmark_{style}.json").write_text(json.dumps([f"{style} {i}" for i in range(12)]))
    source = PromptSource(str(tmp_path))
    draws = set()
    for i in range(300):
        random.seed(i)
        draws.add(source.hpd_photo_painting()[0])
    assert len(draws) == 4  # 2 + 2 prompts after the 10 held out of each style, every call the same pool
