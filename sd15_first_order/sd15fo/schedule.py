"""DDIM with log-probabilities, as pure functions of tensors and the scheduler's ᾱ table (spec §3.1-3.3, §4.6).

A sampling step t -> t' (t' = t - T//N, clamped at 0) of DDIM with η > 0 is a Gaussian transition

    x_t' ~ N(μ, σ_t² I),   μ = √ᾱ_t' · x̂0 + √(1 - ᾱ_t' - σ_t²) · ε,   x̂0 = (x_t - √(1-ᾱ_t) ε) / √ᾱ_t,
    σ_t² = η² (1 - ᾱ_t')/(1 - ᾱ_t) · (1 - ᾱ_t/ᾱ_t')                      (the DDPM posterior variance for η = 1)

(Song et al., "Denoising Diffusion Implicit Models", eqs. 12 and 16). `ddim_step` returns the next state,
its log-density (averaged over the non-batch dimensions, as the upstream code logs it), the noise used and the
"score" -k·(x_t' - μ)/σ_t², the gradient of log p_F(x_t' | x_t) with respect to x_t', which residual ∇-DB
compares between the policy and the reference (Nabla-GFlowNet, Liu et al. 2025).

`ᾱ` is `scheduler.alphas_cumprod` (float32, T entries). Every function takes it as a tensor on the latents'
device, so nothing here reads the device back to the host. Arithmetic order and dtypes follow the reference
(spec §2.3): the tables are float32, so a bf16 ε promotes the step to float32, and the returned x_t' is cast
back to x_t's dtype.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch

# log √(2π) rounded to float32, as the reference computes it from a float32 π (parity of the log-probabilities)
LOG_SQRT_2PI = float(torch.log(torch.sqrt(2 * torch.tensor(math.pi, dtype=torch.float32))))


class DDIMStep(NamedTuple):
    prev_sample: torch.Tensor  # x_t' [B, C, h, w], dtype of x_t
    log_prob: torch.Tensor  # [B] float32: mean over C, h, w of log N(x_t'; μ, σ²)
    noise: Optional[torch.Tensor]  # z [B, C, h, w] (None when x_t' was given)
    score: torch.Tensor  # -k (x_t' - μ)/σ² [B, C, h, w] float32, differentiable through μ
    log_pb: Optional[torch.Tensor] = None  # [B] log p_B(x_t | x_t') when asked (calculate_pb)
    mean: Optional[torch.Tensor] = None  # μ [B, C, h, w]
    std: Optional[torch.Tensor] = None  # σ_t broadcast like x_t


def _broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] or [] -> broadcastable to `like` [B, ...]."""
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim)).expand(like.shape)


def previous_timestep(t: torch.Tensor, num_train_timesteps: int, num_inference_steps: int) -> torch.Tensor:
    """t' = clamp(t - T//N, 0, T-1). Because of the clamp ᾱ_t' is always a table entry (the scheduler's
    "final ᾱ" is never reached: at t = 1, t' = 0 and ᾱ_0 = 0.99915, spec §3.1)."""
    return torch.clamp(t - num_train_timesteps // num_inference_steps, 0, num_train_timesteps - 1)


def alpha_bar(alphas_cumprod: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """ᾱ_t gathered (float32) and broadcast to the shape of `like`, on its device."""
    t = t.to(alphas_cumprod.device)
    return _broadcast(alphas_cumprod.gather(0, t.reshape(-1)).reshape(t.shape), like).to(like.device)


def posterior_variance(a_t: torch.Tensor, a_prev: torch.Tensor) -> torch.Tensor:
    """(1 - ᾱ_t')/(1 - ᾱ_t) · (1 - ᾱ_t/ᾱ_t'): the DDPM posterior variance of the step (σ_t² at η = 1)."""
    return ((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev)


def ddim_step(
    alphas_cumprod: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    x: torch.Tensor,
    *,
    eta: float,
    num_train_timesteps: int = 1000,
    num_inference_steps: int = 50,
    strength: Union[float, torch.Tensor] = 1.0,
    prev_sample: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    calculate_pb: bool = False,
) -> DDIMStep:
    """One DDIM step with log-probability and score (spec §3.2).

    Sampling form: `prev_sample` None -> x_t' = μ + σ z with z = `noise` or drawn from `generator` (shape and
    dtype of ε). Scoring form: `prev_sample` given -> its log-density and score under this step's Gaussian;
    passing a generator too is an error (the reference's rule). `t` is a 0-d tensor or one timestep per row
    [B]; `strength` k is a number or a tensor broadcastable to x (e.g. [B, 1, 1, 1]).

    The scoring form draws no noise (the reference drew and discarded one, spec §9 item 28)."""
    if prev_sample is not None and generator is not None:
        raise ValueError("ddim_step: pass either prev_sample (scoring form) or generator (sampling form), not both")
    t_prev = previous_timestep(t, num_train_timesteps, num_inference_steps)
    a_t = alpha_bar(alphas_cumprod, t, x)  # ᾱ_t, float32 broadcast like x
    a_prev = alpha_bar(alphas_cumprod, t_prev, x)  # ᾱ_t'
    beta_t = 1 - a_t
    std = eta * posterior_variance(a_t, a_prev) ** 0.5  # σ_t
    x0_hat = (x - beta_t ** 0.5 * eps) / a_t ** 0.5
    mean = a_prev ** 0.5 * x0_hat + (1 - a_prev - std ** 2) ** 0.5 * eps  # μ
    if prev_sample is None:
        if noise is None:
            noise = torch.randn(eps.shape, generator=generator, device=eps.device, dtype=eps.dtype)
        prev_sample = mean + std * noise
    else:
        noise = None
    target = prev_sample.detach()
    log_prob = -((target - mean) ** 2) / (2 * std ** 2) - torch.log(std) - LOG_SQRT_2PI
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    score = -(target - mean) / std ** 2 * strength
    log_pb = None
    if calculate_pb:  # fixed backward kernel p_B(x_t | x_t') = N(√α_t x_t', (1 - α_t) I), α_t = ᾱ_t/ᾱ_t'
        alpha_t = a_t / a_prev
        pb_std = (1 - alpha_t) ** 0.5
        log_pb = -((x.detach() - alpha_t ** 0.5 * target) ** 2) / (2 * pb_std ** 2) - torch.log(pb_std) - LOG_SQRT_2PI
        log_pb = log_pb.mean(dim=tuple(range(1, log_pb.ndim)))
    return DDIMStep(prev_sample.type(x.dtype), log_prob, noise, score, log_pb, mean, std)


def pred_orig_latent(alphas_cumprod: torch.Tensor, eps: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x̂0 = (x - √(1-ᾱ_t) ε)/√ᾱ_t with ᾱ cast to x's dtype (bf16 latents -> bf16 arithmetic, spec §3.3); rows
    with t = 0 return x itself (ᾱ := 1)."""
    a_t = alpha_bar(alphas_cumprod, t, x).to(x.dtype).clone()
    at_zero = _broadcast((t == 0).to(x.device), x)
    a_t = torch.where(at_zero, torch.ones_like(a_t), a_t)
    beta_t = torch.where(at_zero, torch.zeros_like(a_t), 1 - a_t)
    return (x - beta_t ** 0.5 * eps) / a_t ** 0.5


class HelperSchedule(NamedTuple):
    """Per-(row, column) schedule quantities of a timesteps matrix, each [B, L, 1, 1, 1] float32."""
    weights: torch.Tensor  # w = (c1 - c2)/σ: ε-space weight of the per-step KL
    omegas: torch.Tensor  # Ω = (c1 - c2)·√(1 - ᾱ_t) (logged by nothing; kept for completeness)
    sigmas: torch.Tensor  # σ


def helper_stride(num_columns: int, num_train_timesteps: int, num_inference_steps: int, legacy: bool) -> int:
    """The t -> t' stride the helper schedules use. `legacy` (parity, spec §4.6): 1000 // L for a matrix of L
    columns, which is 19 for the 51 columns of low-variance subsampling (true stride 20); otherwise T // N."""
    return 1000 // num_columns if legacy else num_train_timesteps // num_inference_steps


def helper_schedule(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, stride: int) -> HelperSchedule:
    """σ, w = (c1 - c2)/σ and Ω = (c1 - c2)√(1-ᾱ_t) of every entry of `timesteps` [B, L] (spec §4.6), with
    t'' = max(t - stride, 0), c1 = √(1-ᾱ_t)/√(ᾱ_t/ᾱ_t''), c2 = √(1 - ᾱ_t'' - σ²)."""
    b, length = timesteps.shape
    table = alphas_cumprod.to(timesteps.device)
    a_t = table[timesteps]
    a_prev = table[(timesteps - stride).clamp(min=0)]
    var = (1 - a_prev) * (1 - a_t / a_prev) / (1 - a_t)
    sigma = torch.sqrt(var)
    c2 = torch.sqrt(1 - a_prev - var)
    c1 = torch.sqrt(1 - a_t) / torch.sqrt(a_t / a_prev)
    shape = (b, length, 1, 1, 1)
    return HelperSchedule(((c1 - c2) / sigma).view(shape), ((c1 - c2) * torch.sqrt(1 - a_t)).view(shape),
                          sigma.view(shape))
