import math

import pytest
import torch

from toy_experiments import ddpm, estimators as est
from toy_experiments.problem import (GaussianMixture, REWARD_GRAD, exact_eps, expected_reward_gradient, reward,
                                     tilted_mixture, value_gradient)

T = ddpm.TEST_T
SCHEDULE = ddpm.linear_schedule()
AB_T, AB_1 = SCHEDULE.ab(T), SCHEDULE.ab(ddpm.prev_t(T))
SIGMA, OMEGA = ddpm.posterior_std(AB_T, AB_1), ddpm.guidance_scale(AB_T, AB_1)
STEPS = len(ddpm.sampling_grid(T))
G = torch.tensor(REWARD_GRAD, dtype=torch.float64)
# A single unit Gaussian: its posterior E[x0 | x_t] = √ᾱ x_t + (1−ᾱ) m is affine, so the exact-ε DDPM sampler
# has E[x0 | x'] equal to it too (each step's mean is the true conditional mean), and the zeroth-order
# estimator's expectation is known in closed form: ω·√ᾱ_{t'}·g. Ψ itself is √ᾱ_t·g (p*_t is p_t shifted).
GAUSS = GaussianMixture(torch.tensor([[1.0, -0.5]], dtype=torch.float64), torch.ones(1, dtype=torch.float64))
X_T = torch.tensor([0.3, -0.2], dtype=torch.float64)


def _gauss_paths(n, seed):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(STEPS, n, 2, generator=g, dtype=torch.float64)
    paths = ddpm.rollout(exact_eps(GAUSS, SCHEDULE.alphas_bar), SCHEDULE, X_T.expand(n, -1), T, noise)
    return reward(paths.x0), paths.xi_first


def test_schedule_reproduces_the_toy_constants():
    # Spec §7.1: ᾱ_389 ≈ 0.00985, first-step std σ_1 ≈ 0.4563, single-step ω ≈ 0.988.
    assert abs(AB_T - 0.00985) < 1e-4
    assert abs(SIGMA - 0.4563) < 1e-3
    assert abs(ddpm.guidance_scale(AB_T, SCHEDULE.ab(T - 1)) - 0.988) < 1e-3
    assert STEPS == 39


def test_omega_option_selects_the_jump_or_the_toys_single_step_scale():
    jump = ddpm.credited_guidance_scale(SCHEDULE, T, "jump")
    single = ddpm.credited_guidance_scale(SCHEDULE, T, "single-step")
    assert jump == OMEGA and abs(jump - 0.887) < 1e-3
    assert abs(single - 0.988) < 1e-3  # the toy scripts' value (spec §4.2)
    # The estimator is linear in ω: the same samples give estimates 11 % larger with the toy's ω ...
    r, xi = _gauss_paths(64, seed=7)
    torch.testing.assert_close(est.zeroth_order(r, xi, SIGMA, single, True),
                               single / jump * est.zeroth_order(r, xi, SIGMA, jump, True))
    # ... so on the Gaussian its mean overshoots Ψ by that factor, where the jump's ω lands on Ψ.
    overshoot = single * math.sqrt(AB_1) / math.sqrt(AB_T)  # closed-form mean / Ψ, both ∝ g
    assert 1.10 < overshoot < 1.12 and abs(jump * math.sqrt(AB_1) / math.sqrt(AB_T) - 1) < 5e-3
    with pytest.raises(ValueError, match="omega"):
        ddpm.credited_guidance_scale(SCHEDULE, T, "half")


def test_closed_form_mean_of_zeroth_order_estimator_is_psi_on_a_gaussian():
    mean = OMEGA * math.sqrt(AB_1) * G
    psi = math.sqrt(AB_T) * G
    # ω of the actual stride-10 step makes the estimator target Ψ up to (1−ᾱ_{t'})/(1−ᾱ_t) ≈ 0.997.
    torch.testing.assert_close(mean, psi, rtol=5e-3, atol=0)


def test_zeroth_order_estimators_converge_to_the_closed_form_value_within_standard_errors():
    truth = OMEGA * math.sqrt(AB_1) * G
    r, xi = _gauss_paths(2**16, seed=0)
    errors = {}
    for cv in (False, True):
        for m in (8, 12, 16):
            n = 2**m
            estimate = est.zeroth_order(r[:n], xi[:n], SIGMA, OMEGA, control_variate=cv)
            centred = r[:n] - r[:n].mean() if cv else r[:n]
            se = (OMEGA * centred[:, None] * xi[:n] / SIGMA).std(0) / math.sqrt(n)
            assert ((estimate - truth).abs() <= 4 * se + 1e-12).all(), (cv, m, estimate, truth, se)
            errors[cv, m] = (estimate - truth).norm().item()
    # Larger N gets closer: standard errors shrink as 1/√N, by 16× from 2^8 to 2^16.
    assert errors[False, 16] < errors[False, 8] and errors[True, 16] < errors[True, 8]


def test_control_variate_lowers_variance_and_leaves_the_mean():
    truth = OMEGA * math.sqrt(AB_1) * G
    n, groups = 64, 1024
    r, xi = _gauss_paths(n * groups, seed=1)
    plain = est.zeroth_order(r.view(groups, n), xi.view(groups, n, 2), SIGMA, OMEGA, control_variate=False)
    cv = est.zeroth_order(r.view(groups, n), xi.view(groups, n, 2), SIGMA, OMEGA, control_variate=True)
    # The reward's mean (~3) multiplies ξ without it; the group baseline removes that term.
    assert (cv.var(0) < 0.05 * plain.var(0)).all()
    se_plain, se_cv = plain.std(0) / math.sqrt(groups), cv.std(0) / math.sqrt(groups)
    assert ((plain.mean(0) - truth).abs() < 4 * se_plain).all()
    # The batch-mean baseline is not independent of the sample: E = (1 − 1/N)·truth exactly.
    assert ((cv.mean(0) - (1 - 1 / n) * truth).abs() < 4 * se_cv).all()


def test_first_order_lookahead_gradient_equals_finite_differences():
    eps = exact_eps(tilted_mixture(), SCHEDULE.alphas_bar)
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(STEPS, 3, 2, generator=g, dtype=torch.float64)
    x_t = torch.tensor([0.4, -0.9], dtype=torch.float64)
    stop = est.lookahead_stop(T, 0.8)
    grads = est.first_order_lookahead(eps, SCHEDULE, x_t, T, stop, noise)  # [3, 2]

    def end_reward(x):
        h = x.expand(3, -1)
        for i, s in enumerate(ddpm.sampling_grid(T)):
            e = eps(h, s)
            if s == stop:
                return reward(ddpm.predict_x0(h, e, SCHEDULE.ab(s)))
            ab, ab_p = SCHEDULE.ab(s), SCHEDULE.ab(ddpm.prev_t(s))
            h = ddpm.ddim_step(h, e, ab, ab_p, ddpm.posterior_std(ab, ab_p), noise[i])

    h = 1e-6
    fd = torch.stack([(end_reward(x_t + h * d) - end_reward(x_t - h * d)) / (2 * h) for d in torch.eye(2, dtype=torch.float64)], -1)
    torch.testing.assert_close(grads, fd, rtol=1e-5, atol=1e-7)


def test_first_order_estimators_on_an_exact_gaussian_denoiser_have_closed_forms():
    # For linear r, ∇_{x_t} r(E[x0|x_t]) = (√ᾱ/(1−ᾱ))·Cov_{p*}[x0|x_t]·g; on a single Gaussian that is √ᾱ·g = Ψ.
    eps = exact_eps(GAUSS, SCHEDULE.alphas_bar)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    dps = est.first_order_current_state(eps, SCHEDULE, x, T)
    torch.testing.assert_close(dps, (math.sqrt(AB_T) * G).expand(5, -1))
    # SQDF's deterministic DDIM jump is affine here too, but its slope is that of the ODE flow, not of the
    # posterior mean: √ᾱ_mid·(√ᾱ_mid√ᾱ_t + √(1−ᾱ_mid)√(1−ᾱ_t)), ≈ 4× Ψ at ᾱ_t = 0.01. An ODE lookahead
    # differentiates the deterministic flow, which is a different quantity from Ψ even with a perfect model.
    ab_mid = SCHEDULE.ab(195)
    slope = math.sqrt(ab_mid) * (math.sqrt(ab_mid * AB_T) + math.sqrt((1 - ab_mid) * (1 - AB_T)))
    sqdf = est.first_order_sqdf(eps, SCHEDULE, x, T, 195)
    torch.testing.assert_close(sqdf, (slope * G).expand(5, -1))
    assert slope > 3 * math.sqrt(AB_T)


def test_mixed_limit_quadrature_matches_monte_carlo():
    eps = exact_eps(tilted_mixture(), SCHEDULE.alphas_bar)
    x_t = torch.tensor([-0.3, 0.2], dtype=torch.float64)
    limit = est.mixed_limit(eps, SCHEDULE, x_t, T, order=48, omega=OMEGA)
    n = 2**15
    noise = torch.randn(STEPS, n, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    paths = ddpm.rollout(eps, SCHEDULE, x_t.expand(n, -1), T, noise, stochastic_after_first=False)
    r = reward(paths.x0)
    mc = est.zeroth_order(r, paths.xi_first, SIGMA, OMEGA, control_variate=True)
    se = (OMEGA * (r - r.mean())[:, None] * paths.xi_first / SIGMA).std(0) / math.sqrt(n)
    assert ((mc - limit).abs() < 4 * se).all(), (mc, limit, se)


def test_branching_tree_shares_first_step_noise_and_counts_nfe():
    eps = exact_eps(tilted_mixture(), SCHEDULE.alphas_bar)
    splits = est.branch_splits(T, 2)
    assert splits == [389, 189]
    paths, nfe = ddpm.tree_rollout(eps, SCHEDULE, torch.zeros(3, 2, dtype=torch.float64), T, splits, 2,
                                   torch.Generator().manual_seed(5))
    assert paths.x0.shape == (12, 2)
    xi = paths.xi_first.view(3, 2, 2, 2)  # [root, first branch, second branch, coord]
    torch.testing.assert_close(xi[:, :, 0], xi[:, :, 1])  # siblings after the second split share ξ_1
    assert not torch.allclose(xi[:, 0], xi[:, 1])
    # 20 steps (389 … 199) with 2 paths per root, 19 steps (189 … 9) with 4.
    assert nfe == 3 * (2 * 20 + 4 * 19)
    assert est.branch_nfe_factor_spec(2, 2) == (2 + 4) / 2 / 4


def test_exact_current_state_estimator_is_the_expected_reward_gradient_not_psi_on_the_mixture():
    # With a perfect model of p*, DPS = ∇E_{p*}[r(x0)|x_t] exactly (r is linear). On the mixture that is not Ψ:
    # Ψ averages the posterior covariance over tilts 0..1, the reward gradient takes it at tilt 1.
    eps = exact_eps(tilted_mixture(), SCHEDULE.alphas_bar)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    limit = expected_reward_gradient(tilted_mixture(), x, AB_T)
    torch.testing.assert_close(est.first_order_current_state(eps, SCHEDULE, x, T), limit)
    gap = (limit - value_gradient(x, AB_T)).pow(2).mean(-1).sqrt().mean()
    assert 0.02 < gap < 0.2
    # On the single Gaussian the covariance does not depend on the tilt, and the two agree.
    torch.testing.assert_close(expected_reward_gradient(GAUSS, x, AB_T), (math.sqrt(AB_T) * G).expand(16, -1))


def _gaussian_prefix_fraction_closed_form():
    """f(s) of the exact-ε sampler on GAUSS, by hand. Each step is affine and isotropic, x' = A_s·x + c_s + σ_s ξ,
    so the noise of step j reaches the end point with gain Π_{i>j} A_i and Var(r | x_s) = |g|²·Σ_{j ≥ s} of
    (Π_{i>j} A_i)²σ_j². By the law of total variance f(s) = 1 − Var(r | x_s) / Var(r | x_t)."""
    grid = ddpm.sampling_grid(T)
    gains, sigmas = [], []
    for s in grid:
        ab, ab_p = SCHEDULE.ab(s), SCHEDULE.ab(ddpm.prev_t(s))
        sigma = ddpm.posterior_std(ab, ab_p)
        x = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
        mean = ddpm.ddim_step(x, exact_eps(GAUSS, SCHEDULE.alphas_bar)(x, s), ab, ab_p, sigma, None)
        gains.append((mean[1, 0] - mean[0, 0]).item())
        sigmas.append(sigma)
    reach = [math.prod(gains[j + 1:]) ** 2 * sigmas[j] ** 2 for j in range(len(grid))]
    return {s: sum(reach[:j]) / sum(reach) for j, s in enumerate(grid) if j > 0}


def test_shared_prefix_fraction_matches_the_closed_form_on_a_gaussian():
    closed = _gaussian_prefix_fraction_closed_form()
    share = est.shared_prefix_fraction(exact_eps(GAUSS, SCHEDULE.alphas_bar), SCHEDULE, X_T.float(), T, 2**13,
                                       torch.Generator().manual_seed(8))
    assert share.states == list(closed)
    expected = torch.tensor(list(closed.values()))
    z = (share.fraction - expected) / (share.cov_se / share.var)
    assert z.abs().max() < 4, z
    # The closed form runs from ~0 after the first step to 1, and the last step (9 → data) has σ = 0, so a
    # prefix up to x_9 fixes the reward: the pair is identical and f is exactly 1.
    assert expected[0] < 0.01 and expected[len(expected) // 2] > 0.3
    assert share.fraction[-1].item() == pytest.approx(1.0, abs=1e-6)


def test_tree_cost_is_the_nfe_tree_rollout_counts():
    eps = exact_eps(GAUSS, SCHEDULE.alphas_bar)
    for n_split, n_branch in ((1, 1), (2, 2), (3, 2), (4, 2), (2, 4)):
        splits = est.branch_splits(T, n_split)
        _, nfe = ddpm.tree_rollout(eps, SCHEDULE, torch.zeros(2, 2, dtype=torch.float64), T, splits, n_branch,
                                   torch.Generator().manual_seed(9))
        assert est.tree_cost(T, splits, n_branch) == pytest.approx(nfe / (2 * n_branch**n_split) / STEPS)
    assert est.tree_cost(T, [189], 2) == pytest.approx(est.tree_cost(T, [389, 189], 2))  # a split at t is free


def test_tree_variance_factor_predicts_the_variance_of_a_tree_mean():
    # B·Var(mean reward over one tree's B end points)/Var(r), measured on 2^14 end points of the exact Gaussian
    # sampler, against 1 + Σ_j (b−1)·b^(m−1−j)·f(s_j) with the closed-form f.
    eps, fraction = exact_eps(GAUSS, SCHEDULE.alphas_bar), _gaussian_prefix_fraction_closed_form()
    for n_split, n_branch in ((2, 2), (4, 2), (2, 4)):
        splits, leaves = est.branch_splits(T, n_split), n_branch**n_split
        roots = 2**14 // leaves
        paths, _ = ddpm.tree_rollout(eps, SCHEDULE, X_T.float().expand(roots, -1).clone(), T, splits, n_branch,
                                     torch.Generator().manual_seed(10))
        r = reward(paths.x0).view(roots, leaves)
        measured = (r.mean(1).var() * leaves / r.var()).item()
        predicted = est.tree_variance_factor(T, splits, n_branch, fraction)
        assert predicted > 1.3  # the prefixes are shared, independent paths would give 1
        assert measured == pytest.approx(predicted, rel=4 * math.sqrt(2 / roots)), (n_split, n_branch)
