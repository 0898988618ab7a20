"""The benchmark's plumbing: a one-epoch run of the baseline through its entry script prints a table row with the
epoch split read from the trainer's own metrics; the full-size builder describes SD1.5's real architecture."""
import subprocess
import sys

from conftest import COMPONENT, subprocess_env


def test_tiny_bench_prints_the_epoch_split_table():
    done = subprocess.run([sys.executable, "bench/bench_epoch.py", "--tiny", "--epochs", "1", "--only", "grpo"],
                          cwd=COMPONENT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[1].startswith("| run | epochs | epoch s | sampling s | reward-wait s | training s | eval s | peak MiB")
    cells = [c.strip() for c in lines[3].strip("|").split("|")]
    assert cells[:2] == ["grpo", "1 (warm-up)"] and float(cells[2]) > 0 and cells[-2:] == ["4", "2"]


def test_full_size_builder_has_sd15s_shapes():
    sys.path.insert(0, str(COMPONENT / "bench"))
    from full_size_sd15 import SD15_TEXT, SD15_UNET, SD15_VAE

    assert SD15_UNET["block_out_channels"] == (320, 640, 1280, 1280) and SD15_UNET["cross_attention_dim"] == 768
    assert SD15_UNET["sample_size"] * 2 ** (len(SD15_VAE["block_out_channels"]) - 1) == 512
    assert (SD15_TEXT["hidden_size"], SD15_TEXT["num_hidden_layers"]) == (768, 12)
