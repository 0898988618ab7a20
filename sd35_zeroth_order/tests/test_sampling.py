"""The `default` SDE-trajectory sampler, ODE sampling, the CFG velocity adapter and decoding (spec §3.1, §3.4, §3.6).

Toy velocities are fixed linear maps, so every expected value is written out by hand from the formulas of §3.3
(Euler step x − h·v, SDE mean x − h(v − ½σ̃² s) with s = −(x + (1−σ)v)/σ) instead of calling the code under test.
"""
import math

import pytest
import torch
from torch import nn

from sd35zo.sampling import decode_latents, initial_latents, make_cfg_velocity, sample_ode, sample_sde_trajectory
from sd35zo.sde import flow_sigmas, sde_step_with_logprob

B, C, H, W = 3, 4, 2, 2


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def toy_velocity(dtype=torch.float64, prompts=B, seed=0):
    """v = M x (channel mixing) + t/1000 · c + b[prompt]: depends on latents, timestep and prompt."""
    g = torch.Generator().manual_seed(seed)
    mix = (0.3 * torch.randn(C, C, generator=g)).to(dtype)  # [C, C]
    direction = torch.randn(1, C, H, W, generator=g).to(dtype)  # [1, C, H, W]
    bias = torch.randn(prompts, C, H, W, generator=g).to(dtype)  # [P, C, H, W]

    def velocity(x, t, rows):
        assert x.shape[0] == t.shape[0] == rows.shape[0]
        mixed = torch.einsum("dc,bchw->bdhw", mix, x)
        return mixed + (t / 1000).reshape(-1, 1, 1, 1).to(dtype) * direction + bias[rows]

    return velocity


def noise(seed, shape=(B, C, H, W), dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def hand_noise_scale(sigmas, j, a=0.7):
    """σ̃_j = a·sqrt(σ/(1 − σ)), with σ_1 in the denominator at σ = 1 (spec §3.3 step 1)."""
    s = float(sigmas[j])
    denominator = 1 - (float(sigmas[1]) if s == 1.0 else s)
    return a * math.sqrt(s / denominator)


# ---------------------------------------------------------------- default sampler (§3.4)

def test_default_trajectory_stores_all_n_steps_chained_with_the_scheduler_timesteps():
    sigmas = flow_sigmas(10)
    x0 = noise(1)
    traj = sample_sde_trajectory(toy_velocity(), x0, sigmas, generator=torch.Generator().manual_seed(0),
                                 keep_matching_aux=True)
    assert traj.latents.shape == traj.next_latents.shape == (B, 10, C, H, W)
    assert traj.log_probs.shape == traj.timesteps.shape == (B, 10)
    assert torch.equal(traj.latents[:, 0], x0)
    # The input of step j+1 is the output of step j; the last step lands on σ = 0.
    assert torch.equal(traj.latents[:, 1:], traj.next_latents[:, :-1])
    assert torch.equal(traj.final_latents, traj.next_latents[:, -1])
    for b in range(B):
        assert torch.equal(traj.timesteps[b], sigmas[:-1] * 1000)
    assert torch.isfinite(traj.log_probs).all()


def test_default_trajectory_steps_are_hand_derived_sde_transitions_with_gaussian_log_probs():
    sigmas = flow_sigmas(10)
    velocity = toy_velocity()
    traj = sample_sde_trajectory(velocity, noise(2), sigmas, generator=torch.Generator().manual_seed(3),
                                 keep_matching_aux=True)
    rows = torch.arange(B)
    for j in range(10):
        s, s_next = float(sigmas[j]), float(sigmas[j + 1])
        h = s - s_next
        x = traj.latents[:, j]
        v = velocity(x, torch.full((B,), 1000 * s, dtype=torch.float64), rows)
        tilde = hand_noise_scale(sigmas, j)
        score = -(x + (1 - s) * v) / s
        mean = x - h * (v - 0.5 * tilde**2 * score)
        std = tilde * math.sqrt(h)
        torch.testing.assert_close(traj.noise_preds[:, j], v, rtol=0, atol=0)
        torch.testing.assert_close(traj.prev_sample_mean[:, j], mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(traj.next_latents[:, j], mean + std * traj.noises[:, j], rtol=1e-12, atol=1e-12)
        expected = torch.distributions.Normal(mean, std).log_prob(traj.next_latents[:, j]).mean(dim=(1, 2, 3))
        torch.testing.assert_close(traj.log_probs[:, j], expected, rtol=1e-10, atol=1e-10)


def test_default_trajectory_log_probs_rescored_from_stored_latents_reproduce_the_stored_ones():
    sigmas = flow_sigmas(10)
    velocity = toy_velocity(torch.float32)
    traj = sample_sde_trajectory(velocity, noise(4, dtype=torch.float32), sigmas,
                                 generator=torch.Generator().manual_seed(5))
    rows = torch.arange(B)
    for j in range(10):
        v = velocity(traj.latents[:, j], traj.timesteps[:, j], rows)
        again = sde_step_with_logprob(v, sigmas[j], sigmas[j + 1], traj.latents[:, j],
                                      prev_sample=traj.next_latents[:, j], sigma_max=float(sigmas[1]))
        torch.testing.assert_close(again.log_prob, traj.log_probs[:, j], rtol=0, atol=0)


def test_default_trajectory_keeps_only_the_requested_buffers():
    sigmas = flow_sigmas(4)
    plain = sample_sde_trajectory(toy_velocity(), noise(6), sigmas, generator=torch.Generator().manual_seed(0))
    assert plain.prev_sample_mean is None and plain.noises is None and plain.noise_preds is None
    guard = sample_sde_trajectory(toy_velocity(), noise(6), sigmas, generator=torch.Generator().manual_seed(0),
                                  keep_prev_sample_mean=True)
    assert guard.prev_sample_mean.shape == (B, 4, C, H, W) and guard.noises is None
    # The flags change what is stored, not what is sampled.
    assert torch.equal(plain.next_latents, guard.next_latents)


def test_default_trajectory_is_deterministic_given_the_generator_seed_and_varies_with_it():
    sigmas = flow_sigmas(5)
    run = lambda seed: sample_sde_trajectory(toy_velocity(), noise(7), sigmas,
                                             generator=torch.Generator().manual_seed(seed))
    first, again, other = run(11), run(11), run(12)
    assert torch.equal(first.next_latents, again.next_latents) and torch.equal(first.log_probs, again.log_probs)
    assert not torch.allclose(first.next_latents, other.next_latents)


def test_default_trajectory_feeds_the_next_step_in_the_initial_latent_dtype_but_stores_fp32_samples():
    sigmas = flow_sigmas(3)
    seen = []

    def velocity(x, t, rows):
        seen.append(x.dtype)
        return torch.zeros_like(x)

    traj = sample_sde_trajectory(velocity, noise(8, dtype=torch.float16), sigmas,
                                 generator=torch.Generator().manual_seed(0))
    assert seen == [torch.float16] * 3
    assert traj.latents.dtype == torch.float16 and traj.next_latents.dtype == torch.float32


# ---------------------------------------------------------------- ODE sampling (§3.6)

def test_ode_sampling_of_a_linear_velocity_is_the_product_of_euler_factors():
    # v = λx makes each Euler step multiply by (1 − h_j λ); 40 steps as in evaluation.
    lam = 0.8
    sigmas = flow_sigmas(40)
    x0 = noise(9)
    out = sample_ode(lambda x, t, rows: lam * x, x0, sigmas)
    factor = 1.0
    for j in range(40):
        factor *= 1 - (float(sigmas[j]) - float(sigmas[j + 1])) * lam
    torch.testing.assert_close(out, factor * x0, rtol=1e-6, atol=1e-9)


def test_ode_sampling_passes_each_rows_prompt_and_the_current_timestep():
    sigmas = flow_sigmas(3)
    calls = []

    def velocity(x, t, rows):
        calls.append((t.clone(), rows.clone()))
        return torch.zeros_like(x)

    sample_ode(velocity, noise(10), sigmas)
    assert len(calls) == 3
    for j, (t, rows) in enumerate(calls):
        assert torch.equal(t, torch.full((B,), float(sigmas[j] * 1000)))
        assert rows.tolist() == list(range(B))


# ---------------------------------------------------------------- CFG adapter (§3.1)

class RecordingTransformer(nn.Module):
    """Stands in for SD3Transformer2DModel: output = latent·(1 + text mean) + pooled mean + t/1000."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.calls = []

    @property
    def dtype(self):
        return self.anchor.dtype

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, return_dict=True):
        self.calls.append(dict(x=hidden_states, t=timestep, text=encoder_hidden_states, pooled=pooled_projections))
        text = encoder_hidden_states.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        pooled = pooled_projections.mean(dim=1).reshape(-1, 1, 1, 1)
        return (hidden_states * (1 + text) + pooled + timestep.reshape(-1, 1, 1, 1) / 1000 + self.anchor,)


def _embeddings(prompts=3, seq=5, dim=6, pooled_dim=7):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(prompts, seq, dim, generator=g), torch.randn(prompts, pooled_dim, generator=g),
            torch.randn(1, seq, dim, generator=g), torch.randn(1, pooled_dim, generator=g))


def test_cfg_velocity_runs_uncond_then_cond_rows_and_extrapolates_by_the_guidance_scale():
    pos, pooled, neg, neg_pooled = _embeddings()
    model = RecordingTransformer()
    velocity = make_cfg_velocity(model, pos, pooled, neg, neg_pooled, guidance_scale=4.5)
    x = noise(11, (2, C, H, W), torch.float32)
    t = torch.tensor([1000.0, 464.88])
    rows = torch.tensor([2, 0])  # rows may pick any prompt, in any order
    v = velocity(x, t, rows)

    (call,) = model.calls
    assert call["x"].shape[0] == 4 and torch.equal(call["x"][:2], x) and torch.equal(call["x"][2:], x)
    assert torch.equal(call["t"], torch.cat([t, t]))
    assert torch.equal(call["text"][:2], neg.expand(2, -1, -1)) and torch.equal(call["text"][2:], pos[[2, 0]])
    assert torch.equal(call["pooled"][2:], pooled[[2, 0]])

    def by_hand(text, pool):
        return x * (1 + text.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)) + pool.mean(dim=1).reshape(-1, 1, 1, 1) \
            + t.reshape(-1, 1, 1, 1) / 1000

    v_u = by_hand(neg.expand(2, -1, -1), neg_pooled.expand(2, -1))
    v_c = by_hand(pos[[2, 0]], pooled[[2, 0]])
    torch.testing.assert_close(v, v_u + 4.5 * (v_c - v_u), rtol=1e-6, atol=1e-6)


def test_cfg_velocity_with_guidance_off_runs_only_the_conditional_rows():
    pos, pooled, neg, neg_pooled = _embeddings()
    model = RecordingTransformer()
    velocity = make_cfg_velocity(model, pos, pooled, neg, neg_pooled, guidance_scale=1.0)
    x = noise(12, (2, C, H, W), torch.float32)
    velocity(x, torch.tensor([500.0, 500.0]), torch.tensor([1, 1]))
    (call,) = model.calls
    assert call["x"].shape[0] == 2 and torch.equal(call["text"], pos[[1, 1]])


def test_cfg_velocity_lets_gradients_reach_the_model_through_both_halves():
    pos, pooled, neg, neg_pooled = _embeddings()
    model = RecordingTransformer()
    velocity = make_cfg_velocity(model, pos, pooled, neg, neg_pooled, guidance_scale=4.5)
    velocity(noise(13, (2, C, H, W), torch.float32), torch.tensor([900.0, 900.0]), torch.tensor([0, 1])).sum().backward()
    # d/d anchor of [v_u + g(v_c − v_u)] summed = elements·(1 + g − g) = elements: the uncond half is not detached.
    assert model.anchor.grad.item() == pytest.approx(2 * C * H * W)


# ---------------------------------------------------------------- latents and decoding (§3.1)

def test_initial_latents_have_the_sd35_latent_shape_and_follow_the_generator():
    a = initial_latents(2, 64, generator=torch.Generator().manual_seed(3))
    b = initial_latents(2, 64, generator=torch.Generator().manual_seed(3))
    assert a.shape == (2, 16, 8, 8) and torch.equal(a, b)
    with pytest.raises(ValueError, match="multiple"):
        initial_latents(1, 60)


class AffineVAE(nn.Module):
    """decode(z) = 3z − 0.5 on the first three channels, upsampled ×2: easy to invert by hand."""

    class Config:
        scaling_factor = 1.5305  # SD3.5-Medium vae/config.json
        shift_factor = 0.0609

    config = Config()

    def __init__(self):
        super().__init__()
        self.register_buffer("unit", torch.ones(()))
        self.rows_seen = []

    @property
    def dtype(self):
        return self.unit.dtype

    def decode(self, z, return_dict=True):
        self.rows_seen.append(z.shape[0])
        image = (3 * z[:, :3] - 0.5).repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        return (image,)


def test_decode_unscales_and_shifts_latents_then_maps_vae_output_to_unit_range_in_chunks():
    vae = AffineVAE()
    latents = noise(14, (5, C, H, W), torch.float32) * 0.2
    images = decode_latents(vae, latents, chunk_size=2)
    assert vae.rows_seen == [2, 2, 1]
    z = latents / 1.5305 + 0.0609
    expected = ((3 * z[:, :3] - 0.5) / 2 + 0.5).clamp(0, 1).repeat_interleave(2, 2).repeat_interleave(2, 3)
    assert images.shape == (5, 3, 2 * H, 2 * W) and images.dtype == torch.float32
    torch.testing.assert_close(images, expected)
    assert images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(decode_latents(AffineVAE(), latents), images)


# ---------------------------------------------------------------- end to end with the tiny SD3.5 pipeline

@pytest.fixture(scope="module")
def tiny_sd3():
    from diffusers import StableDiffusion3Pipeline
    from rsm_testkit import get_tiny_model

    torch.manual_seed(0)
    pipe = StableDiffusion3Pipeline.from_pretrained(get_tiny_model("sd35"))
    with torch.no_grad():
        pos, neg, pooled, neg_pooled = pipe.encode_prompt(
            ["a red cube", "two dogs"], ["a red cube", "two dogs"], ["a red cube", "two dogs"],
            do_classifier_free_guidance=True, negative_prompt="")
    return pipe, pos, pooled, neg[:1], neg_pooled[:1]


def test_default_sampler_end_to_end_with_the_tiny_sd3_transformer_and_cfg(tiny_sd3):
    pipe, pos, pooled, neg, neg_pooled = tiny_sd3
    velocity = make_cfg_velocity(pipe.transformer, pos, pooled, neg, neg_pooled, guidance_scale=4.5)
    sigmas = flow_sigmas(4)
    x0 = initial_latents(2, 64, generator=torch.Generator().manual_seed(0))
    run = lambda: sample_sde_trajectory(velocity, x0, sigmas, generator=torch.Generator().manual_seed(1),
                                        keep_matching_aux=True)
    traj, again = run(), run()
    assert traj.next_latents.shape == (2, 4, 16, 8, 8) and traj.log_probs.shape == (2, 4)
    assert torch.isfinite(traj.next_latents).all() and torch.isfinite(traj.log_probs).all()
    assert torch.equal(traj.next_latents, again.next_latents) and torch.equal(traj.log_probs, again.log_probs)
    # Re-scoring the stored transitions with a fresh forward pass (the trainer's on-policy ratio) gives log p back.
    with torch.no_grad():
        for j in range(4):
            v = velocity(traj.latents[:, j], traj.timesteps[:, j], torch.arange(2))
            torch.testing.assert_close(v, traj.noise_preds[:, j], rtol=1e-5, atol=1e-5)
            step = sde_step_with_logprob(v, sigmas[j], sigmas[j + 1], traj.latents[:, j],
                                         prev_sample=traj.next_latents[:, j], sigma_max=float(sigmas[1]))
            torch.testing.assert_close(step.log_prob, traj.log_probs[:, j], rtol=1e-5, atol=1e-5)
    images = decode_latents(pipe.vae, traj.final_latents, chunk_size=1)
    assert images.shape == (2, 3, 64, 64) and images.min() >= 0 and images.max() <= 1


def test_ode_sampler_with_cfg_adapter_reproduces_the_diffusers_sd3_pipeline_bit_for_bit(tiny_sd3):
    # Same x_0, same embeddings, guidance 4.5: diffusers' own Euler loop is the reference for the CFG batch
    # layout, the timesteps fed to the transformer and the step; its VAE post-processing for decoding.
    pipe, pos, pooled, neg, neg_pooled = tiny_sd3
    x0 = initial_latents(2, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = pipe(prompt_embeds=pos, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg.expand(2, -1, -1),
                         negative_pooled_prompt_embeds=neg_pooled.expand(2, -1), guidance_scale=4.5,
                         num_inference_steps=3, latents=x0.clone(), height=64, width=64, output_type="latent").images
        ours = sample_ode(make_cfg_velocity(pipe.transformer, pos, pooled, neg, neg_pooled, 4.5), x0, flow_sigmas(3))
        assert torch.equal(ours, reference)
        z = reference / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        images = pipe.image_processor.postprocess(pipe.vae.decode(z, return_dict=False)[0], output_type="pt")
    torch.testing.assert_close(decode_latents(pipe.vae, ours, chunk_size=1), images, rtol=1e-5, atol=1e-5)
