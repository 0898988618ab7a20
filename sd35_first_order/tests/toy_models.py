"""Small analytic stand-ins with the call signatures of the real models, for tests whose answer is known in closed
form (and for the parity numbers computed by running upstream's functions on the same inputs).

* `ToyTransformer`: the SD3 transformer's call signature and PEFT's adapter switches; its output is
  `tanh(M x) + 0.3 (s/1000) x + text/pooled offsets` per row with `M = W + A` where `A` (the "adapter") is a
  trainable parameter used only while adapters are enabled.
* `ToyVAE`: `decode(y) = conv1x1(y)` (C -> 3 channels, no upsampling), config scaling 1.5 / shift 0.1.
* `linear_reward(a)`: r(img) = <img, a> per sample (gradient a, constant).
"""
from types import SimpleNamespace

import torch


class ToyTransformer(torch.nn.Module):
    def __init__(self, channels=4, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(channels, channels, generator=gen) * 0.5, requires_grad=False)
        self.adapter = torch.nn.Parameter(torch.randn(channels, channels, generator=gen) * 0.1)
        self.enabled = True
        self.config = SimpleNamespace(in_channels=channels, out_channels=channels)

    def disable_adapters(self):
        self.enabled = False
        self.adapter.requires_grad_(False)

    def enable_adapters(self):
        self.enabled = True

    def set_adapter(self, name):
        self.adapter.requires_grad_(True)

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections,
                joint_attention_kwargs=None, return_dict=False):
        x = hidden_states
        m = self.weight + self.adapter if self.enabled else self.weight
        out = torch.tanh(torch.nn.functional.conv2d(x, m.to(x.dtype)[:, :, None, None]))
        out = out + 0.3 * (timestep.to(x.dtype) / 1000).view(-1, 1, 1, 1) * x
        out = out + encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1).to(x.dtype)
        out = out + 0.1 * pooled_projections.mean(dim=1).view(-1, 1, 1, 1).to(x.dtype)
        return (out,)


class ToyVAE(torch.nn.Module):
    def __init__(self, channels=4, seed=1, scaling=1.5, shift=0.1):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.proj = torch.nn.Parameter(torch.randn(3, channels, generator=gen) * 0.3, requires_grad=False)
        self.config = SimpleNamespace(scaling_factor=scaling, shift_factor=shift)

    def decode(self, latents, return_dict=False):
        return (torch.nn.functional.conv2d(latents, self.proj[:, :, None, None].to(latents.dtype)),)


def linear_reward(direction):
    """r(img, prompts, metadata) = <img, direction> per sample, as (scores [B], {})."""
    def reward(images, prompts, metadata):
        return (images * direction).sum(dim=(1, 2, 3)), {}
    return reward


def quadratic_reward(target, scale=1.0):
    """r(img) = -scale ||img - target||^2 per sample."""
    def reward(images, prompts, metadata):
        return -scale * (images - target).pow(2).sum(dim=(1, 2, 3)), {}
    return reward


def toy_inputs(batch=2, channels=4, size=3, text_len=5, text_dim=6, pooled_dim=7, seed=2):
    """(x [B,C,h,w], text [2B,L,D], pooled [2B,P]) from a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=gen)
    text = torch.randn(2 * batch, text_len, text_dim, generator=gen) * 0.1
    pooled = torch.randn(2 * batch, pooled_dim, generator=gen) * 0.1
    return x, text, pooled
