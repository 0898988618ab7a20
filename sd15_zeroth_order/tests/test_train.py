"""Both paper commands end to end on the tiny kit, as a user types them (spec §12 item 28; contract §1-§5):

    python train_grpo.py --tiny       python train_grpo_pr.py --tiny        (+ --output-dir, --set run_name=...)

two epochs each on a CPU in fp32, with the tiny HPS reward through shared_rewards; then a run interrupted after
epoch 1 and resumed in its own folder (and one resumed into a new folder), which must repeat the uninterrupted
run exactly (same metrics, same LoRA bytes: same computations on the same thread count), and 2-process gloo
runs under torchrun (conftest's `two_process_run`). The uninterrupted runs are module fixtures reused by many
assertions.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import COMPONENT, SCRIPTS, subprocess_env

CONTRACT_EPOCH_KEYS = {"epoch", "global_step", "samples", "reward_mean", "reward_std", "time_per_epoch", "elapsed_s",
                       "peak_memory_mib"}
TIMING_KEYS = {"time_per_epoch", "sample_time_per_epoch", "reward_wait_time_per_epoch", "train_time_per_epoch",
               "policy_update_time_per_epoch", "elapsed_s", "peak_memory_mib", "eval_time", "eval_peak_memory_mib",
               "checkpoint_path"}


def command(trainer, *args):
    return [sys.executable, SCRIPTS[trainer], "--tiny", *args]


def start(trainer, *args):
    return subprocess.Popen(command(trainer, *args), cwd=COMPONENT, env=subprocess_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(process, timeout=400):
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out[-6000:]
    return out


def records(run_dir: Path) -> list:
    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant} in {run_dir}")

    return [json.loads(line, parse_constant=refuse) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def lora_file(run_dir: Path, n: int) -> Path:
    return run_dir / "checkpoints" / f"checkpoint-{n}" / "lora" / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory):
    """The two paper commands with --tiny, started together (two cores): {trainer: (run folder, console)}."""
    root = tmp_path_factory.mktemp("full")
    procs = {t: start(t, "--output-dir", str(root / t), "--set", "run_name=full") for t in SCRIPTS}
    consoles = {t: finish(p) for t, p in procs.items()}
    return {t: (root / t / "full", consoles[t]) for t in SCRIPTS}


@pytest.mark.parametrize("trainer", list(SCRIPTS))
def test_paper_command_tiny_trains_two_epochs_of_two_updates(full_runs, trainer):
    run_dir, _ = full_runs[trainer]
    rows = records(run_dir)
    steps = [r for r in rows if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and [r["epoch"] for r in steps] == [1, 1, 2, 2]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"], r["clipfrac"]])).all() for r in steps)
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2] and all(CONTRACT_EPOCH_KEYS <= set(r) for r in epochs)
    assert [r["optimizer_updates_this_epoch"] for r in epochs] == [2, 2]
    assert "eval_reward_mean" in epochs[1] and epochs[1]["eval_approx_kl"] > 0  # eval after the last epoch
    per_epoch = 4 if trainer == "grpo" else 32  # 2 prompts x 2 trajectories | 2 calls x 2 roots x (2+2+2+2) branches
    assert [r["samples"] for r in epochs] == [per_epoch, 2 * per_epoch]
    assert all(r["reward_std"] > 0 and r["peak_memory_kind"] == "cpu_max_rss" for r in epochs)
    if trainer == "grpo_pr":
        e = epochs[0]
        assert (e["actual_transition_rows"], e["actual_microbatches_per_epoch"], e["padded_policy_units"]) == (32, 8, 0)
        assert (e["raw_kl_anchor_rows"], e["effective_kl_anchor_rows"]) == (20, 3)  # ⌊32 x 0.1⌋ of 2 x 2 x 5
        assert e["group_size"] == 4.0 and e["group_strategy"] == "prompt"  # 2 roots x 2 branches per prompt|t
        assert e["2b_useful_row_steps"] == 2 * 2 * 2 * (9 + 7 + 5 + 3) and e["2b_padded_row_steps"] == 0
        assert {f"clipfrac_timestep_{t}" for t in (901, 701, 501, 301)} <= set(steps[0])
        # 3 anchor rows go to micro-batches 0-2, the first update's window: exactly 0 before the first update (policy
        # = reference, LoRA B = 0), > 0 in epoch 2; the second window has none
        assert [r["kl_anchor_loss"] for r in steps][:2] == [0.0, 0.0] and steps[2]["kl_anchor_loss"] > 0


@pytest.mark.parametrize("trainer", list(SCRIPTS))
def test_checkpoints_hold_a_trained_lora_that_diffusers_loads_at_full_strength(full_runs, trainer):
    from diffusers import StableDiffusionPipeline
    from rsm_testkit import get_tiny_model
    from safetensors.torch import load_file

    run_dir, _ = full_runs[trainer]
    first, last = load_file(str(lora_file(run_dir, 1))), load_file(str(lora_file(run_dir, 2)))
    assert max(v.abs().max().item() for k, v in last.items() if "lora_B" in k) > 0  # moved off B = 0
    assert any(not torch.equal(first[k], last[k]) for k in first)
    state = torch.load(run_dir / "checkpoints" / "checkpoint-2" / "training_state.pt", weights_only=True)
    assert state["epoch"] == 2 and state["global_step"] == 4
    pipe = StableDiffusionPipeline.from_pretrained(str(get_tiny_model("sd15")), safety_checker=None)
    pipe.load_lora_weights(str(lora_file(run_dir, 2).parent))
    adapter = next(iter(pipe.unet.peft_config.values()))
    assert adapter.r == adapter.lora_alpha == 16  # scale alpha / r = 1: the trained strength
    loaded = {n: p for n, p in pipe.unet.named_parameters() if "lora_" in n}
    assert len(loaded) == len(last)
    key = next(k for k in last if "lora_B" in k)
    match = next(p for n, p in loaded.items() if n.replace(".default_0", "").replace(".default", "") ==
                 key[len("unet."):])
    assert torch.equal(match.detach(), last[key])


@pytest.mark.parametrize("trainer", list(SCRIPTS))
def test_run_writes_config_run_json_and_console_lines(full_runs, trainer):
    run_dir, console = full_runs[trainer]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["trainer"] == trainer and config["tiny"] is True and config["algorithm"] == "uw-sigma"
    assert config["derived"]["updates_per_epoch"] == 2
    run = json.loads((run_dir / "run.json").read_text())
    assert run["component"] == "sd15_zeroth_order" and run["trainer"] == SCRIPTS[trainer]
    assert run["world_size"] == 1 and run["device"].startswith("cpu") and run["versions"]["diffusers"]
    assert len(run["starts"]) == 1 and SCRIPTS[trainer] in run["starts"][0]["command"]
    assert f"run folder: {run_dir} (new run)" in console
    for n in (1, 2):
        line = next(line for line in console.splitlines() if f"epoch {n}/2  reward " in line)
        assert "samples/s" in line and f"saved {run_dir / 'checkpoints' / f'checkpoint-{n}'}" in line
    assert "eval " in next(line for line in console.splitlines() if "epoch 2/2  reward " in line)
    assert "done: 2 epochs" in console and "Traceback" not in console
    assert (run_dir / "images" / "epoch_1.jpg").is_file() and (run_dir / "images" / "eval_2.jpg").is_file()


def _same_training(full: list, other: list) -> None:
    assert len(full) == len(other)
    for a, b in zip(full, other):
        if a["kind"] == "epoch" and a["epoch"] == 1:  # the shortened first start evaluated after its last epoch
            b = {k: v for k, v in b.items() if not k.startswith("eval_")}
        keys = (set(a) | set(b)) - TIMING_KEYS
        assert {k: a.get(k) for k in keys} == {k: b.get(k) for k in keys}


def test_interrupted_run_resumes_in_its_folder_and_repeats_the_uninterrupted_run(full_runs, tmp_path):
    """Epoch 1 as its own start, then a start killed in epoch 2 after one update (its record is left behind),
    then a resume from the run folder: no record twice, same numbers and LoRA bytes as the uninterrupted run.
    (The baseline's resume is the fork test below.)"""
    trainer = "grpo_pr"
    full_dir, _ = full_runs[trainer]
    finish(start(trainer, "--output-dir", str(tmp_path), "--set", "run_name=part", "--set", "num_train_epochs=1"))
    part = tmp_path / "part"
    with open(part / "metrics.jsonl", "a") as f:  # what a kill after epoch 2's first update leaves
        f.write(json.dumps({"kind": "step", "step": 3, "loss": 0.5, "epoch": 2}) + "\n")
    out = finish(start(trainer, "--output-dir", str(tmp_path), "--set", f"resume_from_checkpoint={part}"))
    assert f"run folder: {part} (resuming checkpoint-1 (epoch 1))" in out
    _same_training(records(full_dir), records(part))
    assert lora_file(part, 2).read_bytes() == lora_file(full_dir, 2).read_bytes()
    assert len(json.loads((part / "run.json").read_text())["starts"]) == 2


def test_resume_into_another_folder_forks_with_the_history(full_runs, tmp_path):
    """The baseline resumed from checkpoint-1 of a copy of its run into a new run_name: the new folder starts with
    the source's epoch-1 history and ends where the uninterrupted run ended."""
    full_dir, _ = full_runs["grpo"]
    source = tmp_path / "source"
    source.mkdir()
    import shutil

    shutil.copytree(full_dir, source / "full")
    for name in ("checkpoint-2",):
        shutil.rmtree(source / "full" / "checkpoints" / name)
    out = finish(start("grpo", "--output-dir", str(tmp_path), "--set", "run_name=fork", "--set",
                       f"resume_from_checkpoint={source / 'full' / 'checkpoints' / 'checkpoint-1'}"))
    assert f"run folder: {tmp_path / 'fork'} (resuming checkpoint-1" in out
    _same_training(records(full_dir), records(tmp_path / "fork"))
    assert lora_file(tmp_path / "fork", 2).read_bytes() == lora_file(full_dir, 2).read_bytes()


@pytest.mark.parametrize("trainer, epochs", [("grpo", 1), ("grpo_pr", 2)])
def test_two_process_gloo_run_averages_gradients_and_writes_once(two_process_run, trainer, epochs):
    # torchrun --nproc_per_node 2 (conftest); ours' 2-epoch run is also test_multi_node's reference
    run_dir, out = two_process_run(trainer, epochs)
    assert json.loads((run_dir / "run.json").read_text())["world_size"] == 2
    rows = records(run_dir)
    assert [r["kind"] for r in rows] == ["step", "step", "epoch"] * epochs  # one writer
    per_epoch = 4 if trainer == "grpo" else 32
    assert [r["samples"] for r in rows if r["kind"] == "epoch"] == [2 * per_epoch * (n + 1) for n in range(epochs)]
    assert all(lora_file(run_dir, n + 1).is_file() for n in range(epochs)) and out.count("run folder:") == 1
