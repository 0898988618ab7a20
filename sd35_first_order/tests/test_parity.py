"""Parity with upstream: numbers computed by running upstream's own functions (jaylee2000/rsm at e8be3df,
`sd35_first_order/lib/...`) outside this repository on the seeded inputs rebuilt here, then compared with ours.
Only the resulting numbers are kept. Tolerances: float64 inputs 1e-12 relative, float32 1e-6 (contract §7).

Upstream functions used: `RewardGradientComputer.clip_gradient` (A), `VGGFlowAlgorithm.compute_velocity_target`
in both modes with the sampler's `compute_from_latent(..., inf)` for ours (B, C), `compute_transition_drift` (D),
`VGGFlowTrainer._compute_velocity_loss` (E), `_subsample_timesteps` under `torch.manual_seed(0)` (F),
`_shuffle_samples` under `torch.manual_seed(3)` (G), `_aggregate_and_log_metrics` on 2 and 3 gloo processes (H),
and `compute_velocity_target` + `compute_value_consistency_loss` with a value net (I, CPU so fp32).
"""
import pytest
import torch
from toy_models import ToyTransformer, ToyVAE, quadratic_reward, toy_inputs

from sd35fo.algorithm import StepBatch, VGGFlow, eta, transition_drift, velocity_loss
from sd35fo.batching import shuffle, train_step_columns
from sd35fo.guidance import GuidedVelocity
from sd35fo.metrics import aggregate, local_summary
from sd35fo.reward_grad import RewardGrad, clip_per_sample, per_sample_norm
from sd35fo.schedule import flow_match_schedule

F32 = dict(rel=1e-6, abs=1e-9)
F64 = dict(rel=1e-12, abs=1e-15)


def _schedule():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(20)
    return scheduler.sigmas, scheduler.timesteps


# A: clip_tau(g) = g / (|g| + 1e-8) * min(|g|, tau)
CLIP_GOLDEN = {
    1.0: ([0.009656454125739442, 0.9999999989597907, 0.999999999990105],
          [-0.0007841618256304419, 0.013958011642084343, -0.17626079529015445]),
    float("inf"): ([0.009656454125739442, 9.613451175970164, 1010.6093938334459],
                   [-0.0007841618256304419, 0.1341846635743811, -178.1308154865467]),
    0.5: ([0.009656454125739442, 0.4999999994798954, 0.4999999999950525],
          [-0.0007841618256304419, 0.006979005821042172, -0.08813039764507723]),
}


@pytest.mark.parametrize("tau", list(CLIP_GOLDEN))
def test_clipping_matches_upstream(tau):
    gen = torch.Generator().manual_seed(10)
    g = torch.randn(3, 4, 5, 5, generator=gen, dtype=torch.float64) * torch.tensor(
        [1e-3, 1.0, 100.0], dtype=torch.float64).view(3, 1, 1, 1)
    out = clip_per_sample(g, tau)
    norms, first = CLIP_GOLDEN[tau]
    assert per_sample_norm(out).tolist() == pytest.approx(norms, **F64)
    assert out[:, 0, 0, 0].tolist() == pytest.approx(first, **F64)


# B/C: targets T = R - eta beta g (pruned lookahead / ours terminal), their norms and masks; D: drift
TARGET_GOLDEN = {
    ("quad", 3e7, False): ([-0.21195411682128906, 3.086125373840332], [-1.0767314434051514, 0.4503140449523926],
                           [4.961963782079692e-07, 4.884683448835858e-07], [0.0, 0.0]),
    ("quad", 3e7, True): ([-0.25835299491882324, 6.121424674987793], [-1.091269850730896, 0.2311599850654602],
                          [3.780766917316214e-07, 4.58899620525699e-07], [1.0, 0.0]),
    ("linear", 1.5e7, False): ([0.6250233054161072, 3.2932941913604736], [-1.0448428392410278, 0.4636622667312622],
                               [4.961963782079692e-07, 4.884683448835858e-07], [0.0, 0.0]),
    ("linear", 1.5e7, True): ([0.4061547517776489, 6.455552101135254], [-1.1134225130081177, 0.23534151911735535],
                              [3.780766917316214e-07, 4.58899620525699e-07], [1.0, 0.0]),
}
POLICY_SUMS = [-0.28308016061782837, -2.273977279663086]
REFERENCE_SUMS = [-0.4371225833892822, -1.8668019771575928]
DRIFT_GOLDEN = [1.3835551726515405e-05, 5.2851519285468385e-05]


def _toy_setup(mode, beta, ours, value_net=None, steps=(5, 14)):
    sigmas, timesteps = _schedule()
    gen = torch.Generator().manual_seed(11)
    target_image = torch.rand(3, 3, 3, generator=gen)
    reward_grad = RewardGrad(quadratic_reward(target_image, 1e-6), ToyVAE())
    algorithm = VGGFlow(GuidedVelocity(ToyTransformer(), 5.0), reward_grad, sigmas, timesteps, reward_scale=beta,
                        eta_mode=mode, use_saved_rgrad_x1=ours, value_net=value_net)
    x, text, pooled = toy_inputs()
    step = torch.tensor(steps)
    batch = StepBatch(x, timesteps[step], step, text, pooled, ["p", "q"], [{}, {}], torch.tensor([0.3, -0.2]))
    if ours:
        z_final = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(12))
        leaf = z_final.detach().requires_grad_(True)
        batch.rgrad_x1 = reward_grad(leaf, leaf, ["p", "q"], [{}, {}], float("inf"), retain_graph=False).grad
    return algorithm, batch, sigmas


@pytest.mark.parametrize("mode, beta, ours", list(TARGET_GOLDEN))
def test_targets_drift_and_masks_match_upstream_in_both_modes(mode, beta, ours):
    algorithm, batch, sigmas = _toy_setup(mode, beta, ours)
    sigma = sigmas.gather(0, batch.step).view(-1, 1, 1, 1)
    v, g, mask, norm = algorithm.reward_guidance(batch, sigma, 1.0)
    v_ref = algorithm.velocity.reference(batch.x, batch.s, batch.text, batch.pooled)
    target = v_ref - eta(sigma, mode) * beta * g.float()
    sums, elements, norms, masks = TARGET_GOLDEN[(mode, beta, ours)]
    assert target.sum(dim=(1, 2, 3)).tolist() == pytest.approx(sums, **F32)
    assert target[:, 1, 2, 0].tolist() == pytest.approx(elements, **F32)
    assert norm.tolist() == pytest.approx(norms, **F32)
    assert mask.tolist() == masks
    assert v.sum(dim=(1, 2, 3)).tolist() == pytest.approx(POLICY_SUMS, **F32)
    assert v_ref.sum(dim=(1, 2, 3)).tolist() == pytest.approx(REFERENCE_SUMS, **F32)
    sigma_next = sigmas.gather(0, batch.step + 1).view(-1, 1, 1, 1)
    assert transition_drift(v, v_ref, sigma, sigma_next, reduce=False).tolist() == pytest.approx(DRIFT_GOLDEN, **F32)


def test_velocity_loss_matches_upstream_with_and_without_reward_masking():
    gen = torch.Generator().manual_seed(20)
    v, target = torch.randn(3, 4, 3, 3, generator=gen), torch.randn(3, 4, 3, 3, generator=gen)
    mask = torch.tensor([1.0, 0.0, 1.0])
    assert velocity_loss(v, target, mask, False).item() == pytest.approx(2.1454641819000244, **F32)
    assert velocity_loss(v, target, mask, True).item() == pytest.approx(2.318053722381592, **F32)


SUBSAMPLE_GOLDEN = {
    True: [[19, 16, 15, 9, 4, 3, 19, 15, 11, 5, 3, 17, 14, 8, 7, 2, 16, 12, 8, 6, 1],
           [19, 18, 15, 11, 6, 1, 17, 13, 9, 5, 1, 17, 12, 11, 4, 3, 17, 14, 11, 7, 1],
           [19, 18, 15, 8, 5, 3, 17, 15, 11, 6, 3, 16, 13, 9, 5, 3, 16, 15, 10, 4, 3]],
    False: [[19, 15, 10, 14, 3, 17, 2, 9, 5, 7, 12, 18, 13, 11, 16, 4, 1, 6, 8, 1],
            [19, 18, 4, 2, 10, 15, 7, 1, 12, 17, 1, 16, 11, 13, 5, 8, 6, 14, 9, 3],
            [19, 5, 18, 1, 3, 12, 4, 10, 8, 17, 16, 14, 6, 9, 11, 13, 1, 2, 15, 7]],
}


@pytest.mark.parametrize("low_variance", [True, False])
def test_timestep_subsampling_matches_upstream_draw_for_draw(low_variance):
    columns = train_step_columns(20, 0.25, 3, torch.Generator().manual_seed(0), low_variance)
    assert columns.tolist() == SUBSAMPLE_GOLDEN[low_variance]


def test_shuffle_matches_upstream_permutation():
    samples = {"prompts": list("abcde"), "prompt_metadata": [{"i": i} for i in range(5)],
               "timesteps": torch.arange(5.0)[:, None], "rewards": torch.arange(5.0)}
    out = shuffle(samples, torch.Generator().manual_seed(3))
    assert out["prompts"] == ["b", "a", "d", "e", "c"]
    assert out["rewards"].tolist() == [1.0, 0.0, 3.0, 4.0, 2.0]
    assert [m["i"] for m in out["prompt_metadata"]] == [1, 0, 3, 4, 2]


def _rank_window(rank, steps=3, batch=2):
    """The synthetic per-rank records the upstream aggregation ran on (seed 100 + rank)."""
    gen = torch.Generator().manual_seed(100 + rank)
    window = []
    for _ in range(steps):
        norm = torch.rand(batch, generator=gen) * (rank + 1)
        loss, loss_raw, drift = (torch.rand((), generator=gen) for _ in range(3))
        window.append({"loss": loss, "loss_raw": loss_raw, "transition_drift": drift, "rgrad_mean": norm.mean(),
                       "rgrad_min": norm.min(), "rgrad_max": norm.max(), "rgrad_norm": norm})
    return window


AGGREGATE_GOLDEN = {  # upstream's console line at 6 decimals; tau = rgrad_08quantile at full precision
    2: dict(loss=0.338667, loss_raw=0.591617, transition_drift=0.499930, rgrad_mean=0.587733, rgrad_min=0.037181,
            rgrad_max=1.819091, rgrad_08quantile=0.47759708762168884, rgrad_median=0.198049, rgrad_std=0.331582),
    3: dict(loss=0.357435, loss_raw=0.569889, transition_drift=0.515039, rgrad_mean=0.663174, rgrad_min=0.019455,
            rgrad_max=2.324110, rgrad_08quantile=0.41289421916007996, rgrad_median=0.108523, rgrad_std=0.286720),
}


@pytest.mark.parametrize("world", [2, 3])
def test_metric_aggregation_and_threshold_match_upstream_on_several_processes(world):
    """Faithful mode: tau = quantile(M of the last rank, 0.8) / W; _min/_max global; plain keys mean of means."""
    windows = [_rank_window(r) for r in range(world)]
    flats = []
    for window in windows:
        summary, norms = local_summary(window)
        flats.append(torch.cat([torch.stack([summary[k] for k in summary]), norms.reshape(-1)]))
    everyone = torch.stack(flats)
    for rank in range(world):  # every rank computes the same numbers
        out = aggregate(windows[rank], world, gather=lambda flat: everyone)
        golden = AGGREGATE_GOLDEN[world]
        for key, value in golden.items():
            tolerance = F32 if key == "rgrad_08quantile" else dict(abs=5e-7)
            assert out[key] == pytest.approx(value, **tolerance), key
    fixed = aggregate(windows[0], world, gather=lambda flat: everyone, single_rank_quantile=False)
    all_norms = torch.cat([torch.stack([r["rgrad_norm"] for r in w]).reshape(-1) for w in windows]).double()
    assert fixed["rgrad_08quantile"] == pytest.approx(torch.quantile(all_norms, 0.8).item(), **F64)


VALUE_GOLDEN = dict(loss_consistency=7.554528669295735e-10, loss_terminal=0.0005985766183584929,
                    value_grad_norm=0.5674824714660645)


class _ScaledToy(ToyTransformer):
    def forward(self, *args, **kwargs):
        return (super().forward(*args, **kwargs)[0] * 0.05,)


def test_value_net_consistency_and_terminal_losses_match_upstream():
    """Full VGG-Flow at steps 5 and 19 (the terminal one), value net on the negative rows (upstream, N6)."""
    value_module = _ScaledToy(seed=7)

    def value(x, s, text, pooled):
        rows = x.shape[0]
        return value_module(hidden_states=x.float(), timestep=s, encoder_hidden_states=text[:rows].float(),
                            pooled_projections=pooled[:rows].float())[0]

    algorithm, batch, _ = _toy_setup("quad", 3e7, False, value_net=value, steps=(5, 19))
    loss, stats = algorithm.step(batch, 1.0)
    assert stats["loss_consistency"].item() == pytest.approx(VALUE_GOLDEN["loss_consistency"], rel=1e-5)
    assert stats["loss_terminal"].item() == pytest.approx(VALUE_GOLDEN["loss_terminal"], **F32)
    loss.backward()  # L_vel's target is detached: the value net's gradient is that of L_cons + 1000 L_term
    assert value_module.adapter.grad.norm().item() == pytest.approx(VALUE_GOLDEN["value_grad_norm"], rel=1e-5)


def test_schedule_matches_the_spec_table_and_the_scheduler():
    sigmas, timesteps = _schedule()
    ours_sigmas, ours_timesteps = flow_match_schedule(20)
    assert ours_sigmas.tolist() == pytest.approx(sigmas.tolist(), abs=1e-6)
    assert ours_timesteps.tolist() == pytest.approx(timesteps.tolist(), abs=2e-4)


def test_cfg_combination_and_eta_match_upstream():
    """`CFGWrapper.apply` on seeded float64 outputs; `VGGFlowAlgorithm._eta` on four sigmas (upstream's 'constant'
    returns the scalar 1.0)."""
    from sd35fo.guidance import cfg_combine

    out = torch.randn(4, 2, 2, 2, generator=torch.Generator().manual_seed(30), dtype=torch.float64)
    guided = cfg_combine(out, 5.0)
    assert guided[:, 0, 0, 0].tolist() == pytest.approx([-4.146102843851445, 9.685384080541832], **F64)
    assert guided.sum(dim=(1, 2, 3)).tolist() == pytest.approx([-13.050569167009233, -0.7544384921626444], **F64)
    sigma = torch.tensor([1.0, 0.75, 0.3125, 0.008928571], dtype=torch.float64)
    assert eta(sigma, "quad").tolist() == pytest.approx([0.0, 0.0625, 0.47265625, 0.9822225773801021], **F64)
    assert eta(sigma, "linear").tolist() == pytest.approx([0.0, 0.25, 0.6875, 0.991071429], **F64)
    assert eta(sigma, "constant").tolist() == [1.0] * 4
