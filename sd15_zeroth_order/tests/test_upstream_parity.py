"""Parity with upstream's own functions: golden numbers in golden_upstream.json were produced by running upstream
(jaylee2000/rsm sd15_zeroth_order: `diffusion/ddim_step.py`, `train_grpo.py`, `train_grpo_pr.py`) outside this
repository on the SD1.5 scheduler config and these inputs:

  - the step: numpy `default_rng(0)` standard normals as float32, drawn in the order ε [4,4,8,8], ε_ref, x_t, ξ;
    then for the losses ε_θ [6,4,8,8], ε_old, ξ; timesteps 581 (scalar) or [981, 581, 181, 1] (per row), η = 1,
    N = 50; "log_prob_given" is the log-probability of x' = 0.9 x_t;
  - the losses: upstream's inline loss code of train_grpo.py with A = [2, −1.5, 0.3, −0.2, 7, −6] (clamped to
    ±5), ℓ_θ = [−0.5, −0.49, −0.51, −0.5, −0.52, −0.48], ℓ_old = −0.5, ω = 4.5 with s = 8.70575076181, or ω = w(t)
    at steps [0, 10, 20, 30, 40, 49] with s = 1;
  - the advantages: the twelve rewards and labels below.

Tolerances: float32 computations 1e-6 relative (contract §7; upstream mixes float32 alphas with float32 inputs in
another order of operations), float64 ones 1e-12.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sd15zo import advantages, losses, schedule
from sd15zo.ddim import ddim_step_with_logprob

GOLDEN = json.loads((Path(__file__).parent / "golden_upstream.json").read_text())
REWARDS = np.array([0.27, 0.31, 0.29, 0.30, 0.25, 0.25, 0.25, 0.25, 0.33, 0.21, 0.28, 0.30])
LABELS = ["a|t=981"] * 4 + ["b|t=981"] * 4 + ["a|t=581"] * 4


def close(actual, expected, rtol=1e-6, atol=1e-7):
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64),
                               rtol=rtol, atol=atol)


def test_sd15_timesteps_are_upstreams(sd15_scheduler):
    t = schedule.inference_timesteps(sd15_scheduler, 50)
    assert t.tolist() == GOLDEN["timesteps_50"] == [20 * (49 - i) + 1 for i in range(50)]


def test_sigma_pcpo_and_sigma_ddpm_match_upstream(sd15_scheduler, timesteps_50):
    alphas = sd15_scheduler.alphas_cumprod
    a, a_prev = schedule.step_alphas(alphas, timesteps_50, 50)
    close(schedule.sigma_pcpo(a, a_prev, 4.5), GOLDEN["sigma_pcpo_4.5"])
    close(schedule.sigma_ddpm(a, a_prev), GOLDEN["sigma_ddpm"])
    upstream_small = np.array(GOLDEN["sigma_pcpo_0.5169"], dtype=np.float64)  # NaN where the root is complex
    ours_small = schedule.sigma_pcpo(a, a_prev, 0.5168997049331665).numpy()
    assert np.array_equal(np.isnan(ours_small), np.isnan(upstream_small))
    close(ours_small[~np.isnan(ours_small)], upstream_small[~np.isnan(upstream_small)])


def test_natural_weight_matches_both_upstream_versions(sd15_scheduler, timesteps_50):
    w = schedule.natural_weight(sd15_scheduler.alphas_cumprod, timesteps_50, 50)
    close(w, GOLDEN["w_50"])
    close(w, GOLDEN["w_rows"])
    close(float(w.mean()), GOLDEN["w_mean_float32"])


def _step_inputs():
    rng = np.random.default_rng(0)

    def arr(*shape):
        return torch.from_numpy(rng.standard_normal(shape).astype(np.float32))

    return [arr(4, 4, 8, 8) for _ in range(4)], rng


@pytest.mark.parametrize("algorithm, const_weight", [("uw-sigma", 4.5), ("vw", None), ("ddpo", None),
                                                     ("uw-lambda", 0.5168997049331665)])
@pytest.mark.parametrize("kind", ["scalar", "rows"])
def test_ddim_step_matches_upstream(sd15_scheduler, algorithm, const_weight, kind):
    (eps, eps_ref, x, xi), _ = _step_inputs()
    t = torch.tensor(581) if kind == "scalar" else torch.tensor([981, 581, 181, 1])
    golden = GOLDEN["step"][f"{algorithm}/{kind}"]
    kw = dict(num_inference_steps=50, eta=1.0, algorithm=algorithm, const_weight=const_weight, model_output_ref=eps_ref)
    out = ddim_step_with_logprob(sd15_scheduler.alphas_cumprod, eps, t, x, noise=xi, **kw)
    close(out.prev_sample.flatten()[:6], golden["prev_first"])
    close(float(out.prev_sample.double().sum()), golden["prev_sum"], rtol=1e-5)
    close(out.log_prob, golden["log_prob"])
    given = ddim_step_with_logprob(sd15_scheduler.alphas_cumprod, eps, t, x, prev_sample=x * 0.9, **kw)
    close(given.log_prob, golden["log_prob_given"])


def _loss_inputs():
    _, rng = _step_inputs()

    def arr(*shape):
        return torch.from_numpy(rng.standard_normal(shape).astype(np.float32))

    return arr(6, 4, 8, 8), arr(6, 4, 8, 8), arr(6, 4, 8, 8)


ADV = torch.tensor([2.0, -1.5, 0.3, -0.2, 7.0, -6.0])
LOGP_NEW = torch.tensor([-0.5, -0.49, -0.51, -0.5, -0.52, -0.48])


@pytest.mark.parametrize("clip_range", [1e-4, 0.05])
@pytest.mark.parametrize("const_weight", [4.5, None])
@pytest.mark.parametrize("precision", ["best", "bad", "worst"])
@pytest.mark.parametrize("do_clip", [True, False])
def test_noise_matching_loss_matches_upstream(sd15_scheduler, timesteps_50, clip_range, const_weight, precision,
                                              do_clip):
    eps_new, eps_old, noise = _loss_inputs()
    if const_weight is None:
        w = schedule.natural_weight(sd15_scheduler.alphas_cumprod, timesteps_50, 50)[[0, 10, 20, 30, 40, 49]]
        weight, scale = w, 1.0
    else:
        weight, scale = const_weight, 8.70575076181
    adv = losses.clamp_advantages(ADV, 5.0)
    rows = losses.noise_matching_row_loss(eps_new, eps_old, noise, adv, weight, scale, precision, clip_range, do_clip)
    loss, clipfrac = GOLDEN["losses"][f"nm/{clip_range}/{const_weight}/{precision}/{do_clip}"]
    close(float(rows.loss.mean()), loss, rtol=2e-6)
    assert float(rows.clipped.float().mean()) == pytest.approx(clipfrac)


@pytest.mark.parametrize("clip_range", [1e-4, 0.05])
@pytest.mark.parametrize("algorithm", ["ddpo", "logrho"])
def test_ratio_losses_match_upstream(clip_range, algorithm):
    rows = losses.ratio_row_loss(LOGP_NEW, torch.full((6,), -0.5), losses.clamp_advantages(ADV, 5.0), clip_range,
                                 algorithm)
    loss, clipfrac = GOLDEN["losses"][f"{algorithm}/{clip_range}"]
    close(float(rows.loss.mean()), loss)
    assert float(rows.clipped.float().mean()) == pytest.approx(clipfrac)


def test_group_batch_and_block_advantages_match_upstream():
    adv, stats = advantages.group_advantages(LABELS, REWARDS)
    golden = GOLDEN["group_adv"]
    close(adv, golden["adv"], rtol=1e-12, atol=1e-15)
    assert (stats.group_size, stats.group_count) == (golden["group_size"], golden["group_count"])
    close([stats.zero_std_ratio, stats.reward_std_mean], [golden["zero_std_ratio"], golden["reward_std_mean"]],
          rtol=1e-12)
    close(advantages.batch_advantages(REWARDS), GOLDEN["batch_adv"], rtol=1e-12, atol=1e-15)
    close(advantages.block_advantages(torch.tensor(REWARDS), 4), GOLDEN["block_adv"])


def test_seed_ids_match_upstream():
    assert advantages.seed_ids(["a cat", "a dog", "a cat"], 7, 1) == GOLDEN["seed_ids"]
