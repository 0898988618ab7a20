import math

import pytest
import torch

from toy_experiments import ddpm
from toy_experiments.problem import (GaussianMixture, exact_eps, reference_mixture, reward, tilted_mixture,
                                     value_gradient)


def _points(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 4.0 * torch.randn(n, 2, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("alpha_bar", [1.0, 0.5, 0.0985, 0.00985])
def test_analytic_psi_equals_autograd_of_exact_mixture_densities(alpha_bar):
    x = _points().requires_grad_(True)
    log_ratio = tilted_mixture().noisy(alpha_bar).log_prob(x) - reference_mixture().noisy(alpha_bar).log_prob(x)
    (autograd_psi,) = torch.autograd.grad(log_ratio.sum(), x)
    torch.testing.assert_close(value_gradient(x.detach(), alpha_bar), autograd_psi, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("alpha_bar", [1.0, 0.3, 0.00985])
def test_closed_form_score_equals_autograd_of_log_prob(alpha_bar):
    for mix in (reference_mixture(), tilted_mixture()):
        x = _points(seed=1).requires_grad_(True)
        (grad,) = torch.autograd.grad(mix.noisy(alpha_bar).log_prob(x).sum(), x)
        torch.testing.assert_close(mix.noisy(alpha_bar).score(x.detach()), grad, rtol=1e-9, atol=1e-11)


def test_tilted_mixture_is_reference_times_exp_reward():
    # log p*(x) − log p(x) − r(x)/β must be the same constant (−log Z) everywhere.
    x = _points(seed=2)
    diff = tilted_mixture().log_prob(x) - reference_mixture().log_prob(x) - reward(x)
    assert diff.std() < 1e-10
    # And the spec's numbers: means shifted by (−0.5, 0), weights ∝ e^{−1.5} : e^{1.5} : 1.
    p_star = tilted_mixture()
    torch.testing.assert_close(p_star.means - reference_mixture().means,
                               torch.tensor([[-0.5, 0.0]] * 3, dtype=torch.float64))
    w = torch.tensor([math.exp(-1.5), math.exp(1.5), 1.0], dtype=torch.float64)
    torch.testing.assert_close(p_star.weights, w / w.sum())


def test_noisy_marginal_matches_forward_process_samples():
    # x_t = √ᾱ x0 + √(1−ᾱ) ε with x0 ~ p* has the mean and covariance of tilted_mixture().noisy(ᾱ).
    g = torch.Generator().manual_seed(3)
    ab = 0.2
    mix = tilted_mixture()
    x0 = mix.sample(200_000, g)
    xt = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    noisy = mix.noisy(ab)
    mean = noisy.weights @ noisy.means
    torch.testing.assert_close(xt.mean(0), mean, atol=0.02, rtol=0)
    second = noisy.std**2 * torch.eye(2, dtype=torch.float64) + torch.einsum("k,ki,kj->ij", noisy.weights, noisy.means, noisy.means)
    torch.testing.assert_close(torch.cov(xt.T), second - torch.outer(mean, mean), atol=0.03, rtol=0)


def test_exact_eps_gives_the_posterior_mean_as_x0_prediction():
    schedule = ddpm.linear_schedule()
    mix = tilted_mixture()
    eps = exact_eps(mix, schedule.alphas_bar)
    x, t = _points(seed=4), ddpm.TEST_T
    x0_hat = ddpm.predict_x0(x, eps(x, t), schedule.ab(t))
    # For one Gaussian N(m, I) the posterior mean is √ᾱ x + (1−ᾱ) m; for the mixture use Tweedie directly.
    torch.testing.assert_close(x0_hat, mix.posterior_mean(x, schedule.ab(t)))
    one = GaussianMixture(torch.tensor([[1.0, -2.0]], dtype=torch.float64), torch.ones(1, dtype=torch.float64))
    ab = schedule.ab(t)
    x0_one = ddpm.predict_x0(x, exact_eps(one, schedule.alphas_bar)(x, t), ab)
    torch.testing.assert_close(x0_one, math.sqrt(ab) * x + (1 - ab) * one.means)
