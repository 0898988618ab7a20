"""Tiny BLIP-family checkpoints: ImageReward in its ORIGINAL on-disk layout, and a tiny BERT tokenizer.

`imagereward` holds what the hub repo THUDM/ImageReward holds (ImageReward.pt with `blip.visual_encoder.*`
timm-ViT keys, `blip.text_encoder.*` med.py BERT keys and `mlp.layers.*`; med_config.json in BERT-config
format), built from random transformers modules and renamed back by hand here, independently of the
product's `blip_convert.py`, so the round-trip test checks the mapping rather than itself.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .factory import get_tiny_model, tiny_model

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = (
    "a an the of and with in on at to that says is are photo painting picture image drawing cat cats dog dogs "
    "bird birds ocean sea clouds sky day night time low depth field effect red blue green yellow white black "
    "big small sign text hello world coffee shop street tree house car man woman girl boy astronaut horse "
    "riding moon sun mountain lake city , . ! ? \" ' - : ##s ##ing ##ed ##er"
).split()
TINY_VOCAB = SPECIAL_TOKENS + WORDS
BLIP_ADDED_TOKENS = 2  # [DEC] and [ENC], added by BLIP's tokenizer set-up

TINY_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   image_size=32, patch_size=8, layer_norm_eps=1e-6, hidden_act="gelu")
# Original BERT-config format, as THUDM/ImageReward's med_config.json (encoder_width is overwritten by the
# vision width at load time upstream, so 64 here matches what the weights need).
TINY_MED_CONFIG = {
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 4,
    "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2,
    "vocab_size": len(TINY_VOCAB) + BLIP_ADDED_TOKENS, "encoder_width": 64, "add_cross_attention": True,
}
TINY_HEAD = (32, 16, 8, 4, 2, 1)  # v1.0: 768, 1024, 128, 64, 16, 1


@tiny_model("bert_tokenizer")
def build_bert_tokenizer(out_dir: Path) -> None:
    from transformers import BertTokenizer

    (out_dir / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n")
    BertTokenizer(vocab={w: i for i, w in enumerate(TINY_VOCAB)}, do_lower_case=True).save_pretrained(out_dir)


def tiny_imagereward_modules(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Sequential]:
    """Random (vision, text, head) with every parameter perturbed, so that any swapped key changes the score."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    torch.manual_seed(seed)
    vision = BlipVisionModel(BlipVisionConfig(**TINY_VISION, initializer_range=0.02))
    med = TINY_MED_CONFIG
    text = BlipTextModel(BlipTextConfig(
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], intermediate_size=med["intermediate_size"],
        num_hidden_layers=med["num_hidden_layers"], num_attention_heads=med["num_attention_heads"],
        max_position_embeddings=med["max_position_embeddings"], layer_norm_eps=med["layer_norm_eps"],
        encoder_hidden_size=TINY_VISION["hidden_size"], is_decoder=True, bos_token_id=None, eos_token_id=None,
        sep_token_id=None), add_pooling_layer=False)
    layers: list[torch.nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(TINY_HEAD[:-1], TINY_HEAD[1:])):
        layers.append(torch.nn.Linear(d_in, d_out))
        if i < 3:  # upstream: Dropout after the first three Linears -> Linear indices 0, 2, 4, 6, 7
            layers.append(torch.nn.Dropout(0.1))
    head = torch.nn.Sequential(*layers)
    with torch.no_grad():
        for name, param in [*vision.named_parameters(), *text.named_parameters()]:
            if name.endswith("weight") and param.ndim == 1:  # LayerNorm gains
                param.copy_(1 + 0.1 * torch.randn_like(param))
            else:
                param.copy_(0.1 * torch.randn_like(param))
        for param in head.parameters():
            param.copy_(torch.randn_like(param) / param.shape[-1] ** 0.5)
    for module in (vision, text, head):
        module.eval()
    return vision, text, head


def original_layout(vision: torch.nn.Module, text: torch.nn.Module, head: torch.nn.Module) -> dict:
    """The upstream ImageReward state dict for these modules, key by key as BLIP's vit.py / med.py name them."""
    v = {k: t.detach().clone() for k, t in vision.state_dict().items()}
    out = {
        "blip.visual_encoder.cls_token": v.pop("embeddings.class_embedding"),
        "blip.visual_encoder.pos_embed": v.pop("embeddings.position_embedding"),
        "blip.visual_encoder.patch_embed.proj.weight": v.pop("embeddings.patch_embedding.weight"),
        "blip.visual_encoder.patch_embed.proj.bias": v.pop("embeddings.patch_embedding.bias"),
        "blip.visual_encoder.norm.weight": v.pop("post_layernorm.weight"),
        "blip.visual_encoder.norm.bias": v.pop("post_layernorm.bias"),
    }
    for i in range(vision.config.num_hidden_layers):
        ours, theirs = f"encoder.layers.{i}.", f"blip.visual_encoder.blocks.{i}."
        for p in ("weight", "bias"):
            out[f"{theirs}norm1.{p}"] = v.pop(f"{ours}layer_norm1.{p}")
            out[f"{theirs}attn.qkv.{p}"] = v.pop(f"{ours}self_attn.qkv.{p}")
            out[f"{theirs}attn.proj.{p}"] = v.pop(f"{ours}self_attn.projection.{p}")
            out[f"{theirs}norm2.{p}"] = v.pop(f"{ours}layer_norm2.{p}")
            out[f"{theirs}mlp.fc1.{p}"] = v.pop(f"{ours}mlp.fc1.{p}")
            out[f"{theirs}mlp.fc2.{p}"] = v.pop(f"{ours}mlp.fc2.{p}")
    assert not v, f"vision keys left unmapped: {sorted(v)}"
    for key, tensor in text.state_dict().items():  # med.py and transformers' BlipText share the names
        out[f"blip.text_encoder.{key}"] = tensor.detach().clone()
    positions = text.config.max_position_embeddings
    out["blip.text_encoder.embeddings.position_ids"] = torch.arange(positions).expand(1, -1).clone()
    for key, tensor in head.state_dict().items():
        out[f"mlp.layers.{key}"] = tensor.detach().clone()  # upstream MLP keeps its Sequential in `.layers`
    # Unused by the score but present upstream: BLIP's contrastive projections (embed_dim 256 there).
    generator = torch.Generator().manual_seed(1)
    out["blip.vision_proj.weight"] = torch.randn(16, vision.config.hidden_size, generator=generator)
    out["blip.vision_proj.bias"] = torch.zeros(16)
    out["blip.text_proj.weight"] = torch.randn(16, text.config.hidden_size, generator=generator)
    out["blip.text_proj.bias"] = torch.zeros(16)
    return out


def write_imagereward(out_dir: Path, state_dict: dict, med_config: dict = TINY_MED_CONFIG,
                      num_attention_heads: int | None = TINY_VISION["num_attention_heads"]) -> None:
    """ImageReward.pt + med_config.json (+ vision_config.json when the heads are not 64 wide)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, out_dir / "ImageReward.pt")
    (out_dir / "med_config.json").write_text(json.dumps(med_config, indent=2))
    if num_attention_heads is not None:
        (out_dir / "vision_config.json").write_text(json.dumps({"num_attention_heads": num_attention_heads}))


@tiny_model("imagereward")
def build_imagereward(out_dir: Path) -> None:
    write_imagereward(out_dir, original_layout(*tiny_imagereward_modules()))


def reward_options() -> dict[str, dict]:
    return {
        "imagereward": {"weights": str(get_tiny_model("imagereward")),
                        "tokenizer": str(get_tiny_model("bert_tokenizer"))},
    }
