"""KL to the adapter-disabled reference (spec §4.4, invariant 15) on a peft LoRA of a tiny linear velocity."""
import pytest
import torch
from peft import LoraConfig, get_peft_model

from flow_step_reference import TinyVelocity, col, sde_mean, step_rows
from sd35zo.kl import anchor_kl, kl_denominator, sde_kl_rows

STEPS = list(range(9))


def _lora_policy():
    """LoRA (rank 2) on the tiny velocity's projection; lora_B starts at zero as peft initialises it."""
    return get_peft_model(TinyVelocity(), LoraConfig(r=2, lora_alpha=4, target_modules=["proj"]))


def _means(policy, steps, seed=0):
    """μ_θ (adapter on, with grad) and μ_ref (adapter disabled, no grad) of one SDE step per row."""
    sigma, h, st = step_rows(steps)
    x = torch.randn(len(steps), 2, 3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    mean = sde_mean(x, policy(x), sigma, h, st)
    with torch.no_grad(), policy.disable_adapter():
        mean_ref = sde_mean(x, policy(x), sigma, h, st)
    return mean, mean_ref, h, st


def _train_adapter_a_little(policy):
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7), dtype=p.dtype))


def test_kl_is_zero_at_initialisation_because_lora_b_is_zero():
    policy = _lora_policy()
    assert all((p == 0).all() for n, p in policy.named_parameters() if "lora_B" in n)
    mean, mean_ref, h, st = _means(policy, STEPS)
    kl = sde_kl_rows(mean, mean_ref, h=h, sigma_tilde=st)
    assert torch.equal(kl, torch.zeros_like(kl))
    assert anchor_kl(mean, mean_ref, h=h, sigma_tilde=st, k_bar=7.5).item() == 0.0


def test_exact_kl_is_the_per_element_gaussian_kl_of_the_two_sde_steps():
    policy = _lora_policy()
    _train_adapter_a_little(policy)
    mean, mean_ref, h, st = _means(policy, STEPS)
    std = col(st * h.sqrt()).expand_as(mean)
    gaussian = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std),
                                                 torch.distributions.Normal(mean_ref, std)).flatten(1).mean(1)
    kl = sde_kl_rows(mean, mean_ref, h=h, sigma_tilde=st)
    assert (kl > 0).all()
    torch.testing.assert_close(kl, gaussian, rtol=1e-10, atol=0)


def test_heuristic_denominator_is_exact_over_h_so_heuristic_kl_is_h_times_exact():
    policy = _lora_policy()
    _train_adapter_a_little(policy)
    mean, mean_ref, h, st = _means(policy, STEPS)
    torch.testing.assert_close(kl_denominator(h, st, heuristic=True), kl_denominator(h, st) / h)
    exact = sde_kl_rows(mean, mean_ref, h=h, sigma_tilde=st)
    heuristic = sde_kl_rows(mean, mean_ref, h=h, sigma_tilde=st, heuristic=True)
    torch.testing.assert_close(heuristic, h * exact, rtol=1e-12, atol=0)


def test_kl_gradient_reaches_only_the_adapter():
    policy = _lora_policy()
    _train_adapter_a_little(policy)
    mean, mean_ref, h, st = _means(policy, STEPS)
    sde_kl_rows(mean, mean_ref, h=h, sigma_tilde=st).sum().backward()
    for name, p in policy.named_parameters():
        if "lora_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad, name  # base weights are frozen by peft: the reference stays put


def test_anchor_kl_is_k_bar_times_the_plain_mean_over_anchor_rows_and_zero_without_anchors():
    policy = _lora_policy()
    _train_adapter_a_little(policy)
    anchor_steps = [4, 5, 6, 7, 8]  # lowsnr2: the steps with k = 0
    mean, mean_ref, h, st = _means(policy, anchor_steps, seed=3)
    std2 = (st**2 * h)
    by_hand = ((mean - mean_ref) ** 2).flatten(1).mean(1) / (2 * std2)
    k_bar = (6 + 6 + 8 + 10) / 4  # 7.5
    torch.testing.assert_close(anchor_kl(mean, mean_ref, h=h, sigma_tilde=st, k_bar=k_bar), k_bar * by_hand.mean())
    torch.testing.assert_close(anchor_kl(mean, mean_ref, h=h, sigma_tilde=st, k_bar=k_bar, heuristic=True),
                               k_bar * (h * by_hand).mean())
    none = anchor_kl(mean[:0], mean_ref[:0], h=h[:0], sigma_tilde=st[:0], k_bar=k_bar)
    assert none.item() == 0.0 and none.requires_grad
    assert k_bar == pytest.approx(7.5)
