"""Full stochastic DDIM trajectories (spec §4.2, §4.4, §4.5): the baseline's training samples and both trainers'
evaluation. A pure function of a noise predictor, the initial latents and the schedule.

    x_T -> x_{t_1} -> ... -> x_0,   every step `ddim.ddim_step_with_logprob` with η = sample_eta

Initial-noise sharing (DanceGRPO's, kept as the default `shared_initial_noise: two_per_epoch`): two latents
z_A, z_B ~ N(0, I) per epoch; the first max(1, ⌊calls / 2⌋) sampling calls start every row from z_A, the others
from z_B. All G samples of a prompt then share x_T and differ only by the SDE noise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .ddim import ddim_step_with_logprob

Predict = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


@dataclass
class Trajectory:
    latents: torch.Tensor                 # [B, N+1, C, h, w]  x_T first
    noises: torch.Tensor                  # [B, N, C, h, w]    ξ of each step
    noise_preds: torch.Tensor             # [B, N, C, h, w]    CFG-combined ε̂ of the sampling policy
    log_probs: torch.Tensor               # [B, N]             ℓ of each step
    timesteps: torch.Tensor               # [N]
    ref_noise_preds: Optional[torch.Tensor] = None  # [B, N, C, h, w] the reference's ε̂ (evaluation)

    @property
    def final_latents(self) -> torch.Tensor:
        return self.latents[:, -1]


def initial_latent_plan(num_calls: int, policy: str, latent_shape: tuple, generator: torch.Generator,
                        device) -> list[Optional[torch.Tensor]]:
    """The initial latent of each sampling call of an epoch: a [1, C, h, w] latent shared by every row of the call
    (two_per_epoch: z_A for the first max(1, ⌊calls/2⌋) calls, z_B after), or None for "draw per row" (none)."""
    if policy == "none":
        return [None] * num_calls
    z_a = torch.randn((1, *latent_shape), generator=generator, device=device)
    z_b = torch.randn((1, *latent_shape), generator=generator, device=device)
    first = max(1, num_calls // 2)
    return [z_a if i < first else z_b for i in range(num_calls)]


def call_latents(shared: Optional[torch.Tensor], rows: int, latent_shape: tuple, generator: torch.Generator,
                 device) -> torch.Tensor:
    """x_T [rows, C, h, w] of one call: the shared latent repeated, or fresh N(0, I) rows."""
    if shared is not None:
        return shared.expand(rows, *latent_shape).clone()
    return torch.randn((rows, *latent_shape), generator=generator, device=device)


@torch.no_grad()
def sample_trajectory(predict: Predict, x: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, *,
                      eta: float, algorithm: str, const_weight=None, generator: Optional[torch.Generator] = None,
                      predict_ref: Optional[Predict] = None, keep_ref: bool = False,
                      clip_sample_range: Optional[float] = None) -> Trajectory:
    """One stochastic trajectory per row of x [B, C, h, w] through `timesteps` [N]. `predict(x, t)` is the
    policy's guided ε̂; `predict_ref` the reference's, used by `uw-lambda` at every step and recorded when
    `keep_ref` (evaluation's approx KL)."""
    n = timesteps.shape[0]
    need_ref = "lambda" in algorithm or keep_ref
    if need_ref and predict_ref is None:
        raise ValueError(f"algorithm={algorithm!r} / keep_ref needs the reference predictor")
    latents, noises, preds, log_probs, refs = [x], [], [], [], []
    for t in timesteps:
        t_rows = t.expand(x.shape[0])
        eps = predict(x, t_rows, None)
        eps_ref = predict_ref(x, t_rows, None) if need_ref else None
        step = ddim_step_with_logprob(alphas_cumprod, eps, t_rows, x, num_inference_steps=n, eta=eta,
                                      algorithm=algorithm, const_weight=const_weight, model_output_ref=eps_ref,
                                      generator=generator, clip_sample_range=clip_sample_range)
        x = step.prev_sample
        latents.append(x)
        noises.append(step.noise)
        preds.append(eps)
        log_probs.append(step.log_prob)
        if keep_ref:
            refs.append(eps_ref)
    return Trajectory(torch.stack(latents, dim=1), torch.stack(noises, dim=1), torch.stack(preds, dim=1),
                      torch.stack(log_probs, dim=1), timesteps, torch.stack(refs, dim=1) if keep_ref else None)
