"""ImageReward's original BLIP checkpoint layout -> transformers' BlipVisionModel / BlipTextModel.

`ImageReward.pt` (hub THUDM/ImageReward) is a plain state dict saved from the upstream `ImageReward`
module: `blip.visual_encoder.*` (BLIP's timm-style ViT), `blip.text_encoder.*` (BLIP's `med.py` BERT
with cross-attention), `mlp.layers.*` (the reward head) and a few keys the score never reads.
The mapping is strict: every target key must be filled and every source key used or explicitly
ignored, so a checkpoint from another model fails loudly instead of loading half-random weights.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from .weights import RewardWeightsError

VISION_PREFIX = "blip.visual_encoder."
TEXT_PREFIX = "blip.text_encoder."
HEAD_PREFIX = "mlp."

# Saved by upstream but unused by the score: BLIP's contrastive projections (frozen during ImageReward
# training) and med.py's persistent position_ids buffer (non-persistent in transformers' BLIP).
IGNORED_KEYS = frozenset({
    "blip.vision_proj.weight", "blip.vision_proj.bias",
    "blip.text_proj.weight", "blip.text_proj.bias",
    "blip.text_encoder.embeddings.position_ids",
})

# BLIP ViT (timm naming) -> transformers BlipVisionModel; checked against BLIP models/vit.py and
# transformers' modeling_blip.py. Both fuse q,k,v into one [3*D, D] matrix in the same q|k|v order.
# {i}: block index, {p}: weight or bias.
VISION_NAMES = [
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj.{p}", "embeddings.patch_embedding.{p}"),
    ("blocks.{i}.norm1.{p}", "encoder.layers.{i}.layer_norm1.{p}"),
    ("blocks.{i}.attn.qkv.{p}", "encoder.layers.{i}.self_attn.qkv.{p}"),
    ("blocks.{i}.attn.proj.{p}", "encoder.layers.{i}.self_attn.projection.{p}"),
    ("blocks.{i}.norm2.{p}", "encoder.layers.{i}.layer_norm2.{p}"),
    ("blocks.{i}.mlp.fc1.{p}", "encoder.layers.{i}.mlp.fc1.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", "encoder.layers.{i}.mlp.fc2.{p}"),
    ("norm.{p}", "post_layernorm.{p}"),
]


def _template_regex(template: str) -> str:
    return re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")


def rename_vision(key: str, to_hf: bool = True) -> str | None:
    """One vision key from the original to the transformers name (or back); None if no rule matches."""
    for original, hf in VISION_NAMES:
        source, target = (original, hf) if to_hf else (hf, original)
        match = re.fullmatch(_template_regex(source), key)
        if match:
            return target.format(**match.groupdict())
    return None


def original_name(part: str, key: str) -> str:
    """transformers / head key -> the key the original checkpoint should hold (for error messages)."""
    if part == "vision":
        return VISION_PREFIX + (rename_vision(key, to_hf=False) or key)
    return (TEXT_PREFIX if part == "text" else HEAD_PREFIX) + key


# BLIP ViT-L/16 (`create_vit("large")` in BLIP/ImageReward): what the shapes cannot tell.
VISION_DEFAULTS = {"hidden_act": "gelu", "layer_norm_eps": 1e-6, "head_dim": 64}


class CheckpointKeyError(RewardWeightsError):
    """An ImageReward checkpoint whose keys do not match the architecture."""


def split_checkpoint(state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> dict[str, dict]:
    """Original keys -> {"vision": ..., "text": ..., "head": ...} in transformers / head naming.

    A leading `module.` (a DDP-wrapped save) is dropped. Unknown keys raise CheckpointKeyError.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {"vision": {}, "text": {}, "head": {}}
    for key in sorted(state_dict):
        value = state_dict[key]
        name = key[len("module."):] if key.startswith("module.") else key
        if name in IGNORED_KEYS:
            continue
        if name.startswith(VISION_PREFIX):
            target = rename_vision(name[len(VISION_PREFIX):])
            if target is None:
                raise CheckpointKeyError(f"imagereward: {source} has an unexpected key {key!r} (no ViT rule)")
            parts["vision"][target] = value
        elif name.startswith(TEXT_PREFIX):  # med.py BERT and transformers' BlipText share names
            parts["text"][name[len(TEXT_PREFIX):]] = value
        elif re.fullmatch(r"mlp\.layers\.\d+\.(weight|bias)", name):
            parts["head"][name[len(HEAD_PREFIX):]] = value
        else:
            raise CheckpointKeyError(f"imagereward: {source} has an unexpected key {key!r}")
    for part, prefix in (("vision", VISION_PREFIX), ("text", TEXT_PREFIX), ("head", "mlp.layers.")):
        if not parts[part]:
            raise CheckpointKeyError(f"imagereward: {source} has no {prefix}* keys; is it an ImageReward checkpoint?")
    return parts


def _need(tensors: Mapping[str, torch.Tensor], key: str, source: str, part: str = "vision") -> torch.Tensor:
    if key not in tensors:
        raise CheckpointKeyError(f"imagereward: {source} is missing the key {original_name(part, key)!r}")
    return tensors[key]


def vision_config(vision: Mapping[str, torch.Tensor], overrides: Mapping[str, Any] | None = None,
                  source: str = "checkpoint"):
    """BlipVisionConfig read off the tensor shapes; heads = hidden // 64 unless `overrides` say otherwise."""
    from transformers import BlipVisionConfig

    hidden = _need(vision, "embeddings.class_embedding", source).shape[-1]
    patch = _need(vision, "embeddings.patch_embedding.weight", source).shape[-1]
    grid = round((_need(vision, "embeddings.position_embedding", source).shape[1] - 1) ** 0.5)
    depth = len({k.split(".")[2] for k in vision if k.startswith("encoder.layers.")})
    values = {
        "hidden_size": hidden, "patch_size": patch, "image_size": grid * patch, "num_hidden_layers": depth,
        "intermediate_size": _need(vision, "encoder.layers.0.mlp.fc1.weight", source).shape[0],
        "num_attention_heads": max(1, hidden // VISION_DEFAULTS["head_dim"]),
        "hidden_act": VISION_DEFAULTS["hidden_act"], "layer_norm_eps": VISION_DEFAULTS["layer_norm_eps"],
    }
    values.update(overrides or {})
    return BlipVisionConfig(**values)


def text_config(med_config: Mapping[str, Any], encoder_width: int):
    """BlipTextConfig from BLIP's `med_config.json` (a BertConfig).

    `encoder_width` is the vision width: upstream overwrites med_config's `encoder_width` (768) with the
    ViT's width (1024 for ViT-L) before building the text encoder. `is_decoder=True` only makes
    transformers create the cross-attention layers; scoring runs the bidirectional encoder.
    """
    from transformers import BlipTextConfig

    if not med_config.get("add_cross_attention", False):
        raise CheckpointKeyError("imagereward: med_config.json must set add_cross_attention: true")
    if med_config.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointKeyError("imagereward: only absolute position embeddings are supported in med_config.json")
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "hidden_act", "max_position_embeddings", "layer_norm_eps", "pad_token_id")
    missing = [k for k in keys if k not in med_config]
    if missing:
        raise CheckpointKeyError(f"imagereward: med_config.json lacks {missing[0]!r}")
    return BlipTextConfig(**{k: med_config[k] for k in keys}, encoder_hidden_size=encoder_width,
                          is_decoder=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                          bos_token_id=None, eos_token_id=None, sep_token_id=None)


class RewardHead(torch.nn.Module):
    """ImageReward's MLP: Linear layers at the checkpoint's `layers.<i>` indices (768-1024-128-64-16-1 in
    v1.0) with NO nonlinearity between them (upstream comments the ReLUs out). The Dropouts that sit at
    the other indices upstream are identities at inference and hold no weights."""

    def __init__(self, head: Mapping[str, torch.Tensor], source: str = "checkpoint"):
        super().__init__()
        indices = sorted({int(k.split(".")[1]) for k in head})
        modules: list[torch.nn.Module] = [torch.nn.Identity() for _ in range(indices[-1] + 1)]
        width = None
        for i in indices:
            weight = _need(head, f"layers.{i}.weight", source, "head")
            if weight.ndim != 2 or (width is not None and weight.shape[1] != width):
                raise CheckpointKeyError(f"imagereward: {source} head key 'mlp.layers.{i}.weight' has shape "
                                         f"{list(weight.shape)}, expected [out, {width}]")
            modules[i] = torch.nn.Linear(weight.shape[1], weight.shape[0])
            width = weight.shape[0]
        if width != 1:
            raise CheckpointKeyError(f"imagereward: {source} head ends with width {width}, expected 1")
        self.layers = torch.nn.Sequential(*modules)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # [B, D] -> [B, 1]
        return self.layers(features)


def load_strict(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor], part: str,
                source: str = "checkpoint") -> None:
    """`load_state_dict(strict=True)` with errors that name the offending key in the ORIGINAL layout."""
    expected = module.state_dict()
    for key in sorted(expected):
        if key not in tensors:
            raise CheckpointKeyError(f"imagereward: {source} is missing the key {original_name(part, key)!r}")
        if tensors[key].shape != expected[key].shape:
            raise CheckpointKeyError(
                f"imagereward: {source} key {original_name(part, key)!r} has shape {list(tensors[key].shape)}, "
                f"the config expects {list(expected[key].shape)}")
    for key in sorted(tensors):
        if key not in expected:
            raise CheckpointKeyError(f"imagereward: {source} has an unexpected key {original_name(part, key)!r}")
    module.load_state_dict(dict(tensors), strict=True)
