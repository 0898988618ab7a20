"""Rank-aware prompt samplers (spec §6.4, §7.8; §9 item 29). World sizes are simulated by building one
sampler per rank with the same arguments, as every process does in a real run."""
from collections import Counter
from itertools import islice

import pytest
import torch

from sd35zo.prompt_samplers import (
    BranchPromptSampler,
    EpochPromptSampler,
    branch_counter,
    draw_prompt_multiset,
)

N_PROMPTS = 37  # not a multiple of anything below, so no divisibility hides a bug


def _epoch_ranks(world, **kw):
    return [EpochPromptSampler(N_PROMPTS, num_replicas=world, rank=r, **kw) for r in range(world)]


def _branch_ranks(world, **kw):
    return [BranchPromptSampler(N_PROMPTS, num_replicas=world, rank=r, **kw) for r in range(world)]


def test_multiset_has_distinct_prompts_each_repeated_and_is_seed_deterministic():
    order = draw_prompt_multiset(N_PROMPTS, 6, 4, seed=42)
    counts = Counter(order)
    assert len(counts) == 6 and set(counts.values()) == {4}
    assert all(0 <= i < N_PROMPTS for i in order)
    assert order == draw_prompt_multiset(N_PROMPTS, 6, 4, seed=42)
    assert order != draw_prompt_multiset(N_PROMPTS, 6, 4, seed=43)
    # The copies are shuffled, not left adjacent (seed 42 with 24 items: checked to be interleaved).
    assert any(order[i] != order[i - 1] for i in range(1, len(order)))
    with pytest.raises(ValueError, match="dataset size"):
        draw_prompt_multiset(5, 6, 1, seed=0)


def test_selection_follows_a_generator_seeded_with_seed_plus_epoch():
    # Fact of §6.4/§7.8: the distinct prompts are the first m entries of randperm(n) under seed 42 + epoch.
    for epoch in (0, 3):
        expected = torch.randperm(N_PROMPTS, generator=torch.Generator().manual_seed(42 + epoch))[:6]
        batches = [i for b in EpochPromptSampler(N_PROMPTS, 4, 4, 6, seed=42).epoch_batches(epoch) for i in b]
        assert set(batches) == set(expected.tolist())


@pytest.mark.parametrize("world", [1, 2, 4])
def test_epoch_sampler_covers_each_prompt_exactly_image_per_prompt_times_across_ranks(world):
    kw = dict(batch_size=2, image_per_prompt=4, prompt_per_epoch=6)  # 24 images = 12 batches of 2
    ranks = _epoch_ranks(world, **kw)
    for epoch in (0, 1, 5):
        union = Counter()
        for s in ranks:
            s.set_epoch(epoch)
            batches = list(s)
            assert len(batches) == len(s) == 24 // (kw["batch_size"] * len(ranks))
            assert all(len(b) == kw["batch_size"] for b in batches)
            union.update(i for b in batches for i in b)
        assert len(union) == kw["prompt_per_epoch"]
        assert set(union.values()) == {kw["image_per_prompt"]}


def test_epoch_sampler_global_order_does_not_depend_on_world_size():
    # Rank r takes global batches r, r+P, ...: interleaving the ranks rebuilds the single-process epoch.
    kw = dict(batch_size=2, image_per_prompt=4, prompt_per_epoch=6)
    single = EpochPromptSampler(N_PROMPTS, **kw).epoch_batches(2)
    for world in (2, 4):
        per_rank = [s.epoch_batches(2) for s in _epoch_ranks(world, **kw)]
        rebuilt = [per_rank[b % world][b // world] for b in range(len(single))]
        assert rebuilt == single


def test_epoch_sampler_epochs_differ_and_state_resumes():
    s = EpochPromptSampler(N_PROMPTS, 4, 4, 6)
    s.set_epoch(0)
    first = list(s)
    s.set_epoch(1)
    second = list(s)
    assert first != second
    resumed = EpochPromptSampler(N_PROMPTS, 4, 4, 6)
    resumed.load_state_dict(s.state_dict())
    assert resumed.epoch == 1 and list(resumed) == second


def test_epoch_sampler_rejects_budgets_that_do_not_split_with_key_names():
    with pytest.raises(ValueError, match="sample.train_batch_size=3 on each of 3 processes"):
        EpochPromptSampler(N_PROMPTS, 3, 4, 6, num_replicas=3, rank=0)
    with pytest.raises(ValueError, match="sample.num_prompt_per_epoch=40 exceeds"):
        EpochPromptSampler(N_PROMPTS, 4, 1, 40)
    with pytest.raises(ValueError, match="rank must be in"):
        EpochPromptSampler(N_PROMPTS, 4, 4, 6, num_replicas=2, rank=2)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_branch_sampler_ranks_take_disjoint_slices_of_one_global_multiset(world):
    batch, ipp = 4, 4  # paper run: collection_batch_size 4, image_per_prompt 4
    ranks = _branch_ranks(world, batch_size=batch, image_per_prompt=ipp)
    for counter in (0, 1, 17):
        draws = [s.global_draw(counter) for s in ranks]
        assert all(d == draws[0] for d in draws)  # identical global list on every rank
        slices = [s.batch_for(counter) for s in ranks]
        assert all(len(x) == batch for x in slices)
        # Slices are consecutive, non-overlapping segments whose concatenation is the global list.
        assert [i for x in slices for i in x] == draws[0]
        counts = Counter(draws[0])
        assert len(counts) == world * batch // ipp
        assert set(counts.values()) == {ipp}
    assert ranks[0].global_draw(0) != ranks[0].global_draw(1)


def test_branch_sampler_copies_of_a_prompt_spread_across_ranks():
    # With 4 ranks x 4 images and 4 copies per prompt, a prompt seen on only one rank would need all
    # four copies to land in one slice; over many draws the copies must be seen on several ranks.
    ranks = _branch_ranks(4, batch_size=4, image_per_prompt=4)
    spread = 0
    for counter in range(50):
        owners = {}
        for r, s in enumerate(ranks):
            for i in s.batch_for(counter):
                owners.setdefault(i, set()).add(r)
        spread += sum(len(v) > 1 for v in owners.values())
    assert spread > 0


def test_branch_iterator_follows_trainer_counter_and_advances_by_itself():
    ranks = _branch_ranks(2, batch_size=4, image_per_prompt=4)
    iters = [iter(s) for s in ranks]
    rollouts = 3
    for epoch in range(2):
        for rollout in range(rollouts):
            c = branch_counter(epoch, rollout, rollouts)
            for s in ranks:
                s.set_counter(c)
            got = [next(it) for it in iters]
            assert got == [s.batch_for(c) for s in ranks]
    assert branch_counter(2, 0, rollouts) == ranks[0].counter == 6  # next draw, without any set_counter
    solo = BranchPromptSampler(N_PROMPTS, 4, 4)
    assert list(islice(solo, 3)) == [solo.batch_for(c) for c in range(3)]


def test_branch_sampler_state_resumes_at_the_next_draw():
    s = BranchPromptSampler(N_PROMPTS, 4, 2, num_replicas=2, rank=1)
    it = iter(s)
    for _ in range(5):
        next(it)
    state = s.state_dict()
    expected = [next(it) for _ in range(3)]
    resumed = BranchPromptSampler(N_PROMPTS, 4, 2, num_replicas=2, rank=1)
    resumed.load_state_dict(state)
    assert state == {"counter": 5}
    assert list(islice(resumed, 3)) == expected


def test_branch_sampler_rejects_indivisible_budgets_with_key_names():
    expected = "sample.num_image_per_prompt=4 must divide processes x sample.collection_batch_size = 3 x 2"
    with pytest.raises(ValueError, match=expected):
        BranchPromptSampler(N_PROMPTS, 2, 4, num_replicas=3, rank=0)
    with pytest.raises(ValueError, match="needs 40 prompts"):
        BranchPromptSampler(N_PROMPTS, 40, 1)
