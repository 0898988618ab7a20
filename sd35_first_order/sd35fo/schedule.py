"""The flow-matching schedule and the Euler step of the rollout (spec §2.2, §3 step 5c).

Direction: sigma runs from 1 (noise) to 0 (data); `z_{i+1} = z_i + (sigma_{i+1} - sigma_i) v_i`. The network's
timestep is `s_i = 1000 sigma_i` (a float). Pure functions of tensors.
"""
from __future__ import annotations

import torch


def flow_match_schedule(num_steps: int, shift: float = 3.0, num_train_timesteps: int = 1000):
    """(sigmas [N+1] with a trailing 0, timesteps [N] = 1000 sigma), float32, as diffusers'
    FlowMatchEulerDiscreteScheduler(shift, num_train_timesteps).set_timesteps(N) computes them (static shift):
    sigma_max = 1, sigma_min = shifted 1/1000, linspace in timestep units, shifted again."""
    def shifted(s):
        return shift * s / (1 + (shift - 1) * s)

    sigma_min = shifted(torch.tensor(1.0 / num_train_timesteps, dtype=torch.float32))
    sigma_max = shifted(torch.tensor(1.0, dtype=torch.float32))
    t = torch.linspace(float(sigma_max * num_train_timesteps), float(sigma_min * num_train_timesteps), num_steps,
                       dtype=torch.float64).to(torch.float32)
    sigmas = shifted(t / num_train_timesteps)
    timesteps = sigmas * num_train_timesteps
    return torch.cat([sigmas, torch.zeros(1)]), timesteps


def scheduler_schedule(scheduler, num_steps: int, device=None):
    """(sigmas [N+1], timesteps [N]) of a loaded scheduler after `set_timesteps(N)` (what training indexes)."""
    scheduler.set_timesteps(num_steps, device=device)
    return scheduler.sigmas.to(torch.float32), scheduler.timesteps.to(torch.float32)


def euler_step(z: torch.Tensor, v: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """One Euler step in float32, stored in `v`'s dtype, with diffusers' scheduler arithmetic: the latent is
    upcast, `dt * v` is formed in v's dtype (dt a 0-d tensor), the sum rounded back."""
    dt = torch.as_tensor(sigma_next, dtype=torch.float32, device=z.device) - torch.as_tensor(
        sigma, dtype=torch.float32, device=z.device)
    return (z.to(torch.float32) + dt * v).to(v.dtype)


def sigma_of_steps(sigmas: torch.Tensor, step_index: torch.Tensor) -> torch.Tensor:
    """sigma per sample `[B, 1, 1, 1]` for step indices `[B]`."""
    return sigmas.gather(0, step_index.to(sigmas.device)).view(-1, 1, 1, 1)


def next_sigma_of_steps(sigmas: torch.Tensor, step_index: torch.Tensor) -> torch.Tensor:
    """sigma_{i+1} per sample `[B, 1, 1, 1]` (sigma_N = 0 for the last step)."""
    nxt = torch.clamp(step_index.to(sigmas.device) + 1, max=sigmas.shape[0] - 1)
    return sigmas.gather(0, nxt).view(-1, 1, 1, 1)
