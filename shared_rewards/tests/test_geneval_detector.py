"""GenEval detector backends: the transformers Mask2Former through the real loader on tiny checkpoints, the
mmdet 2.x result conversion on hand-made arrays, and the mask -> box / logits -> instances arithmetic."""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rsm_testkit.geneval_models import (
    COCO_INSTANCE_LABELS, NUM_QUERIES, dog_cat_scores, save_mask2former, tiny_mask2former)
from shared_rewards import RewardWeightsError
from shared_rewards.geneval.detections import Detection
from shared_rewards.geneval.detector import (
    MAX_PER_IMAGE, boxes_from_masks, coco_names, detections_from_mmdet, instances_from_logits, load_detector)
from shared_rewards.geneval.vocabulary import COCO_CLASSES


def _images(seed: int, shapes) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for shape in shapes]


@pytest.fixture(scope="module")
def random_detector(tiny_models):
    return load_detector(detector=str(tiny_models.path("mask2former_coco")), batch_size=4)


@pytest.fixture(scope="module")
def dog_cat_detector(tiny_models):
    return load_detector(detector=str(tiny_models.path("mask2former_coco_dog_cat")))


def _flat(detections):
    return [(name, d.score, d.box.tolist(), d.mask) for name, ds in sorted(detections.items()) for d in ds]


def _same(a, b, atol=1e-5) -> bool:
    fa, fb = _flat(a), _flat(b)
    return len(fa) == len(fb) and all(
        na == nb and abs(sa - sb) <= atol and ba == bb and np.array_equal(ma, mb)
        for (na, sa, ba, ma), (nb, sb, bb, mb) in zip(fa, fb))


def _close(a, b, atol=1e-5, mask_pixels=1e-3) -> bool:
    """`_same` up to float rounding, for images that went through batches of other sizes or orders (contract §7):
    a random checkpoint has mask logits within 1e-6 of 0 and (query, class) probabilities within 1e-7 of each
    other, so a rounding difference may flip a mask pixel or swap two near-tied detections of one class. Per
    class: as many detections, sorted scores within atol, and every mask matched by one of the other side's
    masks in all but a `mask_pixels` fraction of pixels."""
    if sorted(a) != sorted(b):
        return False
    for name in a:
        da, db = a[name], b[name]
        if len(da) != len(db) or not np.allclose(sorted(d.score for d in da), sorted(d.score for d in db),
                                                 rtol=0, atol=atol):
            return False
        if not all(any(np.mean(x.mask != y.mask) <= mask_pixels for y in db) for x in da):
            return False
    return True


def test_random_checkpoint_detections_are_well_formed_at_image_size(random_detector):
    shapes = [(48, 80), (70, 50), (64, 64)]
    results = random_detector(_images(0, shapes))
    assert len(results) == 3
    for (height, width), detections in zip(shapes, results):
        flat = [d for ds in detections.values() for d in ds]
        # every (query, class) pair up to mmdet's max_per_image, none dropped before GenEval's thresholds
        assert len(flat) == min(MAX_PER_IMAGE, NUM_QUERIES * 80)
        assert set(detections) <= set(COCO_CLASSES)
        for d in flat:
            assert isinstance(d, Detection) and d.color is None
            assert 0.0 <= d.score <= 1.0
            assert d.mask.dtype == bool and d.mask.shape == (height, width)
            assert d.box.shape == (4,) and d.box.dtype == np.float64
            ys, xs = np.nonzero(d.mask)
            if len(xs):  # the box is the mask's extent, end exclusive
                assert d.box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
                assert 0 <= d.box[0] < d.box[2] <= width and 0 <= d.box[1] < d.box[3] <= height
            else:
                assert d.box.tolist() == [0, 0, 0, 0]


def test_detection_is_deterministic_and_independent_of_batch_order_to_float_tolerance(random_detector):
    a, b, c = _images(1, [(64, 64)] * 3)
    first = random_detector([a, b, c])
    again = random_detector([a, b, c])
    reordered = random_detector([c, a, b])
    alone = random_detector([b])
    for x, y in zip(first, again):
        assert _same(x, y, atol=0.0)  # the same batch twice: bit-identical
    # other batch orders and sizes may round differently (contract §7): equal up to float tolerance
    assert _close(first[0], reordered[1]) and _close(first[1], reordered[2]) and _close(first[2], reordered[0])
    assert _close(first[1], alone[0])


def test_dog_cat_checkpoint_gives_its_designed_detections(dog_cat_detector):
    dog, cat = dog_cat_scores()
    (detections,) = dog_cat_detector(_images(2, [(40, 72)]))
    assert [d.score for d in detections["dog"]] == pytest.approx([dog] * NUM_QUERIES, abs=1e-5)
    assert [d.score for d in detections["cat"]] == pytest.approx([cat] * NUM_QUERIES, abs=1e-5)
    for d in detections["dog"] + detections["cat"]:
        assert d.mask.all() and d.box.tolist() == [0, 0, 72, 40]
    others = [d.score for name, ds in detections.items() if name not in ("dog", "cat") for d in ds]
    assert max(others) < 0.01


def test_labels_map_by_index_onto_geneval_names(tiny_models):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_models.path("mask2former_coco"))
    assert config.id2label[64] == "mouse" and config.id2label[65] == "remote" and config.id2label[66] == "keyboard"
    names = coco_names(config.id2label, "tiny")
    assert names[64:67] == ("computer mouse", "tv remote", "computer keyboard")
    assert names == COCO_CLASSES
    differing = {i: (config.id2label[i], names[i]) for i in range(80) if config.id2label[i] != names[i]}
    assert differing == {64: ("mouse", "computer mouse"), 65: ("remote", "tv remote"),
                         66: ("keyboard", "computer keyboard")}


def test_labels_out_of_coco_order_are_refused():
    swapped = dict(enumerate(COCO_INSTANCE_LABELS))
    swapped[15], swapped[16] = swapped[16], swapped[15]
    with pytest.raises(ValueError, match=r"label 15 is 'dog', which is COCO class 16"):
        coco_names(swapped, "x")


def test_checkpoint_with_wrong_number_of_labels_is_refused(tmp_path):
    save_mask2former(tiny_mask2former({i: f"thing{i}" for i in range(10)}), tmp_path)
    with pytest.raises(ValueError, match=r"has 10 labels; GenEval needs a COCO instance model with the 80"):
        load_detector(detector=str(tmp_path))


def test_missing_detector_path_names_the_option(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(RewardWeightsError, match=r"detector='.*nope' does not exist"):
        load_detector(detector=str(missing))


def test_detector_options_are_checked():
    with pytest.raises(ValueError, match=r"backend must be one of \('transformers', 'mmdet'\), got 'yolo'"):
        load_detector(backend="yolo")
    with pytest.raises(ValueError, match=r"detector_input must be one of \('rgb', 'bgr'\), got 'RGB'"):
        load_detector(detector_input="RGB")
    with pytest.raises(ValueError, match=r"detector_input='bgr' only applies to backend='mmdet'"):
        load_detector(detector_input="bgr")
    with pytest.raises(ValueError, match=r"config= and checkpoint= are for backend='mmdet'"):
        load_detector(checkpoint="/x.pth")
    with pytest.raises(ValueError, match=r"batch_size must be an int >= 1, got 0"):
        load_detector(batch_size=0)


def test_mmdet_backend_without_mmdet_fails_in_one_line():
    # mmdet 2.x needs mmcv-full built for an old torch (spec B.10); it is not installed in CI
    try:
        import mmdet  # noqa: F401
        pytest.skip("mmdet is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match=r"backend='mmdet' needs mmdet 2.x and mmcv-full installed") as info:
        load_detector(backend="mmdet", config="c.py", checkpoint="m.pth")
    assert "\n" not in str(info.value)


FAKE_MMDET_APIS = """
import numpy as np

CALLS = []


class Model:
    CLASSES = CLASSES_FROM_CHECKPOINT


def init_detector(config, checkpoint, device):
    CALLS.append(("init", config, checkpoint, device))
    return Model()


def inference_detector(model, images):
    # mmdet 2.x: per image a (bbox_results, segm_results) tuple, one entry per class
    CALLS.append(("infer", [image.copy() for image in images]))
    out = []
    for image in images:
        height, width = image.shape[:2]
        bbox = [np.zeros((0, 5), np.float32) for _ in model.CLASSES]
        segm = [[] for _ in model.CLASSES]
        bbox[16] = np.array([[1, 1, 3, 2, float(image[0, 0, 0]) / 255]], np.float32)
        mask = np.zeros((height, width), bool)
        mask[1, 1:3] = True
        segm[16] = [mask]
        out.append((bbox, segm) if len(out) % 2 == 0 else {"ins_results": (bbox, segm)})
    return out
"""


@pytest.fixture
def fake_mmdet(tmp_path, monkeypatch):
    """An importable stand-in for mmdet 2.x's API (init_detector, inference_detector) recording its calls."""
    package = tmp_path / "fake" / "mmdet"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('__version__ = "2.28.2"\n')
    classes = repr(COCO_INSTANCE_LABELS)
    (package / "apis.py").write_text(FAKE_MMDET_APIS.replace("CLASSES_FROM_CHECKPOINT", classes))
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    for name in ("mmdet", "mmdet.apis"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    (tmp_path / "m2f.py").write_text("model = dict()\n")
    (tmp_path / "m2f.pth").write_bytes(b"weights")
    yield tmp_path
    for name in ("mmdet", "mmdet.apis"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize("detector_input", ["rgb", "bgr"])
def test_mmdet_backend_hands_mmdet_the_configured_channel_order(fake_mmdet, detector_input):
    detector = load_detector(backend="mmdet", config=str(fake_mmdet / "m2f.py"),
                             checkpoint=str(fake_mmdet / "m2f.pth"), detector_input=detector_input, batch_size=2)
    import mmdet.apis

    image = np.zeros((4, 5, 3), np.uint8)
    image[..., 0], image[..., 2] = 200, 50  # red 200, blue 50
    results = detector([image, image, image])
    calls = mmdet.apis.CALLS
    assert calls[0] == ("init", str(fake_mmdet / "m2f.py"), str(fake_mmdet / "m2f.pth"), "cpu")
    assert [len(call[1]) for call in calls[1:]] == [2, 1]  # batch_size 2
    seen = calls[1][1][0]
    assert np.array_equal(seen, image if detector_input == "rgb" else image[..., ::-1])
    # the fake scores its dog by the first channel it received; plain and panoptic-wrapped results alike
    score = (200 if detector_input == "rgb" else 50) / 255
    for detections in results:
        (dog,) = detections["dog"]
        assert dog.score == pytest.approx(score) and dog.box.tolist() == [1, 1, 3, 2] and dog.mask.sum() == 2


def test_mmdet_backend_needs_existing_config_and_checkpoint(fake_mmdet):
    with pytest.raises(RewardWeightsError, match=r"needs config=<existing file>, got None"):
        load_detector(backend="mmdet", checkpoint=str(fake_mmdet / "m2f.pth"))
    with pytest.raises(RewardWeightsError, match=r"needs checkpoint=<existing file>, got '.*missing.pth'"):
        load_detector(backend="mmdet", config=str(fake_mmdet / "m2f.py"), checkpoint=str(fake_mmdet / "missing.pth"))


def test_mmdet_3_is_refused(fake_mmdet):
    (fake_mmdet / "fake" / "mmdet" / "__init__.py").write_text('__version__ = "3.3.0"\n')
    with pytest.raises(ImportError, match=r"needs mmdet 2.x, found mmdet 3.3.0"):
        load_detector(backend="mmdet", config=str(fake_mmdet / "m2f.py"), checkpoint=str(fake_mmdet / "m2f.pth"))


def test_images_must_be_rgb_uint8(random_detector):
    good = _images(3, [(8, 8)])[0]
    with pytest.raises(ValueError, match=r"images\[1\]: expected an RGB uint8 array \[H, W, 3\], got float32"):
        random_detector([good, good.astype(np.float32)])
    with pytest.raises(ValueError, match=r"images\[0\]: .* got uint8 \(8, 8\)"):
        random_detector([good[..., 0]])


def test_boxes_from_masks_use_exclusive_ends_and_zero_for_empty():
    masks = torch.zeros(3, 5, 7, dtype=torch.bool)
    masks[0, 1:3, 2:5] = True  # rows 1..2, columns 2..4
    masks[1, 4, 6] = True  # one pixel in the last row and column
    assert boxes_from_masks(masks).tolist() == [[2, 1, 5, 3], [6, 4, 7, 5], [0, 0, 0, 0]]


def test_instances_follow_mmdet_instance_postprocess_by_hand():
    # 2 queries, 2 classes + no-object; 4x4 mask logits for an 8x8 padded input whose top 4 rows hold the
    # resized image; the original image is 2x4
    class_logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
    mask_logits = torch.full((2, 4, 4), -5.0)
    mask_logits[0, 0, :2] = 4.0  # query 0: top-left of the image
    mask_logits[1, 2:, :] = 3.0  # query 1: only the padding -> nothing left after the crop
    labels, scores, boxes, masks = instances_from_logits(class_logits, mask_logits, (8, 8), (4, 8), (2, 4), 3)
    probs = class_logits.softmax(-1)[:, :-1]
    p00, p11, p01 = probs[0, 0].item(), probs[1, 1].item(), probs[0, 1].item()
    assert p00 > p11 > p01 > probs[1, 0].item()
    # top 3 (query, class) pairs by class probability: (0, 0), (1, 1), (0, 1)
    assert labels.tolist() == [0, 1, 1]
    # mmdet: upsample to the padded input, crop the resized image, resize to the original, threshold at 0
    up = F.interpolate(mask_logits[None], size=(8, 8), mode="bilinear", align_corners=False)[0]
    up = F.interpolate(up[None, :, :4, :8], size=(2, 4), mode="bilinear", align_corners=False)[0]
    expected = up[0] > 0
    assert expected.any() and not expected.all()
    assert masks[0].tolist() == expected.tolist() == masks[2].tolist() and not masks[1].any()
    mean_sigmoid = up[0].sigmoid()[expected].mean().item()
    assert scores.tolist() == pytest.approx([p00 * mean_sigmoid, 0.0, p01 * mean_sigmoid], rel=1e-5)
    ys, xs = np.nonzero(expected.numpy())
    box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert boxes.tolist() == [box, [0, 0, 0, 0], box]


def test_detections_from_mmdet_hand_made_result():
    names = ("cat", "dog", "bird")
    bbox = [np.array([[1, 2, 5, 6, 0.9], [0, 0, 3, 3, 0.2]], dtype=np.float32), np.zeros((0, 5), np.float32),
            np.array([[4, 4, 8, 8, 0.5]], dtype=np.float32)]
    mask_a, mask_b, mask_c = (np.zeros((10, 12), bool) for _ in range(3))
    mask_a[2:6, 1:5] = True
    mask_c[4:8, 4:8] = True
    segm = [[mask_a, mask_b], [], [mask_c.astype(np.uint8)]]
    detections = detections_from_mmdet(bbox, segm, names)
    assert sorted(detections) == ["bird", "cat"]
    cat = detections["cat"]
    assert [d.score for d in cat] == pytest.approx([0.9, 0.2])
    assert cat[0].box.tolist() == [1, 2, 5, 6] and cat[1].box.tolist() == [0, 0, 3, 3]
    assert np.array_equal(cat[0].mask, mask_a) and cat[0].mask.dtype == bool
    assert detections["bird"][0].mask.dtype == bool and detections["bird"][0].mask.sum() == 16
    boxes_only = detections_from_mmdet(bbox, None, names)
    assert all(d.mask is None for ds in boxes_only.values() for d in ds)
    with pytest.raises(ValueError, match=r"class 'cat': 2 boxes but 1 masks"):
        detections_from_mmdet(bbox, [[mask_a], [], [mask_c]], names)
    with pytest.raises(ValueError, match=r"mmdet result has 3 classes, expected 2"):
        detections_from_mmdet(bbox, segm, names[:2])


def test_dog_cat_scores_formula():
    dog, cat = dog_cat_scores()
    assert dog == pytest.approx(math.exp(8) / (math.exp(8) + math.exp(7.5) + 79) / (1 + math.exp(-10)))
    assert 0.9 > dog > 0.3 and 0.3 < cat < dog


def test_detector_size_resizes_as_mmdet_test_pipeline(tiny_models):
    # shorter side to N, longer side at most N * 1333 / 800; transformers' processor then stretches each side
    # up to a multiple of 32 where mmdet pads (96x144 -> 96x160), so the pixel mask is the whole input
    detector = load_detector(detector=str(tiny_models.path("mask2former_coco")), detector_size=96)
    seen = []
    hook = detector.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((tuple(kwargs["pixel_values"].shape[-2:]),
                                                  kwargs["pixel_mask"][0].sum().item())), with_kwargs=True)
    try:
        (wide,) = detector(_images(5, [(40, 60)]))
        detector(_images(5, [(40, 100)]))
    finally:
        hook.remove()
    assert seen == [((96, 160), 96 * 160), ((64, 160), 64 * 160)]
    assert all(d.mask.shape == (40, 60) for ds in wide.values() for d in ds)
    with pytest.raises(ValueError, match=r"detector_size must be None or an int >= 32, got 8"):
        load_detector(detector_size=8)
