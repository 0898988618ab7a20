"""GenEval's colour classifier (spec B.6): zero-shot CLIP ViT-L/14 over the ten colours, per detected object.

For each object: keep its mask pixels and paint the rest #999 grey, crop to its box, embed with CLIP and take
the colour whose text classifier scores highest. The text classifier of a class name is clip_benchmark's
`zero_shot_classifier` construction over three templates: per colour, the three template embeddings are
L2-normalised, averaged and re-normalised. Upstream runs open_clip ViT-L-14 "openai"; here transformers'
CLIPModel of the same OpenAI weights (`openai/clip-vit-large-patch14`) with its CLIPImageProcessor (shorter side
to 224 bicubic, centre crop 224, OpenAI mean/std: open_clip's eval transform for these weights).

Upstream fed the crops through a torch DataLoader with 4 worker processes on every call, which made a busy
reward server time out; the crops here are batched in-process. Upstream also ran the text and image towers
under CUDA autocast (fp16); this runs in the model's dtype, so near-ties between two colours may resolve
differently.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..clip_common import features, load_hf_image_processor, load_hf_model, load_hf_tokenizer
from .detections import Detection
from .vocabulary import COLORS

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
# geneval evaluate_images.py color_classification; "{c}" is the colour, the class name is filled in first
TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")
DEFAULT_BGCOLOR = "#999"  # geneval --options bgcolor default; "original" keeps the real background


def colour_templates(class_name: str) -> list[list[str]]:
    """[10 colours][3 templates] prompts for one class."""
    return [[t.format(c=color, cls=class_name) for t in TEMPLATES] for color in COLORS]


def object_crop(image: Image.Image, detection: Detection, bgcolor: str = DEFAULT_BGCOLOR,
                crop: bool = True) -> Image.Image:
    """The picture CLIP sees for one object: its mask over a flat `bgcolor` background (or the untouched image
    when bgcolor="original" or the detection has no mask), cropped to its box when `crop`.

    The box goes to PIL's crop as given, which rounds each coordinate (x2, y2 exclusive), as upstream. A box
    that rounds to nothing would crash upstream's transform; it falls back to the uncropped picture here.
    """
    if detection.mask is not None and bgcolor != "original":
        mask = np.asarray(detection.mask, dtype=bool)
        if mask.shape != (image.height, image.width):
            raise ValueError(f"colour: mask shape {mask.shape} does not match the image's "
                             f"{(image.height, image.width)}")
        picture = Image.composite(image, Image.new("RGB", image.size, color=bgcolor), Image.fromarray(mask))
    else:
        picture = image
    if crop:
        box = tuple(float(v) for v in np.asarray(detection.box)[:4])
        cropped = picture.crop(box)
        if cropped.width > 0 and cropped.height > 0:
            return cropped
    return picture


class ColorClassifier:
    """Assigns one of COLORS to each detection. Text classifiers are cached per class name."""

    def __init__(self, model, tokenizer, image_processor, device: str | torch.device = "cpu",
                 bgcolor: str = DEFAULT_BGCOLOR, crop: bool = True, batch_size: int = 16):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.bgcolor, self.crop, self.batch_size = bgcolor, crop, batch_size
        self.dtype = next(self.model.parameters()).dtype
        self._classifiers: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def text_classifier(self, class_name: str) -> torch.Tensor:
        """[D, 10]: column j is the normalised mean of the normalised embeddings of colour j's three prompts."""
        if class_name not in self._classifiers:
            prompts = [p for per_colour in colour_templates(class_name) for p in per_colour]
            tokens = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(self.device)
            embeddings = features(self.model.get_text_features(**tokens)).float()  # [30, D]
            embeddings = F.normalize(embeddings, dim=-1).view(len(COLORS), len(TEMPLATES), -1).mean(dim=1)
            self._classifiers[class_name] = F.normalize(embeddings, dim=-1).T.contiguous()  # [D, 10]
        return self._classifiers[class_name]

    @torch.no_grad()
    def logits(self, pictures: Sequence[Image.Image], class_name: str) -> torch.Tensor:
        """[N, 10] zero-shot logits (100 x cosine, as clip_benchmark) of object pictures against the colours."""
        classifier = self.text_classifier(class_name)
        out = []
        for start in range(0, len(pictures), self.batch_size):
            pixels = self.image_processor(images=list(pictures[start:start + self.batch_size]), return_tensors="pt")
            pixel_values = pixels["pixel_values"].to(self.device, self.dtype)  # [b, 3, 224, 224]
            embeddings = F.normalize(features(self.model.get_image_features(pixel_values=pixel_values)).float(), dim=-1)
            out.append(100.0 * embeddings @ classifier)
        return torch.cat(out) if out else torch.zeros(0, len(COLORS), device=self.device)

    def classify(self, image: np.ndarray | Image.Image, detections: Sequence[Detection], class_name: str) -> list[str]:
        """The colour of each detection of `class_name` in `image` (RGB uint8 [H, W, 3] or PIL)."""
        if not detections:
            return []
        picture = image.convert("RGB") if isinstance(image, Image.Image) else Image.fromarray(image)
        crops = [object_crop(picture, d, self.bgcolor, self.crop) for d in detections]
        return [COLORS[i] for i in self.logits(crops, class_name).argmax(dim=1).tolist()]


def check_color_options(bgcolor: str, crop: bool, batch_size: int) -> None:
    if not isinstance(crop, bool):
        raise ValueError(f"geneval: crop must be True or False, got {crop!r}")
    if bgcolor != "original":
        try:
            Image.new("RGB", (1, 1), color=bgcolor)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"geneval: bgcolor must be a PIL colour or 'original', got {bgcolor!r}") from exc
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"geneval: color_batch_size must be an int >= 1, got {batch_size!r}")


def load_color_classifier(clip: str = DEFAULT_CLIP, device: str | torch.device = "cpu", bgcolor: str = DEFAULT_BGCOLOR,
                          crop: bool = True, batch_size: int = 16) -> ColorClassifier:
    """`clip`: hub id or local directory of a transformers CLIPModel with its tokenizer and image processor."""
    from transformers import CLIPModel

    check_color_options(bgcolor, crop, batch_size)
    model = load_hf_model("geneval", CLIPModel, clip, "clip")
    tokenizer = load_hf_tokenizer("geneval", clip, "clip")
    image_processor = load_hf_image_processor("geneval", clip, "clip")
    return ColorClassifier(model, tokenizer, image_processor, device=device, bgcolor=bgcolor, crop=crop,
                           batch_size=batch_size)
