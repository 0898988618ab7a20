"""The OCR reward rule on hand-worked cases, and the reward end to end with recognizers defined here."""
import sys
import types

import numpy as np
import pytest
import torch

from shared_rewards import RewardInputError, load_reward
from shared_rewards.ocr import ocr_reward_from_text, target_text

SIGN = 'a shop sign that says "Hello World" in neon'


@pytest.mark.parametrize("lines, prompt, expected", [
    (["Hello World"], SIGN, 1.0),                              # exact
    (["xx HELLO WORLD yy"], SIGN, 1.0),                        # target inside more text: distance 0
    (["HEL", "lo wor", "LD"], SIGN, 1.0),                      # lines joined, spaces and case dropped
    (["hallo"], 'says "hello"', 1 - 1 / 5),                    # one substitution
    (["helo"], 'says "hello"', 1 - 1 / 5),                     # one deletion
    (["hallo!"], 'says "hello"', 1 - 2 / 5),                   # distance to the WHOLE recognised text
    (["a very long unrelated sentence"], 'says "cat"', 0.0),   # distance capped at len("cat")
    ([], SIGN, 0.0),                                           # nothing read
    ([""], 'says "Go"', 0.0),
    (["CAFE NOIR"], 'a sign "Café Noir"', 1 - 1 / 8),          # unicode: é != e, len("cafénoir") = 8
    (["ÉCOLE"], 'a sign "école"', 1.0),                        # unicode lower-casing
    (["cat"], 'a "cat" and a "dog"', 1.0),                     # the first quoted text is the target
    (["open end"], 'says "open end', 1.0),                     # unclosed quote runs to the end (upstream)
])
def test_ocr_rule_on_hand_worked_cases(lines, prompt, expected):
    assert ocr_reward_from_text(lines, prompt) == pytest.approx(expected)


def test_target_is_the_first_quoted_text():
    assert target_text(SIGN) == "Hello World"
    assert target_text("no quotes here") is None


@pytest.mark.parametrize("prompt", ["a sign without quotes", 'an empty "" sign', 'only spaces "  "'])
def test_a_prompt_without_quoted_text_is_an_error_naming_it(prompt):
    with pytest.raises(ValueError, match="no non-empty text in double quotes"):
        ocr_reward_from_text(["anything"], prompt)


# --- the reward end to end -----------------------------------------------------------------------------

TEXT_BY_LEVEL = {0: ["HELLO", "WORLD"], 100: ["hallo world"], 200: ["nothing useful here"]}


def level_images(levels, size=16):
    """Image i is flat grey at levels[i]/255 in R; G and B are fixed so channel order is checkable."""
    x = torch.zeros(len(levels), 3, size, size + 4)
    for i, level in enumerate(levels):
        x[i, 0] = level / 255
    x[:, 1], x[:, 2] = 10 / 255, 20 / 255
    return x


class LevelRecognizer:
    """Reads the 'text' off the red level; raises on level 250 as a broken OCR call would."""

    def __init__(self):
        self.calls = []

    def __call__(self, images):
        self.calls.append(len(images))
        out = []
        for image in images:
            assert image.dtype == np.uint8 and image.shape == (16, 20, 3)
            assert image[0, 0, 1] == 10 and image[0, 0, 2] == 20  # RGB, HWC
            if image[0, 0, 0] == 250:
                raise RuntimeError("detector crashed")
            out.append(TEXT_BY_LEVEL[int(image[0, 0, 0])])
        return out


def test_reward_scores_each_image_with_the_rule():
    recognizer = LevelRecognizer()
    reward = load_reward("ocr", recognizer=recognizer)
    assert not reward.differentiable and reward.needs_prompts
    x = level_images([0, 100, 200]).requires_grad_(True)
    scores, extras = reward(x, [SIGN] * 3)
    expected = [ocr_reward_from_text(TEXT_BY_LEVEL[v], SIGN) for v in (0, 100, 200)]
    assert expected == [1.0, 0.9, pytest.approx(0.0)]
    torch.testing.assert_close(scores, torch.tensor(expected))
    assert scores.dtype == torch.float32 and not scores.requires_grad
    assert extras["ocr_text"] == ["HELLOWORLD", "hallo world", "nothing useful here"]
    assert extras["ocr_failed"].tolist() == [0, 0, 0] and recognizer.calls == [3]  # one batched call


def test_an_ocr_failure_scores_zero_for_that_image_only_and_is_counted():
    recognizer = LevelRecognizer()
    scores, extras = load_reward("ocr", recognizer=recognizer)(level_images([0, 250, 100]), [SIGN] * 3)
    assert scores.tolist() == pytest.approx([1.0, 0.0, 0.9])
    assert extras["ocr_failed"].tolist() == [0, 1, 0]
    assert recognizer.calls == [3, 1, 1, 1]  # the failing batch is retried image by image


def test_a_prompt_without_quotes_names_its_index_before_any_ocr():
    recognizer = LevelRecognizer()
    with pytest.raises(RewardInputError, match=r"ocr: prompt 1 has no non-empty text in double quotes.*'plain'"):
        load_reward("ocr", recognizer=recognizer)(level_images([0, 0]), [SIGN, "plain"])
    assert recognizer.calls == []


def test_a_recognizer_returning_the_wrong_count_is_a_bug_not_a_zero():
    with pytest.raises(RuntimeError, match="returned 1 results for 2 images"):
        load_reward("ocr", recognizer=lambda images: [["x"]])(level_images([0, 0]), [SIGN] * 2)


def test_missing_paddleocr_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "paddleocr", None)  # makes `import paddleocr` fail
    with pytest.raises(ImportError, match=r'pip install "shared_rewards\[ocr\]"') as err:
        load_reward("ocr")
    assert "\n" not in str(err.value)


def fake_paddleocr(version):
    module = types.ModuleType("paddleocr")
    module.__version__ = version
    results = {0: [[[[0, 0]] * 4, ("HELLO", 0.9)], [[[0, 0]] * 4, ("ghost", 0.0)], [[[0, 0]] * 4, ("World", 0.5)]]}

    class PaddleOCR:
        def __init__(self, **kwargs):
            module.kwargs = kwargs

        def ocr(self, image, cls=True):
            assert cls is False
            return [results.get(int(image[0, 0, 0]))]  # None when nothing is detected, as 2.9 returns

    module.PaddleOCR = PaddleOCR
    return module


def test_paddleocr_backend_is_configured_as_upstream_and_drops_zero_confidence_lines(monkeypatch):
    module = fake_paddleocr("2.9.1")
    monkeypatch.setitem(sys.modules, "paddleocr", module)
    scores, extras = load_reward("ocr")(level_images([0, 100]), [SIGN] * 2)
    assert module.kwargs == {"use_angle_cls": False, "lang": "en", "use_gpu": False, "show_log": False}
    assert extras["ocr_text"] == ["HELLOWorld", ""]
    assert scores.tolist() == [1.0, 0.0]


def test_paddleocr_3_is_refused_with_the_pin(monkeypatch):
    monkeypatch.setitem(sys.modules, "paddleocr", fake_paddleocr("3.0.1"))
    with pytest.raises(ImportError, match="needs paddleocr 2.9.x"):
        load_reward("ocr")


def test_bad_options_raise_one_clear_error():
    with pytest.raises(ValueError, match=r"engine must be one of \('paddleocr',\)"):
        load_reward("ocr", engine="tesseract", recognizer=lambda images: [])
    with pytest.raises(ValueError, match="recognizer must (be a callable|look like .package.module:function.)"):
        load_reward("ocr", recognizer="easyocr")


def test_a_recognizer_can_be_named_by_its_import_path_as_a_config_file_holds_it():
    """reward_options.ocr.recognizer in a config is a string; the kit's stand-in reads 4 letters per image."""
    from shared_rewards import load_reward

    reward = load_reward("ocr", recognizer="rsm_testkit.ocr_standin:recognize")
    images = torch.stack([torch.full((3, 16, 16), 0.02), torch.full((3, 16, 16), 0.99)])  # "aaaa", "zzzz"
    out = reward(images, ['a sign that says "aaaa"', 'a sign that says "aaaa"'])
    assert out.extras["ocr_text"] == ["aaaa", "zzzz"] and out.scores.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="recognizer 'no.such:thing' cannot be imported"):
        load_reward("ocr", recognizer="no.such:thing")
