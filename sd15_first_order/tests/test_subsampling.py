"""Which transitions train and how they are batched (spec §5.2, §11 items 8-9)."""
import pytest
import torch

from sd15fo.schedule import ddim_step
from sd15fo.subsampling import num_train_timesteps, shuffle_and_batch, timestep_rows


def test_k_is_11_for_50_steps_at_fraction_02_and_n_at_fraction_1():
    assert num_train_timesteps(50, 0.2) == 11
    assert num_train_timesteps(50, 1.0) == 50
    assert num_train_timesteps(10, 0.5) == 6


def test_low_variance_rows_start_with_the_final_step_then_one_step_per_trunk_from_low_noise_up():
    rows = timestep_rows(200, 50, 0.2, low_var=True, generator=torch.Generator().manual_seed(0))
    assert rows.shape == (200, 51)
    assert bool((rows[:, 0] == 49).all())
    for m in range(1, 11):  # column m lies in trunk 10 - m: steps 5(10-m) .. 5(10-m)+4
        trunk = 10 - m
        assert bool(((rows[:, m] >= 5 * trunk) & (rows[:, m] < 5 * trunk + 5)).all())
    # parity: the first pick can repeat the final step (it lies in the last trunk) — and does in 200 draws
    assert bool((rows[:, 1] == 49).any())


def test_clean_mode_never_trains_the_final_transition_twice():
    rows = timestep_rows(200, 50, 0.2, low_var=True, generator=torch.Generator().manual_seed(0), dedupe_final=True)
    assert bool((rows[:, 1] != 49).all()) and bool((rows[:, 1] >= 45).all())
    assert set(rows[:, 1].tolist()) == {45, 46, 47, 48}


def test_rows_without_low_variance_are_the_final_step_then_a_permutation():
    rows = timestep_rows(5, 50, 0.2, low_var=False, generator=torch.Generator().manual_seed(1))
    assert rows.shape == (5, 50) and bool((rows[:, 0] == 49).all())
    for row in rows:
        assert sorted(row[1:].tolist()) == list(range(49))


def test_fraction_one_rows_are_permutations_of_every_step():
    rows = timestep_rows(3, 50, 1.0, low_var=True, generator=torch.Generator().manual_seed(2))
    assert rows.shape == (3, 50)
    for row in rows:
        assert sorted(row.tolist()) == list(range(50))


def test_shuffled_micro_batches_hold_real_transitions():
    """After shuffling, every (x_t, x_t', t, ε_old) is one transition of one trajectory: re-running the DDIM step
    on (ε_old, x_t, t) with that trajectory's noise at that step reproduces x_t'."""
    gen = torch.Generator().manual_seed(3)
    table = torch.linspace(0.9991, 0.0047, 1000, dtype=torch.float64)
    m, n = 6, 50
    steps = torch.arange(981, 0, -20)
    x = torch.randn(m, 4, 2, 2, generator=gen, dtype=torch.float64)
    latents, eps_all, noises = [x], [], []
    for t in steps:
        eps, z = torch.randn_like(x), torch.randn(x.shape, generator=gen, dtype=torch.float64)
        x = ddim_step(table, eps, t, x, eta=1.0, noise=z).prev_sample
        latents.append(x)
        eps_all.append(eps)
        noises.append(z)
    noises = torch.stack(noises, 1)  # [M, N, ...]
    samples = {"timesteps": steps.repeat(m, 1), "latents": torch.stack(latents, 1), "noise_preds": torch.stack(eps_all, 1),
               "trajectory": torch.arange(m), "prompts": [f"p{i}" for i in range(m)]}
    batches, columns = shuffle_and_batch(samples, batch_size=2, num_steps=n, timestep_fraction=0.2, low_var=True,
                                         generator=torch.Generator().manual_seed(4), keep_columns=11)
    assert len(batches) == 3 and columns.shape == (6, 51)
    seen = []
    for batch in batches:
        assert batch["latents"].shape == (2, 11, 4, 2, 2)
        for row in range(2):
            trajectory = int(batch["trajectory"][row])
            assert batch["prompts"][row] == f"p{trajectory}"
            seen.append(trajectory)
            for j in range(11):
                t = batch["timesteps"][row, j]
                s = int((981 - t) // 20)
                again = ddim_step(table, batch["noise_preds"][row, j][None], t, batch["latents"][row, j][None], eta=1.0,
                                  noise=noises[trajectory, s][None]).prev_sample
                torch.testing.assert_close(again[0], batch["next_latents"][row, j], rtol=0, atol=0)
    assert sorted(seen) == list(range(m))


def test_trajectories_that_do_not_fill_micro_batches_are_refused():
    samples = {"timesteps": torch.zeros(3, 50, dtype=torch.long), "latents": torch.zeros(3, 51), "noise_preds": torch.zeros(3, 50)}
    with pytest.raises(ValueError, match="do not split"):
        shuffle_and_batch(samples, batch_size=2, num_steps=50, timestep_fraction=0.2, low_var=True)
