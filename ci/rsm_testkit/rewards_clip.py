"""Tiny CLIP-family reward checkpoints: HPSv2 (open_clip), PickScore and CLIP (transformers), the aesthetic head.

Each builder writes the file layout the real hub repos have, with random weights of a shrunken
architecture: 32 px images in 8 px patches, width 16-32, 2 layers. The reward code is told nothing: it
receives the directory where it would receive a hub id.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .factory import get_tiny_model, tiny_model
from .tokenizers import clip_tokenizer, special_ids

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGE_SIZE = 32
PROJECTION_DIM = 16

# open_clip's model_cfg layout (as in its model_configs/*.json); ViT-H-14 shrunk. The text tower keeps the
# real vocabulary and context so that open_clip's bundled BPE tokenizer works unchanged.
HPS_OPEN_CLIP_CONFIG = {
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": IMAGE_SIZE, "patch_size": 8, "width": 32, "head_width": 16, "layers": 2},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 2},
    },
    "preprocess_cfg": {"mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic", "resize_mode": "longest"},
}


@tiny_model("hps")
def build_hps(out_dir: Path) -> None:
    """xswu/HPSv2 layout: {"state_dict": ...} files per version, plus the config describing the tiny arch.
    Saved in fp16 to keep the 49408-row token embedding small; load_state_dict casts to the model's dtype."""
    import open_clip

    (out_dir / "open_clip_config.json").write_text(json.dumps(HPS_OPEN_CLIP_CONFIG, indent=2))
    for seed, filename in ((0, "HPS_v2_compressed.pt"), (1, "HPS_v2.1_compressed.pt")):
        torch.manual_seed(seed)
        model = open_clip.create_model(f"local-dir:{out_dir}", load_weights=False)
        state = {k: v.half() for k, v in model.state_dict().items()}
        torch.save({"state_dict": state}, out_dir / filename)


def _write_tiny_hf_clip(out_dir: Path, seed: int) -> None:
    """A CLIPModel + CLIPProcessor directory, as save_pretrained writes them for openai/clip-* repos."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = clip_tokenizer()  # CLIP's byte-level BPE layout, end-of-text the largest id as in the real vocab
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, **special_ids(tokenizer)),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                           image_size=IMAGE_SIZE, patch_size=8),
        projection_dim=PROJECTION_DIM,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(out_dir)
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                         image_mean=CLIP_MEAN, image_std=CLIP_STD)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)


@tiny_model("pickscore")
def build_pickscore(out_dir: Path) -> None:
    """yuvalkirstain/PickScore_v1 stand-in; the directory also serves as the `processor`."""
    _write_tiny_hf_clip(out_dir, seed=2)


@tiny_model("clip_vit_l14")
def build_clip_vit_l14(out_dir: Path) -> None:
    """openai/clip-vit-large-patch14 stand-in (aesthetic backbone; also the CLIPScore model)."""
    _write_tiny_hf_clip(out_dir, seed=3)


@tiny_model("aesthetic_head")
def build_aesthetic_head(out_dir: Path) -> None:
    """trl-lib/ddpo-aesthetic-predictor layout: aesthetic-model.pth, the MLP's state dict (Linear layers at
    Sequential indices 0, 2, 4, 6, 7; dropouts between), input width = the tiny CLIP's projection."""
    torch.manual_seed(4)
    widths = [PROJECTION_DIM, 1024, 128, 64, 16, 1]
    state = {}
    for index, (d_in, d_out) in zip((0, 2, 4, 6, 7), zip(widths[:-1], widths[1:])):
        layer = nn.Linear(d_in, d_out)
        state[f"layers.{index}.weight"] = layer.weight.detach().clone()
        state[f"layers.{index}.bias"] = layer.bias.detach().clone()
    torch.save(state, out_dir / "aesthetic-model.pth")


def reward_options() -> dict[str, dict]:
    """load_reward options pointing each CLIP-family reward at its tiny checkpoints."""
    pickscore = str(get_tiny_model("pickscore"))
    clip = str(get_tiny_model("clip_vit_l14"))
    return {
        "hpsv2": {"weights": str(get_tiny_model("hps"))},
        "pickscore": {"weights": pickscore, "processor": pickscore},
        "aesthetic": {"clip": clip, "weights": str(get_tiny_model("aesthetic_head"))},
        "clipscore": {"weights": clip},
    }
