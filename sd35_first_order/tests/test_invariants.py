"""Spec §12's invariants that have a closed-form answer, on the analytic stand-ins of tests/toy_models.py (CPU,
fp32/fp64). The invariants that need the real architectures are in test_inprocess.py; parity with upstream's own
functions in test_parity.py."""
import math

import pytest
import torch
from toy_models import ToyTransformer, ToyVAE, linear_reward, quadratic_reward, toy_inputs

from sd35fo.algorithm import StepBatch, VGGFlow, eta, transition_drift, velocity_loss
from sd35fo.batching import micro_batches, shuffle, subsample, train_step_columns
from sd35fo.decode import decode
from sd35fo.guidance import GuidedVelocity, cfg_combine, transformer_velocity
from sd35fo.reward_grad import RewardGrad, clip_per_sample, per_sample_norm
from sd35fo.rollout import sample_ode
from sd35fo.schedule import euler_step, flow_match_schedule, next_sigma_of_steps

# spec §2.2, sigma_i for N = 20 (6 decimals)
SPEC_SIGMAS = [1.000000, 0.981875, 0.962386, 0.941373, 0.918652, 0.894003, 0.867172, 0.837855, 0.805689, 0.770239,
               0.730974, 0.687244, 0.638240, 0.582948, 0.520074, 0.447944, 0.364352, 0.266330, 0.149787, 0.008929]


def test_1_schedule_has_n_plus_1_decreasing_sigmas_matching_the_table():
    sigmas, timesteps = flow_match_schedule(20)
    assert sigmas.shape == (21,) and sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    assert sigmas[:20].tolist() == pytest.approx(SPEC_SIGMAS, abs=1e-5)
    torch.testing.assert_close(timesteps, 1000 * sigmas[:20])


def test_2_the_rollout_is_euler_with_cfg_and_the_step_is_the_schedulers_bitwise():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sigmas, timesteps = flow_match_schedule(6)
    model = ToyTransformer()
    x, text, pooled = toy_inputs()
    latents, velocities = sample_ode(model, x, text, pooled, sigmas, timesteps, 5.0, keep_velocities=True)
    for i in range(6):
        out = model(torch.cat([latents[:, i]] * 2), timesteps[i].expand(4), text, pooled)[0]
        u, k = out.chunk(2)
        torch.testing.assert_close(velocities[:, i], u + 5.0 * (k - u))
        torch.testing.assert_close(latents[:, i + 1], latents[:, i] + (sigmas[i + 1] - sigmas[i]) * velocities[:, i])
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(6)
    z = torch.randn(2, 4, 3, 3).to(torch.bfloat16)
    v = torch.randn(2, 4, 3, 3).to(torch.bfloat16)
    for i, t in enumerate(scheduler.timesteps):
        expected = scheduler.step(v, t, z, return_dict=False)[0]
        assert torch.equal(euler_step(z, v, scheduler.sigmas[i], scheduler.sigmas[i + 1]), expected)


def test_3_detaching_the_unconditional_half_keeps_the_value_and_scales_the_gradient_by_w():
    theta = torch.tensor(0.7, requires_grad=True)
    out = torch.stack([theta * 2.0, theta ** 2])  # [uncond, cond]
    guided = cfg_combine(out[:, None], 5.0, detach_uncond=True)
    plain = cfg_combine(out[:, None], 5.0, detach_uncond=False)
    assert torch.equal(guided, plain)
    (grad,) = torch.autograd.grad(guided.sum(), theta)
    assert grad.item() == pytest.approx(5.0 * 2 * 0.7)  # w dk/dtheta, no contribution from u


def test_7_decode_is_the_clamped_affine_image_with_zero_gradient_where_saturated():
    vae = ToyVAE()
    y = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(3)) * 3
    raw = vae.decode(y / 1.5 + 0.1)[0]
    torch.testing.assert_close(decode(vae, y), ((raw + 1) / 2).clamp(0, 1))
    saturated = ((raw + 1) / 2 <= 0) | ((raw + 1) / 2 >= 1)
    assert saturated.any() and not saturated.all()
    leaf = y.clone().requires_grad_(True)
    (g,) = torch.autograd.grad((decode(vae, leaf) * saturated).sum(), leaf)
    assert g.abs().max().item() == 0.0  # only saturated pixels selected: no gradient flows
    (g,) = torch.autograd.grad((decode(vae, leaf) * ~saturated).sum(), leaf)
    assert g.abs().max().item() > 0


def test_8_reward_gradient_is_analytic_for_a_linear_reward_and_touches_no_parameter_grad():
    vae = ToyVAE()
    direction = torch.rand(3, 3, 3, generator=torch.Generator().manual_seed(4))
    rg = RewardGrad(linear_reward(direction), vae, quantile_clipping=False)
    y = (torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(5)) * 0.1).requires_grad_(True)
    out = rg(y, y, ["a", "b"], [{}, {}], tau=1.0)
    raw = vae.decode(y.detach() / 1.5 + 0.1)[0]
    inside = (((raw + 1) / 2 > 0) & ((raw + 1) / 2 < 1)).float()
    expected = torch.einsum("ci,bchw->bihw", vae.proj, 0.5 * direction * inside) / 1.5
    torch.testing.assert_close(out.grad, expected)
    torch.testing.assert_close(out.norm, per_sample_norm(expected))
    assert out.mask.tolist() == [float(r >= 0) for r in out.rewards.tolist()]
    assert vae.proj.grad is None


def test_9_clipping_shrinks_by_the_norm_factor_keeps_direction_and_is_off_when_disabled():
    g = torch.randn(4, 3, 5, 5, dtype=torch.float64) * torch.tensor([1e-9, 1e-3, 2.0, 50.0], dtype=torch.float64).view(4, 1, 1, 1)
    norm = per_sample_norm(g)
    for tau in (0.5, 1.0, math.inf):
        out = clip_per_sample(g, tau)
        assert per_sample_norm(out).tolist() == pytest.approx(
            [min(n, tau) * n / (n + 1e-8) for n in norm.tolist()], rel=1e-12)
        cosine = (out * g).sum(dim=(1, 2, 3)) / (per_sample_norm(out) * norm)
        assert cosine.tolist() == pytest.approx([1.0] * 4, rel=1e-12)
    n0 = norm[0].item()  # ~1e-8: the N3 shrink halves it even with tau = inf
    assert (per_sample_norm(clip_per_sample(g, math.inf))[0] / norm[0]).item() == pytest.approx(n0 / (n0 + 1e-8), rel=1e-12)
    assert n0 / (n0 + 1e-8) < 0.6
    assert torch.equal(clip_per_sample(g, 1.0, enabled=False), g)
    fixed = clip_per_sample(g, 1.0, shrink=False)  # the fix: identity below tau
    assert torch.equal(fixed[:2], g[:2]) and per_sample_norm(fixed)[2:].tolist() == pytest.approx([1.0, 1.0], rel=1e-12)


def _toy_algorithm(reward, mode="quad", beta=3e7, ours=False, value_net=None, clipping=True):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(20)
    model = ToyTransformer()
    rg = RewardGrad(reward, ToyVAE(), quantile_clipping=clipping)
    return VGGFlow(GuidedVelocity(model, 5.0), rg, scheduler.sigmas, scheduler.timesteps, reward_scale=beta,
                   eta_mode=mode, use_saved_rgrad_x1=ours, value_net=value_net), scheduler


def _batch(scheduler, steps=(5, 14)):
    x, text, pooled = toy_inputs()
    step = torch.tensor(steps)
    return StepBatch(x, scheduler.timesteps[step], step, text, pooled, ["p", "q"], [{}, {}], torch.tensor([0.3, -0.2]))


def test_10_the_pruned_gradient_is_the_reward_gradient_at_the_lookahead_not_the_full_chain():
    target = torch.rand(3, 3, 3, generator=torch.Generator().manual_seed(6))
    reward = quadratic_reward(target)
    algorithm, scheduler = _toy_algorithm(reward, clipping=False)
    b = _batch(scheduler)
    sigma = scheduler.sigmas[b.step].view(-1, 1, 1, 1)
    v, g, _, _ = algorithm.reward_guidance(b, sigma, 1.0)
    lookahead = (b.x - sigma * v.detach()).requires_grad_(True)
    (at_lookahead,) = torch.autograd.grad(reward(decode(algorithm.reward_grad.vae, lookahead), None, None)[0].sum(),
                                          lookahead)
    torch.testing.assert_close(g, at_lookahead)
    chain_leaf = b.x.clone().requires_grad_(True)
    y = chain_leaf - sigma * algorithm.velocity.policy(chain_leaf, b.s, b.text, b.pooled)
    (full_chain,) = torch.autograd.grad(reward(decode(algorithm.reward_grad.vae, y), None, None)[0].sum(), chain_leaf)
    assert (full_chain - g).abs().max() > 1e-3 * g.abs().max()  # (I - sigma J)^T grad r is not what upstream uses


def test_11_ours_reuses_the_saved_terminal_gradient_at_every_timestep_without_calling_the_reward():
    algorithm, scheduler = _toy_algorithm(linear_reward(torch.ones(3, 3, 3) * 1e-6), mode="linear", beta=1.5e7, ours=True)
    saved = torch.randn(2, 4, 3, 3) * 1e-6
    guidances = []
    for step in ((0, 1), (7, 3), (19, 12)):
        b = _batch(scheduler, step)
        b.rgrad_x1 = saved
        sigma = scheduler.sigmas[b.step].view(-1, 1, 1, 1)
        _, g, mask, norm = algorithm.reward_guidance(b, sigma, 1.0)
        guidances.append(g)
        torch.testing.assert_close(norm, per_sample_norm(saved))
        assert mask.tolist() == [1.0, 0.0]  # from the sampling-time rewards
    assert all(torch.equal(g, guidances[0]) for g in guidances)
    torch.testing.assert_close(guidances[0], clip_per_sample(saved, 1.0))
    assert algorithm.reward_grad.calls == 0


@pytest.mark.parametrize("mode, expected", [("quad", lambda s: (1 - s) ** 2), ("linear", lambda s: 1 - s),
                                            ("constant", lambda s: torch.ones_like(s))])
def test_12_eta_modes_and_step_zero_has_no_guidance(mode, expected):
    sigma = torch.tensor([1.0, 0.7, 0.2, 0.0])
    torch.testing.assert_close(eta(sigma, mode), expected(sigma))
    if mode != "constant":
        algorithm, scheduler = _toy_algorithm(linear_reward(torch.ones(3, 3, 3)), mode=mode)
        b = _batch(scheduler, (0, 0))
        v, g, _, _ = algorithm.reward_guidance(b, scheduler.sigmas[b.step].view(-1, 1, 1, 1), 1.0)
        weight = eta(scheduler.sigmas[b.step].view(-1, 1, 1, 1), mode) * algorithm.beta
        assert weight.abs().max().item() == 0.0  # sigma_0 = 1: the target is the reference velocity


def test_13_the_loss_gradient_is_that_of_matching_a_constant_target_and_the_value_net_gets_none_from_it():
    algorithm, scheduler = _toy_algorithm(quadratic_reward(torch.rand(3, 3, 3), 1e-6))
    b = _batch(scheduler)
    params = [algorithm.velocity.transformer.adapter]
    loss, _ = algorithm.step(b, 1.0)
    (ours,) = torch.autograd.grad(loss, params)
    sigma = scheduler.sigmas[b.step].view(-1, 1, 1, 1)
    v, g, _, _ = algorithm.reward_guidance(b, sigma, 1.0)
    target = (algorithm.velocity.reference(b.x, b.s, b.text, b.pooled) - eta(sigma, "quad") * 3e7 * g).detach()
    (direct,) = torch.autograd.grad((v - target).pow(2).mean(), params)
    torch.testing.assert_close(ours, direct)
    nu_param = torch.nn.Parameter(torch.tensor(0.01))
    target_with_nu = target + nu_param * torch.ones_like(target)
    assert torch.autograd.grad(velocity_loss(v, target_with_nu, torch.ones(2), False), nu_param,
                               allow_unused=True)[0] is None


def test_14_summing_loss_over_a_times_k_equals_the_mean_loss_gradient():
    algorithm, scheduler = _toy_algorithm(quadratic_reward(torch.rand(3, 3, 3), 1e-6))
    param = algorithm.velocity.transformer.adapter
    pairs = [((2, 9), 0), ((4, 11), 1), ((6, 13), 0), ((8, 15), 1)]  # A = 2 micro-batches x K = 2 timesteps
    accumulated = torch.zeros_like(param)
    losses = []
    for steps, _ in pairs:
        loss, _ = algorithm.step(_batch(scheduler, steps), 1.0)
        (g,) = torch.autograd.grad(loss / 4, param)
        accumulated += g
        losses.append(loss)
    (mean_grad,) = torch.autograd.grad(torch.stack([algorithm.step(_batch(scheduler, s), 1.0)[0] for s, _ in pairs]).mean(),
                                       param)
    torch.testing.assert_close(accumulated, mean_grad, rtol=1e-5, atol=1e-8)


def test_15_subsampling_columns():
    gen = torch.Generator().manual_seed(1)
    columns = train_step_columns(20, 0.25, 8, gen, low_variance=True)
    assert columns.shape == (8, 21) and bool((columns[:, 0] == 19).all()) and bool((columns >= 1).all())
    n, m = 5, 4
    for j in range(1, 6):  # the first K - 1 = 5 draws visit trunks n-1 .. 0 (late to early)
        trunk = n - j
        assert bool(((columns[:, j] >= max(trunk * m, 1)) & (columns[:, j] < trunk * m + m)).all()), j
    random_mode = train_step_columns(20, 0.25, 8, gen, low_variance=False)
    for row in random_mode.tolist():
        assert row[0] == 19 and sorted(row[1:]) == sorted([1] + list(range(1, 19)))  # 0 clamped to a second 1
    unclamped = train_step_columns(20, 0.25, 8, torch.Generator().manual_seed(1), low_variance=False, clamp_step_zero=False)
    assert all(sorted(row[1:]) == list(range(19)) for row in unclamped.tolist())


def test_16_shuffling_and_batching_keep_every_field_paired():
    total, steps = 6, 4
    samples = {"prompts": [f"p{i}" for i in range(total)], "prompt_metadata": [{"i": i} for i in range(total)],
               "latents": torch.arange(total, dtype=torch.float32).view(total, 1, 1).expand(total, steps + 1, 3).clone(),
               "timesteps": torch.arange(total, dtype=torch.float32)[:, None].expand(total, steps).clone(),
               "step_index": torch.arange(steps).repeat(total, 1), "rewards": torch.arange(total, dtype=torch.float32),
               "rgrad_x1": torch.arange(total, dtype=torch.float32).view(total, 1).expand(total, 2).clone()}
    out = shuffle(samples, torch.Generator().manual_seed(2))
    order = [int(p[1:]) for p in out["prompts"]]
    assert order != list(range(total))
    for key in ("latents", "timesteps", "rewards", "rgrad_x1"):
        assert out[key].reshape(total, -1)[:, 0].tolist() == [float(i) for i in order]
    assert [m["i"] for m in out["prompt_metadata"]] == order
    batches = micro_batches(out, 2)
    assert len(batches) == 3 and batches[0]["latents"].shape == (2, steps + 1, 3) and len(batches[0]["prompts"]) == 2
    columns = torch.tensor([[3, 1, 2, 0]] * total)
    sub = subsample(samples, columns)
    assert sub["step_index"][0].tolist() == [3, 1, 2, 0] and torch.equal(sub["rewards"], samples["rewards"])


def test_21_transition_drift_uses_sigma_n_zero_for_the_last_step():
    sigmas, _ = flow_match_schedule(20)
    step = torch.tensor([19, 3])
    nxt = next_sigma_of_steps(sigmas, step)
    assert nxt.flatten().tolist() == [0.0, pytest.approx(sigmas[4].item())]
    v, v_ref = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    sigma = sigmas[step].view(-1, 1, 1, 1)
    expected = (((nxt - sigma) * (v - v_ref)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(transition_drift(v, v_ref, sigma, nxt, reduce=False), expected)


class _LinearToy(ToyTransformer):
    """R(x) = M x + text/pooled offsets: linear in x, so finite differences along any direction are exact."""

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, joint_attention_kwargs=None,
                return_dict=False):
        x = hidden_states
        m = self.weight + self.adapter if self.enabled else self.weight
        out = torch.nn.functional.conv2d(x, m.to(x.dtype)[:, :, None, None])
        out = out + encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1).to(x.dtype)
        return (out + 0.1 * pooled_projections.mean(dim=1).view(-1, 1, 1, 1).to(x.dtype),)


class _AffineValue(torch.nn.Module):
    """nu(x, s) = N x + c s: affine in x and in the timestep."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(9)
        self.n = torch.nn.Parameter(torch.randn(4, 4, generator=gen) * 0.2)
        self.c = torch.nn.Parameter(torch.randn(4, 1, 1, generator=gen) * 1e-3)

    def __call__(self, x, s, text, pooled):
        return torch.nn.functional.conv2d(x.float(), self.n[:, :, None, None]) + self.c * s.view(-1, 1, 1, 1)


def test_20_fp32_consistency_terms_are_the_analytic_directional_derivatives_and_train_only_the_value_net():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(20)
    model, value = _LinearToy(), _AffineValue()
    direction = torch.rand(3, 3, 3, generator=torch.Generator().manual_seed(8)) * 1e-4
    beta = 100.0
    algorithm = VGGFlow(GuidedVelocity(model, 5.0), RewardGrad(linear_reward(direction), ToyVAE(seed=3, shift=0.0)),
                        scheduler.sigmas, scheduler.timesteps, reward_scale=beta, eta_mode="quad", value_net=value,
                        finite_differences="fp32")
    b = _batch(scheduler)
    b.x = b.x * 0.3  # keep the decoded pixels inside (0, 1): the reward gradient is then constant
    sigma = scheduler.sigmas[b.step].view(-1, 1, 1, 1)
    _, g, _, _ = algorithm.reward_guidance(b, sigma, 1.0)
    v_ref = algorithm.velocity.reference(b.x, b.s, b.text, b.pooled)
    nu = value(b.x, b.s, b.text, b.pooled)
    grad_v = nu / beta - eta(sigma, "quad") * g
    terms = algorithm.consistency_terms(b, sigma, nu, grad_v, v_ref, 1.0)

    s_prev = b.s - 1e-2
    step = (b.s - s_prev).view(-1, 1, 1, 1)
    sigma_prev = s_prev.view(-1, 1, 1, 1) / 1000
    expected_dt = -value.c / beta - (eta(sigma_prev, "quad") - eta(sigma, "quad")) / step * g
    # float32 differences of O(1) values over a 1e-2 step: ~1e-7 of rounding on a ~1e-5 signal
    assert expected_dt.abs().mean() > 5e-6
    torch.testing.assert_close(terms["delta_t"], expected_dt, rtol=2e-3, atol=5e-7)
    m = model.weight  # R has the base matrix
    torch.testing.assert_close(terms["f1"], torch.nn.functional.conv2d(grad_v, m[:, :, None, None]), rtol=2e-3, atol=1e-7)
    d = v_ref / beta + grad_v
    torch.testing.assert_close(terms["f2"], torch.nn.functional.conv2d(d, value.n[:, :, None, None]), rtol=2e-3, atol=1e-7)

    loss = algorithm.consistency_loss(b, sigma, nu, grad_v, v_ref, 1.0)
    grads = torch.autograd.grad(loss, [value.n, value.c, model.adapter], allow_unused=True)
    assert grads[0].abs().max() > 0 and grads[1].abs().max() > 0
    assert grads[2] is None or grads[2].abs().max() == 0  # the policy gets nothing from L_cons


def test_20_jvp_mode_takes_the_networks_derivatives_exactly():
    """"jvp": d nu/ds = c, J_nu d = N d and J_R nabla V = M nabla V without a step size (float32 rounding only); the
    reward-gradient parts vanish for a linear reward, as in the fp32 mode."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(20)
    model, value = _LinearToy(), _AffineValue()
    direction = torch.rand(3, 3, 3, generator=torch.Generator().manual_seed(8)) * 1e-4
    beta = 100.0
    algorithm = VGGFlow(GuidedVelocity(model, 5.0), RewardGrad(linear_reward(direction), ToyVAE(seed=3, shift=0.0)),
                        scheduler.sigmas, scheduler.timesteps, reward_scale=beta, eta_mode="quad", value_net=value,
                        finite_differences="jvp")
    b = _batch(scheduler)
    b.x = b.x * 0.3
    sigma = scheduler.sigmas[b.step].view(-1, 1, 1, 1)
    _, g, _, _ = algorithm.reward_guidance(b, sigma, 1.0)
    v_ref = algorithm.velocity.reference(b.x, b.s, b.text, b.pooled)
    nu = value(b.x, b.s, b.text, b.pooled)
    grad_v = nu / beta - eta(sigma, "quad") * g
    terms = algorithm.consistency_terms(b, sigma, nu, grad_v, v_ref, 1.0, g=g)
    step = (b.s - (b.s - 1e-2)).view(-1, 1, 1, 1)
    sigma_prev = (b.s - 1e-2).view(-1, 1, 1, 1) / 1000
    expected_dt = -value.c / beta - (eta(sigma_prev, "quad") - eta(sigma, "quad")) / step * g
    torch.testing.assert_close(terms["delta_t"], expected_dt.expand_as(terms["delta_t"]), rtol=1e-3, atol=1e-9)
    torch.testing.assert_close(terms["f1"], torch.nn.functional.conv2d(grad_v, model.weight[:, :, None, None]))
    d = v_ref / beta + grad_v
    torch.testing.assert_close(terms["f2"], torch.nn.functional.conv2d(d, value.n[:, :, None, None]))
    loss = algorithm.consistency_loss(b, sigma, nu, grad_v, v_ref, 1.0, g=g)
    grads = torch.autograd.grad(loss, [value.n, value.c, model.adapter], allow_unused=True)
    assert grads[0].abs().max() > 0 and grads[1].abs().max() > 0
    assert grads[2] is None or grads[2].abs().max() == 0


@pytest.mark.parametrize("leaf_dtype", [None, torch.float32])
def test_n4_reward_gradients_have_the_leafs_precision(leaf_dtype):
    """Faithful (leaf_dtype None): bf16 latents give a bf16-rounded reward gradient; the fix takes it in fp32."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(20)
    rg = RewardGrad(quadratic_reward(torch.rand(3, 3, 3, generator=torch.Generator().manual_seed(2)), 1e-3), ToyVAE(),
                    quantile_clipping=False)
    algorithm = VGGFlow(GuidedVelocity(ToyTransformer(), 5.0), rg, scheduler.sigmas, scheduler.timesteps,
                        reward_scale=3e7, eta_mode="quad", leaf_dtype=leaf_dtype)
    b = _batch(scheduler)
    b.x = b.x.to(torch.bfloat16)
    _, g, _, _ = algorithm.reward_guidance(b, scheduler.sigmas[b.step].view(-1, 1, 1, 1), 1.0)
    assert g.dtype == torch.float32
    representable = torch.equal(g, g.to(torch.bfloat16).float())
    assert representable == (leaf_dtype is None)
