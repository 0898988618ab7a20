"""Finding weights: local file, local directory, hub id, and the one-line errors when none works."""
import pytest
import torch.nn as nn

from shared_rewards.weights import RewardWeightsError, load_pretrained, looks_like_path, resolve_file


def test_a_local_file_or_a_directory_holding_the_file_resolves(tmp_path):
    f = tmp_path / "HPS_v2.1_compressed.pt"
    f.write_bytes(b"x")
    assert resolve_file("hpsv2", f, "ignored.pt") == f
    assert resolve_file("hpsv2", tmp_path, "HPS_v2.1_compressed.pt") == f


def test_a_directory_without_the_file_names_both(tmp_path):
    with pytest.raises(RewardWeightsError, match=r"hpsv2: weights='.*' is a directory without 'HPS_v2.pt'"):
        resolve_file("hpsv2", tmp_path, "HPS_v2.pt")


def test_a_missing_local_path_fails_at_once_without_asking_the_hub(tmp_path):
    with pytest.raises(RewardWeightsError, match=r"aesthetic: clip='.*nope' does not exist") as err:
        resolve_file("aesthetic", tmp_path / "nope", "model.pth", option="clip")
    assert "\n" not in str(err.value)


def test_an_unreachable_hub_id_names_the_option_and_both_sources(monkeypatch):
    # HF_HUB_OFFLINE is set by the test runner; the message must still say what to do.
    with pytest.raises(RewardWeightsError) as err:
        resolve_file("hpsv2", "xswu/HPSv2", "HPS_v2.1_compressed.pt")
    message = str(err.value)
    assert "\n" not in message
    assert "weights='xswu/HPSv2'" in message and "local path" in message and "hub" in message


def test_load_pretrained_reports_a_broken_local_directory(tmp_path):
    def loader(path):
        raise OSError(f"no config.json in {path}")

    with pytest.raises(RewardWeightsError, match=r"pickscore: weights='.*' does not load \(OSError: no config.json"):
        load_pretrained("pickscore", loader, tmp_path)
    assert isinstance(load_pretrained("pickscore", lambda p: nn.Identity(), tmp_path), nn.Identity)


def test_hub_ids_and_paths_are_told_apart():
    assert not looks_like_path("xswu/HPSv2") and not looks_like_path("bert-base-uncased")
    assert looks_like_path("/abs/dir") and looks_like_path("./rel") and looks_like_path("a/b/c")
    assert looks_like_path("model.pth")
