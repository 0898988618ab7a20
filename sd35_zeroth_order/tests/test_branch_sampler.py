"""The `branch` sampler's packed-row contract (spec §3.5; §9 items 16, 20-24).

Toy velocity: a fixed linear map of the latent plus a timestep term and a per-prompt bias, in float64, so that
backbone, branches and ODE completions can be recomputed by hand with the Euler formula x' = x − (σ − σ')v.
"""
import math

import pytest
import torch

from sd35zo.sampling import decode_latents, initial_latents, make_cfg_velocity
from sd35zo.sampling_branch import (
    complete_rows_by_ode,
    exploration_weights,
    mean_active_k,
    sample_branches,
)
from sd35zo.sde import flow_sigmas

B, C, H, W = 4, 3, 2, 2
LOWSNR2 = [6, 6, 8, 10, 0, 0, 0, 0, 0, 6]  # spec §2.3: 10 entries, the last one dropped


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def toy_velocity(prompts=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = (0.3 * torch.randn(C, C, generator=g)).double()  # [C, C]
    direction = torch.randn(1, C, H, W, generator=g).double()
    bias = torch.randn(prompts, C, H, W, generator=g).double()  # [P, C, H, W]

    def velocity(x, t, rows):
        assert x.shape[0] == t.shape[0] == rows.shape[0]
        return torch.einsum("dc,bchw->bdhw", mix, x) + (t / 1000).reshape(-1, 1, 1, 1) * direction + bias[rows]

    return velocity


def x0(seed=1, batch=B):
    return torch.randn((batch, C, H, W), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def euler_by_hand(velocity, x, sample, sigmas, start, stop):
    """Euler steps start..stop−1 of one row: x ← x − (σ_p − σ_{p+1})·v(x, 1000σ_p)."""
    for p in range(start, stop):
        s, s_next = float(sigmas[p]), float(sigmas[p + 1])
        v = velocity(x[None], torch.tensor([1000 * s], dtype=torch.float64), torch.tensor([sample]))[0]
        x = x - (s - s_next) * v
    return x


def run(schedule=LOWSNR2, chunk=12, seed=0, num_steps=10, **flags):
    flags.setdefault("return_prev_sample_mean", True)
    flags.setdefault("collect_matching_aux", True)
    flags.setdefault("collect_kl_anchor_rows", True)
    return sample_branches(toy_velocity(), x0(), flow_sigmas(num_steps), schedule, latent_chunk_size=chunk,
                           generator=torch.Generator().manual_seed(seed), **flags)


@pytest.fixture(scope="module")
def lowsnr2():
    return run()


# ---------------------------------------------------------------- §9.20 row counts and order

def test_rows_are_grouped_by_step_then_sample_major_with_branches_consecutive(lowsnr2):
    out = lowsnr2
    steps, samples = [], []
    for i, k in enumerate(LOWSNR2[:9]):
        for b in range(B):
            steps += [i] * k
            samples += [b] * k
    assert out.num_rows == B * 30 == 120  # spec §2.3/§3.5: R = B·Σk = 120 for lowsnr2
    assert out.row_step_idx.tolist() == steps and out.row_sample_idx.tolist() == samples
    assert out.row_step_idx.dtype == out.row_sample_idx.dtype == torch.int64
    assert out.row_exploration_k.dtype == torch.float32
    assert out.row_exploration_k.tolist() == [float(LOWSNR2[i]) for i in steps]
    sigmas = flow_sigmas(10)
    assert torch.equal(out.row_timesteps, 1000 * sigmas[out.row_step_idx])
    assert torch.equal(out.row_next_timesteps, 1000 * sigmas[out.row_step_idx + 1])
    for name in ("row_latents", "row_next_latents", "row_prev_sample_mean", "row_noises", "row_noise_preds",
                 "row_final_latents"):
        assert getattr(out, name).shape == (120, C, H, W), name
    assert out.row_log_probs.shape == (120,)


def test_anchor_rows_cover_every_zero_branch_step_once_per_sample(lowsnr2):
    out = lowsnr2
    assert out.kl_row_step_idx.tolist() == [i for i in range(4, 9) for _ in range(B)]  # K = 4·5 = 20
    assert out.kl_row_sample_idx.tolist() == list(range(B)) * 5
    sigmas = flow_sigmas(10)
    assert torch.equal(out.kl_row_timesteps, 1000 * sigmas[out.kl_row_step_idx])
    assert torch.equal(out.kl_row_next_timesteps, 1000 * sigmas[out.kl_row_step_idx + 1])
    assert torch.equal(out.kl_row_latents, out.backbone_latents[out.kl_row_sample_idx, out.kl_row_step_idx])
    without = run(collect_kl_anchor_rows=False)
    assert without.kl_row_step_idx.numel() == 0 and without.kl_row_latents.shape == (0, C, H, W)


# ---------------------------------------------------------------- §9.21 shared state per (sample, step)

def test_backbone_is_the_hand_euler_ode_prefix_and_rows_start_from_it(lowsnr2):
    out = lowsnr2
    velocity, sigmas, start = toy_velocity(), flow_sigmas(10), x0()
    assert out.backbone_latents.shape == (B, 10, C, H, W)
    for b in range(B):
        for i in range(10):
            torch.testing.assert_close(out.backbone_latents[b, i], euler_by_hand(velocity, start[b], b, sigmas, 0, i),
                                       rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.row_latents, out.backbone_latents[out.row_sample_idx, out.row_step_idx],
                               rtol=0, atol=0)


def test_branches_of_one_sample_and_step_share_latent_mean_and_velocity_and_differ_only_in_noise(lowsnr2):
    out = lowsnr2
    for i in range(4):
        for b in range(B):
            rows = ((out.row_step_idx == i) & (out.row_sample_idx == b)).nonzero().flatten()
            assert rows.numel() == LOWSNR2[i]
            for name in ("row_latents", "row_prev_sample_mean", "row_noise_preds"):
                values = getattr(out, name)[rows]
                assert torch.equal(values, values[:1].expand_as(values)), name
            noises = out.row_noises[rows]
            assert not torch.allclose(noises[0], noises[1])


def test_branch_steps_are_hand_derived_sde_transitions_with_gaussian_log_probs(lowsnr2):
    out = lowsnr2
    velocity, sigmas = toy_velocity(), flow_sigmas(10)
    for r in range(0, 120, 7):
        i, b = int(out.row_step_idx[r]), int(out.row_sample_idx[r])
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        h = s - s_next
        x = out.row_latents[r]
        v = velocity(x[None], torch.tensor([1000 * s], dtype=torch.float64), torch.tensor([b]))[0]
        tilde = 0.7 * math.sqrt(s / (1 - (float(sigmas[1]) if s == 1.0 else s)))  # a = 0.7
        mean = x - h * (v - 0.5 * tilde**2 * (-(x + (1 - s) * v) / s))
        std = tilde * math.sqrt(h)
        torch.testing.assert_close(out.row_noise_preds[r], v, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out.row_prev_sample_mean[r], mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out.row_next_latents[r], mean + std * out.row_noises[r], rtol=1e-12, atol=1e-12)
        expected = torch.distributions.Normal(mean, std).log_prob(out.row_next_latents[r]).mean()
        torch.testing.assert_close(out.row_log_probs[r], expected, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- §9.22 ODE completion, padding independence

def test_each_branch_ends_at_an_independent_ode_integration_of_its_sde_sample(lowsnr2):
    out = lowsnr2
    velocity, sigmas = toy_velocity(), flow_sigmas(10)
    for r in [0, 5, 24, 47, 48, 80, 119]:
        i, b = int(out.row_step_idx[r]), int(out.row_sample_idx[r])
        expected = euler_by_hand(velocity, out.row_next_latents[r], b, sigmas, i + 1, 10)
        torch.testing.assert_close(out.row_final_latents[r], expected, rtol=1e-12, atol=1e-12)


def test_branches_are_bit_identical_and_ode_completions_equal_to_float_tolerance_across_latent_chunk_sizes(lowsnr2):
    """Passes 1 and 2a never see the chunk size (bit-identical); pass 2b's ODE completions run in chunks of L rows,
    so they agree to float64 tolerance only."""
    for chunk in (1, 3, 5, 200):
        other = run(chunk=chunk)
        for name in ("row_next_latents", "row_log_probs", "row_prev_sample_mean"):
            assert torch.equal(getattr(other, name), getattr(lowsnr2, name)), (chunk, name)
        # different chunk sizes batch the velocity's einsum differently, so BLAS may pick other kernels: contract §7
        torch.testing.assert_close(other.row_final_latents, lowsnr2.row_final_latents, rtol=1e-12, atol=1e-12,
                                   msg=lambda m: f"chunk {chunk}: {m}")


def test_padding_rows_are_run_but_never_written_back():
    # Rows at mixed positions, L = 4: every call is padded to 4 rows, and each row still ends exactly where
    # its own hand Euler integration does.
    velocity, sigmas = toy_velocity(), flow_sigmas(6)
    rows = 5
    start = x0(seed=2, batch=rows)
    positions = torch.tensor([1, 1, 3, 4, 5])
    sample_idx = torch.tensor([0, 1, 2, 3, 0])
    seen = []

    def recording(x, t, s):
        seen.append(x.shape[0])
        return velocity(x, t, s)

    final, useful, processed = complete_rows_by_ode(recording, start, positions, sample_idx, sigmas, 4)
    assert set(seen) == {4}  # every model call has exactly L rows
    assert useful == 5 + 5 + 3 + 2 + 1
    # active rows per round: 5, 4, 3, 2, 2 -> chunks 2, 1, 1, 1, 1 with padding 3, 0, 1, 2, 2
    assert processed == 4 * (2 + 1 + 1 + 1 + 1) and processed - useful == 3 + 0 + 1 + 2 + 2
    for r in range(rows):
        expected = euler_by_hand(velocity, start[r], int(sample_idx[r]), sigmas, int(positions[r]), 6)
        torch.testing.assert_close(final[r], expected, rtol=1e-12, atol=1e-12)


def test_chunk_size_below_one_is_rejected():
    with pytest.raises(ValueError, match="latent_chunk_size"):
        run(chunk=0)


def test_half_precision_velocity_is_stored_as_is_while_branch_samples_and_log_probs_are_fp32():
    # Upstream stores v_old in the embedding dtype (fp16) and x', log p, μ, ε in fp32 (spec §3.5 table).
    velocity = toy_velocity()
    half = lambda x, t, rows: velocity(x.double(), t.double(), rows).half()
    out = sample_branches(half, x0().float(), flow_sigmas(4), [1, 0, 2], latent_chunk_size=2,
                          generator=torch.Generator().manual_seed(0), collect_matching_aux=True)
    assert out.row_noise_preds.dtype == torch.float16
    for name in ("row_next_latents", "row_log_probs", "row_prev_sample_mean", "row_noises"):
        assert getattr(out, name).dtype == torch.float32, name
    assert out.row_latents.dtype == out.row_final_latents.dtype == torch.float32  # the x_0 dtype


# ---------------------------------------------------------------- §9.23 pass-2b accounting

def test_ode_completion_accounting_matches_the_lowsnr2_numbers(lowsnr2):
    # spec §9.23: useful = Σ_rows (N − i − 1) = 4·(6·9 + 6·8 + 8·7 + 10·6) = 872, 4 padded row-steps at L = 12.
    assert lowsnr2.useful_row_steps_2b == 872
    assert lowsnr2.processed_row_steps_2b == 876 and lowsnr2.padded_row_steps_2b == 4
    unchunked = run(chunk=1)
    assert unchunked.useful_row_steps_2b == unchunked.processed_row_steps_2b == 872


def test_model_sees_the_backbone_then_only_chunks_of_exactly_l_rows():
    calls = []
    velocity = toy_velocity()

    def recording(x, t, rows):
        calls.append(x.shape[0])
        return velocity(x, t, rows)

    out = sample_branches(recording, x0(), flow_sigmas(10), LOWSNR2, latent_chunk_size=12,
                          generator=torch.Generator().manual_seed(0))
    # Pass 1: N − 1 = 9 backbone calls of B rows; pass 2a reuses their velocities; pass 2b: L-row chunks.
    assert calls[:9] == [B] * 9 and set(calls[9:]) == {12}
    assert 12 * len(calls[9:]) == out.processed_row_steps_2b


# ---------------------------------------------------------------- §9.24 schedules

def test_all_zero_schedule_raises_and_an_int_schedule_branches_every_transition():
    with pytest.raises(ValueError, match="no step with k > 0"):
        run(schedule=[0] * 10)
    out = run(schedule=2, num_steps=4, collect_kl_anchor_rows=True)
    assert out.row_exploration_k.tolist() == [2.0] * (B * 2 * 3)
    assert out.row_step_idx.tolist() == [i for i in range(3) for _ in range(B * 2)]
    assert out.kl_row_step_idx.numel() == 0
    with pytest.raises(ValueError, match="exploration_k"):
        run(schedule=[1, 2], num_steps=4)


def test_steps_below_keeps_the_trained_transitions_and_their_anchors(lowsnr2):
    kept = lowsnr2.steps_below(4)
    assert kept.num_rows == 120 and kept.kl_row_step_idx.numel() == 0
    early = run(schedule=[1, 0, 2, 3], num_steps=5).steps_below(2)
    assert early.row_step_idx.tolist() == [0] * B and early.kl_row_step_idx.tolist() == [1] * B
    assert early.row_noises.shape[0] == B and early.row_final_latents.shape[0] == B


def test_sampling_is_deterministic_given_the_generator_and_varies_with_it(lowsnr2):
    assert torch.equal(run().row_final_latents, lowsnr2.row_final_latents)
    assert not torch.allclose(run(seed=1).row_next_latents, lowsnr2.row_next_latents)


# ---------------------------------------------------------------- §9.16 exploration weights

@pytest.mark.parametrize("profile", [LOWSNR2, [3, 3, 4, 5, 6, 7, 7, 8, 11, 6], [1, 0, 5, 2, 0, 0, 9, 0, 4, 0], 3])
def test_exploration_weights_of_one_trajectory_sum_to_k_bar_at_every_active_step(profile):
    out = run(schedule=profile, collect_kl_anchor_rows=False)
    schedule = [profile] * 9 if isinstance(profile, int) else profile[:9]
    k_bar = sum(k for k in schedule if k > 0) / sum(1 for k in schedule if k > 0)
    weights = exploration_weights(out.row_exploration_k, schedule)
    for i, k in enumerate(schedule):
        for b in range(B):
            rows = (out.row_step_idx == i) & (out.row_sample_idx == b)
            total = weights[rows].sum().item()
            assert total == pytest.approx(k_bar if k > 0 else 0.0, rel=1e-6)


def test_mean_active_k_is_7_5_for_lowsnr2_and_rejects_empty_schedules():
    assert mean_active_k(LOWSNR2[:9]) == 7.5  # spec §1.5
    with pytest.raises(ValueError):
        mean_active_k([0, 0])


# ---------------------------------------------------------------- end to end with the tiny SD3.5 pipeline

@pytest.fixture(scope="module")
def tiny_velocity():
    from diffusers import StableDiffusion3Pipeline
    from rsm_testkit import get_tiny_model

    torch.manual_seed(0)
    pipe = StableDiffusion3Pipeline.from_pretrained(get_tiny_model("sd35"))
    prompts = ["a red cube", "two dogs"]
    with torch.no_grad():
        pos, neg, pooled, neg_pooled = pipe.encode_prompt(prompts, prompts, prompts,
                                                          do_classifier_free_guidance=True, negative_prompt="")
    return pipe, make_cfg_velocity(pipe.transformer, pos, pooled, neg[:1], neg_pooled[:1], guidance_scale=4.5)


def test_branch_sampler_end_to_end_with_the_tiny_sd3_transformer_is_chunk_size_independent(tiny_velocity):
    pipe, velocity = tiny_velocity
    start = initial_latents(2, 64, generator=torch.Generator().manual_seed(0))
    sigmas = flow_sigmas(4)
    outs = {chunk: sample_branches(velocity, start, sigmas, [2, 0, 1, 6], latent_chunk_size=chunk,
                                   generator=torch.Generator().manual_seed(1), collect_matching_aux=True,
                                   collect_kl_anchor_rows=True)
            for chunk in (1, 3, 12)}
    out = outs[12]
    assert out.row_step_idx.tolist() == [0, 0, 0, 0, 2, 2] and out.row_sample_idx.tolist() == [0, 0, 1, 1, 0, 1]
    assert out.row_final_latents.shape == (6, 16, 8, 8) and out.kl_row_latents.shape == (2, 16, 8, 8)
    assert torch.isfinite(out.row_final_latents).all() and torch.isfinite(out.row_log_probs).all()
    assert out.useful_row_steps_2b == 4 * 3 + 2 * 1 and out.processed_row_steps_2b == 12 * 3  # rounds of 6, 4, 4 active rows
    for chunk in (1, 3):
        # Different batch sizes may round differently inside the transformer; padding must not matter beyond that.
        torch.testing.assert_close(outs[chunk].row_final_latents, out.row_final_latents, rtol=1e-5, atol=1e-5)
        assert torch.equal(outs[chunk].row_next_latents, out.row_next_latents)
    images = decode_latents(pipe.vae, out.row_final_latents, chunk_size=12)
    assert images.shape == (6, 3, 64, 64) and images.min() >= 0 and images.max() <= 1
