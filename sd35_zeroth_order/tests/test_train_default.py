"""The default (Flow-GRPO) trainer: scripts/train_sd3.py + sd35zo/trainer_default.py, CPU, fp32, tiny kit.

The baseline command (`run_sd3.sh --sampler default --loss ppo --reweight base`) and its RSM counterpart
(`--loss matching`) train, evaluate and checkpoint; a resumed run repeats the uninterrupted one; sample
selection follows spec §4.7 with the zero-advantage fixes documented in trainer_default.py.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

COMPONENT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
ACCELERATE = str(Path(PYTHON).parent / "accelerate")


def _launch(loss, reweight, extra, timeout=300, num_processes=1):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=PYTHON, ACCELERATE=ACCELERATE, WANDB_MODE="disabled")
    env["PYTHONPATH"] = str(COMPONENT) + os.pathsep + env.get("PYTHONPATH", "")
    command = ["bash", "scripts/single_node/run_sd3.sh", "--sampler", "default", "--reward", "jpeg_compressibility",
               "--loss", loss, "--reweight", reweight, "--tiny", "--num-processes", str(num_processes),
               "--main-process-port", str(29830 + num_processes), "--", *extra]
    done = subprocess.run(command, cwd=COMPONENT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory):
    """Flow-GRPO's command on the tiny kit (its own prompts), 2 epochs, with the KL term on so the reference
    pass runs."""
    save = tmp_path_factory.mktemp("runs")
    _launch("ppo", "base", [f"--config.save_dir={save}", "--config.run_name=full", "--config.train.beta=0.01"])
    return save / "full"


def test_baseline_command_trains_evaluates_and_checkpoints_each_epoch(baseline_run):
    rows = _metrics(baseline_run)
    updates = [r for r in rows if r["kind"] == "step"]
    # tiny budget: 4 rollouts of 1 image per epoch, 9 trained steps -> 36 passes, 18 per optimizer step
    assert [r["step"] for r in updates] == [1, 2, 3, 4]
    assert [r["epoch"] for r in updates] == [0, 0, 1, 1]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["kl_loss"]])).all() for r in updates)
    assert not any(k.startswith("clipfrac_timestep_") for r in updates for k in r)  # a branch-trainer metric
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert [r["group_size"] for r in epochs] == [2.0, 2.0]  # 2 images per prompt
    assert [(r["epoch"], r["optimizer_updates_this_epoch"], r["skipped_update"]) for r in epochs] == [(1, 2, 0), (2, 2, 0)]
    assert all(r["sample_time_per_epoch"] > 0 and r["train_time_per_epoch"] > 0 and r["peak_memory_mib"] > 0
               for r in epochs)
    assert [r["samples"] for r in epochs] == [4, 8]  # one image per trajectory, 4 an epoch
    assert [r["eval_epoch"] for r in epochs] == [1, 2]  # the last epoch is evaluated too
    for n in (1, 2):
        assert (baseline_run / "checkpoints" / f"checkpoint-{n}" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (baseline_run / "images" / "epoch_0.jpg").is_file()  # training images of epoch 0


def test_resume_from_checkpoint_reproduces_uninterrupted_epoch(baseline_run):
    save = baseline_run.parent
    _launch("ppo", "base", [f"--config.save_dir={save}", "--config.run_name=resumed", "--config.train.beta=0.01",
                            f"--config.resume_from={baseline_run / 'checkpoints' / 'checkpoint-1'}"])

    def unmeasured(rows):
        return [{k: v for k, v in r.items() if "time" not in k and "peak_memory" not in k
                 and k not in ("checkpoint_path", "elapsed_s")} for r in rows]

    assert unmeasured(_metrics(save / "resumed")) == unmeasured(_metrics(baseline_run))
    from safetensors.torch import load_file

    a = load_file(str(save / "resumed" / "checkpoints" / "checkpoint-2" / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(baseline_run / "checkpoints" / "checkpoint-2" / "lora" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _trainer(script, config_id, *overrides):
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    env["PYTHONPATH"] = str(COMPONENT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([PYTHON, script, "--config", f"config/sd3_matrix.py:tiny:{config_id}", *overrides],
                          cwd=COMPONENT, env=env, capture_output=True, text=True, timeout=120)


def test_a_default_trainer_checkpoint_is_refused_by_the_branch_trainer_in_one_line(baseline_run):
    """It used to fail with KeyError: 'counter' after loading every model."""
    checkpoint = baseline_run / "checkpoints" / "checkpoint-1"
    done = _trainer("scripts/train_sd3_pr.py", "sd3.base.branch.jpeg_compressibility.ppo.base",
                    f"--config.resume_from={checkpoint}", "--config.run_name=other")
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1] == (
        f"error: resume_from='{checkpoint}': written by the scripts/train_sd3.py trainer (sampling_mode='default'); "
        "this config runs sampling_mode='sde_branching'")


def test_a_checkpoint_of_another_config_is_refused_naming_the_changed_keys(baseline_run):
    checkpoint = baseline_run / "checkpoints" / "checkpoint-1"
    done = _trainer("scripts/train_sd3.py", "sd3.base.default.jpeg_compressibility.matching.base",
                    f"--config.resume_from={checkpoint}", "--config.train.beta=0.01")
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and "the checkpoint was trained with another config" in last
    assert "train.loss_type: 'ppo' -> 'matching'" in last and "resume_ignore_config_changes=True" in last


def test_matching_loss_with_guard_reweight_trains_one_epoch(tiny_prompt_embeddings, tmp_path):
    """RSM's loss on full trajectories (stores ε and v_old) with GRPO-Guard's scale: one epoch end to end."""
    _launch("matching", "guard", [*tiny_prompt_embeddings, f"--config.save_dir={tmp_path}", "--config.run_name=m",
                                  "--config.num_epochs=1"])
    updates = [r for r in _metrics(tmp_path / "m") if "policy_loss" in r]
    assert [r["step"] for r in updates] == [1, 2]
    # on-policy at the first pass: v = v_old, so the matching term and approx_kl start at exactly 0
    assert updates[0]["approx_kl"] == pytest.approx(0.0, abs=1e-12)


def test_the_branch_trainer_refuses_a_default_sampler_config(tmp_path):
    done = _trainer("scripts/train_sd3_pr.py", "sd3.base.default.jpeg_compressibility.ppo.base",
                    f"--config.save_dir={tmp_path}")
    assert done.returncode == 1
    assert done.stderr.strip() == ("error: sample.sampling_mode='default' belongs to scripts/train_sd3.py, not "
                                   "scripts/train_sd3_pr.py")
    assert not any(tmp_path.iterdir())  # a failed start leaves no run folder


# ------------------------------------------------------------------------------------------------ units

def test_select_training_samples_keeps_nonzero_and_tops_up_to_whole_batches():
    from sd35zo.trainer_default import select_training_samples

    adv = torch.tensor([0.0, 1.0, 0.0, -2.0, 0.5, 0.0, 0.0, 0.0])  # 3 nonzero, 4 batches -> 1 zero sample added
    chosen = select_training_samples(adv, 4, True, torch.Generator().manual_seed(0))
    assert chosen.numel() == 4 and {1, 3, 4} <= set(chosen.tolist())
    assert torch.equal(chosen, chosen.sort().values)
    assert adv[chosen].ne(0).sum() == 3
    full = torch.ones(8)
    assert torch.equal(select_training_samples(full, 4, True, torch.Generator()), torch.arange(8))


def test_select_training_samples_when_advantages_vanish():
    from sd35zo.trainer_default import select_training_samples

    zeros = torch.zeros(6)
    assert select_training_samples(zeros, 2, False, torch.Generator()) is None  # nothing anywhere: skip the update
    # only this rank has none: train on every sample so all ranks take the same optimizer steps
    assert torch.equal(select_training_samples(zeros, 2, True, torch.Generator()), torch.arange(6))


def test_build_rows_lays_out_transition_j_of_sample_s_at_row_s_T_plus_j():
    from sd35zo.trainer_default import build_rows

    def rollout(offset, batch):
        latents = torch.arange(batch * 3, dtype=torch.float32).reshape(batch, 3, 1, 1, 1) + offset
        return ({"latents": latents, "log_probs": latents.reshape(batch, 3), "timesteps": torch.ones(batch, 3)},
                torch.full((batch, 2, 4), float(offset)), torch.full((batch, 5), float(offset)))

    table, prompts = build_rows({"rollouts": [rollout(0, 2), rollout(100, 2)]})
    assert table["latents"].shape == (12, 1, 1, 1)
    assert table["sample"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    s, j = 2, 1  # sample 2 = first sample of the second rollout
    assert table["latents"][s * 3 + j].item() == 100 + j
    assert prompts["prompt_embeds"].shape == (4, 2, 4) and prompts["pooled"][2, 0].item() == 100


def test_two_process_run_splits_the_epoch_and_keeps_replicas_identical(tiny_prompt_embeddings, tmp_path):
    """`run_sd3.sh --tiny --num-processes 2` (torchrun, gloo): each process samples half the epoch's
    trajectories, advantages are grouped over both, and both take the same 2 optimizer steps (the checkpoint
    saver refuses replicas whose LoRA weights differ)."""
    _launch("ppo", "base", [*tiny_prompt_embeddings, f"--config.save_dir={tmp_path}", "--config.run_name=ddp", "--config.num_epochs=1"],
            num_processes=2)
    rows = _metrics(tmp_path / "ddp")
    assert [r["step"] for r in rows if "policy_loss" in r] == [1, 2]
    # 4 trajectories of 2 prompts over 2 processes: the groups (2 images per prompt) span both processes
    assert [r["group_size"] for r in rows if "group_size" in r] == [2.0]
    assert [r["actual_batch_size"] for r in rows if "actual_batch_size" in r] == [1]  # 2 rollouts -> 2 batches of 1
    assert (tmp_path / "ddp" / "checkpoints" / "checkpoint-1" / "lora" / "pytorch_lora_weights.safetensors").is_file()
