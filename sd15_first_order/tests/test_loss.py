"""The residual ∇-DB loss, its modes and the update's accounting (spec §4, §5.4, §11 items 5-7, 11-14)."""
import copy

import pytest
import torch

from conftest import build_run, tiny_values
from sd15fo import trainer
from sd15fo.choices import ModeError, parse_reward_mode, parse_scale, parse_strength
from sd15fo.loss import guidance, residual_nabla_db_loss, strength
from sd15fo.models import reference_mode
from sd15fo.sampling import cfg_eps
from sd15fo.schedule import alpha_bar, ddim_step

# ------------------------------------------------------------------------------------------------ modes


def test_reward_modes_scale_the_gradient_as_the_spec_table_says():
    psi = torch.full((2, 4, 1, 1), 2.0)
    a_next = torch.tensor([0.5, 0.25]).view(2, 1, 1, 1)
    sigma = torch.tensor([0.1, 0.3]).view(2, 1, 1, 1)
    beta, b = 10.0, 3.0
    torch.testing.assert_close(guidance(psi, beta, "squared", a_next, sigma, b), beta * psi * a_next)
    torch.testing.assert_close(guidance(psi, beta, "sigma", a_next, sigma, b), beta * psi * b * sigma)
    torch.testing.assert_close(guidance(psi, beta, "sigma_times_oldgamma", a_next, sigma, b), beta * psi * a_next * b * sigma)
    torch.testing.assert_close(guidance(psi, beta, "constant", a_next, sigma, b), beta * psi)


def test_strength_is_the_constant_or_a_times_sigma_and_a_numeric_strength_ignores_a():
    sigma = torch.tensor([0.1, 0.3]).view(2, 1, 1, 1)
    assert strength(0.5, 7.0, sigma) == 0.5
    torch.testing.assert_close(strength("sigma", 3.0, sigma), 3.0 * sigma)


@pytest.mark.parametrize("value, fragment", [("3sigma", "pretrained_strength_sigma_scale=3.0"), (True, "not a bool"),
                                             ("cosine", "not supported"), (float("nan"), "finite")])
def test_bad_strengths_are_refused(value, fragment):
    with pytest.raises(ModeError, match=fragment):
        parse_strength(value)


@pytest.mark.parametrize("value, fragment", [("3sigma", "reward_adaptive_sigma_scale=3.0"), ("linear", "no code implements it"),
                                             ("cubic", "not supported"), (1.0, "must be one of")])
def test_bad_reward_modes_are_refused(value, fragment):
    with pytest.raises(ModeError, match=fragment):
        parse_reward_mode(value)


def test_modes_are_read_case_and_space_insensitive():
    assert parse_strength(" Sigma ") == "sigma" and parse_reward_mode(" SQUARED") == "squared"


@pytest.mark.parametrize("value", [0.0, -1.0, float("inf"), float("nan"), True, "x"])
def test_sigma_scales_must_be_positive_finite_numbers(value):
    with pytest.raises(ModeError):
        parse_scale("train.reward_adaptive_sigma_scale", value)


# ------------------------------------------------------------------------------------------------ the loss


def _loss(eps_theta, eps_ref, eps_old, x, x_next, t, g, k, table, **kw):
    return residual_nabla_db_loss(eps_theta, eps_ref, eps_old, x, x_next, t, g, k, alphas_cumprod=table, eta=1.0,
                                  num_train_timesteps=1000, num_inference_steps=50,
                                  kl_weight=torch.ones(x.shape[0], 1, 1, 1, dtype=x.dtype),
                                  forward_loss_scale=kw.get("fls", 1.0), unet_reg_scale=kw.get("reg", 100.0),
                                  normalize_reg=kw.get("norm", False))


@pytest.fixture(scope="module")
def table():
    from parity_fixtures import scheduler

    return scheduler().alphas_cumprod.double()


def test_at_init_the_residual_kl_and_trust_region_vanish_and_the_loss_is_mean_g_squared(table):
    gen = torch.Generator().manual_seed(0)
    x, x_next, eps, g = (torch.randn(2, 4, 4, 4, generator=gen) for _ in range(4))  # float32, as trained
    out = _loss(eps.clone(), eps, eps, x, x_next, torch.tensor([981, 21]), g, 1.0, table.float())
    assert out.stats["norm_score_residual_mean"] == 0 and out.stats["approx_kl"] == 0 and out.stats["unetreg"] == 0
    torch.testing.assert_close(out.loss, (g ** 2).mean(), rtol=1e-6, atol=0)


def test_trust_region_divides_by_one_minus_alpha_bar_when_asked(table):
    gen = torch.Generator().manual_seed(1)
    x, eps, eps_old = (torch.randn(2, 4, 4, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([981, 1])
    zero = torch.zeros_like(x)
    plain = _loss(eps, eps, eps_old, x, x, t, zero, 1.0, table, fls=0.0, reg=1.0)
    normalised = _loss(eps, eps, eps_old, x, x, t, zero, 1.0, table, fls=0.0, reg=1.0, norm=True)
    per_row = ((eps - eps_old) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(plain.loss, per_row.mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(normalised.loss, (per_row / (1 - table[t].double())).mean(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("mode", ["pruned", "ours"])
def test_the_minimiser_moves_the_mean_by_sigma_squared_g_over_k(table, mode):
    """Fixed point (spec §4.3-4.4): with ε_θ = ε_ref + δ free, minimising the forward loss drives
    μ_θ - μ_ref -> σ² g / k, i.e. σ² β ᾱ_t' Ψ (pruned, k = 1) and σ² β Ψ (ours, k = σ', g = β σ' Ψ)."""
    gen = torch.Generator().manual_seed(2)
    t = torch.tensor([601, 41])
    x, x_next, eps_ref, psi = (torch.randn(2, 4, 2, 2, generator=gen, dtype=torch.float64) for _ in range(4))
    sigma_h = torch.tensor([0.3, 0.1], dtype=torch.float64).view(2, 1, 1, 1)
    a_next = alpha_bar(table, (t - 20).clamp(min=0), x)
    beta = 2.0
    if mode == "pruned":
        k, g = 1.0, guidance(psi, beta, "squared", a_next, sigma_h, 1.0)
    else:
        k, g = strength("sigma", 1.0, sigma_h), guidance(psi, beta, "sigma", a_next, sigma_h, 1.0)
    delta = torch.zeros_like(x, requires_grad=True)
    optimizer = torch.optim.LBFGS([delta], lr=1, max_iter=200, tolerance_grad=1e-14, tolerance_change=1e-16)

    def closure():
        optimizer.zero_grad()
        out = _loss(eps_ref + delta, eps_ref, eps_ref, x, x_next, t, g, k, table, reg=0.0)
        out.loss.backward()
        return out.loss

    optimizer.step(closure)
    step = dict(eta=1.0, prev_sample=x_next)
    mean_theta = ddim_step(table, eps_ref + delta.detach(), t, x, **step).mean
    ref = ddim_step(table, eps_ref, t, x, **step)
    target = ref.std ** 2 * beta * psi * (a_next if mode == "pruned" else 1.0)
    # the loss compares the scores in float32 (the reference's .float()), so the optimum is float32-accurate
    torch.testing.assert_close(mean_theta - ref.mean, target, rtol=1e-3, atol=1e-7)


# ------------------------------------------------------------------------------------------------ on the tiny kit


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_cpu_thread):
    """The "ours" tiny run's models and one epoch of samples (module-scoped: built once)."""
    tmp = tmp_path_factory.mktemp("loss")
    run = build_run(tiny_values("ours", ["sample.batch_size=2", "sample.num_batches_per_epoch=1"], tmp), tmp)
    samples = trainer.sample_epoch(run, 0)
    return run, samples


def test_fresh_adapter_policy_equals_reference_and_toggling_restores_it(tiny):
    run, samples = tiny
    unet = run.unet
    x, t = samples["latents"][:2, 5], samples["timesteps"][:2, 5]
    embeds = torch.cat([run.negative.expand(2, -1, -1), samples["prompt_embeds"][:2]])
    with torch.no_grad():
        policy = cfg_eps(unet, x, t, embeds, 5.0)
        with reference_mode(unet):
            reference = cfg_eps(unet, x, t, embeds, 5.0)
        assert torch.equal(policy, reference)  # lora_B = 0 at init
        lora_b = next(p for n, p in unet.named_parameters() if "lora_B" in n and ".pf." in n)
        saved = lora_b.clone()
        lora_b.add_(0.5)
        moved = cfg_eps(unet, x, t, embeds, 5.0)
        with reference_mode(unet):
            assert torch.equal(cfg_eps(unet, x, t, embeds, 5.0), reference)
        assert not torch.equal(moved, reference)
        assert torch.equal(cfg_eps(unet, x, t, embeds, 5.0), moved)  # the adapter is back on
        lora_b.copy_(saved)


def _micro_batch(run, samples, use_z0=True):
    batches, stride = trainer.training_batches(run, samples, epoch=0, inner=0)
    mb = batches[0]
    embeds = torch.cat([run.negative.expand(1, -1, -1), mb["prompt_embeds"]])
    from sd15fo.schedule import helper_schedule

    return mb, embeds, helper_schedule(run.models.alphas_cumprod, mb["timesteps"], stride)


def test_only_lora_parameters_get_gradients_and_the_reward_gradient_leaves_them_untouched(tiny):
    run, samples = tiny
    modes = trainer.UpdateModes.of(run.config, run.models.num_train_timesteps)
    mb, embeds, helper = _micro_batch(run, samples)
    for p in run.unet.parameters():
        p.grad = None
    from sd15fo.rewards import lookahead_gradient, terminal_gradient

    terminal_gradient(run.reward, run.models.vae, mb["z0"], mb["prompts"])
    lookahead_gradient(run.reward, run.models.vae, run.unet, run.models.alphas_cumprod, mb["next_latents"][:, 3],
                       mb["timesteps"][:, 3] - 20, embeds, 5.0, mb["prompts"])
    assert all(p.grad is None for p in run.unet.parameters())
    out = trainer.transition_loss(run, modes, mb, 3, embeds, helper, {})
    out.loss.backward()
    with_grad = {n for n, p in run.unet.named_parameters() if p.grad is not None}
    assert with_grad and all(".pf." in n for n in with_grad)
    assert with_grad == {n for n, p in run.unet.named_parameters() if ".pf." in n}
    for p in run.unet.parameters():
        p.grad = None


def _count_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("use_z0, per_transition", [(True, 2), (False, 3)])
def test_unet_calls_per_transition_two_with_the_terminal_estimator_three_with_the_lookahead(tiny, use_z0, per_transition):
    run, samples = tiny
    run = copy.copy(run)
    run.config = copy.deepcopy(run.config)
    run.config["train"]["use_z0"] = use_z0
    modes = trainer.UpdateModes.of(run.config, run.models.num_train_timesteps)
    mb, embeds, helper = _micro_batch(run, samples)
    unet_calls, h1 = _count_calls(run.unet)
    decoder_calls, h2 = _count_calls(run.models.vae.decoder)
    cache = {}
    try:
        for j in range(run.num_train_timesteps):
            trainer.transition_loss(run, modes, mb, j, embeds, helper, cache)
    finally:
        h1.remove()
        h2.remove()
    assert len(unet_calls) == per_transition * run.num_train_timesteps
    # ours: Ψ = ∇_z0 r once per micro-batch, reused by its 11 transitions; the lookahead decodes every time
    assert len(decoder_calls) == (1 if use_z0 else run.num_train_timesteps)


def test_the_terminal_gradient_is_the_same_for_every_transition_of_a_trajectory(tiny):
    run, samples = tiny
    modes = trainer.UpdateModes.of(run.config, run.models.num_train_timesteps)
    mb, embeds, helper = _micro_batch(run, samples)
    cache, seen = {}, []
    run2 = copy.copy(run)
    run2.config = copy.deepcopy(run.config)
    run2.config["train"]["cache_z0_reward_grad"] = False
    for j in (0, 5, 10):
        trainer.transition_loss(run2, modes, mb, j, embeds, helper, cache)
        seen.append(cache["psi"].clone())
    assert all(torch.equal(seen[0], other) for other in seen[1:])


def _update(values, tmp_path, samples=None):
    run = build_run(values, tmp_path)
    samples = samples if samples is not None else trainer.sample_epoch(run, 0)
    trainer.policy_update(run, samples, epoch=0)
    return run, samples


def test_caching_the_terminal_gradient_gives_the_same_update_as_recomputing_it(tmp_path, one_cpu_thread):
    """Spec §9 item 13: Ψ once per trajectory is numerically identical to recomputing it for each of its K
    transitions (same computation on the same inputs): same step records, same LoRA weights, bit for bit."""
    fast = ["sample.num_steps=10"]  # the tiny budget: 2 trajectories, 2 optimizer steps
    cached, samples = _update(tiny_values("ours", fast + ["train.cache_z0_reward_grad=true"], tmp_path), tmp_path)
    again, _ = _update(tiny_values("ours", fast + ["train.cache_z0_reward_grad=false"], tmp_path), tmp_path, samples)
    assert cached.logger.records == again.logger.records and len(cached.logger.records) == 2
    assert all(torch.equal(a, b) for a, b in zip(cached.params, again.params))


def test_accumulated_gradient_is_the_mean_of_the_per_transition_gradients(tmp_path, one_cpu_thread):
    """The backward of L / (GA·K) summed over a window equals the mean over its GA·K transitions of ∇L
    (spec §11 item 14); float32 through different summation orders: relative 1e-5 of the gradient norm."""
    values = tiny_values("pruned", ["train.max_grad_norm=1.0e9", "sample.num_steps=10",
                                    "train.gradient_accumulation_steps=2"], tmp_path)
    run = build_run(values, tmp_path)
    samples = trainer.sample_epoch(run, 0)
    with torch.no_grad():  # move off the init so the trust region and residual are not zero
        for p in run.params:
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    captured = []
    run.optimizer.step = lambda *a, **k: captured.append([p.grad.clone() for p in run.params])
    trainer.policy_update(run, samples, epoch=0)
    assert len(captured) == 1 and run.global_step == 1
    modes = trainer.UpdateModes.of(run.config, run.models.num_train_timesteps)
    batches, stride = trainer.training_batches(run, samples, 0, 0)
    from sd15fo.schedule import helper_schedule

    total = [torch.zeros_like(p) for p in run.params]
    count = 0
    for mb in batches:
        embeds = torch.cat([run.negative.expand(1, -1, -1), mb["prompt_embeds"]])
        helper = helper_schedule(run.models.alphas_cumprod, mb["timesteps"], stride)
        for j in range(run.num_train_timesteps):
            grads = torch.autograd.grad(trainer.transition_loss(run, modes, mb, j, embeds, helper, {}).loss, run.params,
                                        allow_unused=True)
            total = [acc + (g if g is not None else 0) for acc, g in zip(total, grads)]
            count += 1
    assert count == 2 * 3  # 2 trajectories x K = int(10 x 0.2) + 1
    expected = torch.cat([(g / count).flatten() for g in total])
    got = torch.cat([g.flatten() for g in captured[0]])
    assert (got - expected).norm() <= 1e-5 * expected.norm()


def test_paper_budget_is_two_optimizer_steps_an_epoch():
    from sd15fo import config

    for which in ("pruned", "ours"):
        values = config.load(f"config/simple_res-nabladb_sd_hps{'' if which == 'pruned' else '_usez0_basesnr'}.yaml").values
        sample, train = values["sample"], values["train"]
        assert sample["batch_size"] * sample["num_batches_per_epoch"] // (train["batch_size"] * train["gradient_accumulation_steps"]) == 2


# ------------------------------------------------------------------------------------------------ optimizer, scaler


def test_8bit_adam_is_bitsandbytes_adamw8bit_with_the_config_hyper_parameters(monkeypatch):
    import sys
    import types

    built = []
    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.SimpleNamespace(AdamW8bit=lambda params, **kw: built.append(kw) or "adamw8bit")
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    values = tiny_values("ours", ["train.adam.use_8bit=true"])
    assert trainer.make_optimizer(values, [torch.nn.Parameter(torch.ones(1))]) == "adamw8bit"
    assert built == [dict(lr=4e-3, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)]


def test_grad_scaler_for_fp16_always_for_bf16_only_in_parity_mode_never_for_fp32():
    cpu = torch.device("cpu")
    paper = {"train": {"gradscaler_growth_interval": 2000}}
    assert trainer.make_scaler({**paper, "mixed_precision": "bf16", "parity": True}, cpu) is not None
    assert trainer.make_scaler({**paper, "mixed_precision": "bf16", "parity": False}, cpu) is None
    assert trainer.make_scaler({**paper, "mixed_precision": "no", "parity": True}, cpu) is None
    scaler = trainer.make_scaler({**paper, "mixed_precision": "fp16", "parity": False}, cpu)
    assert scaler.get_scale() == 2.0 ** 16 and scaler.get_growth_interval() == 2000


def test_gradient_checkpointing_gives_the_same_gradient(tiny):
    """train.gradient_checkpointing trades memory for a recomputed forward; the gradient is the same (float32
    through another evaluation order: relative 1e-5)."""
    run, samples = tiny
    modes = trainer.UpdateModes.of(run.config, run.models.num_train_timesteps)
    mb, embeds, helper = _micro_batch(run, samples)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            run.unet.enable_gradient_checkpointing()
        run.unet.train()
        loss = trainer.transition_loss(run, modes, mb, 4, embeds, helper, {}).loss
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, run.params[1::2])]))  # lora_B
    run.unet.disable_gradient_checkpointing()
    assert grads[0].norm() > 0
    assert (grads[0] - grads[1]).norm() <= 1e-5 * grads[0].norm()
