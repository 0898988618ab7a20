"""The RSM `matching` row loss (spec §4.3, invariants 8-12) against Gaussian log-densities and autograd."""
import pytest
import torch

from flow_step_reference import (TinyVelocity, col, gaussian_logp, grads, perturb, rollout_rows, sde_mean,
                                 step_rows)
from sd35zo.ppo_loss import ppo_row_loss
from sd35zo.rsm_loss import matching_row_loss
from sd35zo.weighting import REWEIGHTS

ALL_STEPS = list(range(9))
EPS_C = 1e-4


def _current(model, rows):
    """v_θ, μ_θ and log p_θ(x') of the stored transitions under the current parameters."""
    v = model(rows["x"])
    mean = sde_mean(rows["x"], v, rows["sigma"], rows["h"], rows["sigma_tilde"])
    return v, mean, gaussian_logp(rows["x_next"], mean, rows["sigma_tilde"], rows["h"])


def _steps(rows):
    return dict(sigma=rows["sigma"], h=rows["h"], sigma_tilde=rows["sigma_tilde"])


def _w_base(rows):
    """(√h/σ̃)·(1 + σ̃²(1-σ)/(2σ)), spec §4.1. [rows]"""
    sigma, h, st = rows["sigma"], rows["h"], rows["sigma_tilde"]
    return (h.sqrt() / st) * (1 + (1 - sigma) / (2 * sigma) * st**2)


def test_base_matching_term_is_minus_the_gaussian_log_ratio_at_every_step():
    # Invariant 8: m1 + m2 = -(log p_θ(x') - log p_old(x')) for random v_θ, v_old, ε.
    model = TinyVelocity()
    rows = rollout_rows(model, ALL_STEPS)
    perturb(model, 0.3)
    v, _, logp = _current(model, rows)
    adv = torch.ones(len(ALL_STEPS), dtype=v.dtype)
    _, diag = matching_row_loss(v, rows["v_old"], rows["noise"], adv, **_steps(rows), reweight="base",
                                clip_range=EPS_C)
    # diag.log_ratio = -m = -(m1 + m2) for base.
    torch.testing.assert_close(diag.log_ratio, (logp - rows["logp_old"]).detach(), rtol=1e-9, atol=1e-12)
    assert diag.log_ratio.abs().min() > 1e-3  # the identity is tested off-policy, not at 0 = 0


def test_grpo_guard_bias_cancels_the_quadratic_term_of_the_log_ratio():
    # Invariant 9: Δℓ + b = -m2, so the guard ratio is exp(-m2·σ_t) in both losses.
    model = TinyVelocity()
    rows = rollout_rows(model, ALL_STEPS)
    perturb(model, 0.3)
    v, mean, logp = _current(model, rows)
    adv = torch.ones(len(ALL_STEPS), dtype=v.dtype)
    b = ((mean - rows["mean_old"]) ** 2).flatten(1).mean(1) / (2 * rows["sigma_tilde"] ** 2 * rows["h"])
    sigma_t = rows["sigma_tilde"] * rows["h"].sqrt()
    expected = ((logp - rows["logp_old"] + b) * sigma_t).detach()
    _, ppo_diag = ppo_row_loss(logp, rows["logp_old"], adv, **_steps(rows), reweight="grpo_guard",
                               mean=mean, old_mean=rows["mean_old"])
    _, match_diag = matching_row_loss(v, rows["v_old"], rows["noise"], adv, **_steps(rows), reweight="grpo_guard")
    torch.testing.assert_close(ppo_diag.log_ratio, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(match_diag.log_ratio, expected, rtol=1e-9, atol=1e-12)
    # -m2 alone, from the stored noise: the log-ratio keeps only the term linear in Δv.
    m2 = (col(_w_base(rows)) * (v - rows["v_old"]) * rows["noise"]).flatten(1).mean(1)
    torch.testing.assert_close(expected, (-m2 * sigma_t).detach(), rtol=1e-9, atol=1e-12)


def test_matching_loss_is_an_advantage_weighted_regression_toward_the_shifted_old_velocity():
    # A·(m1+m2) = (A/2)·mean((wΔ + ε)²) - (A/2)·mean(ε²):
    # same value and gradient as regressing v_θ onto v_old - ε/w with weight A.
    model = TinyVelocity()
    rows = rollout_rows(model, ALL_STEPS)
    perturb(model, 0.05)
    v, _, _ = _current(model, rows)
    adv = torch.linspace(-2.0, 2.0, len(ALL_STEPS), dtype=v.dtype)
    loss, _ = matching_row_loss(v, rows["v_old"], rows["noise"], adv, **_steps(rows), reweight="base",
                                clip_range=0.0)
    w = col(_w_base(rows))
    target = rows["v_old"] - rows["noise"] / w
    shifted = ((w * (v - target)) ** 2).flatten(1).mean(1)
    regression = adv / 2 * shifted - adv / 2 * (rows["noise"] ** 2).flatten(1).mean(1)
    active = loss.detach() > 0  # hinge with ε_c = 0 keeps rows with A·m > 0
    assert 0 < active.sum() < len(ALL_STEPS)
    torch.testing.assert_close(loss[active], regression[active], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads(loss[active].sum(), model), grads(regression[active].sum(), model))


@pytest.mark.parametrize("name", sorted(set(REWEIGHTS) - {"fair_clip2"}))
def test_matching_gradient_equals_ppo_gradient_on_policy(name):
    # Invariant 10 (base) and its extension to every reweight PPO supports.
    model = TinyVelocity()
    rows = rollout_rows(model, ALL_STEPS)
    v, mean, logp = _current(model, rows)
    adv = torch.tensor([1.5, -0.7, 2.0, -3.0, 0.4, -1.1, 5.0, -5.0, 0.9], dtype=v.dtype)
    ppo, ppo_diag = ppo_row_loss(logp, rows["logp_old"], adv, **_steps(rows), reweight=name, clip_range=EPS_C,
                                 mean=mean, old_mean=rows["mean_old"])
    match, match_diag = matching_row_loss(v, rows["v_old"], rows["noise"], adv, **_steps(rows), reweight=name,
                                          clip_range=EPS_C)
    torch.testing.assert_close(ppo_diag.ratio, torch.ones_like(adv), rtol=0, atol=1e-12)
    torch.testing.assert_close(match_diag.log_ratio, torch.zeros_like(adv), rtol=0, atol=1e-12)
    torch.testing.assert_close(grads(ppo.sum(), model), grads(match.sum(), model), rtol=1e-8, atol=1e-12)
    if name == "base":
        torch.testing.assert_close(ppo.detach(), -adv)
        torch.testing.assert_close(match.detach(), EPS_C * adv.abs())
        policy_gradient = grads(-(adv * logp).sum(), model)
        torch.testing.assert_close(grads(match.sum(), model), policy_gradient, rtol=1e-8, atol=1e-12)


def test_fair_clip2_gradient_equals_grpo_guard_and_fair_clip_equals_base_on_policy():
    # Invariant 11.
    model = TinyVelocity()
    rows = rollout_rows(model, ALL_STEPS)
    v, _, _ = _current(model, rows)
    adv = torch.tensor([1.5, -0.7, 2.0, -3.0, 0.4, -1.1, 5.0, -5.0, 0.9], dtype=v.dtype)

    def grad_of(name):
        loss, _ = matching_row_loss(v, rows["v_old"], rows["noise"], adv, **_steps(rows), reweight=name)
        return grads(loss.sum(), model)

    torch.testing.assert_close(grad_of("fair_clip2"), grad_of("grpo_guard"), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(grad_of("fair_clip"), grad_of("base"), rtol=1e-8, atol=1e-12)
    assert not torch.allclose(grad_of("fair_clip2"), grad_of("base"))


@pytest.mark.parametrize("name", sorted(REWEIGHTS))
def test_hinge_zeroes_exactly_the_rows_past_the_trust_region_and_flags_them(name):
    # Invariant 12, with m computed independently from Gaussian log-densities.
    model = TinyVelocity()
    steps = ALL_STEPS * 4
    rows = rollout_rows(model, steps, seed=3)
    perturb(model, 0.02, seed=4)
    v, mean, logp = _current(model, rows)
    h, st = rows["h"], rows["sigma_tilde"]
    sigma_t = st * h.sqrt()
    gen = torch.Generator().manual_seed(5)
    adv = torch.randn(len(steps), generator=gen, dtype=v.dtype)
    adv[::7] = 0.0  # A = 0: margin 0, not clipped
    minus_log_r = -(logp - rows["logp_old"]).detach()
    b = ((mean - rows["mean_old"]) ** 2).flatten(1).mean(1).detach() / (2 * sigma_t**2)
    m = {"base": minus_log_r, "tempflow_reweight": 2.25 * sigma_t * minus_log_r,
         "grpo_guard": (minus_log_r - b) * sigma_t, "fair_clip": sigma_t**2 * minus_log_r,
         "fair_clip2": sigma_t**2 * minus_log_r}
    # pcpo: w = ζh = q·w_base, so m = q²·m1_base + q·m2_base with m1_base = b and m2_base = -log r - b.
    q = 4.3152134639895925 * h / _w_base(rows)
    m["pcpo_reweight"] = q**2 * b + q * (minus_log_r - b)
    margin = EPS_C * adv.abs() + adv * m[name]
    loss, diag = matching_row_loss(v, rows["v_old"], rows["noise"], adv, **_steps(rows), reweight=name,
                                   clip_range=EPS_C)
    off = margin < 0
    assert 0 < off.sum() < len(steps) - 4  # a mix of switched-off and active rows
    assert torch.equal(loss.detach() == 0, off | (margin == 0))
    assert torch.equal(diag.clipped, off)
    assert torch.equal(diag.clipped_gt, off & (adv > 0)) and torch.equal(diag.clipped_lt, off & (adv < 0))
    stats = diag.summary()
    torch.testing.assert_close(stats["clipfrac"], stats["clipfrac_gt_one"] + stats["clipfrac_lt_one"])
    assert stats["clipfrac"].item() == pytest.approx(off.double().mean().item())
    # Switched-off rows carry no gradient; active rows do.
    assert torch.count_nonzero(grads(loss[off].sum(), model)) == 0
    assert torch.count_nonzero(grads(loss[~off & (adv != 0)].sum(), model)) > 0


def test_half_precision_velocities_accumulate_the_matching_terms_in_float32():
    model = TinyVelocity()
    rows = rollout_rows(model, ALL_STEPS)
    perturb(model, 0.3)
    v, _, _ = _current(model, rows)
    adv = torch.ones(len(ALL_STEPS), dtype=torch.float32)
    steps = {k: t.float() for k, t in _steps(rows).items()}
    loss16, diag16 = matching_row_loss(v.detach().half(), rows["v_old"].half(), rows["noise"].half(), adv, **steps)
    loss64, diag64 = matching_row_loss(v.detach(), rows["v_old"], rows["noise"], adv.double(), **_steps(rows))
    assert loss16.dtype == torch.float32
    torch.testing.assert_close(diag16.log_ratio.double(), diag64.log_ratio, rtol=2e-2, atol=2e-4)


def test_losses_compose_with_the_sde_step_of_sd35zo_sde():
    # Contract with sde.py: its per-row log p, μ and σ̃ ([rows,1,1,1], flattened here) feed these losses.
    from sd35zo import sde

    model = TinyVelocity()
    sigma, h, _ = step_rows(ALL_STEPS)
    sigma_next = sigma - h
    x = torch.randn(len(ALL_STEPS), 2, 3, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    with torch.no_grad():
        v_old = model(x)
        old = sde.sde_step_with_logprob(v_old, sigma, sigma_next, x, generator=torch.Generator().manual_seed(10),
                                        sigma_max=sigma[1].item())
    perturb(model, 0.3)
    v = model(x)
    new = sde.sde_step_with_logprob(v, sigma, sigma_next, x, prev_sample=old.prev_sample, sigma_max=sigma[1].item())
    st = new.tilde_sigma.flatten()
    steps = dict(sigma=sigma, h=h, sigma_tilde=st)
    adv = torch.linspace(-1.0, 1.0, len(ALL_STEPS), dtype=v.dtype)
    loss, diag = matching_row_loss(v, v_old, old.noise, adv, **steps, reweight="base")
    log_r = (new.log_prob - old.log_prob).detach()
    torch.testing.assert_close(diag.log_ratio, log_r, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(loss.detach(), (EPS_C * adv.abs() - adv * log_r).clamp(min=0))
    _, guard_diag = ppo_row_loss(new.log_prob, old.log_prob, adv, **steps, reweight="grpo_guard",
                                 mean=new.prev_sample_mean, old_mean=old.prev_sample_mean)
    _, match_guard = matching_row_loss(v, v_old, old.noise, adv, **steps, reweight="grpo_guard")
    torch.testing.assert_close(guard_diag.log_ratio, match_guard.log_ratio, rtol=1e-9, atol=1e-12)
