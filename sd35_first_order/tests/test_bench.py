"""The benchmark's plumbing: the full-size builder writes a pipeline the trainer's loaders read, with the real
embedding widths (shrunk transformer here: the real one is for a GPU), and the table's epoch split."""
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))


def test_the_full_size_builder_writes_a_loadable_pipeline_with_sd35_widths(tmp_path, one_cpu_thread):
    from diffusers import AutoencoderTiny, StableDiffusion3Pipeline
    from full_size import SD35_MEDIUM_TRANSFORMER, TAESD3, write_pipeline

    assert SD35_MEDIUM_TRANSFORMER["num_layers"] == 24 and len(SD35_MEDIUM_TRANSFORMER["dual_attention_layers"]) == 13
    shrunk = dict(SD35_MEDIUM_TRANSFORMER, num_layers=1, num_attention_heads=2, attention_head_dim=8,
                  caption_projection_dim=16, dual_attention_layers=(0,), sample_size=8, pos_embed_max_size=16)
    write_pipeline(tmp_path, transformer_config=shrunk, hps_arch=None)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tmp_path / "pipeline"))
    text, _, pooled, _ = pipe.encode_prompt(prompt=["a cat"], prompt_2=None, prompt_3=None, device="cpu",
                                            do_classifier_free_guidance=True, max_sequence_length=256)
    assert text.shape[-1] == 4096 and pooled.shape[-1] == 2048 and text.shape[1] == 77 + 256
    vae = AutoencoderTiny.from_pretrained(str(tmp_path / "taesd3"))
    assert vae.config.latent_channels == 16 and vae.config.scaling_factor == TAESD3["scaling_factor"]
    with torch.no_grad():
        assert vae.decode(torch.zeros(1, 16, 4, 4)).sample.shape == (1, 3, 32, 32)  # 8x


def test_the_table_reports_warm_up_then_the_mean_of_later_epochs():
    from bench_epoch import summarise

    epochs = [{"time_per_epoch": t, "sample_time_per_epoch": 1.0, "reward_grad_time_per_epoch": r,
               "train_time_per_epoch": 2.0, "peak_memory_mib": m, "peak_memory_kind": "cuda_allocated",
               "reward_grad_calls_sampling": 1, "reward_grad_calls_training": 0, "optimizer_updates_this_epoch": 1}
              for t, r, m in ((5.0, 0.5, 100), (4.0, 0.4, 120), (3.0, 0.2, 110))]
    rows = summarise({"name": "ours", "epochs": epochs})
    assert rows[0][:3] == ["ours", "1 (warm-up)", "5.00"]
    assert rows[1][:5] == ["ours", "2-3 (mean)", "3.50", "1.00", "0.30"] and rows[1][7] == "120 (cuda_allocated)"
    assert rows[1][8] == "1 / 0"
