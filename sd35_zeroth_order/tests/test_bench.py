"""The epoch benchmark (bench/bench_epoch.py) and its full-size builders, on the CPU.

The bench is run as a user runs it, on the paper combination with a one-prompt epoch (the smallest epoch the
branch budget allows on one process, to keep the run short); its table must carry every column with a
finite number. The full-size builders are checked on a scaled-down variant of the same configs: the full
model (2.2 B parameters) is GPU work.
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

COMPONENT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(COMPONENT / "bench"))

PAPER = "--profile lowsnr2 --sampler branch --reward jpeg_compressibility --loss matching --reweight fairclip2"


def _table_rows(stdout):
    """Markdown table lines of the bench output -> (header cells, body rows as lists of cells)."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return cells[0], cells[2:]


def test_bench_tiny_one_epoch_prints_every_column_with_finite_numbers(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, "bench/bench_epoch.py", "--tiny", "--epochs", "1", "--combo", PAPER,
               "--cache-dir", str(tmp_path / "cache"), "--work-dir", str(tmp_path / "runs"),
               "--json", str(tmp_path / "rows.json"), "--", "--config.sample.num_prompt_per_epoch=1"]
    done = subprocess.run(command, cwd=COMPONENT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    header, body = _table_rows(done.stdout)
    assert header == ["combination", "epochs", "epoch s", "sampling s", "reward-wait s", "training s", "eval s",
                      "peak memory MiB", "rows/epoch", "optimizer steps"]
    assert len(body) == 1 and len(body[0]) == len(header)
    row = dict(zip(header, body[0]))
    assert row["combination"] == "sd3.lowsnr2.branch.jpeg_compressibility.matching.fairclip2"
    assert row["epochs"] == "1 (warm-up)"
    numbers = {k: float(row[k]) for k in ("epoch s", "sampling s", "reward-wait s", "training s", "eval s",
                                           "rows/epoch", "optimizer steps")}
    peak, kind = row["peak memory MiB"].split()
    numbers["peak memory MiB"] = float(peak)
    assert kind == "(cpu_max_rss)"
    assert all(math.isfinite(v) and v >= 0 for v in numbers.values()), numbers
    assert numbers["epoch s"] > 0 and numbers["peak memory MiB"] > 0
    # the parts never exceed the whole (all three are measured inside time_per_epoch)
    assert numbers["sampling s"] + numbers["reward-wait s"] + numbers["training s"] <= numbers["epoch s"] + 1e-6
    # 1 prompt x 2 images x (6 + 6 + 8 + 10) branch rows; 2 optimizer steps per epoch (config)
    assert numbers["rows/epoch"] == 60 and numbers["optimizer steps"] == 2
    assert (tmp_path / "rows.json").is_file()


def test_full_size_without_cuda_fails_with_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: --full-size would run")
    done = subprocess.run([sys.executable, "bench/bench_epoch.py", "--full-size"], cwd=COMPONENT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "--full-size needs a CUDA GPU" in done.stderr


def test_full_size_configs_are_consistent_with_sd35_medium():
    from full_size_sd35 import SD3_VAE, SD35_MEDIUM_TRANSFORMER as T

    assert T["num_attention_heads"] * T["attention_head_dim"] == T["caption_projection_dim"] == 1536
    assert max(T["dual_attention_layers"]) < T["num_layers"] and len(T["dual_attention_layers"]) == 13
    assert T["in_channels"] == T["out_channels"] == SD3_VAE["latent_channels"] == 16
    assert 2 ** (len(SD3_VAE["block_out_channels"]) - 1) == 8  # the trainer's VAE factor (sampling.SD35_VAE_FACTOR)


def test_builders_write_a_model_and_embeddings_the_trainer_loads(tmp_path):
    """A scaled-down variant of the full-size configs through the same writers and the trainer's loaders."""
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from full_size_sd35 import SD3_VAE, SD35_MEDIUM_TRANSFORMER, write_random_sd3
    from random_embeddings import write_random_split_files

    from sd35zo.embeddings import T5_MAX_LENGTH, PrecomputedEmbeddingDataset, read_negative

    small_transformer = {**SD35_MEDIUM_TRANSFORMER, "num_layers": 2, "num_attention_heads": 2,
                         "attention_head_dim": 8, "caption_projection_dim": 16, "joint_attention_dim": 32,
                         "pooled_projection_dim": 24, "pos_embed_max_size": 16, "dual_attention_layers": (0,)}
    small_vae = {**SD3_VAE, "block_out_channels": (8, 8, 8, 8), "layers_per_block": 1, "norm_num_groups": 4}
    model = write_random_sd3(tmp_path / "model", small_transformer, small_vae)
    transformer = SD3Transformer2DModel.from_pretrained(model, subfolder="transformer")
    assert transformer.config.qk_norm == "rms_norm" and list(transformer.config.dual_attention_layers) == [0]
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    assert (vae.config.scaling_factor, vae.config.shift_factor, vae.config.use_quant_conv) == (1.5305, 0.0609, False)
    assert write_random_sd3(model, small_transformer, small_vae) == model  # reused, not rebuilt
    with pytest.raises(ValueError, match="other configs"):
        write_random_sd3(model, {**small_transformer, "num_layers": 3}, small_vae)

    paths = write_random_split_files(tmp_path / "data", model, {"train": 3, "test": 2}, dtype=torch.float16)
    train = PrecomputedEmbeddingDataset(paths["train_hdf5_path"], paths["train_prompt_file_path"])
    item = train[2]
    assert item["prompt_embeds"].shape == (77 + T5_MAX_LENGTH, 32) and item["prompt_embeds"].dtype == torch.float16
    assert item["pooled_prompt_embeds"].shape == (24,)
    embeds, pooled = read_negative(paths["test_hdf5_path"], 1)
    assert embeds.shape == (1, 77 + T5_MAX_LENGTH, 32) and pooled.shape == (1, 24)
    # the transformer accepts them: one velocity of a 64 px latent
    with torch.no_grad():
        out = transformer(hidden_states=torch.randn(1, 16, 8, 8), encoder_hidden_states=embeds.float(),
                          pooled_projections=pooled.float(), timestep=torch.tensor([500.0])).sample
    assert out.shape == (1, 16, 8, 8) and torch.isfinite(out).all()


def test_reward_path_bench_compares_both_paths_on_equal_scores():
    """The reward-path bench runs both paths on the tiny kit, checks their scores are equal and shows that
    a two-part mix converts each batch once instead of once per part."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "bench/bench_reward_path.py", "--tiny", "--rollouts", "2", "--images", "3",
                           "--size", "64", "--sample-seconds", "0", "--repeats", "1"], cwd=COMPONENT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| ") and "path" not in line]
    assert [r[0].strip() for r in rows] == ["one-thread", "shared (4 threads)"]
    assert [int(r[3]) for r in rows] == [4, 2]  # 2 rollouts x 2 parts, then 2 rollouts x 1
