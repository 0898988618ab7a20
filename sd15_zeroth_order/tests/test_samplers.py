"""The samplers on the tiny SD1.5 UNet (spec §12 items 19-22, 25, 26): the branching pipeline's rows, order, anchors
and accounting; branches that reproduce the root at η = 0; results independent of the chunk size and of the
efficient call pattern (within float32 tolerance: other batch shapes pick other kernels, contract §7); the full
trajectory and the epoch's initial-noise sharing; reproducible evaluation."""
import pytest
import torch

from sd15zo import models as sd_models
from sd15zo.branching import sample_branches
from sd15zo.config import load_config
from sd15zo.sampling import call_latents, initial_latent_plan, sample_trajectory
from sd15zo.schedule import inference_timesteps

N = 6


@pytest.fixture(scope="module")
def tiny(one_cpu_thread):
    """The tiny SD1.5 with a LoRA whose B is perturbed (policy ≠ reference), 3 prompts encoded."""
    config = load_config("grpo_pr", tiny=True)
    models = sd_models.load_models(config, "cpu")
    torch.manual_seed(0)
    params = sd_models.add_lora(models.unet, 4)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    _, cond = sd_models.encode_prompts(models, ["a cat", "a dog", "a cat"])
    timesteps = inference_timesteps(models.scheduler, N)
    predict = sd_models.NoisePredictor(models, cond, 5.0, lambda: sd_models.autocast(config, "cpu"))
    predict_ref = sd_models.NoisePredictor(models, cond, 5.0, lambda: sd_models.autocast(config, "cpu"),
                                           use_reference=True)
    return models, predict, predict_ref, timesteps


def _branches(tiny, schedule=(2, 0, 3, 0, 0, 0), eta=1.0, chunk=2, efficient=True, groups=None, seed=0,
              algorithm="vw", const_weight=None, x=None):
    models, predict, predict_ref, timesteps = tiny
    x = torch.randn(3, *models.latent_shape, generator=torch.Generator().manual_seed(1)) if x is None else x
    return sample_branches(predict, x, models.alphas_cumprod, timesteps, list(schedule), eta=eta, algorithm=algorithm,
                           const_weight=const_weight, latent_chunk_size=chunk, collect_anchor_rows=True,
                           generator=torch.Generator().manual_seed(seed), predict_ref=predict_ref,
                           root_groups=groups, efficient=efficient)


def test_rows_are_ordered_by_step_root_branch_and_carry_their_root_state(tiny):
    out = _branches(tiny)
    assert out.num_rows == 3 * (2 + 3)
    assert out.row_step_idx.tolist() == [0] * 6 + [2] * 9
    assert out.row_sample_idx.tolist() == [0, 0, 1, 1, 2, 2] + [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert out.row_exploration_k.tolist() == [2.0] * 6 + [3.0] * 9
    timesteps = tiny[3]
    assert out.row_timesteps.tolist() == [int(timesteps[0])] * 6 + [int(timesteps[2])] * 9
    assert out.row_next_timesteps.tolist() == [int(timesteps[1])] * 6 + [int(timesteps[3])] * 9
    for r in range(out.num_rows):
        assert torch.equal(out.row_latents[r], out.root_latents[out.row_sample_idx[r], out.row_step_idx[r]])
    # anchors: zero-k steps before the last (1, 3, 4), every root, the root's state
    assert out.kl_row_step_idx.tolist() == [1] * 3 + [3] * 3 + [4] * 3
    assert out.kl_row_sample_idx.tolist() == [0, 1, 2] * 3
    for a in range(out.kl_row_step_idx.shape[0]):
        assert torch.equal(out.kl_row_latents[a], out.root_latents[out.kl_row_sample_idx[a], out.kl_row_step_idx[a]])
    # the branches differ (their own noise), the k predictions of a root are one and the same
    assert not torch.equal(out.row_next_latents[0], out.row_next_latents[1])
    assert torch.equal(out.row_noise_preds[0], out.row_noise_preds[1])
    # pass-2b accounting: Σ (N − s − 1) useful row-steps, nothing padded in the efficient path
    assert out.useful_row_steps_2b == 6 * (N - 1) + 9 * (N - 3) == out.processed_row_steps_2b


def test_with_eta_0_every_branch_reproduces_its_root(tiny):
    out = _branches(tiny, eta=0.0)
    for r in range(out.num_rows):
        root, step = int(out.row_sample_idx[r]), int(out.row_step_idx[r])
        torch.testing.assert_close(out.row_next_latents[r], out.root_latents[root, step + 1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.row_final_latents[r], out.root_latents[root, N], rtol=1e-5, atol=1e-5)
    models = tiny[0]
    images = sd_models.decode(models, out.row_final_latents)
    roots = sd_models.decode(models, out.root_latents[out.row_sample_idx, N])
    torch.testing.assert_close(images, roots, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk", [1, 4, 7])
def test_results_do_not_depend_on_the_chunk_size(tiny, chunk):
    reference = _branches(tiny, chunk=2)
    other = _branches(tiny, chunk=chunk)
    for name in ("row_next_latents", "row_log_probs", "row_noises", "row_final_latents", "row_noise_preds"):
        torch.testing.assert_close(getattr(other, name), getattr(reference, name), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("algorithm, const_weight", [("vw", None), ("uw-sigma", 4.5), ("uw-lambda", 0.5168997049331665)])
def test_efficient_path_equals_upstreams_call_pattern_and_pads_nothing(tiny, algorithm, const_weight):
    """Shared predictions for the k branches of a root and for identical roots, unpadded chunks, no policy forward
    where λ = 0: the same numbers as upstream's per-row, padded calls (float32 tolerance)."""
    models = tiny[0]
    base = torch.randn(1, *models.latent_shape, generator=torch.Generator().manual_seed(3))
    x = base.expand(3, -1, -1, -1).clone()  # roots 0 and 2: same prompt, same initial latent
    kw = dict(x=x, algorithm=algorithm, const_weight=const_weight, chunk=4)
    fast = _branches(tiny, efficient=True, groups=["a cat", "a dog", "a cat"], **kw)
    slow = _branches(tiny, efficient=False, **kw)
    # other batch shapes round differently in float32, and guidance (scale 5) amplifies it over the ODE steps
    for name in ("root_latents", "row_next_latents", "row_log_probs", "row_final_latents", "row_noise_preds",
                 "kl_row_latents"):
        torch.testing.assert_close(getattr(fast, name), getattr(slow, name), rtol=1e-4, atol=1e-4)
    assert torch.equal(fast.root_latents[0], fast.root_latents[2])
    assert fast.padded_row_steps_2b == 0 < slow.padded_row_steps_2b
    assert slow.processed_row_steps_2b >= slow.useful_row_steps_2b == fast.useful_row_steps_2b


def test_schedules_without_branches_or_of_another_length_are_refused(tiny):
    with pytest.raises(ValueError, match="0 at every step"):
        _branches(tiny, schedule=(0,) * N)
    with pytest.raises(ValueError, match="entries"):
        _branches(tiny, schedule=(1, 0))


def test_trajectory_steps_chain_and_reference_is_recorded(tiny):
    models, predict, predict_ref, timesteps = tiny
    x = torch.randn(3, *models.latent_shape, generator=torch.Generator().manual_seed(4))
    # vw: PCPO's sigma with const_weight 4.5 has no real value at the second-to-last step of a 6-step schedule
    traj = sample_trajectory(predict, x, models.alphas_cumprod, timesteps, eta=1.0, algorithm="vw",
                             generator=torch.Generator().manual_seed(0), predict_ref=predict_ref, keep_ref=True)
    assert traj.latents.shape == (3, N + 1, *models.latent_shape) and traj.log_probs.shape == (3, N)
    assert torch.equal(traj.latents[:, 0], x) and traj.ref_noise_preds.shape == traj.noise_preds.shape
    assert not torch.equal(traj.ref_noise_preds, traj.noise_preds)  # the LoRA is perturbed
    assert torch.isfinite(traj.log_probs).all()


def test_the_first_half_of_the_calls_share_one_initial_latent_and_the_rest_another():
    gen = torch.Generator().manual_seed(0)
    for calls, first in ((16, 8), (5, 2), (1, 1), (2, 1)):
        plan = initial_latent_plan(calls, "two_per_epoch", (4, 8, 8), gen, "cpu")
        assert all(p is plan[0] for p in plan[:first]) and all(p is plan[-1] for p in plan[first:])
        assert calls == 1 or plan[0] is not plan[-1]
        rows = call_latents(plan[0], 3, (4, 8, 8), gen, "cpu")
        assert all(torch.equal(rows[i], plan[0][0]) for i in range(3))
    assert initial_latent_plan(4, "none", (4, 8, 8), gen, "cpu") == [None] * 4
    fresh = call_latents(None, 2, (4, 8, 8), gen, "cpu")
    assert not torch.equal(fresh[0], fresh[1])


def test_evaluation_sampling_is_reproducible_for_a_fixed_model_and_seed(tiny):
    models, predict, _, timesteps = tiny

    def sample(seed):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(3, *models.latent_shape, generator=gen)
        traj = sample_trajectory(predict, x, models.alphas_cumprod, timesteps, eta=1.0, algorithm="vw", generator=gen)
        return sd_models.decode(models, traj.final_latents)

    assert torch.equal(sample(7), sample(7)) and not torch.equal(sample(7), sample(8))
