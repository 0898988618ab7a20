"""The RSM pieces of the update on the tiny UNet (spec §12 items 13, 15): the ODE KL anchor is exactly 0 at
initialisation (policy = reference, LoRA B = 0), positive once the LoRA moves, and weighted by const_weight² (not
divided by weight_scale_factor); the training forward with train_cfg=false is the conditional branch alone; the
on-policy PCPO loss of real rows is ε|A| per row and its RSM reduction with κ = 1 and no mask is the baseline's
batch mean."""
from types import SimpleNamespace

import pytest
import torch

from sd15zo import models as sd_models, rsm
from sd15zo.config import load_config
from sd15zo.trainer_common import row_losses, training_noise_pred
from sd15zo.trainer_grpo_pr import anchor_kl


@pytest.fixture(scope="module")
def run(one_cpu_thread):
    config = load_config("grpo_pr", tiny=True)
    models = sd_models.load_models(config, "cpu")
    torch.manual_seed(0)
    params = sd_models.add_lora(models.unet, config.rank)
    _, cond = sd_models.encode_prompts(models, ["a cat", "a dog"])
    return SimpleNamespace(config=config, models=models, params=params, device=torch.device("cpu"),
                           cond=cond)


def _anchors(run):
    x = torch.randn(3, *run.models.latent_shape, generator=torch.Generator().manual_seed(0))
    return {"latents": x, "t": torch.tensor([801, 401, 101]), "root": torch.tensor([0, 1, 0])}, {"cond": run.cond}


def test_anchor_kl_is_zero_at_init_positive_after_the_lora_moves_and_weighted_by_const_weight_squared(run):
    anchors, roots = _anchors(run)
    chosen = torch.tensor([0, 2])
    assert anchor_kl(run, anchors, roots, chosen).item() == 0.0
    assert anchor_kl(run, anchors, roots, torch.zeros(0, dtype=torch.long)).item() == 0.0
    saved = [p.detach().clone() for p in run.params]
    try:
        with torch.no_grad():
            for name, p in run.models.unet.named_parameters():
                if "lora_B" in name:
                    p.add_(0.05 * torch.randn_like(p))
        kl = anchor_kl(run, anchors, roots, chosen)
        assert kl.item() > 0 and kl.requires_grad
        x, t, cond = anchors["latents"][chosen], anchors["t"][chosen], run.cond[anchors["root"][chosen]]
        eps, ref = training_noise_pred(run, x, t, cond), training_noise_pred(run, x, t, cond, reference=True)
        expected = 0.5 * (4.5 ** 2 * (eps - ref) ** 2).mean(dim=(1, 2, 3)).mean()  # ω_a = 4.5, not 4.5 / 8.7
        torch.testing.assert_close(kl, expected, rtol=1e-5, atol=1e-12)
    finally:
        with torch.no_grad():
            for p, s in zip(run.params, saved):
                p.copy_(s)


@pytest.mark.parametrize("train_cfg", [True, False])
def test_train_cfg_chooses_the_guided_or_the_conditional_forward(run, train_cfg):
    anchors, _ = _anchors(run)
    x, t, cond = anchors["latents"][:2], anchors["t"][:2], run.cond
    local = SimpleNamespace(**{**vars(run), "config": load_config("grpo_pr", tiny=True,
                                                                  sets=[f"train_cfg={str(train_cfg).lower()}"])})
    out = training_noise_pred(local, x, t, cond)
    expected = sd_models.cfg_noise_pred(run.models.unet, x, t, cond, run.models.negative, 5.0 if train_cfg else None)
    torch.testing.assert_close(out, expected.float(), rtol=0, atol=0)


def test_on_policy_rows_cost_epsilon_abs_a_and_the_rsm_reduction_is_the_baseline_mean(run):
    anchors, _ = _anchors(run)
    x, t, cond = anchors["latents"], anchors["t"], run.cond[anchors["root"]]
    with torch.no_grad():
        old = training_noise_pred(run, x, t, cond)
    eps = training_noise_pred(run, x, t, cond)
    adv = torch.tensor([1.0, -2.0, 7.0])
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    out = row_losses(run, eps, x, t, adv, eps_old=old, noise=noise)
    torch.testing.assert_close(out.loss, 1e-4 * torch.tensor([1.0, 2.0, 5.0]), rtol=1e-6, atol=1e-9)  # |A| clamped
    rsm_loss = rsm.masked_policy_loss(out.loss, torch.ones(3), torch.ones(3, dtype=torch.bool))
    torch.testing.assert_close(rsm_loss, out.loss.mean(), rtol=1e-7, atol=0)
