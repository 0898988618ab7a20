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
def full_run(tiny_prompt_embeddings, tmp_path_factory):
    """The uninterrupted 2-epoch paper run on the tiny kit."""
    save = tmp_path_factory.mktemp("runs")
    _launch([*tiny_prompt_embeddings, f"--config.save_dir={save}", "--config.run_name=full", "--config.num_epochs=2"])
    return save / "full"


def test_paper_command_tiny_trains_two_epochs_with_exact_update_counts(full_run):
    rows = _metrics(full_run)
    updates = [r for r in rows if "policy_loss" in r]
    # 120 rows per epoch -> 4 microbatches of U = 4 x 9 rows, accumulated 2 per step: 2 steps per epoch.
    assert [r["step"] for r in updates] == [1, 2, 3, 4]
    assert [r["epoch"] for r in updates] == [1, 1, 2, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in updates)
    layout = [r for r in rows if "actual_microbatches_per_epoch" in r]
    assert [(r["actual_transition_rows"], r["actual_microbatches_per_epoch"], r["padded_policy_units"])
            for r in layout] == [(120, 4, 24)] * 2
    # seed|t groups of the lowsnr2 schedule 6, 6, 8, 10: mean group size 7.5
    assert [r["group_size"] for r in rows if "group_size" in r] == [7.5, 7.5]
    assert [r["eval_epoch"] for r in rows if "eval_epoch" in r] == [1, 2]
    assert all("eval_reward_avg" in r for r in rows if "eval_epoch" in r)
    # EMA weights at eval equal the LoRA init (no EMA update before step 7), whose adapter is a no-op: KL = 0
    assert [r["eval_kl_divergence"] for r in rows if "eval_epoch" in r] == [0.0, 0.0]
    assert [r["optimizer_updates_this_epoch"] for r in rows if "optimizer_updates_this_epoch" in r] == [2, 2]
    # the live LoRA moved away from its initialisation (B = 0 at init)
    state = torch.load(full_run / "checkpoints" / "checkpoint-2" / "training_state.pt", weights_only=False)
    assert max(p.abs().max().item() for p in state["params"] if p.dim() == 2 and p.shape[1] == 32) > 0


def test_checkpoint_lora_loads_with_diffusers_pipeline(full_run):
    from diffusers import StableDiffusion3Pipeline
    from rsm_testkit import get_tiny_model
    from safetensors.torch import load_file

    lora_dir = full_run / "checkpoints" / "checkpoint-2" / "lora"
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


def test_resume_from_checkpoint_reproduces_uninterrupted_epoch(full_run, tiny_prompt_embeddings):
    save = full_run.parent
    _launch([*tiny_prompt_embeddings, f"--config.save_dir={save}", "--config.run_name=resumed", "--config.num_epochs=2",
             f"--config.resume_from={full_run / 'checkpoints' / 'checkpoint-1'}"])
    def measured(key):  # wall-clock times, memory and paths differ between any two runs
        return "time" in key or "peak_memory" in key or key == "checkpoint_path"

    def epoch_two(rows):
        first = next(i for i, r in enumerate(rows) if r.get("checkpoint_epoch") == 1) + 1 if any(
            r.get("checkpoint_epoch") == 1 for r in rows) else 0
        return [{k: v for k, v in r.items() if not measured(k)} for r in rows[first:]]

    resumed, full = epoch_two(_metrics(save / "resumed")), epoch_two(_metrics(full_run))
    assert len(resumed) == len(full) and resumed == full
    a = torch.load(full_run / "checkpoints" / "checkpoint-2" / "training_state.pt", weights_only=False)
    b = torch.load(save / "resumed" / "checkpoints" / "checkpoint-2" / "training_state.pt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 4
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))
    assert a["sampler"] == b["sampler"]


def test_two_process_gloo_run_averages_gradients_and_saves_once(tiny_prompt_embeddings, tmp_path):
    """Two CPU processes (gloo): each rank samples half the epoch, groups are normalised over both, and
    the replicas stay identical (checked by the trainer before it saves). `accelerate launch --cpu` starts
    only one process, so torchrun starts the two (ACCELERATE_USE_CPU selects gloo)."""
    torchrun = str(Path(PYTHON).parent / "torchrun")
    command = [torchrun, "--nproc_per_node", "2", "--master_port", "29817", "scripts/train_sd3_pr.py",
               "--config", f"config/sd3_matrix.py:tiny:{TINY_ID}", *tiny_prompt_embeddings,
               f"--config.save_dir={tmp_path}", "--config.run_name=two", "--config.num_epochs=1",
               "--config.train.ema=False"]  # evaluate the live weights: the KL probe must see them move
    done = subprocess.run(command, cwd=COMPONENT, env=dict(_env(), ACCELERATE_USE_CPU="true"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-5000:]
    rows = _metrics(tmp_path / "two")
    # 2 ranks x 1 rollout x 2 images x 30 branch rows: 60 rows per rank -> 2 microbatches of 36, 1 per step
    layout = [r for r in rows if "actual_microbatches_per_epoch" in r]
    assert [(r["actual_transition_rows"], r["actual_microbatches_per_epoch"]) for r in layout] == [(60, 2)]
    assert [r["step"] for r in rows if "policy_loss" in r] == [1, 2]
    assert [r["group_size"] for r in rows if "group_size" in r] == [7.5]
    kl = [r["eval_kl_divergence"] for r in rows if "eval_epoch" in r]
    assert len(kl) == 1 and 0.0 < kl[0] < 1.0  # two small steps away from the reference: positive, small
    assert (tmp_path / "two" / "checkpoints" / "checkpoint-1" / "lora" / "pytorch_lora_weights.safetensors").is_file()


GENEVAL_TRAIN = [
    {"tag": "counting", "include": [{"class": "dog", "count": 2}], "prompt": "a photo of two dogs"},
    {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
    {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}],
     "prompt": "a photo of a dog and a cat"},
]


def test_geneval_reward_through_a_loopback_server(tmp_path):
    """The paper's reward end to end: GenEval prompts with metadata, the client posting the branch images
    to a local server running the tiny detector, strict scores for training and accuracies at eval."""
    from diffusers import StableDiffusion3Pipeline
    from rsm_testkit import get_tiny_model
    from shared_rewards.geneval.client import start_server

    from sd35zo.embeddings import precompute_split

    prompts = tmp_path / "geneval.jsonl"
    prompts.write_text("".join(json.dumps(item) + "\n" for item in GENEVAL_TRAIN))
    pipe = StableDiffusion3Pipeline.from_pretrained(get_tiny_model("sd35"), transformer=None, vae=None)
    for split in ("train", "test"):
        precompute_split(pipe, str(prompts), str(tmp_path), split, batch_size=8, dtype=torch.float32)
    geneval_data = [f"--config.train_hdf5_path={tmp_path / 'train_embeddings.h5'}", f"--config.train_prompt_file_path={prompts}",
            f"--config.test_hdf5_path={tmp_path / 'test_embeddings.h5'}", f"--config.test_prompt_file_path={prompts}"]
    with start_server(port=0, device="cpu", detector=str(get_tiny_model("mask2former_coco_dog_cat")),
                      clip=str(get_tiny_model("clip_vit_l14"))) as server:
        command = [PYTHON, "scripts/train_sd3_pr.py", "--config",
                   "config/sd3_matrix.py:tiny:sd3.lowsnr2.branch.geneval.matching.fairclip2", *geneval_data,
                   f"--config.reward_options.geneval.url={server.url}", f"--config.save_dir={tmp_path}",
                   "--config.run_name=geneval", "--config.num_epochs=1"]
        done = subprocess.run(command, cwd=COMPONENT, env=_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-5000:]
    rows = _metrics(tmp_path / "geneval")
    rewards = next(r for r in rows if "reward_avg" in r)
    # partial credit (may be negative, as upstream's count term); pickscore has weight 0 and is still logged
    assert math.isfinite(rewards["reward_geneval"]) and math.isfinite(rewards["reward_pickscore"])
    assert rewards["reward_avg"] == rewards["reward_geneval"]
    assert [r["step"] for r in rows if "policy_loss" in r] == [1, 2]
    evaluation = next(r for r in rows if "eval_epoch" in r)
    assert 0.0 <= evaluation["eval_reward_geneval/accuracy"] <= 1.0  # benchmark accuracy, only_strict=False
    assert 0.0 <= evaluation["eval_reward_geneval/strict_accuracy"] <= 1.0


# ------------------------------------------------------------------------------- in-process pieces of the loop

def _tiny_run(loss_type="matching", reweight="fair_clip2", beta=0.0):
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
                              heuristic_kldenom_trick=False))
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
             "k": torch.tensor([6.0, 6.0, 8.0, 10.0])[steps], "sample": torch.arange(n) % 2}
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
