"""DDIM step, x̂0 helper and helper schedules against their closed forms (spec §3, §4.6, §11 items 1-4, 10)."""
import math

import pytest
import torch

from sd15fo.schedule import (alpha_bar, ddim_step, helper_schedule, helper_stride, posterior_variance,
                             pred_orig_latent, previous_timestep)


@pytest.fixture(scope="module")
def scheduler():
    """The SD1.5 scheduler as the trainer builds it: the DDPM config of the (tiny) checkpoint -> DDIM."""
    from diffusers import DDIMScheduler, DDPMScheduler
    from rsm_testkit import get_tiny_model

    ddpm = DDPMScheduler.from_pretrained(get_tiny_model("sd15"), subfolder="scheduler")
    return DDIMScheduler.from_config(ddpm.config)


@pytest.fixture(scope="module")
def table(scheduler):
    return scheduler.alphas_cumprod.double()


def test_sd15_timesteps_and_alpha_bar_ends(scheduler):
    scheduler.set_timesteps(50)
    assert scheduler.timesteps.tolist() == list(range(981, 0, -20))
    assert scheduler.alphas_cumprod[0].item() == pytest.approx(0.99915, abs=1e-6)
    assert scheduler.alphas_cumprod[999].item() == pytest.approx(0.00466, abs=1e-5)


def test_previous_timestep_is_clamped_so_the_final_alpha_is_never_needed():
    t = torch.tensor([981, 21, 1])
    assert previous_timestep(t, 1000, 50).tolist() == [961, 1, 0]


def test_sampling_form_draws_mean_plus_sigma_noise_and_its_score_and_logprob(table):
    gen = torch.Generator().manual_seed(0)
    t = torch.tensor([981, 481, 21, 1])
    eps, x, z = (torch.randn(4, 4, 8, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    out = ddim_step(table, eps, t, x, eta=1.0, noise=z, strength=torch.tensor(2.0, dtype=torch.float64))
    torch.testing.assert_close(out.prev_sample, out.mean + out.std * z, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.score, -2.0 * z / out.std, rtol=1e-12, atol=1e-12)
    density = torch.distributions.Normal(out.mean, out.std).log_prob(out.prev_sample).mean(dim=(1, 2, 3))
    # the normalising constant log √(2π) is the reference's float32 value: 1.6e-8 off the float64 one
    torch.testing.assert_close(out.log_prob, density, rtol=0, atol=2e-8)
    a_t, a_prev = alpha_bar(table, t, x), alpha_bar(table, previous_timestep(t, 1000, 50), x)
    torch.testing.assert_close(out.std ** 2, posterior_variance(a_t, a_prev), rtol=1e-12, atol=0)


def test_the_direction_term_is_real_at_every_step(scheduler, table):
    scheduler.set_timesteps(50)
    t = scheduler.timesteps
    like = torch.zeros(50, 1, 1, 1, dtype=torch.float64)
    a_t, a_prev = alpha_bar(table, t, like), alpha_bar(table, previous_timestep(t, 1000, 50), like)
    assert bool((1 - a_prev - posterior_variance(a_t, a_prev) >= 0).all())


def test_scoring_form_residual_depends_on_eps_only(table):
    """s_θ - s_ref = k(μ_θ - μ_ref)/σ² = -k(c1 - c2)(ε_θ - ε_ref)/σ², the same for any x_t'."""
    gen = torch.Generator().manual_seed(1)
    t = torch.tensor([961, 301, 41])
    x, eps_a, eps_b, next_1, next_2 = (torch.randn(3, 4, 8, 8, generator=gen, dtype=torch.float64) for _ in range(5))
    k = torch.tensor([0.3, 1.0, 2.5], dtype=torch.float64).view(3, 1, 1, 1)
    a = ddim_step(table, eps_a, t, x, eta=1.0, prev_sample=next_1, strength=k)
    b = ddim_step(table, eps_b, t, x, eta=1.0, prev_sample=next_1, strength=k)
    residual = a.score - b.score
    torch.testing.assert_close(residual, k * (a.mean - b.mean) / a.std ** 2, rtol=1e-10, atol=1e-10)
    a_t, a_prev = alpha_bar(table, t, x), alpha_bar(table, previous_timestep(t, 1000, 50), x)
    c1 = torch.sqrt(1 - a_t) / torch.sqrt(a_t / a_prev)
    c2 = torch.sqrt(1 - a_prev - a.std ** 2)
    torch.testing.assert_close(residual, -k * (c1 - c2) * (eps_a - eps_b) / a.std ** 2, rtol=1e-9, atol=1e-9)
    other = ddim_step(table, eps_a, t, x, eta=1.0, prev_sample=next_2, strength=k).score - \
        ddim_step(table, eps_b, t, x, eta=1.0, prev_sample=next_2, strength=k).score
    torch.testing.assert_close(other, residual, rtol=1e-9, atol=1e-9)


def test_passing_a_next_state_and_a_generator_is_an_error(table):
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="not both"):
        ddim_step(table, x, torch.tensor([21]), x, eta=1.0, prev_sample=x, generator=torch.Generator())


def test_pred_orig_latent_inverts_the_forward_noising_and_keeps_t0_rows(table):
    gen = torch.Generator().manual_seed(2)
    x0, eps = (torch.randn(3, 4, 8, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([981, 500, 0])
    a = alpha_bar(table, t, x0)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * eps
    recovered = pred_orig_latent(table, eps, noisy, t)
    torch.testing.assert_close(recovered[:2], x0[:2], rtol=1e-10, atol=1e-10)
    assert torch.equal(recovered[2], noisy[2])


# spec §3.6: σ_t at stride 20 and the quirk σ'_t at stride 19 (float32 table)
TABLE = [(0, 0.45446, 0.44436), (10, 0.39075, 0.38187), (25, 0.28769, 0.28118), (47, 0.09989, 0.09981),
         (48, 0.03948, 0.04726), (49, 0.02065, 0.02065)]


@pytest.mark.parametrize("step, sigma, sigma_quirk", TABLE)
def test_helper_sigma_is_the_ddim_sigma_at_50_columns_and_the_stride_19_quirk_at_51(scheduler, step, sigma, sigma_quirk):
    table = scheduler.alphas_cumprod
    t = torch.tensor([[981 - 20 * step]])
    assert helper_schedule(table, t, helper_stride(50, 1000, 50, legacy=True)).sigmas.item() == pytest.approx(sigma, abs=6e-5)
    assert helper_schedule(table, t, helper_stride(51, 1000, 50, legacy=True)).sigmas.item() == pytest.approx(sigma_quirk, abs=6e-5)
    assert helper_stride(51, 1000, 50, legacy=False) == 20  # clean mode: the true stride
    step_sigma = ddim_step(table, torch.zeros(1, 1), t[0], torch.zeros(1, 1), eta=1.0, prev_sample=torch.zeros(1, 1)).std
    assert step_sigma.item() == pytest.approx(sigma, abs=6e-5)


def test_helper_weights_and_omegas_match_their_closed_forms(table):
    t = torch.tensor([[981, 601, 201, 21, 1]])
    helper = helper_schedule(table, t, 20)
    a_t, a_prev = table[t], table[(t - 20).clamp(min=0)]
    var = (1 - a_prev) * (1 - a_t / a_prev) / (1 - a_t)
    c1, c2 = torch.sqrt(1 - a_t) / torch.sqrt(a_t / a_prev), torch.sqrt(1 - a_prev - var)
    torch.testing.assert_close(helper.weights.flatten(), ((c1 - c2) / var.sqrt()).flatten(), rtol=1e-12, atol=0)
    torch.testing.assert_close(helper.omegas.flatten(), ((c1 - c2) * (1 - a_t).sqrt()).flatten(), rtol=1e-12, atol=0)
    assert helper.sigmas.shape == (1, 5, 1, 1, 1)
    assert math.isclose(helper.sigmas[0, 0].item(), var[0, 0].sqrt().item(), rel_tol=1e-12)
