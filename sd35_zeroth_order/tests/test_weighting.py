"""Reweight tables (spec §4.1-4.3, paper.md §5.3) against their closed forms and the paper's numbers."""
import pytest
import torch

from flow_step_reference import step_rows
from sd35zo import weighting
from sd35zo.weighting import REWEIGHTS, ZETA, check_combination, get_reweight

TRAINED_STEPS = list(range(9))  # int(10 · 0.99) = 9 trained transitions


def test_base_weight_is_velocity_coefficient_times_step_over_sigma_t():
    sigma, h, st = step_rows(TRAINED_STEPS)
    c = 1 + st**2 * (1 - sigma) / (2 * sigma)
    torch.testing.assert_close(weighting.base_weight(sigma, h, st), c * h / (st * h.sqrt()))


def test_velocity_coefficient_is_one_plus_half_noise_level_squared_away_from_sigma_one():
    # σ̃² = a²σ/(1-σ) ⇒ c = 1 + a²/2 = 1.245 at every step but the first (σ = 1, where c = 1).
    sigma, h, st = step_rows(TRAINED_STEPS)
    c = 1 + st**2 * (1 - sigma) / (2 * sigma)
    torch.testing.assert_close(c[1:], torch.full_like(c[1:], 1.245))
    assert c[0].item() == 1.0


# paper.md §5.3 table, columns w (base), ζΔt (pcpo), tempflow, guard / fairclip2 for steps 0..8.
PAPER_KAPPA = {
    "base": [0.057, 0.078, 0.129, 0.188, 0.264, 0.371, 0.536, 0.825, 1.487],
    "pcpo_reweight": [0.172, 0.202, 0.240, 0.291, 0.359, 0.454, 0.592, 0.806, 1.161],
    "tempflow_reweight": [0.090, 0.131, 0.156, 0.189, 0.233, 0.295, 0.385, 0.523, 0.754],
    "grpo_guard": [1.000] + [1.245] * 8,
    "fair_clip2": [1.000] + [1.245] * 8,
    "fair_clip": [0.057, 0.078, 0.129, 0.188, 0.264, 0.371, 0.536, 0.825, 1.487],
}


@pytest.mark.parametrize("name", sorted(PAPER_KAPPA))
def test_on_policy_velocity_gradient_weight_matches_paper_table(name):
    # On-policy the matching row gradient w.r.t. v_θ is A·match·match_post·w·ε/D per element.
    sigma, h, st = step_rows(TRAINED_STEPS)
    s = get_reweight(name)(sigma, h, st)
    kappa = s.match * s.match_post * s.w
    torch.testing.assert_close(kappa, torch.tensor(PAPER_KAPPA[name], dtype=kappa.dtype), atol=6e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(set(REWEIGHTS) - {"fair_clip2"}))
def test_ppo_and_matching_push_velocity_with_the_same_weight(name):
    # PPO on-policy: ∂(-A·r)/∂v = -A·ppo_ratio·∂Δℓ/∂v and ∂Δℓ/∂v = -w_base·ε/D, then × ppo_post.
    sigma, h, st = step_rows(TRAINED_STEPS)
    s = get_reweight(name)(sigma, h, st)
    ppo_kappa = s.ppo_ratio * s.ppo_post * weighting.base_weight(sigma, h, st)
    torch.testing.assert_close(ppo_kappa, s.match * s.match_post * s.w)


def test_each_reweight_scales_follow_the_spec_formulas():
    sigma, h, st = step_rows(TRAINED_STEPS)
    sigma_t = st * h.sqrt()
    w_base = (h.sqrt() / st) * (1 + (1 - sigma) / (2 * sigma) * st**2)
    one = torch.ones_like(h)
    expected = {  # name: (w, ppo_ratio, ppo_post, match, match_post)
        "base": (w_base, one, one, one, one),
        "tempflow_reweight": (w_base, one, 2.25 * sigma_t, 2.25 * sigma_t, one),
        "pcpo_reweight": (ZETA * h, ZETA * h / w_base, one, one, one),
        "grpo_guard": (w_base, sigma_t, 1 / h, sigma_t, 1 / h),
        "fair_clip": (w_base, st**2 * h, 1 / (h * st**2), st**2 * h, 1 / (h * st**2)),
        "fair_clip2": (w_base, None, st / h.sqrt() / (h * st**2), st**2 * h, st / h.sqrt() / (h * st**2)),
    }
    for name, (w, ratio, ppo_post, match, match_post) in expected.items():
        s = get_reweight(name)(sigma, h, st)
        torch.testing.assert_close(s.w, w)
        if ratio is None:
            assert s.ppo_ratio is None
        else:
            torch.testing.assert_close(s.ppo_ratio, ratio)
        torch.testing.assert_close(s.ppo_post, ppo_post)
        torch.testing.assert_close(s.match, match)
        torch.testing.assert_close(s.match_post, match_post)
        assert s.cancel_quadratic == (name == "grpo_guard")


def test_fairclip2_paper_run_post_factor_and_log_ratio_threshold():
    # Spec §4.3 ("approximate", 3 digits): lowsnr2 steps 0-3: post ≈ 35.8, 28.7, 33.5, 33.3;
    # log-ratio threshold ε_c/(σ̃²h) ≈ 2.0, 1.8, 3.5, 5.0e-4.
    sigma, h, st = step_rows([0, 1, 2, 3])
    s = get_reweight("fair_clip2")(sigma, h, st)
    torch.testing.assert_close(s.match_post, torch.tensor([35.8, 28.7, 33.5, 33.3], dtype=h.dtype), atol=0, rtol=5e-3)
    torch.testing.assert_close(1e-4 / s.match, torch.tensor([2.0e-4, 1.8e-4, 3.5e-4, 5.0e-4], dtype=h.dtype),
                               atol=6e-6, rtol=0)


def test_get_reweight_accepts_none_as_base_and_names_allowed_values_on_error():
    assert get_reweight(None) is get_reweight("base")
    with pytest.raises(ValueError, match=r"train\.reweight_type must be one of .*fair_clip2.*got 'fairclip2'"):
        get_reweight("fairclip2")  # the CLI spelling, not a train.reweight_type


def test_ppo_with_fair_clip2_is_rejected_and_matching_with_fair_clip2_is_accepted():
    with pytest.raises(ValueError, match=r"fair_clip2.*matching"):
        check_combination("ppo", "fair_clip2")
    check_combination("matching", "fair_clip2")
    for name in REWEIGHTS:
        if name != "fair_clip2":
            check_combination("ppo", name)
    with pytest.raises(ValueError, match=r"train\.loss_type must be one of \['ppo', 'matching'\]"):
        check_combination("grpo", "base")


def test_the_config_check_accepts_exactly_the_reweights_and_combinations_the_losses_implement():
    from sd35zo import config_check
    from sd35zo.weighting import REWEIGHTS, check_combination

    assert set(config_check.REWEIGHT_TYPES) == set(REWEIGHTS)
    for loss in config_check.LOSS_TYPES:
        for name in REWEIGHTS:
            accepted = loss != "ppo" or name in config_check.PPO_REWEIGHT_TYPES
            if accepted:
                check_combination(loss, name)
            else:
                with pytest.raises(ValueError):
                    check_combination(loss, name)
