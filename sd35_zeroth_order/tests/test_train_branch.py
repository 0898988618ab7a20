"""End-to-end tiny runs of the branch trainer (scripts/train_sd3_pr.py, sd35zo/trainer_branch.py), CPU, fp32.

The paper command (`run_sd3.sh --profile lowsnr2 --sampler branch --loss matching --reweight fairclip2`) on
the tiny kit with a local reward (JPEG compressibility): it must train, log, evaluate, checkpoint in a form
diffusers loads, and resume from a checkpoint to exactly the numbers of the uninterrupted run.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

COMPONENT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
ACCELERATE = str(Path(PYTHON).parent / "accelerate")
TINY_ID = "sd3.lowsnr2.branch.jpeg_compressibility.matching.fairclip2"


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=PYTHON, ACCELERATE=ACCELERATE, WANDB_MODE="disabled")
    env["PYTHONPATH"] = str(COMPONENT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _launch(extra, timeout=300, num_processes=1):
    command = ["bash", "scripts/single_node/run_sd3.sh", "--profile", "lowsnr2", "--sampler", "branch",
               "--reward", "jpeg_compressibility", "--loss", "matching", "--reweight", "fairclip2", "--tiny",
               "--num-processes", str(num_processes), "--main-process-port", str(29800 + num_processes), "--", *extra]
    done = subprocess.run(command, cwd=COMPONENT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The uninterrupted 2-epoch paper run on the tiny kit, exactly as a user types it on a fresh clone: no
    prompt files or embeddings given (--tiny brings its own); returns the run folder and the console text."""
    save = tmp_path_factory.mktemp("runs")
    done = _launch([f"--config.save_dir={save}", "--config.run_name=full", "--config.num_epochs=2"])
    return save / "full", done.stdout + done.stderr


def _strict_records(path):
    """metrics.jsonl parsed as strict JSON: a bare NaN or Infinity fails the test."""
    def refuse(constant):
        raise AssertionError(f"{path}: non-standard JSON constant {constant}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


CONTRACT_EPOCH_KEYS = {"epoch", "global_step", "samples", "reward_mean", "reward_std", "time_per_epoch",
                       "elapsed_s", "peak_memory_mib", "eval_reward_mean"}


def test_paper_command_tiny_trains_two_epochs_with_exact_update_counts(full_run):
    run_dir, _ = full_run
    rows = _metrics(run_dir)
    updates = [r for r in rows if r["kind"] == "step"]
    # 120 rows per epoch -> 4 microbatches of U = 4 x 9 rows, accumulated 2 per step: 2 steps per epoch.
    assert [r["step"] for r in updates] == [1, 2, 3, 4]
    assert [r["epoch"] for r in updates] == [1, 1, 2, 2]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() for r in updates)
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert [(r["actual_transition_rows"], r["actual_microbatches_per_epoch"], r["padded_policy_units"])
            for r in epochs] == [(120, 4, 24)] * 2
    # seed|t groups of the lowsnr2 schedule 6, 6, 8, 10: mean group size 7.5
    assert [r["group_size"] for r in epochs] == [7.5, 7.5]
    assert [r["eval_epoch"] for r in epochs] == [1, 2]
    assert [r["optimizer_updates_this_epoch"] for r in epochs] == [2, 2]
    # the EMA moves every step on the tiny kit (train.ema_update_interval=1): eval sees a policy off the reference
    assert all(0.0 < r["eval_kl_divergence"] < 1e-3 for r in epochs)
    # the live LoRA moved away from its initialisation (B = 0 at init); the state loads without unpickling code
    state = torch.load(run_dir / "checkpoints" / "checkpoint-2" / "training_state.pt", weights_only=True)
    assert max(p.abs().max().item() for p in state["params"] if p.dim() == 2 and p.shape[1] == 32) > 0


def test_saved_lora_is_trained_so_checkpoints_differ_from_the_base_model(full_run):
    """Contract §1: the tiny budget moves the EMA the checkpoints are saved from (with upstream's cadence of
    8 steps a 4-step tiny run saved lora_B = 0, and qualitative grids of every epoch were identical)."""
    from safetensors.torch import load_file

    run_dir, _ = full_run
    saved = [load_file(str(run_dir / "checkpoints" / f"checkpoint-{n}" / "lora" / "pytorch_lora_weights.safetensors"))
             for n in (1, 2)]
    for lora in saved:
        assert max(v.abs().max().item() for k, v in lora.items() if "lora_B" in k) > 0
    assert any(not torch.equal(saved[0][k], saved[1][k]) for k in saved[0])  # epoch 2 differs from epoch 1


def test_run_writes_config_run_json_and_strict_per_epoch_records(full_run):
    run_dir, _ = full_run
    config = json.loads((run_dir / "config.json").read_text())
    assert config["config_id"] == f"tiny:{TINY_ID}" and config["train"]["loss_type"] == "matching"
    run = json.loads((run_dir / "run.json").read_text())
    assert run["component"] == "sd35_zeroth_order" and run["config_id"] == f"tiny:{TINY_ID}"
    assert run["world_size"] == 1 and run["device"].startswith("cpu") and run["versions"]["torch"]
    assert len(run["starts"]) == 1 and "scripts/train_sd3_pr.py" in run["starts"][0]["command"]
    rows = _strict_records(run_dir / "metrics.jsonl")
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert len(epochs) == 2 and all(CONTRACT_EPOCH_KEYS <= set(r) for r in epochs)
    # samples: images scored, cumulative (2 rollouts x 2 noises x 30 branch rows an epoch)
    assert [r["samples"] for r in epochs] == [120, 240]
    assert epochs[0]["elapsed_s"] < epochs[1]["elapsed_s"]
    assert all(r["reward_mean"] == r["reward_avg"] and r["reward_std"] > 0 for r in epochs)
    assert [r["checkpoint_path"] for r in epochs] == [str(run_dir / "checkpoints" / f"checkpoint-{n}") for n in (1, 2)]


def test_console_names_the_run_folder_each_epoch_each_checkpoint_and_a_summary(full_run):
    run_dir, console = full_run
    assert f"run folder: {run_dir} (new run)" in console
    for n in (1, 2):
        line = next(line for line in console.splitlines() if f"epoch {n}/2  reward " in line)
        assert "samples/s" in line and f"saved {run_dir / 'checkpoints' / f'checkpoint-{n}'}" in line
    assert "done: 2 epochs" in console


def test_checkpoint_lora_loads_with_diffusers_pipeline(full_run):
    from diffusers import StableDiffusion3Pipeline
    from rsm_testkit import get_tiny_model
    from safetensors.torch import load_file

    lora_dir = full_run[0] / "checkpoints" / "checkpoint-2" / "lora"
    saved = load_file(str(lora_dir / "pytorch_lora_weights.safetensors"))
    assert saved and all(key.startswith("transformer.") for key in saved)
    assert not any(".attn2." in key for key in saved)  # SD3.5's extra self-attention is not adapted
    pipe = StableDiffusion3Pipeline.from_pretrained(get_tiny_model("sd35"))
    pipe.load_lora_weights(str(lora_dir))
    loaded = {name: p for name, p in pipe.transformer.named_parameters() if "lora_" in name}
    assert len(loaded) == len(saved)
    adapter = next(iter(pipe.transformer.peft_config.values()))
    assert (adapter.r, adapter.lora_alpha) == (32, 64)  # the trained strength alpha/r = 2, not diffusers' alpha = r
    # spot-check one tensor arrived unchanged (names differ only by the adapter name)
    key = sorted(saved)[0]
    match = [p for name, p in loaded.items()
             if name.replace(".default_0", "").replace(".default", "") == key[len("transformer."):]]
    assert len(match) == 1 and torch.equal(match[0].detach().cpu(), saved[key])


def _unmeasured(rows):
    """Records without what differs between any two runs: wall-clock times, memory, paths."""
    def measured(key):
        return "time" in key or "peak_memory" in key or key in ("checkpoint_path", "elapsed_s")

    return [{k: v for k, v in r.items() if not measured(k)} for r in rows]


def test_resume_into_a_new_folder_reproduces_the_uninterrupted_run(full_run):
    """A fork: resume checkpoint-1 under another run_name. The new folder starts with the source's history up
    to that checkpoint and ends equal to the uninterrupted run, weights and all; the source is untouched."""
    run_dir, _ = full_run
    before = (run_dir / "metrics.jsonl").read_text()
    _launch([f"--config.save_dir={run_dir.parent}", "--config.run_name=resumed", "--config.num_epochs=2",
             f"--config.resume_from={run_dir / 'checkpoints' / 'checkpoint-1'}"])
    resumed = run_dir.parent / "resumed"
    assert _unmeasured(_metrics(resumed)) == _unmeasured(_metrics(run_dir))
    assert (run_dir / "metrics.jsonl").read_text() == before
    a = torch.load(run_dir / "checkpoints" / "checkpoint-2" / "training_state.pt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "checkpoint-2" / "training_state.pt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 4
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))
    assert a["sampler"] == b["sampler"]
    assert len(json.loads((resumed / "run.json").read_text())["starts"]) == 1


def test_killed_run_resumes_in_its_own_folder_without_duplicate_records(full_run, tmp_path):
    """A run killed during epoch 2 (checkpoint-1 saved, epoch-2 records partly written): resuming with only
    resume_from continues in the checkpoint's own folder, cuts metrics.jsonl back to checkpoint-1 and ends
    with the uninterrupted run's records, each once."""
    import shutil

    run_dir, _ = full_run
    killed = tmp_path / "killed"
    shutil.copytree(run_dir, killed)
    shutil.rmtree(killed / "checkpoints" / "checkpoint-2")
    lines = (killed / "metrics.jsonl").read_text().splitlines(keepends=True)
    (killed / "metrics.jsonl").write_text("".join(lines[:-1]) + lines[-1][:20])  # epoch-2 steps + a torn line
    _launch([f"--config.resume_from={killed / 'checkpoints' / 'checkpoint-1'}", "--config.num_epochs=2"])
    assert _unmeasured(_metrics(killed)) == _unmeasured(_metrics(run_dir))
    assert not any(p.name != "killed" for p in tmp_path.iterdir())  # no second run folder was made
    assert len(json.loads((killed / "run.json").read_text())["starts"]) == 2


def test_geneval_paper_command_runs_with_tiny_against_a_server_the_launcher_starts(tmp_path):
    """The paper's reward end to end with --tiny and nothing else: the launcher starts a GenEval server with the
    tiny detector beside the run, the client posts the branch images (strict scores for training), eval reports
    the benchmark accuracies, and the server is gone when the launcher exits."""
    command = ["bash", "scripts/single_node/run_sd3.sh", "--tiny", "--profile", "lowsnr2", "--sampler", "branch",
               "--reward", "geneval", "--loss", "matching", "--reweight", "fairclip2", "--",
               f"--config.save_dir={tmp_path}", "--config.run_name=geneval", "--config.num_epochs=1"]
    done = subprocess.run(command, cwd=COMPONENT, env=_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    server = next(line for line in done.stdout.splitlines() if line.startswith("tiny geneval server: "))
    pid = int(server.split("(pid ")[1].split(",")[0])
    rows = _metrics(tmp_path / "geneval")
    epoch = next(r for r in rows if r["kind"] == "epoch")
    # partial credit (may be negative, as upstream's count term); pickscore has weight 0 and is still logged
    assert math.isfinite(epoch["reward_geneval"]) and math.isfinite(epoch["reward_pickscore"])
    assert epoch["reward_avg"] == epoch["reward_geneval"]
    assert [r["step"] for r in rows if r["kind"] == "step"] == [1, 2]
    assert 0.0 <= epoch["eval_reward_geneval/accuracy"] <= 1.0  # benchmark accuracy, only_strict=False
    assert 0.0 <= epoch["eval_reward_geneval/strict_accuracy"] <= 1.0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the tiny server was stopped with the launcher


# ------------------------------------------------------------------------------- in-process pieces of the loop

def _tiny_run(loss_type="matching", reweight="fair_clip2", beta=0.0, cfg=True):
    """Just enough of a `Run` for `rows_loss`: the tiny SD3 transformer with a fresh LoRA, 10 steps."""
    import contextlib
    from types import SimpleNamespace

    from diffusers import SD3Transformer2DModel
    from rsm_testkit import get_tiny_model

    from sd35zo.sde import flow_sigmas
    from sd35zo.trainer_branch import add_lora

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel.from_pretrained(get_tiny_model("sd35"), subfolder="transformer")
    params = add_lora(transformer)
    with torch.no_grad():  # a non-zero B, so the adapter changes the velocity
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    config = SimpleNamespace(
        sample=SimpleNamespace(noise_level=0.7, guidance_scale=4.5),
        train=SimpleNamespace(loss_type=loss_type, reweight_type=reweight, clip_range=1e-4, beta=beta,
                              heuristic_kldenom_trick=False, cfg=cfg))
    dims = transformer.config
    negative = (torch.zeros(1, 6, dims.joint_attention_dim), torch.zeros(1, dims.pooled_projection_dim))
    return SimpleNamespace(config=config, transformer=transformer, params=params, negative=negative,
                           sigmas=flow_sigmas(10), schedule=[6, 6, 8, 10, 0, 0, 0, 0, 0],
                           accelerator=SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext))


def _rows(run, n, seed):
    gen = torch.Generator().manual_seed(seed)
    dims = run.transformer.config
    channels, side = dims.in_channels, 8
    steps = torch.arange(n) % 4  # the four branching steps of lowsnr2
    timesteps = (run.sigmas * 1000)[steps]
    table = {"latents": torch.randn(n, channels, side, side, generator=gen), "timesteps": timesteps,
             "v_old": torch.randn(n, channels, side, side, generator=gen),
             "noises": torch.randn(n, channels, side, side, generator=gen),
             "k": torch.tensor([6.0, 6.0, 8.0, 10.0])[steps], "sample": torch.arange(n) % 2, "step": steps}
    prompts = {"prompt_embeds": torch.randn(2, 6, dims.joint_attention_dim, generator=gen),
               "pooled": torch.randn(2, dims.pooled_projection_dim, generator=gen)}
    return table, prompts


def _loss_and_grads(run, table, prompts, adv, mask):
    from sd35zo.sampling_branch import exploration_weights
    from sd35zo.trainer_common import rows_loss

    for p in run.params:
        p.grad = None
    idx = torch.arange(adv.shape[0])
    loss, _ = rows_loss(run, table, {}, prompts, idx, torch.zeros(0, dtype=torch.long), adv, mask,
                        exploration_weights(table["k"], run.schedule))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in run.params]


def test_masked_rows_change_neither_loss_nor_gradient():
    run = _tiny_run()
    table, prompts = _rows(run, 8, seed=1)
    adv = torch.tensor([1.0, -0.5, 0.0, 2.0, 0.0, -1.5, 0.7, 0.3])
    mask = torch.tensor([True, True, False, True, False, True, True, False])  # row 7: padding (mask off, A != 0)
    loss, grads = _loss_and_grads(run, table, prompts, adv, mask)
    assert loss.item() > 0  # off-policy rows (v_old random) with the hinge margin
    # scramble everything stored for the masked rows: nothing may change
    other, _ = _rows(run, 8, seed=2)
    for key in ("latents", "v_old", "noises"):
        table[key][~mask] = other[key][~mask]
    adv2 = adv.clone()
    adv2[~mask] = 3.0
    loss2, grads2 = _loss_and_grads(run, table, prompts, adv2, mask)
    assert torch.equal(loss, loss2)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads2))


def test_all_rows_masked_gives_zero_policy_loss_and_no_gradient():
    run = _tiny_run()
    table, prompts = _rows(run, 4, seed=3)
    loss, grads = _loss_and_grads(run, table, prompts, torch.tensor([1.0, -1.0, 2.0, 0.5]),
                                  torch.zeros(4, dtype=torch.bool))
    assert loss.item() == 0.0
    assert all(g.abs().max().item() == 0.0 for g in grads)


def test_pad_to_microbatches_unmasks_all_rows_when_every_advantage_is_zero_and_checks_the_count():
    from types import SimpleNamespace

    from sd35zo.trainer_branch import pad_to_microbatches

    run = SimpleNamespace(budget=SimpleNamespace(microbatch_rows=36, microbatches_per_epoch=4))
    index, mask = pad_to_microbatches(run, 120, torch.zeros(120))
    assert index.shape == (144,) and torch.equal(index[120:], torch.zeros(24, dtype=torch.long))  # copies of row 0
    assert bool(mask[:120].all()) and not bool(mask[120:].any())  # padding never trains
    adv = torch.zeros(120)
    adv[5] = 1.0
    _, mask = pad_to_microbatches(run, 120, adv)
    assert mask.nonzero().flatten().tolist() == [5]
    with pytest.raises(RuntimeError, match="no-carry"):
        pad_to_microbatches(run, 150, torch.ones(150))  # 5 microbatches where start-up predicted 4


def _valid_objectives():
    from sd35zo.config_check import PPO_REWEIGHT_TYPES, REWEIGHT_TYPES

    return [("ppo", r) for r in PPO_REWEIGHT_TYPES] + [("matching", r) for r in REWEIGHT_TYPES]


@pytest.mark.parametrize("loss_type, reweight", _valid_objectives())
def test_every_objective_gives_a_finite_loss_and_gradient_off_policy(loss_type, reweight):
    """Every loss x reweight a config can select (both trainers share `rows_loss`), with the KL term on:
    finite loss, finite non-zero LoRA gradient, and the KL pass leaves the adapter enabled."""
    from sd35zo.sampling_branch import exploration_weights
    from sd35zo.trainer_common import rows_loss

    run = _tiny_run(loss_type, reweight, beta=0.01)
    table, prompts = _rows(run, 6, seed=4)
    gen = torch.Generator().manual_seed(5)
    table["next_latents"] = table["latents"] + 0.1 * torch.randn(table["latents"].shape, generator=gen)
    table["log_probs"] = torch.full((6,), -1.0)
    table["mean_old"] = table["latents"] + 0.05 * torch.randn(table["latents"].shape, generator=gen)  # grpo_guard's μ_old
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5, 0.7, -0.3])
    loss, stats = rows_loss(run, table, {}, prompts, torch.arange(6), torch.zeros(0, dtype=torch.long), adv,
                            torch.ones(6, dtype=torch.bool), exploration_weights(table["k"], run.schedule))
    loss.backward()
    assert torch.isfinite(loss) and stats["kl_loss"] > 0
    grads = torch.cat([p.grad.flatten() for p in run.params if p.grad is not None])
    assert torch.isfinite(grads).all() and grads.abs().max() > 0
    from peft.tuners.tuners_utils import BaseTunerLayer

    lora_layers = [m for m in run.transformer.modules() if isinstance(m, BaseTunerLayer)]
    assert lora_layers and not any(m.disable_adapters for m in lora_layers)  # adapter back on after μ_ref


@pytest.mark.parametrize("cfg", [True, False])
def test_train_cfg_chooses_the_training_forward_guided_or_conditional_only(cfg):
    """train.cfg (upstream's flag, True in every paper config) is honoured: with v_old set to the velocity the
    flag selects, the matching loss is on-policy (approx_kl exactly 0); the other velocity is off-policy."""
    from sd35zo.sampling import make_cfg_velocity
    from sd35zo.sampling_branch import exploration_weights
    from sd35zo.trainer_common import rows_loss

    run = _tiny_run(cfg=cfg)
    table, prompts = _rows(run, 4, seed=6)
    samples = table["sample"]

    def velocity(scale):
        v = make_cfg_velocity(run.transformer, prompts["prompt_embeds"][samples], prompts["pooled"][samples],
                              run.negative[0], run.negative[1], scale)
        with torch.no_grad():
            return v(table["latents"], table["timesteps"], torch.arange(4)).float()

    kl = {}
    for name, scale in (("guided", 4.5), ("conditional", 1.0)):
        table["v_old"] = velocity(scale)
        _, stats = rows_loss(run, table, {}, prompts, torch.arange(4), torch.zeros(0, dtype=torch.long),
                             torch.tensor([1.0, -1.0, 0.5, -0.5]), torch.ones(4, dtype=torch.bool),
                             exploration_weights(table["k"], run.schedule))
        kl[name] = stats["approx_kl"].item()
    on, off = ("guided", "conditional") if cfg else ("conditional", "guided")
    assert kl[on] == 0.0 and kl[off] > 0
