"""The value network of the full VGG-Flow (spec §7): `nu = V(x, s, text, pooled)`, shaped like x, read as beta x
(learned residual of nabla V).

Three parameterisations (`model.value_net_param`):

* 'lora': a copy of the SD3 transformer with its own LoRA adapter "default_value" (rank/alpha/targets as the policy)
  and a trainable `proj_out.weight` scaled by 1e-5 (its bias stays frozen, so the first outputs are close to the
  unpatchified bias pattern, not 0);
* 'copy': a copy of the transformer with only `proj_out.weight` trainable (x 1e-5). Upstream RSM took the copy after
  adding the policy LoRA, which also trained that copied adapter (spec §10 C2); here the copy is of the base model;
* 'small': a fresh diffusers UNet2DConditionModel (in/out = latent channels, `model.value_channel_width`,
  `model.value_layers_per_block`, cross-attention on the T5-width text tokens, conv_out x 1e-3), all trainable, in
  the weight dtype as upstream.

Faithful quirk (spec §10 N6, `quirks.value_net_negative_embeds`): given the stacked [negative; positive] embeddings
the value net sees the first B rows, the empty prompt's; the fix passes the prompt's own rows.
"""
from __future__ import annotations

import copy

import torch

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def lora_config(rank: int):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS)


def build(kind: str, base_transformer, config, device, weight_dtype):
    """The value-net module; `base_transformer` is the transformer without adapters (copied, never changed)."""
    if kind == "small":
        from diffusers import UNet2DConditionModel

        channels = base_transformer.config.in_channels
        net = UNet2DConditionModel(in_channels=channels, out_channels=channels,
                                   block_out_channels=tuple(config.model.value_channel_width),
                                   layers_per_block=config.model.value_layers_per_block,
                                   cross_attention_dim=base_transformer.config.joint_attention_dim)
        with torch.no_grad():
            net.conv_out.weight.mul_(1e-3)
        return net.to(device, dtype=weight_dtype).train()
    net = copy.deepcopy(base_transformer)
    net.requires_grad_(False)
    if kind == "lora":
        net.add_adapter(lora_config(config.model.lora_rank), adapter_name="default_value")
        net.set_adapter("default_value")
    elif kind != "copy":
        raise ValueError(f"model.value_net_param={kind!r} is not supported; allowed: lora, copy, small")
    net.proj_out.weight.requires_grad_(True)
    with torch.no_grad():
        net.proj_out.weight.mul_(1e-5)
    for p in net.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # trainable weights (and their optimizer state) in fp32
    return net.to(device).train()


class ValueNet:
    """Call signature of spec §7: x `[B, C, h, w]`, s `[B]`, text `[2B, L, D]` / pooled `[2B, P]` stacked [negative;
    positive] (or `[B, ...]`). Inputs are cast to float32 (the caller's autocast decides the matmul precision) or,
    with autocast off, to the module's own dtype."""

    def __init__(self, module, kind: str, negative_embeds: bool = True, joint_attention_kwargs=None):
        self.module, self.kind, self.negative_embeds, self.kwargs = module, kind, negative_embeds, joint_attention_kwargs

    def parameters(self):
        return [p for p in self.module.parameters() if p.requires_grad]

    def _rows(self, tensor, batch):
        if tensor is None or tensor.shape[0] <= batch:
            return tensor
        return tensor[:batch] if self.negative_embeds else tensor[batch:2 * batch]

    def __call__(self, x, s, text, pooled):
        batch = x.shape[0]
        text, pooled = self._rows(text, batch), self._rows(pooled, batch)
        dtype = torch.float32 if torch.is_autocast_enabled(x.device.type) else next(self.module.parameters()).dtype
        if self.kind == "small":
            return self.module(sample=x.to(dtype), timestep=s, encoder_hidden_states=text.to(dtype)).sample
        return self.module(hidden_states=x.to(dtype), timestep=s, encoder_hidden_states=text.to(dtype),
                           pooled_projections=pooled.to(dtype), joint_attention_kwargs=self.kwargs, return_dict=False)[0]
