"""End-to-end tiny runs of the paper commands (`simple_res-nabladb.py --config config/<paper>.yaml --tiny`), CPU, fp32.

Both commands train, log, evaluate and checkpoint in a form diffusers loads; a resumed run reproduces the
uninterrupted one exactly (forked into a new folder, or killed and resumed in its own folder); two gloo
processes under torchrun average their gradients and stay identical (contract §1, §3-§5; spec §11 item 16).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

COMPONENT = Path(__file__).resolve().parents[1]
PRUNED, OURS = "config/simple_res-nabladb_sd_hps.yaml", "config/simple_res-nabladb_sd_hps_usez0_basesnr.yaml"
CONTRACT_EPOCH_KEYS = {"epoch", "global_step", "samples", "reward_mean", "reward_std", "loss", "time_per_epoch",
                       "elapsed_s", "peak_memory_mib"}


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", HF_HUB_OFFLINE="1")


def train(config, *extra, timeout=400, check=True, launcher=None):
    command = (launcher or [sys.executable]) + ["simple_res-nabladb.py", "--config", config, "--tiny", *extra]
    done = subprocess.run(command, cwd=COMPONENT, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def strict_records(path):
    def refuse(constant):
        raise AssertionError(f"{path}: non-standard JSON constant {constant}")

    return [json.loads(line, parse_constant=refuse) for line in Path(path).read_text().splitlines()]


def unmeasured(rows):
    """Records without what differs between any two runs: wall-clock times, memory, paths."""
    def measured(key):
        return "time" in key or "peak_memory" in key or key in ("checkpoint_path", "elapsed_s")

    return [{k: v for k, v in r.items() if not measured(k)} for r in rows]


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """The uninterrupted 2-epoch "ours" paper command on the tiny kit, as a user types it on a fresh clone."""
    out = tmp_path_factory.mktemp("runs")
    done = train(OURS, "--output-dir", str(out), "--run-name", "full")
    return out / "full", done.stdout + done.stderr


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs_pruned")
    done = train(PRUNED, "--output-dir", str(out), "--run-name", "pruned")
    return out / "pruned", done.stdout + done.stderr


@pytest.mark.parametrize("which", ["ours", "pruned"])
def test_paper_command_on_the_tiny_kit_trains_two_epochs_of_two_optimizer_steps(request, which):
    run_dir, _ = request.getfixturevalue(which)
    rows = strict_records(run_dir / "metrics.jsonl")
    steps = [r for r in rows if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and [r["epoch"] for r in steps] == [1, 1, 2, 2]
    assert all(r["loss"] is not None and r["grad_norm"] is not None for r in steps)
    # on-policy: the first step of each epoch sees ε_θ = ε_old (up to the other batch shape of sampling), the
    # second a moved policy
    assert steps[0]["unetreg"] < 1e-10 < steps[1]["unetreg"]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert len(epochs) == 2 and all(CONTRACT_EPOCH_KEYS <= set(r) for r in epochs)
    assert [r["epoch"] for r in epochs] == [1, 2] and [r["global_step"] for r in epochs] == [2, 4]
    assert [r["samples"] for r in epochs] == [2, 4] and [r["optimizer_updates_this_epoch"] for r in epochs] == [2, 2]
    # both configs evaluate before epoch 0 only (freq 25 / 100), the untouched model: KL exactly 0
    assert "eval_reward_mean" in epochs[0] and "eval_reward_mean" not in epochs[1]
    assert epochs[0]["eval_kl_divergence"] == 0 and epochs[0]["eval_samples"] == 2
    assert all(r["sample_time_per_epoch"] > 0 and r["train_time_per_epoch"] > 0 and r["reward_grad_time_per_epoch"] > 0
               for r in epochs)
    assert [r["checkpoint_path"] for r in epochs] == [str(run_dir / "checkpoints" / f"checkpoint-{n}") for n in (1, 2)]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["train"]["use_z0"] is (which == "ours")
    run = json.loads((run_dir / "run.json").read_text())
    assert run["component"] == "sd15_first_order" and run["world_size"] == 1 and run["device"].startswith("cpu")
    assert run["config_id"] == f"tiny:{Path(OURS if which == 'ours' else PRUNED).stem}" and run["versions"]["torch"]


def test_the_saved_lora_is_trained_and_moves_between_epochs(ours):
    from safetensors.torch import load_file

    run_dir, _ = ours
    saved = [load_file(str(run_dir / "checkpoints" / f"checkpoint-{n}" / "lora" / "pytorch_lora_weights.safetensors"))
             for n in (1, 2)]
    for lora in saved:
        assert all(k.startswith("unet.") and (".lora.down." in k or ".lora.up." in k) for k in lora)
        assert max(v.abs().max().item() for k, v in lora.items() if ".lora.up." in k) > 0
    assert any(not torch.equal(saved[0][k], saved[1][k]) for k in saved[0])
    state = torch.load(run_dir / "checkpoints" / "checkpoint-2" / "training_state.pt", weights_only=True)
    assert state["epoch"] == 2 and state["global_step"] == 4 and state["scaler"] is None


def test_parity_mode_also_writes_upstreams_files(ours):
    run_dir, _ = ours
    folder = run_dir / "checkpoints" / "checkpoint-2"
    assert (folder / "unet_lora_weights.safetensors").is_file() and (folder / "conv_out_weights_epoch1.pt").is_file()
    conv = torch.load(folder / "conv_out_weights_epoch1.pt", weights_only=True)
    assert set(conv) == {"weight", "bias"}


def test_checkpoint_lora_loads_with_diffusers_and_gives_the_trained_policy(ours):
    """Round trip (spec §11 item 16): diffusers' StableDiffusionPipeline.load_lora_weights and our loader
    (into a fresh adapter, also from upstream's file name) give the same ε as each other."""
    from diffusers import StableDiffusionPipeline
    from rsm_testkit import get_tiny_model

    from sd15fo.models import add_lora, load_lora_into

    run_dir, _ = ours
    folder = run_dir / "checkpoints" / "checkpoint-2"
    pipe = StableDiffusionPipeline.from_pretrained(str(get_tiny_model("sd15")), safety_checker=None)
    x, embeds = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(1, 77, 32)
    with torch.no_grad():
        base = pipe.unet(x, 501, embeds).sample
        pipe.load_lora_weights(str(folder / "lora"))
        adapter = next(iter(pipe.unet.peft_config.values()))
        assert (adapter.r, adapter.lora_alpha) == (8, 8)
        diffusers_eps = pipe.unet(x, 501, embeds).sample
    assert not torch.equal(diffusers_eps, base)
    for source in (folder, folder / "unet_lora_weights.safetensors"):
        fresh = StableDiffusionPipeline.from_pretrained(str(get_tiny_model("sd15")), safety_checker=None).unet
        add_lora(fresh, 8, 8, use_xformers=False)
        load_lora_into(fresh, str(source))
        with torch.no_grad():
            assert torch.equal(fresh(x, 501, embeds).sample, diffusers_eps)


def test_console_names_the_run_folder_each_epoch_each_checkpoint_and_a_summary(ours):
    run_dir, console = ours
    assert f"run folder: {run_dir} (new run)" in console
    assert "budget: 2 trajectories per process an epoch (1 x 2)" in console and "K = 11 transitions" in console
    for n in (1, 2):
        line = next(line for line in console.splitlines() if f"epoch {n}/2  reward " in line)
        assert "samples/s" in line and f"saved {run_dir / 'checkpoints' / f'checkpoint-{n}'}" in line
    assert "done: 2 epochs" in console


def test_resume_into_a_new_folder_reproduces_the_uninterrupted_run(ours):
    """A fork: resume checkpoint-1 under another run name; the new folder starts with the source's history up to
    that checkpoint and ends equal to the uninterrupted run, weights and all; the source is untouched. Resuming
    continues with the next epoch (upstream re-ran the saved one)."""
    run_dir, _ = ours
    before = (run_dir / "metrics.jsonl").read_text()
    done = train(OURS, "--output-dir", str(run_dir.parent), "--run-name", "resumed", "--resume",
                 str(run_dir / "checkpoints" / "checkpoint-1"))
    resumed = run_dir.parent / "resumed"
    assert "resuming checkpoint-1 (1 epochs trained)" in done.stderr
    assert unmeasured(strict_records(resumed / "metrics.jsonl")) == unmeasured(strict_records(run_dir / "metrics.jsonl"))
    assert (run_dir / "metrics.jsonl").read_text() == before
    a = torch.load(run_dir / "checkpoints" / "checkpoint-2" / "training_state.pt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "checkpoint-2" / "training_state.pt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 4
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))


def test_killed_run_resumes_in_its_own_folder_without_duplicate_records(ours, tmp_path):
    run_dir, _ = ours
    killed = tmp_path / "killed"
    shutil.copytree(run_dir, killed)
    shutil.rmtree(killed / "checkpoints" / "checkpoint-2")
    lines = (killed / "metrics.jsonl").read_text().splitlines(keepends=True)
    (killed / "metrics.jsonl").write_text("".join(lines[:-1]) + lines[-1][:20])  # epoch-2 steps + a torn line
    train(OURS, "--resume", str(killed))  # a run folder: its newest checkpoint
    assert unmeasured(strict_records(killed / "metrics.jsonl")) == unmeasured(strict_records(run_dir / "metrics.jsonl"))
    assert not any(p.name != "killed" for p in tmp_path.iterdir())
    assert len(json.loads((killed / "run.json").read_text())["starts"]) == 2


def test_two_gloo_processes_average_gradients_and_save_once(two_processes_one_node):
    """torchrun with 2 CPU processes: each rank samples its own prompts and noise, DDP averages the gradients at
    the last backward of each window (no_sync before), the replicas stay identical (checked before saving)."""
    run_dir, console = two_processes_one_node
    epochs = [r for r in strict_records(run_dir / "metrics.jsonl") if r["kind"] == "epoch"]
    assert [r["samples"] for r in epochs] == [4, 8] and [r["global_step"] for r in epochs] == [2, 4]
    assert epochs[0]["eval_samples"] == 4  # 2 a process
    assert json.loads((run_dir / "run.json").read_text())["world_size"] == 2
    assert console.count("epoch 1/2  reward") == 1 and console.count("epoch 2/2  reward") == 1  # rank 0 only
    for n in (1, 2):
        assert (run_dir / "checkpoints" / f"checkpoint-{n}" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_offline_evaluation_of_a_run_uses_the_runs_epoch0_prompts_and_reads_upstream_checkpoints(ours, tmp_path):
    """evaluate.py (spec §9 item 16): the base model scores exactly what the run's epoch-0 evaluation scored (same
    prompts and noise, key 0), with KL 0 (spec §11 item 18); trained checkpoints have KL > 0; upstream's
    checkpoint_epoch<E> folder (its file names) evaluates like the checkpoint it holds."""
    run_dir, _ = ours
    upstream = tmp_path / "upstream_run" / "checkpoint_epoch1"
    upstream.mkdir(parents=True)
    shutil.copy(run_dir / "checkpoints" / "checkpoint-2" / "unet_lora_weights.safetensors", upstream)
    out = tmp_path / "eval.jsonl"
    done = subprocess.run([sys.executable, "evaluate.py", "--config", OURS, "--tiny", "--base", str(run_dir),
                           str(upstream), "--out", str(out)], cwd=COMPONENT, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["checkpoint"][-12:], r["epoch"]) for r in rows] == [("base", 0), ("checkpoint-1", 1), ("checkpoint-2", 2),
                                                                   ("heckpoint_epoch1"[-12:], 2)]
    epoch0 = [r for r in strict_records(run_dir / "metrics.jsonl") if r["kind"] == "epoch"][0]
    assert rows[0]["eval_reward_mean"] == epoch0["eval_reward_mean"] and rows[0]["eval_kl_divergence"] == 0
    assert rows[1]["eval_kl_divergence"] > 0 and rows[2]["eval_kl_divergence"] > 0
    assert rows[3]["eval_reward_mean"] == rows[2]["eval_reward_mean"]
    assert "checkpoint-2" in done.stdout and (tmp_path / "offline_eval" / "images" / "eval_checkpoint-2.jpg").is_file()


def test_qualitative_grid_of_the_base_model_and_the_newest_checkpoint(ours, tmp_path):
    run_dir, _ = ours
    out = tmp_path / "grid.jpg"
    done = subprocess.run([sys.executable, "scripts/qualitative.py", "--config", OURS, "--tiny", "--checkpoints",
                           str(run_dir), "--prompts", "a photo of a dog", "a red car", "--seeds", "0", "1", "--steps",
                           "10", "--out", str(out)], cwd=COMPONENT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    from PIL import Image

    image = Image.open(out)
    assert image.size == (260 + 4 * 64, 28 + 2 * 64)  # label margin + 4 columns x 2 rows of 64 px
    scores = json.loads((tmp_path / "grid.json").read_text())
    assert list(scores["rewards"]) == ["base", str(run_dir / "checkpoints" / "checkpoint-2")]
    assert scores["rewards"]["base"] != scores["rewards"][str(run_dir / "checkpoints" / "checkpoint-2")]


def test_clean_mode_writes_only_the_diffusers_lora_and_the_state(tmp_path):
    """parity: false fixes the reference's quirks (config.PARITY_QUIRKS): among them no upstream file copies."""
    train(OURS, "--output-dir", str(tmp_path), "--run-name", "clean", "--set", "parity=false", "--set",
          "train.max_epochs=1", "--set", "sample.num_steps=10")
    folder = tmp_path / "clean" / "checkpoints" / "checkpoint-1"
    assert sorted(p.name for p in folder.iterdir()) == ["lora", "training_state.pt"]
    assert json.loads((tmp_path / "clean" / "config.json").read_text())["parity"] is False


def test_bf16_parity_run_trains_with_the_grad_scaler(tmp_path):
    """The paper precision on a CPU: bf16 frozen weights and latents, fp32 LoRA, the GradScaler upstream used for
    bf16 (parity), its scale logged and saved."""
    train(OURS, "--output-dir", str(tmp_path), "--run-name", "bf16", "--set", "mixed_precision=bf16", "--set",
          "train.max_epochs=1", "--set", "sample.num_steps=10")
    steps = [r for r in strict_records(tmp_path / "bf16" / "metrics.jsonl") if r["kind"] == "step"]
    assert [r["grad_scale"] for r in steps] == [65536.0, 65536.0] and all(r["loss"] is not None for r in steps)
    state = torch.load(tmp_path / "bf16" / "checkpoints" / "checkpoint-1" / "training_state.pt", weights_only=True)
    assert state["scaler"]["scale"] == 65536.0 and all(p.dtype == torch.float32 for p in state["params"])


def test_an_upstream_checkpoint_is_a_warm_start_at_the_next_epoch_in_a_new_folder(ours, tmp_path):
    """The reference's checkpoint_epoch<E> holds only the LoRA: training continues with epoch E + 1 (upstream
    re-ran epoch E) and global step (E + 1) x updates per epoch, in a new run folder."""
    run_dir, _ = ours
    upstream = tmp_path / "upstream_run" / "checkpoint_epoch0"
    upstream.mkdir(parents=True)
    shutil.copy(run_dir / "checkpoints" / "checkpoint-1" / "unet_lora_weights.safetensors", upstream)
    done = train(OURS, "--resume", str(upstream), "--output-dir", str(tmp_path), "--run-name", "warm")
    assert "warm start from upstream checkpoint_epoch0" in done.stderr
    rows = strict_records(tmp_path / "warm" / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in rows] == [("step", 3), ("step", 4), ("epoch", 4)]
    assert rows[-1]["epoch"] == 2 and (tmp_path / "warm" / "checkpoints" / "checkpoint-2").is_dir()
