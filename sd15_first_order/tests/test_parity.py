"""Parity with the reference implementation (jaylee2000/rsm e8be3df, sd15_first_order) on fixed float64 inputs.

`golden_upstream.json` holds numbers produced by running the reference's own functions (DDIM step, x̂0 helper,
sampling pipeline, helper schedules, shuffle/subsampling, the whole policy update in three mode combinations)
outside this repository on the inputs of `parity_fixtures.py`; no reference code is in this repository. Each
test runs this implementation on the same inputs and compares.

Tolerance: the same float64 computation in the same order -> relative 1e-9 (with an absolute floor of 1e-18 for
the near-zero first-step residuals), far above float64 rounding yet far below any change of formula, index or
RNG order; bf16 step outputs -> relative 1e-6 (the same bf16 operations, summed in float64).
"""
import json
from pathlib import Path

import pytest
import torch

import parity_fixtures as F
from sd15fo import distributed
from sd15fo.models import Models
from sd15fo.prompts import SALT_SHUFFLE, SALT_TRAIN_NOISE, seed_mix
from sd15fo.sampling import sample_trajectories
from sd15fo.schedule import ddim_step, helper_schedule, pred_orig_latent
from sd15fo.subsampling import shuffle_and_batch
from sd15fo.trainer import Run, policy_update

GOLDEN = json.loads((Path(__file__).parent / "golden_upstream.json").read_text())


def close(actual, expected, rtol=1e-9, atol=1e-18):
    actual, expected = list(map(float, actual)), list(map(float, expected))
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert abs(a - e) <= atol + rtol * abs(e), (actual, expected)


@pytest.fixture(scope="module")
def alphas():
    return F.scheduler().alphas_cumprod


def test_ddim_step_sampling_form_matches_the_reference(alphas, one_cpu_thread):
    t, eps, x, noise, _, _ = F.step_inputs()
    out = ddim_step(alphas, eps, t, x, eta=1.0, num_inference_steps=50, noise=noise)
    golden = GOLDEN["step_sampling"]
    close(F.checksum(out.prev_sample), golden["prev"])
    close(out.log_prob.tolist(), golden["log_prob"])
    close(F.checksum(out.score), golden["score"])


def test_ddim_step_scoring_form_with_strength_and_backward_logprob_matches(alphas):
    t, eps, x, _, x_next, strength = F.step_inputs()
    out = ddim_step(alphas, eps, t, x, eta=0.7, num_inference_steps=50, prev_sample=x_next, strength=strength,
                    calculate_pb=True)
    golden = GOLDEN["step_scoring"]
    close(out.log_prob.tolist(), golden["log_prob"])
    close(F.checksum(out.score), golden["score"])
    close(out.log_pb.tolist(), golden["log_pb"])


def test_ddim_step_in_bf16_keeps_the_reference_dtypes_and_values(alphas):
    t, eps, x, noise, _, _ = F.step_inputs(torch.bfloat16)
    out = ddim_step(alphas, eps, t, x, eta=1.0, num_inference_steps=50, noise=noise)
    golden = GOLDEN["step_bf16"]
    assert (str(out.prev_sample.dtype), str(out.score.dtype)) == (golden["prev_dtype"], golden["score_dtype"])
    close(F.checksum(out.prev_sample), golden["prev"], rtol=1e-6)
    close(out.log_prob.tolist(), golden["log_prob"], rtol=1e-6)
    close(F.checksum(out.score), golden["score"], rtol=1e-6)


def test_pred_orig_latent_matches_including_t0_rows_and_bf16(alphas):
    t0 = torch.tensor([981, 0, 21, 1])
    _, eps, x, _, _, _ = F.step_inputs()
    close(F.checksum(pred_orig_latent(alphas, eps, x, t0)), GOLDEN["pred_orig"])
    _, eps, x, _, _, _ = F.step_inputs(torch.bfloat16)
    close(F.checksum(pred_orig_latent(alphas, eps, x, t0)), GOLDEN["pred_orig_bf16"], rtol=1e-6)


@pytest.mark.parametrize("length", [51, 50])
def test_helper_schedules_match_with_the_legacy_stride(alphas, length):
    """The reference's helper uses stride 1000 // L: 19 for the 51-column training matrix, 20 for 50."""
    scheduler = F.scheduler()
    scheduler.set_timesteps(50)
    ts = scheduler.timesteps[torch.arange(length) % 50].repeat(2, 1)
    ts[1] = ts[1].flip(0)
    helper = helper_schedule(alphas, ts, 1000 // length)
    golden = GOLDEN[f"helper_L{length}"]
    close(F.checksum(helper.weights), golden["weights"])
    close(F.checksum(helper.omegas), golden["omegas"])
    close(F.checksum(helper.sigmas), golden["sigmas"])
    close(helper.sigmas[0, :, 0, 0, 0].tolist(), golden["sigma_row0"])


@pytest.mark.parametrize("name, fraction, low_var, seed", [("shuffle_lowvar", 0.2, True, 5),
                                                          ("shuffle_plain", 0.2, False, 6),
                                                          ("shuffle_full", 1.0, True, 7)])
def test_shuffle_and_subsampling_draw_the_reference_rows_from_the_same_rng_stream(name, fraction, low_var, seed):
    """Ids 1000·m + s mark (trajectory, step): the rows, their order and the trajectory order all match the
    reference's for a generator seeded like its global RNG."""
    ids = torch.arange(4)[:, None] * 1000 + torch.arange(50)[None]  # [M, N]
    samples = {"timesteps": ids, "latents": torch.cat([ids, ids[:, -1:] + 1], 1).double(),
               "noise_preds": ids.double(), "prompts": [f"p{m}" for m in range(4)],
               "prompt_metadata": [{} for _ in range(4)], "z0": torch.arange(4).double()}
    batches, columns = shuffle_and_batch(samples, batch_size=2, num_steps=50, timestep_fraction=fraction,
                                         low_var=low_var, generator=torch.Generator().manual_seed(seed))
    golden = GOLDEN[name]
    assert torch.cat([b["timesteps"] for b in batches]).tolist() == golden["timesteps"]
    assert torch.cat([b["z0"] for b in batches]).tolist() == golden["z0"]
    assert [p for b in batches for p in b["prompts"]] == golden["prompts"]
    assert torch.cat([b["next_latents"] - b["latents"] for b in batches]).unique().tolist() == golden["next_minus_latents"]
    assert columns.shape[1] == len(golden["timesteps"][0])


class _Log:
    def __init__(self):
        self.records = []

    def log(self, record, step, kind="step"):
        self.records.append(record)


def _run(mode, tmp_path):
    unet, vae = F.unet(), F.vae()
    params = F.add_lora(unet)
    scheduler = F.scheduler()
    models = Models(None, None, unet, vae, scheduler, scheduler.alphas_cumprod.float(), F.DTYPE)
    train = {**F.BASE_TRAIN, **F.MODES[mode], "cache_z0_reward_grad": True}
    config = {"sample": dict(F.SAMPLE), "train": train, "seed": F.SEED, "parity": True, "nan_policy": "stop"}
    optimizer = torch.optim.AdamW(params, lr=train["lr"], betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    embeds, negative = F.prompt_embeds(2)
    run = Run(config, "parity", distributed.Processes(), models, unet, params, optimizer, None, F.toy_reward, None,
              negative, str(tmp_path), _Log(), num_train_timesteps=11, updates_per_epoch=2)
    return run, embeds


def _samples(run, embeds):
    gen = torch.Generator().manual_seed(seed_mix(F.SEED, SALT_TRAIN_NOISE, 0, 0, 0))
    traj = sample_trajectories(run.unet, run.models.vae, run.models.alphas_cumprod, embeds, run.negative,
                               timesteps=run.models.timesteps(50), guidance_scale=5.0, eta=1.0, generator=gen,
                               latent_shape=F.LATENT)
    samples = {"prompts": ["a", "b"], "prompt_metadata": [{}, {}], "prompt_embeds": embeds,
               "timesteps": traj.timesteps, "latents": traj.latents, "noise_preds": traj.noise_preds,
               "z0": traj.latents[:, -1]}
    return traj, samples


@pytest.mark.parametrize("mode", ["pruned", "ours", "mixed"])
def test_sampling_and_the_whole_policy_update_match_the_reference(mode, tmp_path, one_cpu_thread):
    """Sampling (seeded generator, CFG, η = 1) gives the reference's trajectories; one epoch of policy updates
    (shuffle, subsampling with the legacy stride, K = 11 transitions, lookahead or terminal Ψ, modes, trust region,
    clipping, AdamW) logs the reference's per-step diagnostics and ends at its LoRA weights."""
    run, embeds = _run(mode, tmp_path)
    traj, samples = _samples(run, embeds)
    golden = GOLDEN[f"sampling_{mode}"]
    close(F.checksum(traj.latents), golden["latents"])
    close(F.checksum(traj.noise_preds), golden["noise_preds"])
    close(F.checksum(traj.log_probs), golden["log_probs"])
    close(F.checksum(traj.images), golden["images"])

    # the reference shuffles with its global RNG seeded like our generator for (seed, epoch 0, rank 0, inner 0)
    assert seed_mix(F.SEED, SALT_SHUFFLE, 0, 0, 0) > 0
    policy_update(run, samples, epoch=0)
    golden = GOLDEN[f"update_{mode}"]
    assert len(run.logger.records) == len(golden["steps"]) == 2
    for record, expected in zip(run.logger.records, golden["steps"]):
        for key, value in expected.items():
            close([record[key]], [value], atol=1e-18 if value else 1e-24)
    close(F.checksum(torch.cat([p.detach().flatten() for p in run.params])), golden["lora"])
