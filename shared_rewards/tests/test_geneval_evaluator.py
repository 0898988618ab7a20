"""GenEval colour classifier and evaluator on tiny models.

The evaluator tests use `mask2former_coco_dog_cat`, whose every image holds 4 full-image dogs scoring 0.612 and
4 cats scoring 0.371 (rsm_testkit/geneval_models.py), so each expected number below is worked out by hand from
the rules of spec B.4 / B.8 with those detections.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from shared_rewards import RewardWeightsError
from shared_rewards.clip_common import features
from shared_rewards.geneval.color import TEMPLATES, colour_templates, load_color_classifier, object_crop
from shared_rewards.geneval.detections import Detection
from shared_rewards.geneval.evaluator import GenEvalEvaluator, load_evaluator
from shared_rewards.geneval.vocabulary import COCO_CLASSES, COLORS, TAGS

RESPONSE_KEYS = {"scores", "rewards", "strict_rewards", "group_rewards", "group_strict_rewards"}


def _images(n: int, shape=(40, 56), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for _ in range(n)]


def md(tag: str, *include: dict, exclude=None) -> dict:
    row = {"tag": tag, "include": list(include), "prompt": f"a {tag} prompt"}
    if exclude is not None:
        row["exclude"] = exclude
    return row


@pytest.fixture(scope="module")
def paths(tiny_models):
    return {"detector": str(tiny_models.path("mask2former_coco_dog_cat")),
            "clip": str(tiny_models.path("clip_vit_l14"))}


@pytest.fixture(scope="module")
def evaluator(paths) -> GenEvalEvaluator:
    return load_evaluator(**paths)


@pytest.fixture(scope="module")
def colors(paths):
    return load_color_classifier(clip=paths["clip"])


# --- colour classifier ---------------------------------------------------------------------------------------

def _gradient_image() -> Image.Image:
    # every pixel distinct: R = 10 * x, G = 10 * y, B = 7
    ys, xs = np.mgrid[0:6, 0:8]
    return Image.fromarray(np.stack([xs * 10, ys * 10, np.full_like(xs, 7)], axis=-1).astype(np.uint8))


def test_object_crop_keeps_mask_pixels_on_grey_and_crops_to_the_box():
    image = _gradient_image()
    mask = np.zeros((6, 8), dtype=bool)
    mask[1:4, 2:5] = True
    mask[2, 3] = False  # a hole shows the background too
    picture = np.asarray(object_crop(image, Detection(box=np.array([1.0, 1.0, 6.0, 5.0]), score=0.9, mask=mask)))
    assert picture.shape == (4, 5, 3)  # rows 1..4, columns 1..5
    original = np.asarray(image)[1:5, 1:6]
    inside = mask[1:5, 1:6]
    assert (picture[inside] == original[inside]).all()
    assert (picture[~inside] == [153, 153, 153]).all()  # "#999"
    assert (~inside).sum() == 20 - 8


def test_object_crop_background_options():
    image = _gradient_image()
    mask = np.zeros((6, 8), dtype=bool)
    mask[0, 0] = True
    detection = Detection(box=np.array([0.0, 0.0, 8.0, 6.0]), score=0.9, mask=mask)
    assert np.array_equal(np.asarray(object_crop(image, detection, bgcolor="original")), np.asarray(image))
    red = np.asarray(object_crop(image, detection, bgcolor="#f00"))
    assert (red[1:] == [255, 0, 0]).all() and (red[0, 0] == [0, 0, 7]).all()
    no_mask = Detection(box=np.array([2.0, 1.0, 4.0, 3.0]), score=0.9)
    assert np.array_equal(np.asarray(object_crop(image, no_mask)), np.asarray(image)[1:3, 2:4])
    uncropped = object_crop(image, Detection(box=np.array([2.0, 1.0, 4.0, 3.0]), score=0.9, mask=mask), crop=False)
    assert uncropped.size == (8, 6)


def test_object_crop_rounds_the_box_as_pil_and_falls_back_when_it_vanishes():
    image = _gradient_image()
    # PIL rounds half to even: 1.5 -> 2, 2.5 -> 2, 4.5 -> 4, 5.6 -> 6
    picture = object_crop(image, Detection(box=np.array([1.5, 2.5, 4.5, 5.6]), score=0.9))
    assert np.array_equal(np.asarray(picture), np.asarray(image)[2:6, 2:4])
    flat = object_crop(image, Detection(box=np.array([3.2, 1.0, 3.4, 4.0]), score=0.9))
    assert flat.size == (8, 6)


def test_object_crop_refuses_a_mask_of_another_size():
    with pytest.raises(ValueError, match=r"mask shape \(5, 8\) does not match the image's \(6, 8\)"):
        object_crop(_gradient_image(), Detection(box=np.zeros(4), score=1.0, mask=np.ones((5, 8), bool)))


def test_tiny_clip_tokenizer_spells_every_template_and_class(colors):
    tokenizer = colors.tokenizer
    for name in COCO_CLASSES:
        for prompt in (p for per_colour in colour_templates(name) for p in per_colour):
            ids = tokenizer(prompt)["input_ids"]
            assert len(ids) <= 77 and tokenizer.unk_token_id not in ids[1:-1]
            # CLIP's decoder puts a space after every word piece ("red - colored"): compare without spaces
            assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == prompt.replace(" ", "")


def test_text_classifier_is_normalised_mean_of_normalised_template_embeddings(colors):
    classifier = colors.text_classifier("traffic light")
    assert classifier.shape == (colors.model.config.projection_dim, len(COLORS))
    assert colors.text_classifier("traffic light") is classifier  # cached per class
    with torch.no_grad():
        for j, color in enumerate(COLORS):
            prompts = [t.format(c=color, cls="traffic light") for t in TEMPLATES]
            assert prompts[1] == f"a photo of a {color}-colored traffic light"
            per_template = []
            for prompt in prompts:  # one at a time: no padding at all
                tokens = colors.tokenizer([prompt], return_tensors="pt")
                embedding = features(colors.model.get_text_features(**tokens))[0]
                per_template.append(embedding / embedding.norm())
            mean = sum(per_template) / 3
            assert torch.allclose(classifier[:, j], mean / mean.norm(), atol=1e-5)
    assert torch.allclose(classifier.norm(dim=0), torch.ones(len(COLORS)), atol=1e-5)


def test_colour_is_the_argmax_of_image_embedding_against_the_classifier(colors):
    image = _images(1, (24, 32), seed=4)[0]
    boxes = [[0, 0, 32, 24], [3, 2, 20, 18], [10, 5, 31, 23]]
    detections = [Detection(box=np.array(b, dtype=float), score=0.9, mask=None) for b in boxes]
    got = colors.classify(image, detections, "car")
    pil = Image.fromarray(image)
    with torch.no_grad():
        expected = []
        for box in boxes:
            pixels = colors.image_processor(images=[pil.crop(box)], return_tensors="pt")["pixel_values"]
            embedding = features(colors.model.get_image_features(pixel_values=pixels))[0]
            expected.append(COLORS[int((F.normalize(embedding, dim=0) @ colors.text_classifier("car")).argmax())])
    assert got == expected
    assert colors.classify(image, [], "car") == []


def test_crops_are_preprocessed_exactly_as_open_clips_eval_transform(colors):
    # upstream: open_clip ViT-L-14 "openai" transform (shorter side bicubic, centre crop, OpenAI mean/std)
    import open_clip

    size = colors.model.config.vision_config.image_size
    transform = open_clip.image_transform(size, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN,
                                          std=open_clip.OPENAI_DATASET_STD)
    rng = np.random.default_rng(11)
    for shape in [(37, 53), (80, 45), (20, 20)]:  # down- and upsampling, wide and tall
        crop = Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
        ours = colors.image_processor(images=[crop], return_tensors="pt")["pixel_values"][0]
        assert torch.equal(ours, transform(crop))


def test_colour_options_are_checked():
    with pytest.raises(ValueError, match=r"bgcolor must be a PIL colour or 'original', got 'greyish'"):
        load_color_classifier(clip="/nonexistent", bgcolor="greyish")
    with pytest.raises(ValueError, match=r"crop must be True or False, got 1"):
        load_color_classifier(clip="/nonexistent", crop=1)
    with pytest.raises(RewardWeightsError, match=r"clip='/nonexistent/clip' does not exist"):
        load_color_classifier(clip="/nonexistent/clip")


# --- evaluator -----------------------------------------------------------------------------------------------

def test_response_has_the_upstream_keys_and_hand_computed_values(evaluator):
    rows = [
        md("single_object", {"class": "dog", "count": 1}),
        md("two_object", {"class": "dog", "count": 1}, {"class": "cat", "count": 1}),
        md("counting", {"class": "dog", "count": 2}, exclude=[{"class": "dog", "count": 3}]),
        md("position", {"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}),
        md("single_object", {"class": "bird", "count": 1}),
    ]
    response = evaluator(_images(5), rows, only_strict=False)
    assert set(response) == RESPONSE_KEYS
    # 4 dogs, 4 cats above 0.3; nothing above counting's 0.9
    # single dog: count term 1 - |1 - 4| = -2; at least one dog -> benchmark correct; not exactly one -> not strict
    # two_object: (-2 + -2) / 2; counting: no dog above 0.9: 1 - 2/2 = 0
    # position: cat -2, dog -2 and 0.0 for the failed count of a positioned clause; benchmark: identical
    # full-image boxes have no relation -> fails; bird: none found: 1 - 1 = 0
    assert response["scores"] == pytest.approx([-2.0, -2.0, 0.0, -4.0 / 3.0, 0.0])
    assert response["rewards"] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert response["strict_rewards"] == [0.0] * 5
    for key in ("group_rewards", "group_strict_rewards"):
        assert set(response[key]) == set(TAGS)
        assert all(len(values) == 5 for values in response[key].values())
    assert response["group_rewards"]["single_object"] == [1.0, -10.0, -10.0, -10.0, 0.0]
    assert response["group_rewards"]["two_object"] == [-10.0, 1.0, -10.0, -10.0, -10.0]
    assert response["group_rewards"]["colors"] == [-10.0] * 5
    assert response["group_strict_rewards"]["counting"] == [-10.0, -10.0, 0.0, -10.0, -10.0]


def test_only_strict_reports_every_benchmark_reward_as_zero(evaluator):
    rows = [md("single_object", {"class": "dog", "count": 1})] * 3
    strict = evaluator(_images(3), rows, only_strict=True)
    full = evaluator(_images(3), rows, only_strict=False)
    assert strict["rewards"] == [0.0, 0.0, 0.0] and full["rewards"] == [1.0, 1.0, 1.0]
    assert strict["scores"] == full["scores"] and strict["strict_rewards"] == full["strict_rewards"]
    assert strict["group_rewards"]["single_object"] == [0.0, 0.0, 0.0]


def test_scoring_options_reach_the_rules(paths):
    capped = load_evaluator(**paths, max_objects=1)  # one dog, one cat survive
    strict_threshold = load_evaluator(**paths, threshold=0.5)  # the cats (0.371) are dropped
    single = [md("single_object", {"class": "dog", "count": 1})]
    pair = [md("two_object", {"class": "dog", "count": 1}, {"class": "cat", "count": 1})]
    out = capped(_images(1), single)
    assert (out["scores"], out["rewards"], out["strict_rewards"]) == ([1.0], [1.0], [1.0])
    out = strict_threshold(_images(1), pair)
    # dog: -2 (4 found); cat: none found: 1 - 1 = 0
    assert (out["scores"], out["rewards"], out["strict_rewards"]) == ([-1.0], [0.0], [0.0])


def test_colour_clauses_read_the_classifier(paths, evaluator):
    capped = load_evaluator(**paths, max_objects=1)
    image = _images(1, seed=7)[0]
    (detections,) = capped.detect([image], [md("colors", {"class": "cat", "count": 1, "color": "red"})])
    (cat,) = detections["cat"]
    colour = cat.color
    assert colour in COLORS and detections["dog"][0].color is None  # only the clause's class is classified
    # the evaluator's colour is the classifier's on the full-image cat (mask all True, box the whole image)
    assert capped.color_classifier.classify(image, [cat], "cat") == [colour]
    other = next(c for c in COLORS if c != colour)
    right = capped([image], [md("colors", {"class": "cat", "count": 1, "color": colour})])
    wrong = capped([image], [md("colors", {"class": "cat", "count": 1, "color": other})])
    assert (right["scores"], right["rewards"], right["strict_rewards"]) == ([1.0], [1.0], [1.0])
    # count term 1, colour term 1 - |1 - 0| = 0
    assert (wrong["scores"], wrong["rewards"], wrong["strict_rewards"]) == ([0.5], [0.0], [0.0])
    # uncapped: 4 cats, a count-1 clause: -2 then a single 0.0 for the colour
    assert evaluator([image], [md("colors", {"class": "cat", "count": 1, "color": colour})])["scores"] == [-1.0]


def test_batches_do_not_change_the_numbers(paths, evaluator):
    small_batches = load_evaluator(**paths, batch_size=2)
    rows = [md("colors", {"class": "cat", "count": 1, "color": c}) for c in ("red", "blue", "green", "black", "white")]
    images = _images(5, seed=9)
    assert small_batches(images, rows) == evaluator(images, rows)


def test_metadata_errors_name_the_row(evaluator):
    rows = [md("single_object", {"class": "dog", "count": 1}), md("countin", {"class": "dog", "count": 2})]
    with pytest.raises(ValueError, match=r"metadata\[1\]\.tag='countin'"):
        evaluator(_images(2), rows)
    rows[1] = md("colors", {"class": "dog", "count": 1, "color": "teal"})
    with pytest.raises(ValueError, match=r"metadata\[1\]\.include\[0\]\.color='teal'"):
        evaluator(_images(2), rows)
    with pytest.raises(ValueError, match=r"2 images but 1 metadata rows"):
        evaluator(_images(2), rows[:1])
    with pytest.raises(ValueError, match=r"images\[0\]: expected an RGB uint8 array"):
        evaluator([np.zeros((8, 8, 4), np.uint8)], rows[:1])
    with pytest.raises(ValueError, match=r"only_strict must be a bool, got 'yes'"):
        evaluator(_images(1), rows[:1], only_strict="yes")


def test_empty_batch_gives_empty_lists(evaluator):
    response = evaluator([], [], only_strict=True)
    assert response["scores"] == [] and response["rewards"] == [] and response["strict_rewards"] == []


def test_load_evaluator_checks_options_before_loading():
    with pytest.raises(ValueError, match=r"unknown option 'treshold'; allowed: .*threshold"):
        load_evaluator(detector="/nonexistent", treshold=0.3)
    with pytest.raises(ValueError, match=r"max_objects=0"):
        load_evaluator(detector="/nonexistent", max_objects=0)
    with pytest.raises(ValueError, match=r"bgcolor must be a PIL colour"):
        load_evaluator(detector="/nonexistent", bgcolor="nope")
    with pytest.raises(RewardWeightsError, match=r"detector='/nonexistent' does not exist"):
        load_evaluator(detector="/nonexistent")
