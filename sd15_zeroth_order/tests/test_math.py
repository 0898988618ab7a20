"""The math of spec §3, §8 and §7.3 against formulas and diffusers, one invariant per test (spec §12 items 1-14,
16-18). Float64 results are compared at 1e-12 relative, float32 ones at 1e-6 (contract §7)."""
import math

import numpy as np
import pytest
import torch

from sd15zo import advantages, losses, rsm, schedule
from sd15zo.ddim import ddim_ode_step, ddim_step_with_logprob

W_PRESET, W_LAMBDA, SCALE = 4.5, 0.5168997049331665, 8.70575076181


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape)).to(dtype)


# ------------------------------------------------------------------------------------------------ schedule (7, 5, 6)

def test_timesteps_are_981_to_1_and_t_prev_is_clamped_at_0(timesteps_50):
    assert timesteps_50[:3].tolist() == [981, 961, 941] and timesteps_50[-2:].tolist() == [21, 1]
    assert schedule.prev_timestep(timesteps_50, 50).tolist()[-2:] == [1, 0]
    assert schedule.prev_timestep(torch.tensor([5]), 50).item() == 0


def test_sigma_pcpo_is_a_root_of_pcpos_quadratic_and_takes_the_c1_plus_c2_branch_at_w_4_5(sd15_scheduler,
                                                                                           timesteps_50):
    a, a_prev = schedule.step_alphas(sd15_scheduler.alphas_cumprod.double(), timesteps_50, 50)
    sigma = schedule.sigma_pcpo(a, a_prev, W_PRESET)
    c1, c2 = schedule.c1(a, a_prev), schedule.c2(a_prev, sigma)
    quadratic = (1 + W_PRESET ** 2) * sigma ** 2 - 2 * W_PRESET * c1 * sigma + c1 ** 2 - (1 - a_prev)
    assert quadratic.abs().max() < 1e-12
    np.testing.assert_allclose((c1 + c2) / sigma, np.full(50, W_PRESET), rtol=1e-12)
    assert float(sigma[0]) == pytest.approx(0.446712, abs=1e-5)


def test_small_w_lands_on_the_c1_minus_c2_branch_and_has_no_real_root_at_the_last_steps(sd15_scheduler, timesteps_50):
    a, a_prev = schedule.step_alphas(sd15_scheduler.alphas_cumprod.double(), timesteps_50, 50)
    sigma = schedule.sigma_pcpo(a, a_prev, W_LAMBDA)
    real = timesteps_50 >= 141
    assert torch.isnan(sigma[timesteps_50 <= 121]).all() and torch.isfinite(sigma[real]).all()
    c1, c2 = schedule.c1(a, a_prev)[real], schedule.c2(a_prev[real], sigma[real])
    np.testing.assert_allclose((c1 - c2) / sigma[real], np.full(int(real.sum()), W_LAMBDA), rtol=1e-10)


def test_natural_weight_reference_values_and_the_preset_scale(sd15_scheduler, timesteps_50):
    w = schedule.natural_weight(sd15_scheduler.alphas_cumprod.double(), timesteps_50, 50)
    table = dict(zip(timesteps_50.tolist(), w.tolist()))  # spec §3.6
    for t, expected in ((981, 0.5126), (781, 0.4380), (581, 0.3875), (381, 0.3760), (181, 0.4475), (21, 3.2748),
                        (1, 1.0032)):
        assert table[t] == pytest.approx(expected, abs=5e-5)
    assert float(w.mean()) == pytest.approx(0.51690, abs=1e-5)
    assert W_PRESET / float(w.mean()) == pytest.approx(SCALE, rel=1e-5)


def test_sigma_table_of_spec_3_6(sd15_scheduler, timesteps_50):
    a, a_prev = schedule.step_alphas(sd15_scheduler.alphas_cumprod.double(), timesteps_50, 50)
    ddpm, pcpo = schedule.sigma_ddpm(a, a_prev), schedule.sigma_pcpo(a, a_prev, W_PRESET)
    rows = dict(zip(timesteps_50.tolist(), zip(ddpm.tolist(), pcpo.tolist())))
    for t, (d, p) in {981: (0.454463, 0.446712), 381: (0.251790, 0.312825), 21: (0.039480, 0.035927),
                      1: (0.020648, 0.014764)}.items():
        assert rows[t] == pytest.approx((d, p), abs=2e-6)


# ------------------------------------------------------------------------------------------------ the step (1-4)

@pytest.mark.parametrize("algorithm", ["vw", "ddpo"])
def test_eta_0_step_equals_diffusers_ddim_for_scalar_and_per_row_timesteps(sd15_scheduler, timesteps_50, algorithm):
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(sd15_scheduler.config)
    ddim.set_timesteps(50)
    x, eps = randn(3, 4, 8, 8, seed=1, dtype=torch.float32), randn(3, 4, 8, 8, seed=2, dtype=torch.float32)
    for t in timesteps_50:
        expected = ddim.step(eps, t, x, eta=0.0).prev_sample
        ours = ddim_ode_step(sd15_scheduler.alphas_cumprod, eps, t, x, num_inference_steps=50, algorithm=algorithm)
        torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    rows = timesteps_50[[0, 25, 49]]
    ours = ddim_ode_step(sd15_scheduler.alphas_cumprod, eps, rows, x, num_inference_steps=50, algorithm=algorithm)
    for i, t in enumerate(rows):
        torch.testing.assert_close(ours[i], ddim.step(eps[i:i + 1], t, x[i:i + 1], eta=0.0).prev_sample[0],
                                   rtol=1e-6, atol=1e-6)


def test_eta_1_sigma_squared_is_diffusers_ddpm_posterior_variance(sd15_scheduler, timesteps_50):
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(sd15_scheduler.config)
    ddim.set_timesteps(50)
    sigma = schedule.step_sigma(sd15_scheduler.alphas_cumprod, timesteps_50, 50, 1.0, "vw")
    expected = torch.stack([ddim._get_variance(int(t), int(t) - 20) for t in timesteps_50])
    torch.testing.assert_close(sigma ** 2, expected, rtol=1e-5, atol=1e-8)


def test_log_prob_is_the_gaussian_log_density_mean_without_constants_and_0_at_the_mean(sd15_scheduler):
    x, eps, target = randn(2, 4, 8, 8, seed=3), randn(2, 4, 8, 8, seed=4), randn(2, 4, 8, 8, seed=5)
    t = torch.tensor([781, 181])
    kw = dict(num_inference_steps=50, eta=1.0, algorithm="uw-sigma", const_weight=W_PRESET)
    out = ddim_step_with_logprob(sd15_scheduler.alphas_cumprod, eps, t, x, prev_sample=target, **kw)
    sigma = out.std.reshape(-1)
    density = torch.distributions.Normal(out.mean, out.std).log_prob(target).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_prob, density + torch.log(sigma) + 0.5 * math.log(2 * math.pi),
                               rtol=1e-12, atol=1e-12)
    at_mean = ddim_step_with_logprob(sd15_scheduler.alphas_cumprod, eps, t, x, prev_sample=out.mean, **kw)
    assert at_mean.log_prob.abs().max() == 0


def test_step_returns_its_noise_keeps_a_given_prev_sample_and_refuses_both_prev_sample_and_generator(sd15_scheduler):
    x, eps, xi = randn(2, 4, 8, 8, seed=6), randn(2, 4, 8, 8, seed=7), randn(2, 4, 8, 8, seed=8)
    kw = dict(num_inference_steps=50, eta=1.0, algorithm="vw")
    out = ddim_step_with_logprob(sd15_scheduler.alphas_cumprod, eps, 581, x, noise=xi, **kw)
    torch.testing.assert_close(out.prev_sample, out.mean + out.std * xi, rtol=0, atol=0)
    assert out.noise is xi or torch.equal(out.noise, xi)
    drawn = ddim_step_with_logprob(sd15_scheduler.alphas_cumprod, eps, 581, x,
                                   generator=torch.Generator().manual_seed(0), **kw)
    torch.testing.assert_close(drawn.prev_sample, drawn.mean + drawn.std * drawn.noise, rtol=1e-12, atol=1e-12)
    given = ddim_step_with_logprob(sd15_scheduler.alphas_cumprod, eps, 581, x, prev_sample=xi, **kw)
    assert given.prev_sample is xi or torch.equal(given.prev_sample, xi)
    with pytest.raises(ValueError, match="prev_sample or generator"):
        ddim_step_with_logprob(sd15_scheduler.alphas_cumprod, eps, 581, x, prev_sample=xi,
                               generator=torch.Generator(), **kw)
    ode = ddim_step_with_logprob(sd15_scheduler.alphas_cumprod, eps, 581, x, **{**kw, "eta": 0.0})
    assert ode.log_prob is None and ode.noise is None and torch.equal(ode.prev_sample, ode.mean)


# ------------------------------------------------------------------------------------------------ losses (8-12)

def _logratio(alphas, algorithm, const_weight, t, seed=10):
    """(ℓ_θ − ℓ_old through the step, Δ_raw, ξ) for a stored transition x' = μ_old + σξ."""
    x, eps_old, eps_new = randn(3, 4, 8, 8, seed=seed), randn(3, 4, 8, 8, seed=seed + 1), randn(3, 4, 8, 8, seed=seed + 2)
    xi, ref = randn(3, 4, 8, 8, seed=seed + 3), randn(3, 4, 8, 8, seed=seed + 4)
    kw = dict(num_inference_steps=50, eta=1.0, algorithm=algorithm, const_weight=const_weight, model_output_ref=ref)
    old = ddim_step_with_logprob(alphas, eps_old, t, x, noise=xi, **kw)
    new = ddim_step_with_logprob(alphas, eps_new, t, x, prev_sample=old.prev_sample, **kw)
    return new.log_prob - old.log_prob, eps_new, eps_old, xi


@pytest.mark.parametrize("t", [torch.tensor([981, 481, 21]), torch.tensor(181)])
def test_log_ratio_equals_minus_the_noise_matching_terms_with_the_natural_weight(sd15_scheduler, t):
    alphas = sd15_scheduler.alphas_cumprod.double()
    log_rho, new, old, xi = _logratio(alphas, "vw", None, t)
    w = schedule.natural_weight(alphas, t.expand(3), 50)
    _, t1, t2 = losses.noise_matching_terms(new, old, xi, w, 1.0)
    torch.testing.assert_close(-(t1 + t2), log_rho, rtol=1e-12, atol=1e-12)


def test_log_ratio_identity_holds_for_uw_lambda_with_the_raw_delta_and_const_weight(sd15_scheduler):
    alphas = sd15_scheduler.alphas_cumprod.double()
    log_rho, new, old, xi = _logratio(alphas, "uw-lambda", W_LAMBDA, torch.tensor([961, 541, 141]))
    _, t1, t2 = losses.noise_matching_terms(new, old, xi, W_LAMBDA, 1.0)
    torch.testing.assert_close(-(t1 + t2), log_rho, rtol=1e-10, atol=1e-12)


def test_worst_equals_bad_and_best_equals_the_linear_term_in_float64():
    new, old, xi = randn(5, 4, 8, 8, seed=20), randn(5, 4, 8, 8, seed=21), randn(5, 4, 8, 8, seed=22)
    adv = torch.tensor([1.0, -2.0, 0.5, 3.0, -0.1], dtype=torch.float64)
    kw = dict(weight=W_PRESET, scale=SCALE, clip_range=1e-4, do_clip=False)
    bad = losses.noise_matching_row_loss(new, old, xi, adv, precision="bad", **kw).loss
    worst = losses.noise_matching_row_loss(new, old, xi, adv, precision="worst", **kw).loss
    best = losses.noise_matching_row_loss(new, old, xi, adv, precision="best", **kw).loss
    torch.testing.assert_close(worst, bad, rtol=1e-12, atol=1e-13)
    _, _, t2 = losses.noise_matching_terms(new, old, xi, W_PRESET, SCALE)
    torch.testing.assert_close(best, 1e-4 * adv.abs() + adv * t2, rtol=1e-12, atol=1e-15)


def test_on_policy_rows_are_never_clipped_and_their_gradient_is_a_omega_over_s_xi():
    old, xi = randn(4, 4, 8, 8, seed=30), randn(4, 4, 8, 8, seed=31)
    new = old.clone().requires_grad_(True)
    adv = torch.tensor([1.5, -0.7, 0.0, 4.0], dtype=torch.float64)
    out = losses.noise_matching_row_loss(new, old, xi, adv, W_PRESET, SCALE, "bad", 1e-4, True)
    torch.testing.assert_close(out.loss, 1e-4 * adv.abs(), rtol=0, atol=0)
    assert not out.clipped.any()
    out.loss.sum().backward()
    expected = adv.reshape(-1, 1, 1, 1) * (W_PRESET / SCALE) * xi / xi[0].numel()
    torch.testing.assert_close(new.grad, expected, rtol=1e-12, atol=1e-16)


def test_pcpo_loss_is_logrho_ppo_plus_a_constant_and_clips_where_ppo_has_no_gradient():
    adv = torch.tensor([2.0, -1.0, 0.5, -3.0, 1.0, -0.5], dtype=torch.float64)
    m = torch.tensor([-5e-4, 5e-4, 2e-5, -2e-5, 1e-3, -1e-3], dtype=torch.float64, requires_grad=True)
    eps = 1e-4
    inner = eps * adv.abs() + adv * m
    pcpo = torch.clamp(inner, min=0.0)
    log_rho = -m
    ppo = torch.maximum(-adv * (1 + log_rho), -adv * torch.clamp(1 + log_rho, 1 - eps, 1 + eps))
    torch.testing.assert_close(pcpo - ppo, adv + eps * adv.abs(), rtol=1e-12, atol=1e-15)
    grad_pcpo, = torch.autograd.grad(pcpo.sum(), m, retain_graph=True)
    grad_ppo, = torch.autograd.grad(ppo.sum(), m)
    torch.testing.assert_close(grad_pcpo, grad_ppo, rtol=0, atol=0)
    clipped = inner < 0
    assert torch.equal(clipped, grad_ppo == 0) and clipped.any() and (~clipped).any()


def test_advantages_beyond_the_clip_count_as_the_clip():
    adv = losses.clamp_advantages(torch.tensor([-9.0, -5.0, 0.3, 5.0, 12.0]), 5.0)
    assert adv.tolist() == pytest.approx([-5.0, -5.0, 0.3, 5.0, 5.0])


def test_ratio_losses_clip_outside_the_trust_region():
    adv = torch.tensor([1.0, 1.0, -1.0])
    out = losses.ratio_row_loss(torch.tensor([0.0, 0.2, -0.2]), torch.zeros(3), adv, 0.1, "ddpo")
    assert out.clipped.tolist() == [False, True, True]
    assert out.loss.tolist() == pytest.approx([-1.0, -1.1, 0.9])
    assert out.log_approx_error[0] == 0
    out = losses.ratio_row_loss(torch.tensor([0.05, 0.2]), torch.zeros(2), torch.ones(2), 0.1, "logrho")
    assert out.loss.tolist() == pytest.approx([-1.05, -1.1]) and out.clipped.tolist() == [False, True]


# ------------------------------------------------------------------------------------------------ RSM reduction (13, 14)

def test_rsm_reduction_with_kappa_1_all_rows_valid_is_the_baseline_batch_mean_and_ignores_masked_rows():
    row_loss = randn(6, seed=40).abs()
    ones = torch.ones(6)
    assert rsm.masked_policy_loss(row_loss, ones, torch.ones(6, dtype=torch.bool)).item() == pytest.approx(
        row_loss.mean().item(), rel=1e-12)
    mask = torch.tensor([True, False, True, True, False, True])
    changed = row_loss.clone()
    changed[~mask] = 1e6
    assert rsm.masked_policy_loss(changed, ones, mask).item() == pytest.approx(row_loss[mask].mean().item(), rel=1e-12)
    index, not_padding = rsm.pad_to_microbatches(10, 4)
    assert index.tolist() == list(range(10)) + [0, 0] and not_padding.tolist() == [True] * 10 + [False] * 2
    assert rsm.masked_policy_loss(row_loss, ones, torch.zeros(6, dtype=torch.bool)).item() == 0.0


def test_exploration_weight_is_mean_active_k_over_k():
    assert rsm.mean_active_k([4, 0, 0, 2, 0, 6]) == 4.0
    assert rsm.exploration_weights(torch.tensor([4.0, 2.0, 6.0]), 4.0).tolist() == pytest.approx([1.0, 2.0, 2 / 3])
    assert rsm.exploration_weights(torch.full((5,), 4.0), rsm.mean_active_k([4, 0, 4])).tolist() == [1.0] * 5
    with pytest.raises(ValueError):
        rsm.mean_active_k([0, 0])


def test_row_mask_drops_zero_advantages_unless_all_are_zero():
    assert rsm.row_mask(torch.tensor([0.0, 1.0, -2.0, 0.0])).tolist() == [False, True, True, False]
    assert rsm.row_mask(torch.zeros(3)).tolist() == [True] * 3


def test_anchor_cap_and_split_over_microbatches():
    assert rsm.anchor_target(800, 1760, 0.10) == 80
    assert rsm.anchor_target(5, 10, 0.10) == 1  # ⌊0.5⌋ raised to 1
    assert rsm.anchor_target(5, 10, 0.0) == 0
    gen = torch.Generator().manual_seed(0)
    kept = rsm.subsample_anchors(1760, 80, gen)
    assert kept.shape == (80,) and len(set(kept.tolist())) == 80
    assert rsm.subsample_anchors(5, 80, gen) is None
    parts = rsm.split_anchors(80, 200, gen)
    assert len(parts) == 200 and [p.numel() for p in parts] == [1] * 80 + [0] * 120
    assert sorted(torch.cat(parts).tolist()) == list(range(80))
    assert [p.numel() for p in rsm.split_anchors(7, 3, gen)] == [3, 2, 2]


# ------------------------------------------------------------------------------------------------ advantages (16-18)

def test_baseline_blocks_have_zero_mean_and_unit_population_std_and_constant_blocks_give_zero():
    rewards = torch.cat([randn(16, seed=50), torch.full((16,), 0.3, dtype=torch.float64), randn(16, seed=51)])
    adv = advantages.block_advantages(rewards, 16).double().reshape(3, 16)
    assert adv[[0, 2]].mean(dim=1).abs().max() < 1e-6
    np.testing.assert_allclose(adv[[0, 2]].std(dim=1, unbiased=False).numpy(), [1.0, 1.0], atol=1e-6)
    assert adv[1].abs().max() == 0


def test_rsm_groups_are_centred_scaled_by_std_plus_1e_4_and_zero_std_groups_give_zero():
    rewards = np.array([0.1, 0.3, 0.2, 0.4, 0.5, 0.5, 0.5, 0.5])
    labels = advantages.group_labels("prompt", ["p"] * 4 + ["q"] * 4, [0] * 8, [981] * 8)
    assert labels[0] == "p|t=981" and labels[-1] == "q|t=981"
    adv, stats = advantages.group_advantages(labels, rewards)
    std = rewards[:4].std()
    np.testing.assert_allclose(adv[:4], (rewards[:4] - rewards[:4].mean()) / (std + 1e-4), rtol=1e-12)
    assert np.abs(adv[:4].std() - std / (std + 1e-4)) < 1e-12 and abs(adv[:4].mean()) < 1e-12
    assert np.all(adv[4:] == 0) and stats.zero_std_ratio == 0.5 and stats.group_count == 2
    seed_labels = advantages.group_labels("seed", ["p"] * 2, [7, 9], [581, 581])
    assert seed_labels == ["7|t=581", "9|t=581"]


def test_pooled_rows_sliced_by_rank_give_each_process_its_own_rows():
    per_rank = [torch.arange(6) + 100 * r for r in range(3)]
    pooled = torch.cat(per_rank)
    for rank in range(3):
        assert torch.equal(advantages.local_slice(pooled, 3, rank), per_rank[rank])


def test_seed_ids_are_deterministic_in_range_and_differ_by_position_process_and_call():
    ids = advantages.seed_ids(["a", "a", "b"], 5, 0)
    assert ids == advantages.seed_ids(["a", "a", "b"], 5, 0)
    assert all(0 <= i <= 2**63 - 2 for i in ids) and len(set(ids)) == 3
    assert advantages.seed_ids(["a"], 5, 1) != advantages.seed_ids(["a"], 5, 0)
    assert advantages.seed_ids(["a"], 6, 0) != advantages.seed_ids(["a"], 5, 0)
