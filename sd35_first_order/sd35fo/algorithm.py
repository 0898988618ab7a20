"""One training timestep of the three objectives (spec §5.3-5.6, §6): the pruned VGG-Flow baseline, RSM "ours" and
the full VGG-Flow with its value network.

All three match the policy's guided velocity to a reward-guided target,

    L_vel = mean_b mean_CHW (G_θ(x, s) - sg(T))^2,   T = R(x, s) - eta(sigma) beta g  (+ nu with the value net),

and differ in the reward gradient g:

* pruned baseline: `g = clip_tau(grad r(D(y)))` at the one-step lookahead `y = x - sigma sg(G_θ(x, s))` (identity
  Jacobian), recomputed at every training timestep (one decode + reward backward per state);
* ours (`training.use_saved_rgrad_x1`): `g = clip_tau(rgrad_x1)`, the terminal gradient `clip_inf(grad r(D(z_N)))`
  computed once per trajectory at sampling time; no reward call during training;
* full VGG-Flow (`model.use_value_net`): the pruned g plus a learned residual nu, trained by the finite-difference
  consistency loss and the terminal loss (the policy is trained by L_vel only).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .reward_grad import per_sample_norm
from .schedule import next_sigma_of_steps, sigma_of_steps

# Finite-difference steps (upstream's hard-coded 1e-4 for both, in latent and in timestep units, spec §5.5).
FD_EPS = {"bf16": (1e-4, 1e-4),
          # fp32: timesteps near 1000 have a float32 spacing of 6e-5, so the time step is 1e-2 (the quotient divides
          # by the step actually realised); the spatial step 1e-2 along a unit direction balances float32 rounding
          # against the one-sided difference's curvature error (~1 % each on the tiny MMDiT, vs exact JVPs)
          "fp32": (1e-2, 1e-2)}


def eta(sigma: torch.Tensor, mode: str) -> torch.Tensor:
    """The temporal weight (spec §5.2): (1 - sigma)^2 'quad', 1 - sigma 'linear', 1 'constant'."""
    if mode == "linear":
        return 1 - sigma
    if mode == "constant":
        return torch.ones_like(sigma)
    if mode == "quad":
        return (1 - sigma).pow(2)
    raise ValueError(f"model.eta_mode={mode!r} is not supported; allowed: quad, linear, constant")


def velocity_loss(v: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, reward_masking: bool) -> torch.Tensor:
    """mean_b d_b with d_b = mean_CHW (v_b - sg(T_b))^2 in float32; with reward masking, the mask-weighted mean
    `sum_b m_b d_b / (sum_b m_b + 1e-8)`."""
    d = (v.float() - target.detach().float()).pow(2).mean(dim=(1, 2, 3))  # [B]
    if reward_masking:
        return (d * mask).sum() / (mask.sum() + 1e-8)
    return d.mean()


def transition_drift(v: torch.Tensor, v_ref: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                     reduce: bool = True) -> torch.Tensor:
    """mean_CHW ((sigma_{i+1} - sigma_i)(G - R))^2 per sample (sigma_N = 0 for the last step), or its batch mean."""
    drift = ((sigma_next - sigma).float() * (v.float() - v_ref.float())).pow(2).mean(dim=(1, 2, 3))  # [B]
    return drift.mean() if reduce else drift


@dataclass
class StepBatch:
    """Column k of a micro-batch (spec §5.3 step 1)."""
    x: torch.Tensor          # [B, C, h, w] state before the step, stored dtype, detached
    s: torch.Tensor          # [B] network timestep 1000 sigma
    step: torch.Tensor       # [B] int64 step index i
    text: torch.Tensor       # [2B, L, D] [negative; positive]
    pooled: torch.Tensor     # [2B, P] [negative; positive]
    prompts: list
    metadata: list
    rewards: torch.Tensor    # [B] sampling-time rewards
    rgrad_x1: Optional[torch.Tensor] = None         # [B, C, h, w] ours: terminal gradient (clip_inf applied)
    rollout_velocity: Optional[torch.Tensor] = None  # [B, C, h, w] the CFG velocity recorded at sampling


class VGGFlow:
    """`step(batch, tau)` -> (loss, stats): the loss of one (micro-batch, timestep) before the 1/(A·K) scaling, and
    detached diagnostics (`loss_raw`, `transition_drift`, `rgrad_norm` [B], and `loss_consistency`,
    `loss_terminal`, `unetreg` when they apply).

    `velocity` is a GuidedVelocity over the policy transformer, `reward_grad` a RewardGrad, `sigmas` [N+1] and
    `timesteps` [N] the schedule. `leaf_dtype`: the dtype of the latent w.r.t. which reward gradients are taken
    (None = the stored dtype, upstream's bf16, spec §10 N4)."""

    def __init__(self, velocity, reward_grad, sigmas, timesteps, *, reward_scale: float, eta_mode: str,
                 reward_masking: bool = False, unet_reg_scale: float = 0.0, use_saved_rgrad_x1: bool = False,
                 value_net=None, coeff_terminal: float = 1000.0, detach_dir: bool = True,
                 finite_differences: str = "bf16", leaf_dtype: Optional[torch.dtype] = None,
                 value_autocast: Optional[torch.dtype] = None, timer: Optional[Callable] = None):
        self.velocity, self.reward_grad = velocity, reward_grad
        self.sigmas, self.timesteps = sigmas, timesteps
        self.beta, self.eta_mode = float(reward_scale), eta_mode
        self.reward_masking, self.unet_reg_scale = reward_masking, float(unet_reg_scale)
        self.use_saved_rgrad_x1, self.value_net = use_saved_rgrad_x1, value_net
        self.coeff_terminal, self.detach_dir = float(coeff_terminal), detach_dir
        self.fd = finite_differences
        self.leaf_dtype, self.value_autocast = leaf_dtype, value_autocast
        self.timer = timer or (lambda name: contextlib.nullcontext())
        if use_saved_rgrad_x1 and value_net is not None:
            raise ValueError("training.use_saved_rgrad_x1 cannot be combined with the value net")

    # -------------------------------------------------------------------------------------------- pieces

    def _leaf(self, x):
        return x.detach().to(self.leaf_dtype or x.dtype).requires_grad_(True)

    def _autocast(self, device):
        """The value branch's autocast (upstream: bf16); off in fp32/jvp finite differences or fp32 training."""
        if self.value_autocast is None or self.fd != "bf16":
            return torch.autocast(device_type=device.type, enabled=False)
        return torch.autocast(device_type=device.type, dtype=self.value_autocast)

    def lookahead_gradient(self, x, s, sigma, b: StepBatch, tau):
        """L0 (spec §4.4): v = G_θ(x, s) with graph, g = RewardGrad(leaf - sigma sg(v), leaf) for the leaf sg(x).
        (Upstream fed the leaf itself to the transformer: the same values, and v enters the lookahead detached; with
        an fp32 leaf, `quirks.rgrad_leaf_weight_dtype=False`, the transformer keeps its own input dtype.)"""
        leaf = self._leaf(x)
        with torch.enable_grad():
            v = self.velocity.policy(x.detach(), s, b.text, b.pooled)
        sigma_last = self.sigmas[-1]
        y = leaf + (sigma_last - sigma) * v.detach()
        with self.timer("reward_grad"):
            rg = self.reward_grad(y, leaf, b.prompts, b.metadata, tau, retain_graph=False)
        return v, rg

    def reward_guidance(self, b: StepBatch, sigma, tau):
        """(v, g, mask, norm): the policy velocity with graph and the clipped reward gradient of this objective."""
        if self.use_saved_rgrad_x1:
            v = self.velocity.policy(b.x, b.s, b.text, b.pooled)
            saved = b.rgrad_x1.detach().float()
            return v, self.reward_grad.clip(saved, tau), (b.rewards >= 0).float(), per_sample_norm(saved)
        v, rg = self.lookahead_gradient(b.x, b.s, sigma, b, tau)
        return v, rg.grad, rg.mask, rg.norm

    # -------------------------------------------------------------------------------------------- the step

    def step(self, b: StepBatch, tau: float):
        sigma = sigma_of_steps(self.sigmas, b.step)            # [B, 1, 1, 1]
        sigma_next = next_sigma_of_steps(self.sigmas, b.step)  # [B, 1, 1, 1]
        v, g, mask, norm = self.reward_guidance(b, sigma, tau)
        v_ref = self.velocity.reference(b.x, b.s, b.text, b.pooled)
        weight = eta(sigma, self.eta_mode) * self.beta
        target = v_ref - weight * g.float()
        stats = {}
        if self.value_net is not None:
            with self._autocast(b.x.device):
                nu = self.value_net(b.x, b.s, b.text, b.pooled)
            grad_v = nu / self.beta - eta(sigma, self.eta_mode) * g.float()  # nabla V
            target = target + nu
        stats["transition_drift"] = transition_drift(v, v_ref, sigma, sigma_next).detach()
        loss_vel = velocity_loss(v, target, mask, self.reward_masking)
        loss = loss_vel
        if self.value_net is not None:
            loss_cons = self.consistency_loss(b, sigma, nu, grad_v, v_ref, tau, g=g)
            is_terminal = (b.s == self.timesteps[-1]).float()  # [B] the last discrete step (sigma ~ 0.009)
            loss_term = (nu.float().pow(2).mean(dim=(1, 2, 3)) * is_terminal).sum() / (is_terminal.sum() + 1e-6)
            loss = loss + loss_cons + self.coeff_terminal * loss_term
            stats["loss_consistency"], stats["loss_terminal"] = loss_cons.detach(), loss_term.detach()
        if self.unet_reg_scale > 0:
            reg = (v - b.rollout_velocity).float().pow(2).mean(dim=(1, 2, 3)).mean()
            loss = loss + self.unet_reg_scale * reg  # once, scaled (upstream VGG-Flow added it twice, spec §5.6)
            stats["unetreg"] = reg.detach()
        stats["loss_raw"] = loss_vel.detach()
        stats["rgrad_norm"] = norm.detach()
        return loss, stats

    # -------------------------------------------------------------------------------------------- value net

    def consistency_loss(self, b: StepBatch, sigma, nu, grad_v, v_ref, tau, g=None):
        """L_cons = mean(((Δ_t - F1 - F2) / beta)^2) (spec §5.5 steps 6-9): the residual of the spatial gradient of
        the HJB equation, by finite differences. Gradients reach the value net only."""
        terms = self.consistency_terms(b, sigma, nu, grad_v, v_ref, tau, g=g)
        residual = (terms["delta_t"].float() - terms["f1"] - terms["f2"]) / self.beta
        return residual.pow(2).mean()

    def _direction(self, v, eps):
        """(perturbation, factor): upstream's `eps v` and 1; fp32: `eps v/|v|` per sample and |v|, so the quotient
        times the factor is the same directional derivative with a perturbation far above rounding."""
        if self.fd == "bf16":
            return v * eps, 1.0
        norm = v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1))).float()
        return v / norm.clamp(min=1e-30) * eps, norm

    def consistency_terms(self, b: StepBatch, sigma, nu, grad_v, v_ref, tau, g=None) -> dict:
        """The three finite differences of the consistency loss: the time derivative of nabla V (Δ_t), the
        reference velocity's derivative along nabla V (F1) and beta nabla V's along R / beta + nabla V (F2).
        `g`: the step's clipped reward gradient (needed by the "jvp" mode)."""
        if self.fd == "jvp":
            return self._jvp_terms(b, sigma, grad_v, v_ref, tau, g)
        device, beta = b.x.device, self.beta
        eps_x, eps_t = FD_EPS["fp32" if self.fd == "fp32" else "bf16"]
        x = b.x if self.fd == "bf16" else b.x.float()
        eta_sigma = eta(sigma, self.eta_mode)

        # Δ_t: (nabla V(x, s - eps) - nabla V(x, s)) / eps, in timestep units (upstream's "T = 1000" convention)
        s_prev = b.s - eps_t * torch.ones_like(b.s)
        step_t = (b.s - s_prev).view(-1, 1, 1, 1) if self.fd == "fp32" else eps_t
        sigma_prev = s_prev.view(-1, 1, 1, 1) / 1000.0
        with self._autocast(device):
            nu_prev = self.value_net(x, s_prev, b.text, b.pooled)
        if self.fd == "bf16":
            # L1 (spec §4.4, §10 N8): the first term uses the original x, so the gradient flows through v' only
            leaf = self._leaf(x)
            with torch.enable_grad(), self._autocast(device):
                v_prev = self.velocity.policy(leaf, s_prev, b.text, b.pooled)
            with self.timer("reward_grad"):
                g_prev = self.reward_grad(x - sigma_prev * v_prev, leaf, b.prompts, b.metadata, tau).grad
        else:  # fp32: the same L0 estimator as nabla V itself, so the quotient is a derivative
            _, rg = self.lookahead_gradient(x, s_prev, sigma_prev, b, tau)
            g_prev = rg.grad
        grad_v_prev = nu_prev / beta - eta(sigma_prev, self.eta_mode) * g_prev.float()
        delta_t = (grad_v_prev - grad_v) / step_t

        # F1: (R(x + eps nabla V) - R(x)) / eps, with graph into nabla V (hence the value net). fp32: along the unit
        # direction times |nabla V| (the same derivative; |nabla V| ~ 1e-6 at paper scales would put x + eps nabla V
        # within rounding of x)
        step_1, scale_1 = self._direction(grad_v, eps_x)
        with self._autocast(device):
            r_plus = self.velocity.reference_with_graph(x + step_1, b.s, b.text, b.pooled)
        f1 = (r_plus.float() - v_ref.float()) / eps_x * scale_1

        # F2: (beta nabla V(x + eps d) - beta nabla V(x)) / eps along d = R/beta + nabla V
        direction = v_ref / beta + grad_v
        if self.detach_dir:
            direction = direction.detach()
        step_2, scale_2 = self._direction(direction, eps_x)
        x_p = (x + step_2).detach().requires_grad_(True)
        with self._autocast(device):
            nu_p = self.value_net(x_p, b.s, b.text, b.pooled)
        with torch.enable_grad(), self._autocast(device):
            v_p = self.velocity.policy(x_p, b.s, b.text, b.pooled)
        y_p = x_p - b.s.view(-1, 1, 1, 1) / 1000.0 * v_p  # full chain (I - sigma J)^T grad r (spec §4.4 L2)
        if self.fd != "bf16":
            y_p = x_p - sigma * v_p.detach()  # fp32: the L0 estimator of nabla V
        with self.timer("reward_grad"):
            g_p = self.reward_grad(y_p, x_p, b.prompts, b.metadata, tau, retain_graph=False).grad
        scaled_p = nu_p.float() - eta_sigma * beta * g_p
        f2 = (scaled_p - grad_v.float() * beta) / eps_x * scale_2
        return {"delta_t": delta_t, "f1": f1, "f2": f2}

    def _jvp_terms(self, b: StepBatch, sigma, grad_v, v_ref, tau, g):
        """"jvp": the networks' directional derivatives exactly (reverse-over-reverse products, the math attention
        kernel): d nu / ds, J_nu(x) d and J_R(x) nabla V; the reward-gradient parts of Δ_t and F2, which are
        differences of two reward gradients, as in the fp32 mode (unit directions, realised steps)."""
        beta, x = self.beta, b.x.float()
        eps_x, eps_t = FD_EPS["fp32"]
        eta_sigma = eta(sigma, self.eta_mode)
        s = b.s.detach().float()
        dnu_ds = jvp(lambda s_: self.value_net(x, s_, b.text, b.pooled).float(), s, torch.ones_like(s))
        s_prev = b.s - eps_t * torch.ones_like(b.s)
        step_t, sigma_prev = (b.s - s_prev).view(-1, 1, 1, 1), s_prev.view(-1, 1, 1, 1) / 1000.0
        _, rg = self.lookahead_gradient(x, s_prev, sigma_prev, b, tau)
        guidance_change = (eta(sigma_prev, self.eta_mode) * rg.grad - eta_sigma * g.float()) / step_t
        delta_t = -dnu_ds / beta - guidance_change  # (nabla V(s - eps) - nabla V(s)) / eps -> -d nabla V / ds

        f1 = jvp(lambda x_: self.velocity.reference_with_graph(x_, b.s, b.text, b.pooled).float(), x, grad_v)

        direction = (v_ref / beta + grad_v).detach()
        f2_value = jvp(lambda x_: self.value_net(x_, b.s, b.text, b.pooled).float(), x, direction)
        step_2, scale_2 = self._direction(direction, eps_x)
        _, rg_p = self.lookahead_gradient((x + step_2).detach(), b.s, sigma, b, tau)
        f2 = f2_value - eta_sigma * beta * (rg_p.grad - g.float()) / eps_x * scale_2
        return {"delta_t": delta_t, "f1": f1, "f2": f2}


def jvp(fn, primal: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    """J_fn(primal) tangent, differentiable w.r.t. the tangent and fn's parameters: the gradient of the
    vector-Jacobian product <J^T u, tangent> with respect to the dummy u (double backward)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    primal = primal.detach().requires_grad_(True)
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no double backward
        out = fn(primal)
        dummy = torch.zeros_like(out, requires_grad=True)
        (vjp,) = torch.autograd.grad(out, primal, grad_outputs=dummy, create_graph=True)
        (product,) = torch.autograd.grad(vjp, dummy, grad_outputs=tangent.to(vjp.dtype), create_graph=True)
    return product
