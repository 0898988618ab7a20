"""GenEval's object detector: Mask2Former instance segmentation, from transformers (default) or mmdet 2.x.

Both backends turn a batch of RGB uint8 [H, W, 3] images into one ImageDetections per image holding *every*
instance the model returns (no score threshold): GenEval's own post-processing (scoring.postprocess)
thresholds at 0.3 / 0.9, sorts, caps and optionally runs NMS, identically for both backends.

transformers: `Mask2FormerForUniversalSegmentation` (default `facebook/mask2former-swin-small-coco-instance`).
  Its image processor's `post_process_instance_segmentation` cannot be used as is: it drops instances under
  `threshold=0.5` and empty masks, and resizes the mask logits to a fixed 384x384 without removing padding.
  `instances_from_logits` instead follows mmdet's MaskFormerFusionHead.instance_postprocess, which produced
  GenEval's numbers: top `max_per_image` (100) (query, class) pairs by class probability, masks upsampled to
  the padded input, cropped to the resized image, resized to the original image, thresholded at logit 0;
  score = class probability x mean sigmoid inside the mask; box = the mask's extent.
  Input resolution: by default the checkpoint's image processor decides. GenEval's mmdet 2.x config resized
  to fit 1333x800 (shorter side 800 for square images: `test_pipeline` img_scale=(1333, 800), keep_ratio,
  padded to a multiple of 32); `detector_size=800` reproduces that (shorter side 800, longer at most 1333),
  except that transformers' processor stretches a side that is not a multiple of 32 up to one where mmdet pads
  (the same for square 512 px images, 800 being a multiple of 32).
mmdet: GenEval's own mmdet 2.x checkpoint and config, for exact parity where mmdet 2.x is installed.

Box convention (both backends): x1, y1 = first mask column / row, x2, y2 = last column / row + 1 (mmdet's
mask2bbox), so a mask covering columns 3..5 has x1=3, x2=6. An empty mask gives the box [0, 0, 0, 0].
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..weights import RewardWeightsError, load_pretrained
from .detections import Detection, ImageDetections
from .vocabulary import COCO_CLASSES

DEFAULT_DETECTOR = "facebook/mask2former-swin-small-coco-instance"
BACKENDS = ("transformers", "mmdet")
DETECTOR_INPUTS = ("rgb", "bgr")
# mmdet 2.x mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco test_cfg: max_per_image=100
MAX_PER_IMAGE = 100
# the same config's test_pipeline: img_scale=(1333, 800), keep_ratio=True
MMDET_LONGEST_PER_SHORTEST = 1333 / 800


class Detector(Protocol):
    def __call__(self, images: Sequence[np.ndarray]) -> list[ImageDetections]: ...


def check_images(images: Sequence[np.ndarray]) -> None:
    for i, image in enumerate(images):
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            what = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise ValueError(f"images[{i}]: expected an RGB uint8 array [H, W, 3], got {what}")


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """[N, H, W] bool -> [N, 4] float x1, y1, x2, y2 with exclusive x2, y2; zeros for empty masks."""
    height, width = masks.shape[-2:]
    cols, rows = masks.any(dim=1), masks.any(dim=2)  # [N, W], [N, H]
    # argmax returns the first True; on the flipped axis it counts from the end
    x1 = cols.float().argmax(dim=1)
    x2 = width - cols.flip(1).float().argmax(dim=1)
    y1 = rows.float().argmax(dim=1)
    y2 = height - rows.flip(1).float().argmax(dim=1)
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float()
    boxes[~cols.any(dim=1)] = 0.0
    return boxes


def instances_from_logits(class_logits: torch.Tensor, mask_logits: torch.Tensor, padded_size: tuple[int, int],
                          valid_size: tuple[int, int], image_size: tuple[int, int],
                          max_per_image: int = MAX_PER_IMAGE):
    """One image's Mask2Former outputs -> (labels [K], scores [K], boxes [K, 4], masks [K, H, W] bool).

    class_logits: [Q, C+1], the last column "no object". mask_logits: [Q, h, w], coarser than the input.
    padded_size: the model input's (height, width); valid_size: the resized image's inside it (the rest is
    padding); image_size: the original (H, W).
    K = min(max_per_image, Q * C) (query, class) pairs, most probable first, as mmdet's instance_postprocess.
    """
    num_classes = class_logits.shape[-1] - 1
    probs = class_logits.float().softmax(dim=-1)[:, :-1]  # [Q, C]
    top_probs, top_index = probs.flatten().topk(min(max_per_image, probs.numel()))
    labels, queries = top_index % num_classes, top_index // num_classes
    logits = F.interpolate(mask_logits[None].float(), size=padded_size, mode="bilinear", align_corners=False)[0]
    logits = logits[:, :valid_size[0], :valid_size[1]]
    logits = F.interpolate(logits[None], size=image_size, mode="bilinear", align_corners=False)[0]  # [Q, H, W]
    logits = logits[queries]  # [K, H, W]
    masks = logits > 0
    inside = masks.flatten(1).float()
    mask_scores = (logits.sigmoid().flatten(1) * inside).sum(1) / (inside.sum(1) + 1e-6)
    return labels, top_probs * mask_scores, boxes_from_masks(masks), masks


def coco_names(id2label: dict, source: str) -> tuple[str, ...]:
    """GenEval class name per label id. COCO-instance checkpoints name the 80 classes in COCO order but spell
    some differently ("mouse" for GenEval's "computer mouse", "remote", "keyboard"), so labels map by index;
    a label that spells *another* index's GenEval name means a different order, and is refused."""
    if len(id2label) != len(COCO_CLASSES):
        raise ValueError(f"geneval: detector={source!r} has {len(id2label)} labels; GenEval needs a COCO instance "
                         f"model with the {len(COCO_CLASSES)} COCO thing classes in COCO order")
    labels = {int(k): str(v) for k, v in id2label.items()}
    for index, name in sorted(labels.items()):
        if name in COCO_CLASSES and COCO_CLASSES.index(name) != index:
            raise ValueError(f"geneval: detector={source!r} label {index} is {name!r}, which is COCO class "
                             f"{COCO_CLASSES.index(name)}; its labels are not in COCO order")
    return COCO_CLASSES


def _group(labels: Sequence[int], scores: Sequence[float], boxes: np.ndarray, masks, class_names) -> ImageDetections:
    detections: ImageDetections = {}
    for j, label in enumerate(labels):
        mask = None if masks is None else masks[j]
        detections.setdefault(class_names[int(label)], []).append(
            Detection(box=np.asarray(boxes[j], dtype=np.float64), score=float(scores[j]), mask=mask))
    return detections


class TransformersMask2Former:
    """Mask2Former from transformers. Images are processed `batch_size` at a time; one image's masks are
    [100, H, W] floats while they are made, so keep batches modest on large images."""

    def __init__(self, model, processor, class_names: Sequence[str], device: str | torch.device = "cpu",
                 batch_size: int = 8, max_per_image: int = MAX_PER_IMAGE, size: int | None = None):
        self.model = model.to(device).eval().requires_grad_(False)
        self.processor = processor
        # None: the processor's own resize; N: shorter side N, longer side at most N * 1333 / 800 (mmdet's rule)
        self.resize = {} if size is None else {
            "size": {"shortest_edge": size, "longest_edge": round(size * MMDET_LONGEST_PER_SHORTEST)}}
        self.class_names = tuple(class_names)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_per_image = max_per_image

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray]) -> list[ImageDetections]:
        check_images(images)
        results: list[ImageDetections] = []
        for start in range(0, len(images), self.batch_size):
            chunk = list(images[start:start + self.batch_size])
            inputs = self.processor(images=chunk, return_tensors="pt", **self.resize)
            pixel_values = inputs["pixel_values"].to(self.device)  # [B, 3, Hp, Wp], padded to a common size
            pixel_mask = inputs["pixel_mask"].to(self.device)  # [B, Hp, Wp], 1 on the resized image
            outputs = self.model(pixel_values=pixel_values, pixel_mask=pixel_mask)
            for i, image in enumerate(chunk):
                valid = (int(pixel_mask[i].any(dim=1).sum()), int(pixel_mask[i].any(dim=0).sum()))
                labels, scores, boxes, masks = instances_from_logits(
                    outputs.class_queries_logits[i], outputs.masks_queries_logits[i],
                    tuple(pixel_values.shape[-2:]), valid, image.shape[:2], self.max_per_image)
                results.append(_group(labels.tolist(), scores.tolist(), boxes.cpu().numpy(),
                                      masks.cpu().numpy(), self.class_names))
        return results


def load_transformers_detector(detector: str = DEFAULT_DETECTOR, device: str | torch.device = "cpu",
                               batch_size: int = 8, size: int | None = None) -> TransformersMask2Former:
    from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

    model = load_pretrained("geneval", Mask2FormerForUniversalSegmentation.from_pretrained, detector, "detector")
    processor = load_pretrained("geneval", AutoImageProcessor.from_pretrained, detector, "detector")
    names = coco_names(model.config.id2label, str(detector))
    return TransformersMask2Former(model, processor, names, device=device, batch_size=batch_size, size=size)


def detections_from_mmdet(bbox_results: Sequence[np.ndarray], segm_results: Sequence[Sequence[np.ndarray]] | None,
                          class_names: Sequence[str]) -> ImageDetections:
    """mmdet 2.x `inference_detector` output for one image -> ImageDetections.

    bbox_results: per class a [N_k, 5] array of x1, y1, x2, y2, score; segm_results: per class a list of N_k
    [H, W] masks, or None for a box-only model. Classes without instances are left out.
    """
    if len(bbox_results) != len(class_names):
        raise ValueError(f"mmdet result has {len(bbox_results)} classes, expected {len(class_names)}")
    if segm_results is not None and len(segm_results) != len(class_names):
        raise ValueError(f"mmdet segm result has {len(segm_results)} classes, expected {len(class_names)}")
    detections: ImageDetections = {}
    for k, name in enumerate(class_names):
        boxes = np.asarray(bbox_results[k], dtype=np.float64).reshape(-1, 5)
        masks = None if segm_results is None else segm_results[k]
        if masks is not None and len(masks) != len(boxes):
            raise ValueError(f"mmdet result for class {name!r}: {len(boxes)} boxes but {len(masks)} masks")
        if len(boxes):
            detections[name] = [
                Detection(box=boxes[j, :4].copy(), score=float(boxes[j, 4]),
                          mask=None if masks is None else np.asarray(masks[j], dtype=bool))
                for j in range(len(boxes))]
    return detections


class MMDetMask2Former:
    """GenEval's mmdet 2.x Mask2Former (spec B.1). `detector_input` says what array mmdet receives:
    "rgb" hands it the RGB array as the reward server did (its config's to_rgb=True then swaps the channels,
    the Flow-GRPO reward's behaviour); "bgr" flips to BGR first, as mmcv's imread of the benchmark's PNG files
    gave it (benchmark parity)."""

    def __init__(self, config: str, checkpoint: str, device: str | torch.device = "cpu", detector_input: str = "rgb",
                 batch_size: int = 8):
        try:
            import mmdet
            from mmdet.apis import inference_detector, init_detector
        except ImportError as exc:
            raise ImportError(f"geneval: backend='mmdet' needs mmdet 2.x and mmcv-full installed ({exc}); "
                              "use backend='transformers' otherwise") from exc
        if not str(mmdet.__version__).startswith("2."):
            raise ImportError(f"geneval: backend='mmdet' needs mmdet 2.x, found mmdet {mmdet.__version__} "
                              "(3.x returns DetDataSample objects)")
        for option, path in (("config", config), ("checkpoint", checkpoint)):
            if not path or not Path(path).expanduser().is_file():
                raise RewardWeightsError(f"geneval: backend='mmdet' needs {option}=<existing file>, got {path!r}")
        self._infer = inference_detector
        self.model = init_detector(str(Path(config).expanduser()), str(Path(checkpoint).expanduser()),
                                   device=str(device))
        # mmdet 2.x keeps the class names from the checkpoint's meta; a checkpoint without them is COCO's
        classes = getattr(self.model, "CLASSES", None) or COCO_CLASSES
        self.class_names = coco_names(dict(enumerate(classes)), str(checkpoint))
        self.detector_input = detector_input
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray]) -> list[ImageDetections]:
        check_images(images)
        results: list[ImageDetections] = []
        for start in range(0, len(images), self.batch_size):
            chunk = [img if self.detector_input == "rgb" else np.ascontiguousarray(img[..., ::-1])
                     for img in images[start:start + self.batch_size]]
            for result in self._infer(self.model, chunk):
                if isinstance(result, dict):  # a config with panoptic_on=True wraps the instance results
                    result = result["ins_results"]
                bbox, segm = (result[0], result[1]) if isinstance(result, tuple) else (result, None)
                results.append(detections_from_mmdet(bbox, segm, self.class_names))
        return results


def load_detector(backend: str = "transformers", device: str | torch.device = "cpu", detector: str | None = None,
                  config: str | None = None, checkpoint: str | None = None, detector_input: str = "rgb",
                  batch_size: int = 8, detector_size: int | None = None) -> Detector:
    """backend="transformers": `detector` is a hub id or a local save_pretrained directory; `detector_size`
    the shorter side images are resized to (None: the checkpoint processor's; 800: GenEval's mmdet config).
    backend="mmdet": `config` (the mmdetection 2.x config .py) and `checkpoint` (.pth) are local files."""
    if backend not in BACKENDS:
        raise ValueError(f"geneval: backend must be one of {BACKENDS}, got {backend!r}")
    if detector_input not in DETECTOR_INPUTS:
        raise ValueError(f"geneval: detector_input must be one of {DETECTOR_INPUTS}, got {detector_input!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"geneval: batch_size must be an int >= 1, got {batch_size!r}")
    if detector_size is not None and (isinstance(detector_size, bool) or not isinstance(detector_size, int)
                                      or detector_size < 32):
        raise ValueError(f"geneval: detector_size must be None or an int >= 32, got {detector_size!r}")
    if backend == "mmdet":
        if detector_size is not None:
            raise ValueError("geneval: detector_size is for backend='transformers'; the mmdet config sets its resize")
        if detector is not None:
            raise ValueError("geneval: detector= is for backend='transformers'; the mmdet backend takes config= "
                             "and checkpoint=")
        return MMDetMask2Former(config, checkpoint, device=device, detector_input=detector_input,
                                batch_size=batch_size)
    if config is not None or checkpoint is not None:
        raise ValueError("geneval: config= and checkpoint= are for backend='mmdet'; the transformers backend "
                         "takes detector=<hub id or directory>")
    if detector_input != "rgb":
        # the transformers processor normalises the RGB array it is given; a channel swap is an mmdet quirk
        raise ValueError("geneval: detector_input='bgr' only applies to backend='mmdet'")
    return load_transformers_detector(detector or DEFAULT_DETECTOR, device=device, batch_size=batch_size,
                                      size=detector_size)
