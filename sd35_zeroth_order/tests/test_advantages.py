"""Group labels, the group normaliser and its cross-rank form (spec §3.5 seed_id, §4.5; §9 items 17-19)."""
import hashlib
import os
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from sd35zo.advantages import (
    gather_group_advantages,
    group_advantages,
    grouping_labels,
    mean_group_size,
    mean_group_std,
    rollout_seed_ids,
    seed_id,
    zero_std_ratio,
)
from sd35zo.config_check import normalize_exploration_schedule
from sd35zo.sde import flow_sigmas, timesteps_from_sigmas


def _rewards(n, seed=0):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------- normaliser (§9.17)

def test_each_group_has_zero_mean_and_std_shrunk_by_the_epsilon():
    labels = ["a"] * 5 + ["b"] * 3 + ["c"] * 4
    r = _rewards(12)
    adv = group_advantages(r, labels, adv_clip=None)
    for g in "abc":
        rows = torch.tensor([lab == g for lab in labels])
        group_std = np.std(r[rows].numpy())  # population std (ddof 0)
        assert adv[rows].mean().item() == pytest.approx(0.0, abs=1e-12)
        assert np.std(adv[rows].numpy()) == pytest.approx(group_std / (group_std + 1e-4), rel=1e-10)


def test_advantage_of_a_row_matches_the_hand_formula():
    r = torch.tensor([1.0, 2.0, 4.0, 10.0, 20.0], dtype=torch.float64)
    labels = ["x", "x", "x", "y", "y"]
    mean, std = 7.0 / 3.0, np.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 3)
    adv = group_advantages(r, labels, adv_clip=None)
    assert adv[2].item() == pytest.approx((4.0 - mean) / (std + 1e-4), rel=1e-12)
    assert adv[3].item() == pytest.approx(-5.0 / (5.0 + 1e-4), rel=1e-12)


def test_constant_reward_groups_get_exactly_zero():
    # 0.1 three times: the float mean is not exactly 0.1, but the advantage must still be exactly 0.
    r = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 1.0, 0.0], dtype=torch.float64)
    labels = ["a", "a", "a", "b", "b", "c", "c"]
    adv = group_advantages(r, labels)
    assert torch.equal(adv[:5], torch.zeros(5, dtype=torch.float64))
    assert adv[5] > 0 > adv[6]
    # Also with the batch-wide scale, whose denominator no longer vanishes.
    assert torch.equal(group_advantages(r, labels, global_std=True)[:5], torch.zeros(5, dtype=torch.float64))


def test_global_std_divides_by_the_std_of_all_rewards():
    r = _rewards(9, seed=1)
    labels = ["a"] * 3 + ["b"] * 6
    adv = group_advantages(r, labels, adv_clip=None, global_std=True)
    batch_std = np.std(r.numpy())
    a_rows = r[:3]
    expected = (a_rows - a_rows.mean()) / (batch_std + 1e-4)
    torch.testing.assert_close(adv[:3], expected, rtol=1e-12, atol=1e-12)


def test_advantages_are_clamped_to_the_clip_range():
    # One outlier in a group of 100: its z-score is ~9.9, clamped to 5; the others are untouched.
    r = torch.zeros(100, dtype=torch.float64)
    r[0] = 1.0
    adv = group_advantages(r, ["g"] * 100, adv_clip=5.0)
    assert adv[0].item() == 5.0
    unclipped = group_advantages(r, ["g"] * 100, adv_clip=None)
    assert unclipped[0].item() > 9.0
    torch.testing.assert_close(adv[1:], unclipped[1:])


def test_single_label_is_a_batch_z_score():
    r = _rewards(16, seed=2)
    adv = group_advantages(r, grouping_labels("batch", prompts=["p"] * 16), adv_clip=None)
    expected = (r - r.mean()) / (r.std(unbiased=False) + 1e-4)
    torch.testing.assert_close(adv, expected, rtol=1e-12, atol=1e-12)


def test_two_dimensional_rewards_are_normalised_per_column():
    # The default trainer repeats each reward over its T transitions; each column equals the 1-d result.
    r = _rewards(6, seed=3)
    labels = ["a", "b", "a", "b", "a", "b"]
    adv2 = group_advantages(r[:, None].repeat(1, 4), labels)
    assert adv2.shape == (6, 4)
    for j in range(4):
        # [R, 4] and [R, 1] inputs reduce through tensors of different shapes: float64 tolerance, contract §7
        torch.testing.assert_close(adv2[:, j], group_advantages(r, labels), rtol=1e-12, atol=1e-12)


def test_dtype_follows_rewards_and_label_count_must_match():
    assert group_advantages(torch.tensor([1.0, 2.0]), ["a", "a"]).dtype == torch.float32
    assert group_advantages(torch.tensor([1, 2]), ["a", "a"]).dtype == torch.float32
    with pytest.raises(ValueError, match="labels"):
        group_advantages(torch.tensor([1.0, 2.0]), ["a"])


# ---------------------------------------------------------------- labels and seed ids (§9.18-19)

def test_seed_id_is_sha256_of_the_key_first_eight_bytes_mod_2_63_minus_1():
    key = "a photo of a cat|13|1|2"
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
    expected = int(digest[:16], 16) % (2**63 - 1)
    assert seed_id("a photo of a cat", 13, 1, 2) == expected
    assert seed_id("a photo of a cat", 13, 1, 2) == expected  # deterministic


def test_seed_ids_fit_int64_and_differ_between_noises():
    ids = rollout_seed_ids(["p", "p", "q", "p"], base_seed=5, rank=0)
    assert ids.dtype == torch.int64 and ids.shape == (4,)
    assert bool((ids >= 0).all()) and bool((ids < 2**63 - 1).all())
    assert len(set(ids.tolist())) == 4  # the same prompt twice is still two noises
    assert ids[2].item() == seed_id("q", 5, 0, 2)
    assert seed_id("p", 5, 1, 0) != ids[0].item()  # rank is part of the key
    assert seed_id("p", 6, 0, 0) != ids[0].item()  # so is the rollout's base seed


def _branch_rows(k_schedule, samples, train_steps):
    """Row layout of a branch rollout (spec §3.5): by step, sample-major, k_i branches consecutive."""
    rows = [(i, b) for i, k in enumerate(k_schedule) if k > 0 and i < train_steps
            for b in range(samples) for _ in range(k)]
    return [i for i, _ in rows], [b for _, b in rows]


def test_seed_step_groups_are_the_k_branches_of_one_noise_at_one_step():
    k = normalize_exploration_schedule([6, 6, 8, 10, 0, 0, 0, 0, 0, 0], 10)  # lowsnr2
    t = timesteps_from_sigmas(flow_sigmas(10))
    prompts = ["red cube", "two dogs", "red cube", "a clock"]  # a prompt may appear twice in a rollout
    ids = rollout_seed_ids(prompts, base_seed=3, rank=0)
    step_idx, sample_idx = _branch_rows(k, len(prompts), train_steps=9)
    labels = grouping_labels("seed", seed_ids=ids[sample_idx], timesteps=t[step_idx])
    assert len(labels) == 4 * (6 + 6 + 8 + 10)  # R = 120
    sizes = {label: labels.count(label) for label in labels}
    assert len(sizes) == 4 * 4
    for label, size in sizes.items():
        step = index_of_label_step(label, t)
        assert size == k[step]
    assert labels[0] == f"{ids[0].item()}|t=1000.0"
    assert mean_group_size(labels) == pytest.approx(120 / 16)


def index_of_label_step(label, t):
    return [str(float(x)) for x in t.tolist()].index(label.split("|t=")[1])


def test_prompt_step_groups_have_image_per_prompt_times_k_rows():
    # Two prompts, each drawn image_per_prompt = 3 times across two ranks, k = [2, 5, 0].
    k = normalize_exploration_schedule([2, 5, 0, 0], 4)
    t = timesteps_from_sigmas(flow_sigmas(4))
    rank_prompts = [["p0", "p1", "p0"], ["p1", "p0", "p1"]]
    labels = []
    for prompts in rank_prompts:
        step_idx, sample_idx = _branch_rows(k, len(prompts), train_steps=3)
        labels += grouping_labels("prompt", prompts=[prompts[b] for b in sample_idx], timesteps=t[step_idx])
    for step, k_i in enumerate(k):
        for p in ("p0", "p1"):
            assert labels.count(f"{p}|t={float(t[step])}") == 3 * k_i


def test_prompt_labels_without_timesteps_are_the_prompts():
    assert grouping_labels("prompt", prompts=["a", "b", "a"]) == ["a", "b", "a"]


def test_timestep_in_label_is_the_python_string_of_the_float32_value():
    t = timesteps_from_sigmas(flow_sigmas(10))
    from_tensor = grouping_labels("seed", seed_ids=[7], timesteps=t[1:2])
    from_float = grouping_labels("seed", seed_ids=[7], timesteps=[t[1].item()])
    assert from_tensor == from_float == [f"7|t={t[1].item()}"]
    # Upstream: numpy float32 array → .tolist() → str(); e.g. "7|t=960.1293334960938" for σ_1 of 10 steps.
    assert from_tensor[0] == f"7|t={t.numpy().tolist()[1]}"
    assert from_tensor[0].startswith("7|t=960.129")


def test_grouping_labels_validate_strategy_and_inputs():
    with pytest.raises(ValueError, match="group_strategy"):
        grouping_labels("noise", prompts=["a"])
    with pytest.raises(ValueError, match="seed_ids"):
        grouping_labels("seed", timesteps=[1000.0])
    with pytest.raises(ValueError, match="timesteps"):
        grouping_labels("seed", seed_ids=[1])
    with pytest.raises(ValueError, match="rows"):
        grouping_labels("prompt", prompts=["a", "b"], timesteps=[1000.0])


def test_zero_std_ratio_counts_constant_groups():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 0.5, 2.0], dtype=torch.float64)
    labels = ["a", "a", "b", "b", "c", "c", "c", "d"]  # a, c, d constant (a singleton has std 0)
    assert zero_std_ratio(r, labels) == pytest.approx(3 / 4)
    assert mean_group_std(r, labels) == pytest.approx(0.5 / 4)
    assert zero_std_ratio(torch.zeros(0), []) == 0.0


# ---------------------------------------------------------------- gather → normalise → slice (§9.17)

def test_gather_without_process_group_is_the_local_normaliser():
    r = _rewards(8, seed=4).float()
    labels = ["a", "b"] * 4
    out = gather_group_advantages(r, labels)
    assert torch.equal(out.local, group_advantages(r, labels))
    assert out.all_labels == labels and out.local.dtype == torch.float32


def _rank_inputs(rank):
    # Rank 0 holds 5 rows, rank 1 holds 7: groups "a", "b" span both ranks; "c" lives on rank 1 only.
    r = _rewards(12, seed=5).float()
    labels = ["a", "b", "a", "b", "a", "b", "a", "c", "c", "b", "a", "c"]
    cut = 5
    return (r[:cut], labels[:cut]) if rank == 0 else (r[cut:], labels[cut:])


def _gather_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=__import__("datetime").timedelta(seconds=30))
    try:
        r, labels = _rank_inputs(rank)
        out = gather_group_advantages(r, labels, adv_clip=5.0)
        torch.save({"local": out.local, "all": out.all_advantages, "labels": out.all_labels},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_rank_gather_normalises_across_ranks_and_returns_each_rank_its_own_rows(tmp_path):
    world = 2
    ctx = mp.start_processes(_gather_worker, args=(world, str(tmp_path / "init"), str(tmp_path)),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    try:
        while not ctx.join(timeout=1):
            assert time.monotonic() < deadline, "2-process gather test timed out"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    full_r = torch.cat([_rank_inputs(0)[0], _rank_inputs(1)[0]])
    full_labels = _rank_inputs(0)[1] + _rank_inputs(1)[1]
    reference = group_advantages(full_r.double(), full_labels).float()
    results = [torch.load(tmp_path / f"rank{k}.pt") for k in range(world)]
    assert torch.equal(results[0]["local"], reference[:5])
    assert torch.equal(results[1]["local"], reference[5:])
    assert results[0]["labels"] == results[1]["labels"] == full_labels
    assert torch.equal(results[0]["all"], results[1]["all"])
    # Normalising each rank alone would give different numbers for the groups that span ranks.
    assert not torch.allclose(group_advantages(*_rank_inputs(0)), reference[:5])
