"""Tiny GenEval detectors: `Mask2FormerForUniversalSegmentation` + its image processor, saved as the hub repo
facebook/mask2former-swin-small-coco-instance is (config.json, model.safetensors, preprocessor_config.json).

Same architecture as the real one (Swin backbone, deformable-attention pixel decoder, masked-attention
decoder, 80 COCO labels + "no object"), shrunk: 64 px inputs, Swin width 8 with one block per stage, width 32,
4 queries. The colour classifier's tiny CLIP is rewards_clip's `clip_vit_l14`; its byte-level BPE spells any
word it has no merge for byte by byte, so every colour template and class name tokenizes (never to unk).

    mask2former_coco           random weights (seed 0): image-dependent instances of arbitrary classes;
                               for properties that hold for any weights, and servers that just need a model.
    mask2former_coco_dog_cat   the same with its heads set at build time so that every image gives known
                               detections: class head weights 0 and biases dog 8.0, cat 7.5 (every other logit
                               0, "no object" included), so each query is a dog with p = e^8 / (e^8 + e^7.5 + 79)
                               = 0.612 and a cat with p = 0.371; mask features constant (mask_projection weight 0,
                               bias 1) and mask embeddings constant (last mask_embedder layer weight 0, bias
                               10/32), so every mask logit is +10: full-image masks, boxes [0, 0, W, H], mask
                               score sigmoid(10). Per image: 4 dogs scoring 0.612 and 4 cats scoring 0.371.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from shared_rewards.geneval.vocabulary import COCO_CLASSES

from .factory import tiny_model

IMAGE_SIZE = 64
NUM_QUERIES = 4
DOG, CAT = 16, 15  # COCO label ids
DOG_LOGIT, CAT_LOGIT, MASK_LOGIT = 8.0, 7.5, 10.0

# The 80 labels of the hub's COCO-instance Mask2Former/MaskFormer configs: GenEval's names in COCO order,
# with detectron2's spellings for three of them.
_DETECTRON2_SPELLINGS = {"computer mouse": "mouse", "tv remote": "remote", "computer keyboard": "keyboard"}
COCO_INSTANCE_LABELS = tuple(_DETECTRON2_SPELLINGS.get(name, name) for name in COCO_CLASSES)


def tiny_mask2former(id2label: dict[int, str], seed: int = 0):
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    backbone = SwinConfig(image_size=IMAGE_SIZE, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1],
                          num_heads=[1, 1, 1, 1], window_size=2, out_features=["stage1", "stage2", "stage3", "stage4"])
    # widths of 32: the pixel decoder's GroupNorm has 32 groups
    config = Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
                               encoder_feedforward_dim=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                               dim_feedforward=32, num_queries=NUM_QUERIES, id2label=dict(id2label),
                               label2id={v: k for k, v in id2label.items()})
    torch.manual_seed(seed)
    return Mask2FormerForUniversalSegmentation(config).eval()


def save_mask2former(model, out_dir: Path) -> None:
    from transformers import Mask2FormerImageProcessor

    model.save_pretrained(out_dir)
    # the hub processor's layout (shorter side resized, padded to a multiple of 32), at a tiny size
    Mask2FormerImageProcessor(size={"shortest_edge": IMAGE_SIZE, "longest_edge": 2 * IMAGE_SIZE},
                              size_divisor=32, ignore_index=255).save_pretrained(out_dir)


@tiny_model("mask2former_coco")
def build_mask2former_coco(out_dir: Path) -> None:
    """facebook/mask2former-swin-small-coco-instance stand-in with random weights."""
    save_mask2former(tiny_mask2former(dict(enumerate(COCO_INSTANCE_LABELS))), out_dir)


@tiny_model("mask2former_coco_dog_cat")
def build_mask2former_coco_dog_cat(out_dir: Path) -> None:
    """Every image: NUM_QUERIES full-image dogs (score 0.612) and as many cats (0.371); see the module doc."""
    model = tiny_mask2former(dict(enumerate(COCO_INSTANCE_LABELS)))
    with torch.no_grad():
        model.class_predictor.weight.zero_()
        model.class_predictor.bias.zero_()
        model.class_predictor.bias[DOG] = DOG_LOGIT
        model.class_predictor.bias[CAT] = CAT_LOGIT
        projection = model.model.pixel_level_module.decoder.mask_projection
        projection.weight.zero_()
        projection.bias.fill_(1.0)
        embedder = model.model.transformer_module.decoder.mask_predictor.mask_embedder
        last = [m for m in embedder.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.weight.zero_()
        last.bias.fill_(MASK_LOGIT / last.bias.numel())
    save_mask2former(model, out_dir)


def dog_cat_scores() -> tuple[float, float]:
    """The dog and cat detection scores of `mask2former_coco_dog_cat` on any image."""
    denominator = math.exp(DOG_LOGIT) + math.exp(CAT_LOGIT) + (len(COCO_INSTANCE_LABELS) + 1 - 2)
    mask_score = 1.0 / (1.0 + math.exp(-MASK_LOGIT))
    return math.exp(DOG_LOGIT) / denominator * mask_score, math.exp(CAT_LOGIT) / denominator * mask_score

