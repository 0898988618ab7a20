"""The GRPO clipped-ratio row loss (spec §4.2, invariants 10, 13, 14) against the spec's tables."""
import pytest
import torch

from flow_step_reference import TinyVelocity, gaussian_logp, grads, perturb, rollout_rows, sde_mean
from sd35zo.ppo_loss import RowDiagnostics, ppo_row_loss
from sd35zo.weighting import REWEIGHTS, ZETA

ALL_STEPS = list(range(9))
EPS_C = 1e-4
PPO_REWEIGHTS = sorted(set(REWEIGHTS) - {"fair_clip2"})


def _off_policy(scale=0.05, steps=ALL_STEPS * 3, seed=2):
    model = TinyVelocity()
    rows = rollout_rows(model, steps)
    perturb(model, scale, seed=seed)
    v = model(rows["x"])
    mean = sde_mean(rows["x"], v, rows["sigma"], rows["h"], rows["sigma_tilde"])
    logp = gaussian_logp(rows["x_next"], mean, rows["sigma_tilde"], rows["h"])
    return model, rows, mean, logp


def _call(name, logp, rows, mean, adv, clip_range=EPS_C):
    return ppo_row_loss(logp, rows["logp_old"], adv, sigma=rows["sigma"], h=rows["h"],
                        sigma_tilde=rows["sigma_tilde"], reweight=name, clip_range=clip_range,
                        mean=mean, old_mean=rows["mean_old"])


@pytest.mark.parametrize("name", PPO_REWEIGHTS)
def test_row_loss_follows_the_ratio_and_post_scaling_tables(name):
    _, rows, mean, logp = _off_policy()
    sigma, h, st = rows["sigma"], rows["h"], rows["sigma_tilde"]
    dl = (logp - rows["logp_old"]).detach()
    w_base = (h.sqrt() / st) * (1 + (1 - sigma) / (2 * sigma) * st**2)
    b = ((mean - rows["mean_old"]) ** 2).flatten(1).mean(1).detach() / (2 * (h.sqrt() * st) ** 2)
    ratio = {"base": dl.exp(), "tempflow_reweight": dl.exp(), "fair_clip": (dl * st**2 * h).exp(),
             "pcpo_reweight": (dl * ZETA * h / w_base).exp(), "grpo_guard": ((dl + b) * st * h.sqrt()).exp()}[name]
    post = {"base": 1.0, "pcpo_reweight": 1.0, "grpo_guard": 1 / h, "fair_clip": 1 / (h * st**2),
            "tempflow_reweight": 2.25 * st * h.sqrt()}[name]
    adv = torch.linspace(-5, 5, len(dl), dtype=dl.dtype)
    clip_range = 0.05  # wide enough that both branches of the max occur
    expected = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range)) * post
    loss, diag = _call(name, logp, rows, mean, adv, clip_range)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(diag.ratio, ratio, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(diag.approx_kl, 0.5 * dl**2)  # unscaled Δℓ for every reweight
    assert torch.equal(diag.clipped, (ratio - 1).abs() > clip_range)
    assert torch.equal(diag.clipped_gt, ratio - 1 > clip_range)
    assert torch.equal(diag.clipped_lt, 1 - ratio > clip_range)


def test_on_policy_base_ratio_is_one_and_row_loss_is_minus_advantage():
    model = TinyVelocity()
    rows = rollout_rows(model, ALL_STEPS)
    v = model(rows["x"])
    mean = sde_mean(rows["x"], v, rows["sigma"], rows["h"], rows["sigma_tilde"])
    logp = gaussian_logp(rows["x_next"], mean, rows["sigma_tilde"], rows["h"])
    adv = torch.linspace(-5, 5, len(ALL_STEPS), dtype=v.dtype)
    loss, diag = _call("base", logp, rows, mean, adv)
    torch.testing.assert_close(diag.ratio, torch.ones_like(adv), rtol=0, atol=1e-12)
    torch.testing.assert_close(loss.detach(), -adv, rtol=0, atol=1e-12)
    assert not diag.clipped.any()
    # Gradient of the surrogate on-policy is the policy gradient -A·∇log p.
    torch.testing.assert_close(grads(loss.sum(), model), grads(-(adv * logp).sum(), model), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", PPO_REWEIGHTS)
def test_clipped_rows_are_constant_in_theta_and_unclipped_rows_are_not(name):
    # Invariant 13: A > 0 with r > 1+ε_c, and A < 0 with r < 1-ε_c, give zero gradient.
    model, rows, mean, logp = _off_policy()
    _, diag = _call(name, logp, rows, mean, torch.ones_like(logp))
    above, below = diag.ratio > 1 + EPS_C, diag.ratio < 1 - EPS_C
    assert above.sum() >= 3 and below.sum() >= 3
    favoured = torch.where(above, 1.0, -1.0).to(logp.dtype)  # A pushes r further out: clipped
    loss, d = _call(name, logp, rows, mean, favoured)
    out = above | below
    assert torch.equal(d.clipped, out)
    assert torch.count_nonzero(grads(loss[out].sum(), model)) == 0
    loss_back, d_back = _call(name, logp, rows, mean, -favoured)  # A pulls r back toward 1: not clipped
    assert torch.count_nonzero(grads(loss_back[out].sum(), model)) > 0
    assert torch.equal(d_back.clipped_gt, above) and torch.equal(d_back.clipped_lt, below)


def test_fair_clip2_has_no_ppo_ratio_and_says_which_loss_to_use():
    # Invariant 14: upstream raises NotImplementedError after a sampling epoch; we raise at the first call.
    _, rows, mean, logp = _off_policy()
    with pytest.raises(ValueError, match=r"fair_clip2.*loss_type='matching'"):
        _call("fair_clip2", logp, rows, mean, torch.ones_like(logp))


def test_grpo_guard_without_stored_means_names_the_missing_inputs():
    _, rows, _, logp = _off_policy()
    with pytest.raises(ValueError, match=r"grpo_guard.*mean and old_mean"):
        ppo_row_loss(logp, rows["logp_old"], torch.ones_like(logp), sigma=rows["sigma"], h=rows["h"],
                     sigma_tilde=rows["sigma_tilde"], reweight="grpo_guard")


def test_unknown_reweight_is_rejected_with_the_allowed_values():
    _, rows, mean, logp = _off_policy()
    with pytest.raises(ValueError, match=r"train\.reweight_type must be one of"):
        _call("tempflow", logp, rows, mean, torch.ones_like(logp))


def test_summary_averages_only_unmasked_rows_and_all_masked_gives_zero():
    t = torch.tensor
    diag = RowDiagnostics(log_ratio=t([0.0, 0.0, 0.0, 0.0]), approx_kl=t([1.0, 2.0, 3.0, 100.0]),
                          clipped=t([True, True, False, True]), clipped_gt=t([True, False, False, True]),
                          clipped_lt=t([False, True, False, False]))
    stats = diag.summary(t([True, True, True, False]))
    assert stats["approx_kl"].item() == pytest.approx(2.0)
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)
    assert stats["clipfrac_gt_one"].item() == pytest.approx(1 / 3)
    assert stats["clipfrac_lt_one"].item() == pytest.approx(1 / 3)
    empty = diag.summary(torch.zeros(4, dtype=torch.bool))
    assert all(v.item() == 0.0 for v in empty.values())
