"""End-to-end tiny runs of `train_vggflow.py` (CPU, fp32, the test kit): both paper commands and the value-net variant
with `--tiny` for 2 epochs, exactly as a user types them from inside sd35_first_order/ on a fresh clone; what they
write; resume after a kill equal to the uninterrupted run; a 2-process gloo run; one-line errors; divergence."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

COMPONENT = Path(__file__).resolve().parents[1]
PRUNED = ["--config=config/hpsv2_geneval.py", "--exp_name=PRUNED_BASELINE"]
OURS = ["--config=config/hpsv2_geneval_ours.py", "--exp_name=OURS"]
VALUE_NET = ["--config=config/hpsv2_geneval.py", "--exp_name=VALUE_NET", "--config.model.use_value_net=True",
             "--config.training.use_jvp=True"]  # upstream's flag: the math attention kernel for the whole run
CONTRACT_EPOCH_KEYS = {"epoch", "global_step", "samples", "reward_mean", "reward_std", "time_per_epoch", "elapsed_s",
                       "peak_memory_mib", "eval_reward_mean"}


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    env.pop("WANDB_API_KEY", None)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return env


def train(args, output_dir, timeout=300, expect=0):
    done = subprocess.run([sys.executable, "train_vggflow.py", *args, "--tiny", f"--output_dir={output_dir}"],
                          cwd=COMPONENT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == expect, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def records(run_dir, kind=None):
    def refuse(constant):
        raise AssertionError(f"metrics.jsonl holds the non-JSON constant {constant}")

    rows = [json.loads(line, parse_constant=refuse) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if kind is None or r["kind"] == kind]


def unmeasured(rows):
    """Records without what differs between two runs of the same computation: times, memory, paths."""
    return [{k: v for k, v in r.items() if "time" not in k and "memory" not in k and k not in ("checkpoint_path", "elapsed_s")}
            for r in rows]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The three tiny runs, each 2 epochs: {name: (run folder, console text)}."""
    out = tmp_path_factory.mktemp("runs")
    result = {}
    for name, args in (("pruned", PRUNED), ("ours", OURS), ("value_net", VALUE_NET)):
        done = train(args, out)
        run_dir = out / f"hpscore_vggflow_{args[1].split('=')[1]}_seed0"
        result[name] = (run_dir, done.stdout + done.stderr)
    return result


def test_both_paper_commands_train_two_epochs_with_one_update_each(runs):
    for name in ("pruned", "ours", "value_net"):
        run_dir, _ = runs[name]
        steps, epochs = records(run_dir, "step"), records(run_dir, "epoch")
        assert [s["global_step"] for s in steps] == [1, 2] and [s["epoch"] for s in steps] == [1, 2]
        assert [e["epoch"] for e in epochs] == [1, 2] and [e["global_step"] for e in epochs] == [1, 2]
        assert all(CONTRACT_EPOCH_KEYS <= set(e) for e in epochs)
        assert [e["samples"] for e in epochs] == [2, 4]  # 2 trajectories an epoch on one process
        assert all(torch.isfinite(torch.tensor([s["loss"], s["grad_norm"], s["loss_raw"]])).all() for s in steps)
        assert [s["tau"] for s in steps] == [1.0, 1.0]  # faithful: tau reset to 1 every epoch (spec §5.7, N2)
        assert {e["optimizer_updates_this_epoch"] for e in epochs} == {1}


def test_ours_calls_the_reward_only_at_sampling_and_the_pruned_baseline_at_every_timestep(runs):
    """Spec §12.11: ours computes one terminal gradient per rollout batch; the pruned baseline one reward
    backward per (micro-batch, timestep): 2 micro-batches x 10 tiny steps."""
    ours = records(runs["ours"][0], "epoch")
    pruned = records(runs["pruned"][0], "epoch")
    assert [(e["reward_grad_calls_sampling"], e["reward_grad_calls_training"]) for e in ours] == [(1, 0)] * 2
    assert [(e["reward_grad_calls_sampling"], e["reward_grad_calls_training"]) for e in pruned] == [(0, 20)] * 2
    assert all(e["reward_grad_time_per_epoch"] > 0 for e in ours + pruned)


def test_the_value_net_variant_logs_its_losses_and_saves_its_weights(runs):
    run_dir, _ = runs["value_net"]
    steps = records(run_dir, "step")
    assert all(s["loss_consistency"] > 0 and s["loss_terminal"] >= 0 and s["value_grad_norm"] > 0 for s in steps)
    state = torch.load(run_dir / "checkpoints" / "checkpoint-2" / "training_state.pt", weights_only=True)
    assert len(state["value"]) > 0 and len(state["optimizer"]["param_groups"]) == 2


def test_run_writes_config_and_run_json(runs):
    run_dir, _ = runs["ours"]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["training"]["use_saved_rgrad_x1"] is True and config["model"]["eta_mode"] == "linear"
    assert config["run_name"] == "hpscore_vggflow_OURS_seed0" and config["tiny"] is True
    run = json.loads((run_dir / "run.json").read_text())
    assert run["component"] == "sd35_first_order" and run["preset"] == "hpsv2_geneval_ours.py"
    assert run["world_size"] == 1 and run["device"].startswith("cpu") and run["versions"]["torch"]
    assert len(run["starts"]) == 1 and "train_vggflow.py" in run["starts"][0]["command"]
    assert (run_dir / "images" / "epoch_1.jpg").is_file()


def test_console_names_the_run_folder_each_epoch_each_checkpoint_and_a_summary(runs):
    run_dir, console = runs["ours"]
    assert f"run folder: {run_dir} (new run)" in console
    for n in (1, 2):
        line = next(line for line in console.splitlines() if f"epoch {n}/2  reward " in line)
        assert "samples/s" in line and "eval " in line and f"saved {run_dir / 'checkpoints' / f'checkpoint-{n}'}" in line
    assert "done: 2 epochs (2 this start), 2 optimizer steps, 4 samples" in console


def test_the_saved_lora_loads_into_a_diffusers_pipeline_and_moved_from_its_initialisation(runs):
    from diffusers import StableDiffusion3Pipeline
    from rsm_testkit import get_tiny_model
    from safetensors.torch import load_file

    run_dir, _ = runs["ours"]
    loras = [load_file(str(run_dir / "checkpoints" / f"checkpoint-{n}" / "lora" / "pytorch_lora_weights.safetensors"))
             for n in (1, 2)]
    assert all(key.startswith("transformer.") for key in loras[0])
    assert max(v.abs().max().item() for k, v in loras[1].items() if "lora_B" in k) > 0  # B starts at 0
    assert any(not torch.equal(loras[0][k], loras[1][k]) for k in loras[0])
    adapted = {k.split(".lora_")[0] for k in loras[1]}
    assert all(k.endswith((".to_q", ".to_k", ".to_v", ".to_out.0")) for k in adapted)
    assert any(".attn2." in k for k in adapted)  # SD3.5's dual-attention projections are adapted too (spec §2.3)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(get_tiny_model("sd35")))
    pipe.load_lora_weights(str(run_dir / "checkpoints" / "checkpoint-2" / "lora"))
    adapter = next(iter(pipe.transformer.peft_config.values()))
    assert (adapter.r, adapter.lora_alpha) == (8, 8)
    loaded = {n: p for n, p in pipe.transformer.named_parameters() if "lora_" in n}
    assert len(loaded) == len(loras[1])


def test_a_killed_run_resumes_in_its_own_folder_to_the_uninterrupted_numbers(runs, tmp_path):
    """Checkpoint-1 saved, epoch 2 half written (a torn metrics line): `--resume` alone continues in the checkpoint's
    folder, cuts metrics.jsonl back, and ends with the uninterrupted run's records and bit-identical weights."""
    run_dir, _ = runs["ours"]
    killed = tmp_path / "out" / run_dir.name
    shutil.copytree(run_dir, killed)
    shutil.rmtree(killed / "checkpoints" / "checkpoint-2")
    lines = (killed / "metrics.jsonl").read_text().splitlines(keepends=True)
    (killed / "metrics.jsonl").write_text("".join(lines[:-1]) + lines[-1][:20])
    train(["--config=config/hpsv2_geneval_ours.py", f"--resume={killed / 'checkpoints' / 'checkpoint-1'}"],
          tmp_path / "elsewhere")
    assert unmeasured(records(killed)) == unmeasured(records(run_dir))
    a = torch.load(run_dir / "checkpoints" / "checkpoint-2" / "training_state.pt", weights_only=True)
    b = torch.load(killed / "checkpoints" / "checkpoint-2" / "training_state.pt", weights_only=True)
    assert all(torch.equal(x, y) for x, y in zip(a["policy"], b["policy"]))
    assert len(json.loads((killed / "run.json").read_text())["starts"]) == 2
    assert not (tmp_path / "elsewhere").exists()  # no second run folder


def test_resuming_under_another_exp_name_forks_and_leaves_the_source_untouched(runs, tmp_path):
    run_dir, _ = runs["pruned"]
    before = (run_dir / "metrics.jsonl").read_text()
    train(["--config=config/hpsv2_geneval.py", "--exp_name=FORK", f"--resume={run_dir / 'checkpoints' / 'checkpoint-1'}"],
          tmp_path)
    fork = tmp_path / "hpscore_vggflow_FORK_seed0"
    assert unmeasured(records(fork)) == unmeasured(records(run_dir))
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_two_gloo_processes_with_same_seeds_reproduce_the_one_process_run(runs, two_processes_on_one_node):
    """torchrun, 2 CPU processes (conftest.py): each samples its own batch (the same prompts and noise, upstream's
    identical seeding, spec §9.9), gradients are averaged, replicas agree (checked before saving); the result equals
    the 1-process run, as the spec says of the 4-GPU paper runs."""
    two = two_processes_on_one_node
    one = runs["ours"][0]
    epochs2, epochs1 = records(two, "epoch"), records(one, "epoch")
    assert [e["samples"] for e in epochs2] == [4, 8]
    for a, b in zip(epochs2, epochs1):
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], rel=1e-6)
        assert a["reward_std"] == pytest.approx(b["reward_std"], rel=1e-5, abs=1e-9)
    s2 = torch.load(two / "checkpoints" / "checkpoint-2" / "training_state.pt", weights_only=True)
    s1 = torch.load(one / "checkpoints" / "checkpoint-2" / "training_state.pt", weights_only=True)
    assert s2["world_size"] == 2
    for x, y in zip(s2["policy"], s1["policy"]):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-9)
    assert json.loads((two / "run.json").read_text())["world_size"] == 2


def test_check_validates_everything_before_the_models_and_creates_nothing(tmp_path):
    """--check runs the start-up checks and exits: the real paper command offline stops at the model source, the
    tiny one prints its budget and run folder."""
    def check(*extra):
        return subprocess.run([sys.executable, "train_vggflow.py", *OURS, "--check", f"--output_dir={tmp_path}", *extra],
                              cwd=COMPONENT, env=dict(_env(), HF_HUB_OFFLINE="1"), capture_output=True, text=True,
                              timeout=120)

    done = check()
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1] == (
        "error: pretrained.model (--model)='stabilityai/stable-diffusion-3.5-medium' (revision 'main') is not in the "
        "local hub cache and HF_HUB_OFFLINE is set: download it once online, or pass a local directory")
    done = check("--tiny")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "budget: world_size=1 trajectories_per_epoch=2 micro_batches_per_epoch=2 optimizer_steps_per_epoch=1 "
        "train_timesteps=10 loss_divisor=20 global_trajectories_per_epoch=2",
        f"run folder: {tmp_path / 'hpscore_vggflow_OURS_seed0'}"]
    assert not any(tmp_path.iterdir())


def test_starting_into_a_folder_that_holds_a_run_is_refused_with_one_line(runs):
    run_dir, _ = runs["pruned"]
    done = train(PRUNED, run_dir.parent, expect=1)
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: run folder {run_dir} already holds a run (metrics or checkpoints): resume it with --resume={run_dir}, "
        "or choose another --exp_name (or --output_dir)")


@pytest.mark.parametrize("args, message", [
    ([], "error: --config is required, e.g. --config=config/hpsv2_geneval_ours.py (the presets are in config/)"),
    (["--config=config/hpsv2_geneval.py", "--config.training.lrr=1e-3"],
     "error: no config key training.lrr (did you mean training.lr?); check the --config.<key>=<value> overrides"),
    (["--config=config/hpsv2_geneval.py", "--config.sampling.guidance_scale=1.0"],
     "error: sampling.guidance_scale=1.0 must be > 1"),
])
def test_bad_command_lines_end_with_one_line(args, message, tmp_path):
    done = subprocess.run([sys.executable, "train_vggflow.py", *args, f"--output_dir={tmp_path}"], cwd=COMPONENT,
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1].startswith(message), done.stderr[-2000:]
    assert not any(tmp_path.iterdir())


def test_a_huge_learning_rate_stops_the_run_with_one_line_and_saves_no_non_finite_weights(tmp_path):
    """lr = 1e30: the first update blows the LoRA up (finite, ~1e30), the next rollout is non-finite: the run stops
    there naming the epoch and the last checkpoint, instead of a reward-input traceback; with a smaller blow-up the
    optimizer step's guard names the non-finite loss (tests/test_divergence.py)."""
    done = train([*OURS, "--config.training.lr=1e30", "--config.training.num_epochs=3"], tmp_path, expect=1)
    last = done.stderr.strip().splitlines()[-1]
    run_dir = tmp_path / "hpscore_vggflow_OURS_seed0"
    assert last == ("error: training diverged by epoch 1 (evaluation): the policy after step 1 produces non-finite "
                    "latents; last checkpoint: none saved yet; lower training.lr and resume from an earlier checkpoint")
    assert not (run_dir / "checkpoints").exists()
    assert [r["kind"] for r in records(run_dir)] == ["step"]
    done = train([*OURS, "--exp_name=NOEVAL", "--config.training.lr=1e30", "--config.training.num_epochs=3",
                  "--config.eval.enabled=False"], tmp_path, expect=1)
    run_dir = tmp_path / "hpscore_vggflow_NOEVAL_seed0"
    assert done.stderr.strip().splitlines()[-1] == (
        "error: training diverged at epoch 2 (sampling): the policy after step 1 produces non-finite latents; last "
        f"checkpoint: {run_dir / 'checkpoints' / 'checkpoint-1'}; lower training.lr and resume from an earlier checkpoint")


def test_offline_evaluation_scores_base_and_checkpoints_with_either_decoder(runs, tmp_path):
    run_dir, _ = runs["ours"]
    results = {}
    for decoder in ("taesd", "vae"):
        out = tmp_path / f"{decoder}.json"
        done = subprocess.run([sys.executable, "evaluate.py", f"--run={run_dir}", f"--decoder={decoder}",
                               f"--out={out}"], cwd=COMPONENT, env=_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        results[decoder] = json.loads(out.read_text())
    taesd = results["taesd"]
    assert list(taesd["policies"]) == ["base", "checkpoint-1", "checkpoint-2"] and taesd["prompts"] == 4
    assert taesd["prompt_fn"] == "from_jsonl" and taesd["policies"]["base"]["eval_transition_drift"] == 0.0
    assert taesd["policies"]["checkpoint-2"]["eval_transition_drift"] > 0
    # the in-training evaluation of the same policy on the same prompts and noise gives the same number
    last_epoch = records(run_dir, "epoch")[-1]
    assert taesd["policies"]["checkpoint-2"]["eval_reward_mean"] == pytest.approx(last_epoch["eval_reward_mean"], rel=1e-5)
    vae = results["vae"]["policies"]["base"]["eval_reward_mean"]
    assert vae != taesd["policies"]["base"]["eval_reward_mean"]  # another decoder, another image


def test_the_qualitative_grid_has_a_row_per_policy_and_a_column_per_prompt_and_seed(runs, tmp_path):
    from PIL import Image

    run_dir, _ = runs["pruned"]
    out = tmp_path / "grid.jpg"
    done = subprocess.run([sys.executable, "qualitative_grid.py", f"--run={run_dir}", "--prompts", "a red apple",
                           "a cat", "--seeds", "0", "1", "--checkpoints", "latest", "--tile", "64", f"--out={out}"],
                          cwd=COMPONENT, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert Image.open(out).size == (140 + 4 * 64, 40 + 2 * 64)
    assert "2 policies x 4 prompt/seed columns" in done.stdout
