"""Classifier-free-guided velocities of the SD3 transformer (spec §5.2): the policy `G_θ` (LoRA active) and the
reference `R` (adapters disabled), over the stacked [negative; positive] text embeddings.

`G_θ(x, s) = u + w (k - u)` with `u`, `k` the unconditional and conditional halves of one forward on [x; x]. In
training the unconditional half is detached, so θ gets gradient only through `w·dk/dθ` (the forward value is the
same either way). `R` runs without autograd (no graph) and leaves the policy adapter active again.
"""
from __future__ import annotations

import contextlib

import torch


def cfg_combine(output: torch.Tensor, scale: float, detach_uncond: bool = True) -> torch.Tensor:
    """`[2B, ...]` stacked (uncond; cond) -> `[B, ...]` guided."""
    uncond, cond = output.chunk(2)
    if detach_uncond:
        uncond = uncond.detach()
    return uncond + scale * (cond - uncond)


def transformer_velocity(transformer, x, s, text, pooled, scale, detach_uncond=True, joint_attention_kwargs=None):
    """G(x, s) of `transformer` as it is (adapters on or off): x `[B, C, h, w]`, s `[B]` (1000 sigma), text
    `[2B, L, D]` and pooled `[2B, P]` stacked [negative; positive]. Returns `[B, C, h, w]` in the output dtype."""
    out = transformer(hidden_states=torch.cat([x, x]), timestep=torch.cat([s, s]), encoder_hidden_states=text,
                      pooled_projections=pooled, joint_attention_kwargs=joint_attention_kwargs, return_dict=False)[0]
    return cfg_combine(out, scale, detach_uncond)


@contextlib.contextmanager
def adapters_disabled(transformer, adapter_name: str = "default"):
    """The frozen base model for the duration; afterwards the policy adapter is active (and trainable) again."""
    transformer.disable_adapters()
    try:
        yield transformer
    finally:
        transformer.enable_adapters()
        transformer.set_adapter(adapter_name)


class GuidedVelocity:
    """`policy(x, s, text, pooled)` = G_θ with graph; `reference(...)` = R without one (spec §5.2)."""

    def __init__(self, transformer, guidance_scale: float, joint_attention_kwargs=None):
        self.transformer, self.scale, self.kwargs = transformer, float(guidance_scale), joint_attention_kwargs

    def policy(self, x, s, text, pooled, detach_uncond=True):
        return transformer_velocity(self.transformer, x, s, text, pooled, self.scale, detach_uncond, self.kwargs)

    def reference(self, x, s, text, pooled):
        with torch.no_grad(), adapters_disabled(self.transformer):
            return transformer_velocity(self.transformer, x, s, text, pooled, self.scale, False, self.kwargs)

    def reference_with_graph(self, x, s, text, pooled):
        """R with autograd on (gradient flows into x, e.g. along the value gradient in the consistency loss)."""
        with adapters_disabled(self.transformer):
            return transformer_velocity(self.transformer, x, s, text, pooled, self.scale, False, self.kwargs)
