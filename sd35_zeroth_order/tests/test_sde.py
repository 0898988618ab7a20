"""The sigma schedule and the SDE/ODE steps against hand-derived formulas (spec §3.2-3.3, §9 items 1-7, 25)."""
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from sd35zo.config_check import normalize_exploration_schedule
from sd35zo.sde import (
    flow_sigmas,
    index_for_timestep,
    noise_scale,
    ode_step,
    sde_mean,
    sde_step_with_logprob,
    step_sigmas,
    timesteps_from_sigmas,
)

SHAPE = (3, 2, 4, 4)  # [B, C, H, W]


def _latents(seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g, dtype=dtype), torch.randn(SHAPE, generator=g, dtype=dtype)


# ---------------------------------------------------------------- schedule (§9.1)

def _sigma_by_hand(n, shift=3.0):
    """§3.2 in float64: u_j = linspace(1, σ_min_shifted, n), σ_j = shift(u_j); σ_n = 0."""
    shift_fn = lambda u: shift * u / (1 + (shift - 1) * u)
    u_min = shift_fn(0.001)
    u = [1.0 + (u_min - 1.0) * j / (n - 1) for j in range(n)] if n > 1 else [1.0]
    return [shift_fn(x) for x in u] + [0.0]


@pytest.mark.parametrize("n", [1, 2, 10, 40])
def test_sigma_table_matches_formula_and_is_strictly_decreasing_from_one_to_zero(n):
    sigmas = flow_sigmas(n)
    assert sigmas.shape == (n + 1,) and sigmas.dtype == torch.float32
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    torch.testing.assert_close(sigmas.double(), torch.tensor(_sigma_by_hand(n), dtype=torch.float64),
                               atol=1e-6, rtol=0)


def test_ten_step_table_matches_spec_values():
    # Spec §3.2 table (rounded to 4 decimals): σ_1, σ_5, σ_9 and the σ_min_shifted end point.
    sigmas = flow_sigmas(10)
    assert sigmas[1].item() == pytest.approx(0.9601, abs=5e-5)
    assert sigmas[5].item() == pytest.approx(0.7073, abs=5e-5)
    assert sigmas[9].item() == pytest.approx(0.0089, abs=5e-5)
    assert sigmas[9].item() == pytest.approx(3 * 0.0029940 / (1 + 2 * 0.0029940), rel=1e-4)


@pytest.mark.parametrize("n,shift", [(10, 3.0), (40, 3.0), (7, 1.0), (25, 5.0)])
def test_sigma_table_is_bit_identical_to_diffusers_scheduler(n, shift):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(n)
    sigmas = flow_sigmas(n, shift=shift)
    assert torch.equal(sigmas, scheduler.sigmas)
    assert torch.equal(timesteps_from_sigmas(sigmas), scheduler.timesteps)


def test_timesteps_are_thousand_sigma_and_index_lookup_inverts_them():
    sigmas = flow_sigmas(10)
    t = timesteps_from_sigmas(sigmas)
    assert t.shape == (10,)
    torch.testing.assert_close(t, 1000 * sigmas[:-1])
    for i in range(10):
        assert index_for_timestep(t, t[i]) == i
        assert index_for_timestep(t, t[i].item()) == i  # a Python float read back from a buffer
    assert torch.equal(index_for_timestep(t, t.flip(0)), torch.arange(9, -1, -1))


def test_index_lookup_rejects_a_timestep_not_in_the_schedule():
    t = timesteps_from_sigmas(flow_sigmas(10))
    with pytest.raises(ValueError, match="not in the schedule"):
        index_for_timestep(t, t[3] + 0.5)


def test_step_sigmas_returns_the_sigma_pair_of_each_stored_timestep():
    sigmas = flow_sigmas(10)
    t = timesteps_from_sigmas(sigmas)
    s, s_next = step_sigmas(sigmas, t[[4, 0, 9]])
    assert torch.equal(s, sigmas[[4, 0, 9]]) and torch.equal(s_next, sigmas[[5, 1, 10]])


def test_schedule_rejects_bad_step_counts():
    with pytest.raises(ValueError, match="num_steps"):
        flow_sigmas(0)


# ---------------------------------------------------------------- SDE step

def _hand_noise_scale(sigma, sigma_1, a=0.7):
    return a * math.sqrt(sigma / (1 - (sigma_1 if sigma == 1 else sigma)))


def test_noise_scale_and_step_std_match_spec_table():
    # Spec §3.2 table, a = 0.7: σ̃_0 = 3.5057, σ_t,0 = 0.7000; σ̃_5 = 1.0881, σ_t,5 = 0.3528.
    sigmas = flow_sigmas(10).double()
    x, v = _latents(0)
    for i, tilde, std in [(0, 3.5057, 0.7000), (1, 3.4351, 0.7430), (5, 1.0881, 0.3528), (9, 0.0664, 0.0063)]:
        out = sde_step_with_logprob(v, sigmas[i], sigmas[i + 1], x, sigma_max=float(sigmas[1]))
        assert out.tilde_sigma.flatten()[0].item() == pytest.approx(tilde, abs=5e-4)
        assert out.std_dev_t.flatten()[0].item() == pytest.approx(std, abs=5e-4)


@pytest.mark.parametrize("step", [0, 3, 8])
def test_log_prob_is_per_element_mean_of_the_gaussian_density(step):
    # §9.2: compare with torch.distributions.Normal, summing nothing — a mean over C,H,W per row.
    sigmas = flow_sigmas(10).double()
    x, v = _latents(1)
    target = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = sde_step_with_logprob(v, sigmas[step], sigmas[step + 1], x, prev_sample=target,
                                sigma_max=float(sigmas[1]))
    std = out.std_dev_t.expand_as(out.prev_sample_mean)
    reference = torch.distributions.Normal(out.prev_sample_mean, std).log_prob(target).mean(dim=(1, 2, 3))
    assert out.log_prob.shape == (SHAPE[0],)
    torch.testing.assert_close(out.log_prob, reference, rtol=1e-12, atol=1e-12)
    assert out.noise is None


def test_drawn_sample_is_mean_plus_std_times_returned_noise_and_rescoring_reproduces_it():
    # §9.3
    sigmas = flow_sigmas(10).double()
    x, v = _latents(3)
    drawn = sde_step_with_logprob(v, sigmas[2], sigmas[3], x, generator=torch.Generator().manual_seed(7),
                                  sigma_max=float(sigmas[1]))
    assert drawn.noise is not None
    torch.testing.assert_close(drawn.prev_sample, drawn.prev_sample_mean + drawn.std_dev_t * drawn.noise,
                               rtol=0, atol=1e-14)
    rescored = sde_step_with_logprob(v, sigmas[2], sigmas[3], x, prev_sample=drawn.prev_sample,
                                     sigma_max=float(sigmas[1]))
    torch.testing.assert_close(rescored.log_prob, drawn.log_prob, rtol=0, atol=1e-12)
    assert torch.equal(rescored.prev_sample_mean, drawn.prev_sample_mean)
    # With x' = μ + σ_t ε the density is −ε²/2 − log σ_t − ½ log 2π, per element.
    expected = (-0.5 * drawn.noise**2).mean(dim=(1, 2, 3)) - torch.log(drawn.std_dev_t.flatten()) \
        - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(drawn.log_prob, expected, rtol=0, atol=1e-12)


def test_same_generator_seed_draws_the_same_step_and_per_row_generators_are_independent_of_batch():
    sigmas = flow_sigmas(10)
    x, v = _latents(4, torch.float32)
    a = sde_step_with_logprob(v, sigmas[1], sigmas[2], x, generator=torch.Generator().manual_seed(5))
    b = sde_step_with_logprob(v, sigmas[1], sigmas[2], x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.prev_sample, b.prev_sample)
    gens = [torch.Generator().manual_seed(10 + i) for i in range(SHAPE[0])]
    full = sde_step_with_logprob(v, sigmas[1], sigmas[2], x, generator=gens)
    alone = sde_step_with_logprob(v[1:2], sigmas[1], sigmas[2], x[1:2], generator=[torch.Generator().manual_seed(11)])
    assert torch.equal(full.noise[1:2], alone.noise)


def test_deterministic_ode_step_is_plain_euler():
    # §9.4, first half: x' = x − h v.
    sigmas = flow_sigmas(10).double()
    x, v = _latents(5)
    for i in (0, 4, 9):
        h = (sigmas[i] - sigmas[i + 1]).item()
        torch.testing.assert_close(ode_step(v, sigmas[i], sigmas[i + 1], x), x - h * v, rtol=0, atol=1e-15)


def test_zero_noise_level_gives_euler_mean_and_zero_std():
    # §9.4, second half: σ̃ = 0 ⇒ μ = x − h v, σ_t = 0.
    sigmas = flow_sigmas(10).double()
    x, v = _latents(6)
    out = sde_step_with_logprob(v, sigmas[3], sigmas[4], x, noise_level=0.0, prev_sample=x)
    h = (sigmas[3] - sigmas[4]).item()
    torch.testing.assert_close(out.prev_sample_mean, x - h * v, rtol=0, atol=1e-15)
    assert bool((out.std_dev_t == 0).all())


def test_first_step_at_sigma_one_uses_the_schedule_second_sigma_and_stays_finite():
    # §9.5: σ = 1 would divide by zero in σ/(1−σ); the denominator uses σ_1 of the current schedule.
    for n in (10, 40):
        sigmas = flow_sigmas(n).double()
        x, v = _latents(7)
        out = sde_step_with_logprob(v, sigmas[0], sigmas[1], x, sigma_max=float(sigmas[1]),
                                    generator=torch.Generator().manual_seed(0))
        expected = _hand_noise_scale(1.0, sigmas[1].item())
        assert out.tilde_sigma.flatten()[0].item() == pytest.approx(expected, rel=1e-12)
        assert bool(torch.isfinite(out.log_prob).all()) and bool(torch.isfinite(out.prev_sample).all())
    with pytest.raises(ValueError, match="sigma_max"):
        sde_step_with_logprob(v, 1.0, 0.9, x)


def test_mean_equals_euler_maruyama_step_with_the_flow_score():
    # §9.6: μ = x − h (v − ½ σ̃² s) with s = −(x + (1−σ)v)/σ, at every step of the 10-step schedule.
    sigmas = flow_sigmas(10).double()
    x, v = _latents(8)
    for i in range(10):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        tilde = _hand_noise_scale(sigma, sigmas[1].item())
        score = -(x + (1 - sigma) * v) / sigma
        expected = x - (sigma - sigma_next) * (v - 0.5 * tilde**2 * score)
        out = sde_step_with_logprob(v, sigmas[i], sigmas[i + 1], x, sigma_max=float(sigmas[1]), prev_sample=x)
        torch.testing.assert_close(out.prev_sample_mean, expected, rtol=1e-12, atol=1e-12)
        assert out.std_dev_t.flatten()[0].item() == pytest.approx(tilde * math.sqrt(sigma - sigma_next), rel=1e-12)


def test_velocity_only_mean_recomputation_is_bit_identical_to_the_step_mean():
    # §9.7: the trainer's μ_θ path and the sampler's μ agree exactly, per-row sigmas included.
    sigmas = flow_sigmas(10)
    t = timesteps_from_sigmas(sigmas)
    x, v = _latents(9, torch.float32)
    rows = t[[0, 4, 8]]
    s, s_next = step_sigmas(sigmas, rows)
    step = sde_step_with_logprob(v, s, s_next, x, sigma_max=float(sigmas[1]),
                                 generator=torch.Generator().manual_seed(1))
    mean, tilde = sde_mean(v, x, s, s_next, sigma_max=float(sigmas[1]))
    assert torch.equal(mean, step.prev_sample_mean) and torch.equal(tilde, step.tilde_sigma)
    # Consumers recover σ̃ from the returned std and sqrt(h).
    torch.testing.assert_close(step.std_dev_t / step.sqrt_h.clamp_min(1e-12), tilde)


def test_per_row_sigmas_equal_separate_scalar_steps():
    sigmas = flow_sigmas(10).double()
    x, v = _latents(10)
    target, _ = _latents(11)
    idx = [0, 5, 9]
    batched = sde_step_with_logprob(v, sigmas[idx], sigmas[[i + 1 for i in idx]], x, prev_sample=target,
                                    sigma_max=float(sigmas[1]))
    for row, i in enumerate(idx):
        single = sde_step_with_logprob(v[row:row + 1], sigmas[i], sigmas[i + 1], x[row:row + 1],
                                       prev_sample=target[row:row + 1], sigma_max=float(sigmas[1]))
        torch.testing.assert_close(batched.log_prob[row:row + 1], single.log_prob, rtol=1e-13, atol=1e-13)


def test_log_prob_gradient_flows_through_the_mean_only():
    # x' is a constant: d log p / d v = mean_d((x' − μ)/σ_t² · dμ/dv), dμ/dv = −h(1 + σ̃²(1−σ)/(2σ)).
    sigmas = flow_sigmas(10).double()
    x, v = _latents(12)
    target, _ = _latents(13)
    v = v.clone().requires_grad_(True)
    target = target.clone().requires_grad_(True)
    out = sde_step_with_logprob(v, sigmas[2], sigmas[3], x, prev_sample=target, sigma_max=float(sigmas[1]))
    out.log_prob.sum().backward()
    sigma, h = sigmas[2].item(), (sigmas[2] - sigmas[3]).item()
    tilde = _hand_noise_scale(sigma, sigmas[1].item())
    coef = -h * (1 + tilde**2 * (1 - sigma) / (2 * sigma))
    n = x[0].numel()
    expected = (target.detach() - out.prev_sample_mean.detach()) / out.std_dev_t**2 * coef / n
    torch.testing.assert_close(v.grad, expected, rtol=1e-10, atol=1e-12)
    assert target.grad is None


def test_dtype_is_kept_and_promoted_to_at_least_float32():
    sigmas = flow_sigmas(10)
    x, v = _latents(14, torch.float16)
    out = sde_step_with_logprob(v, sigmas[1], sigmas[2], x, generator=torch.Generator().manual_seed(0))
    assert out.prev_sample.dtype == torch.float32 and out.log_prob.dtype == torch.float32
    x64, v64 = _latents(14, torch.float64)
    assert sde_step_with_logprob(v64, sigmas[1], sigmas[2], x64).prev_sample.dtype == torch.float64
    assert ode_step(v, sigmas[1], sigmas[2], x).dtype == torch.float32


def test_step_rejects_both_a_given_sample_and_a_generator_and_mismatched_rows():
    sigmas = flow_sigmas(10)
    x, v = _latents(15, torch.float32)
    with pytest.raises(ValueError, match="not both"):
        sde_step_with_logprob(v, sigmas[1], sigmas[2], x, prev_sample=x, generator=torch.Generator())
    with pytest.raises(ValueError, match="entries"):
        sde_step_with_logprob(v, sigmas[1:3], sigmas[2:4], x)
    with pytest.raises(ValueError, match="same shape"):
        sde_step_with_logprob(v[:2], sigmas[1], sigmas[2], x)


def test_noise_scale_matches_flow_grpo_formula_away_from_sigma_one():
    sigma = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    expected = 0.7 * torch.sqrt(sigma / (1 - sigma))
    torch.testing.assert_close(noise_scale(sigma, 0.7), expected, rtol=1e-15, atol=0)


# ---------------------------------------------------------------- exploration schedule (§9.25)


def test_exploration_schedule_drops_the_last_entry_of_a_length_n_list():
    assert normalize_exploration_schedule([6, 6, 8, 10, 0, 0, 0, 0, 0, 3], 10) == [6, 6, 8, 10, 0, 0, 0, 0, 0]


def test_exploration_schedule_uses_a_length_n_minus_one_list_as_is_and_repeats_an_int():
    assert normalize_exploration_schedule([1, 0, 2], 4) == [1, 0, 2]
    assert normalize_exploration_schedule(4, 10) == [4] * 9


@pytest.mark.parametrize("bad,n,match", [
    ([1, 2], 4, "length"), ([1, 2, 3, 4, 5], 4, "length"), (0, 10, ">= 1"), ([1, -1, 2], 4, r"\[1\]"),
    ([1, 2.5, 2], 4, r"\[1\]"), (2, 1, "num_steps"), ("3", 4, "int"), ([True, 1, 1], 4, r"\[0\]"),
])
def test_exploration_schedule_rejects_other_lengths_and_values(bad, n, match):
    with pytest.raises(ValueError, match=match):
        normalize_exploration_schedule(bad, n)
