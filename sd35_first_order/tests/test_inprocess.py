"""Spec §12's invariants on the real architectures (the kit's tiny SD3.5 MMDiT-X with its dual-attention layer, tiny
TAESD3, tiny HPSv2): runs built in this process by the trainer's own `setup` (tiny config, CPU, fp32)."""
import copy

import pytest
import torch
from helpers import paper_config

from sd35fo import trainer
from sd35fo.algorithm import StepBatch, eta
from sd35fo.distributed import Dist
from sd35fo.guidance import adapters_disabled
from sd35fo.value_net import ValueNet, build as build_value_net


def make_run(tmp_path, **overrides):
    return trainer.setup(paper_config(saving__output_dir=str(tmp_path), **overrides), Dist())


@pytest.fixture(scope="module")
def fresh(tmp_path_factory, one_cpu_thread):
    """A pruned-baseline run straight after set-up (the LoRA at its initialisation) and one rollout of it."""
    run = make_run(tmp_path_factory.mktemp("fresh"), name="hpsv2_geneval", exp_name="PRUNED")
    samples = trainer.sample_epoch(run, 0)
    return run, samples


class moved_adapter:
    """The policy LoRA moved by seeded noise for the duration (so policy and reference differ), restored exactly."""

    def __init__(self, run, scale=0.05):
        self.run, self.scale = run, scale

    def __enter__(self):
        self.saved = [p.detach().clone() for p in self.run.policy_params]
        with torch.no_grad():
            for i, p in enumerate(self.run.policy_params):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * self.scale)

    def __exit__(self, *exc):
        with torch.no_grad():
            for p, saved in zip(self.run.policy_params, self.saved):
                p.copy_(saved)


def _column(run, samples, k):
    text = torch.cat([samples["negative_prompt_embeds"], samples["prompt_embeds"]])
    pooled = torch.cat([samples["negative_pooled_prompt_embeds"], samples["pooled_prompt_embeds"]])
    return StepBatch(samples["latents"][:, k], samples["timesteps"][:, k], samples["step_index"][:, k], text, pooled,
                     samples["prompts"], samples["prompt_metadata"], samples["rewards"])


def test_4_at_initialisation_the_policy_is_the_reference_and_the_loss_is_the_guidance_alone(fresh):
    run, samples = fresh
    b = _column(run, samples, 5)
    sigma = run.sigmas[b.step].view(-1, 1, 1, 1)
    v, g, _, _ = run.algorithm.reward_guidance(b, sigma, 1.0)
    v_ref = run.algorithm.velocity.reference(b.x, b.s, b.text, b.pooled)
    assert torch.equal(v.detach(), v_ref)  # LoRA B = 0
    loss, stats = run.algorithm.step(b, 1.0)
    assert stats["transition_drift"].item() == 0.0
    expected = (eta(sigma, "quad") * run.algorithm.beta * g).pow(2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_5_the_reference_pass_leaves_the_policy_adapter_active_trainable_and_unchanged(fresh):
    run, samples = fresh
    b = _column(run, samples, 3)
    velocity = run.algorithm.velocity
    with moved_adapter(run):
        before = velocity.policy(b.x, b.s, b.text, b.pooled).detach()
        reference = velocity.reference(b.x, b.s, b.text, b.pooled)
        assert reference.grad_fn is None and not reference.requires_grad
        after = velocity.policy(b.x, b.s, b.text, b.pooled)
        assert torch.equal(before, after.detach()) and not torch.equal(before, reference)
        assert after.requires_grad and all(p.requires_grad for p in run.policy_params)
        with adapters_disabled(run.transformer):
            assert not any(p.requires_grad for p in run.policy_params)
        assert all(p.requires_grad for p in run.policy_params)


def test_6_the_optimizer_trains_exactly_the_lora_weights_in_fp32_and_leaves_the_base_unchanged(fresh, tmp_path):
    run, samples = fresh
    names = [n for n, p in run.transformer.named_parameters() if p.requires_grad]
    adapted = {n.split(".lora_")[0] for n in names}
    linears = [n for n, m in run.transformer.named_modules() if n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))
               and hasattr(m, "lora_A")]
    assert len(names) == 2 * len(linears) == len(run.optimizer.param_groups[0]["params"])
    assert {n.split(".")[-1] for n in linears} == {"to_q", "to_k", "to_v", "0"} and any(".attn2." in n for n in linears)
    assert all(".lora_A." in n or ".lora_B." in n for n in names) and len(adapted) == len(linears)
    assert all(p.dtype == torch.float32 for p in run.policy_params)
    base = {n: p.detach().clone() for n, p in run.transformer.named_parameters() if "lora_" not in n}
    other = make_run(tmp_path, name="hpsv2_geneval", exp_name="STEP")
    trainer.train_epoch(other, trainer.sample_epoch(other, 0), 0)
    assert other.global_step == 1
    after = {n: p for n, p in other.transformer.named_parameters() if "lora_" not in n}
    assert all(torch.equal(base[n], after[n]) for n in base)
    assert any(not torch.equal(a, b) for a, b in zip(run.policy_params, other.policy_params))


def test_18_tau_is_one_at_each_epoch_start_unless_the_fix_carries_it(tmp_path):
    for reset in (True, False):
        run = make_run(tmp_path / str(reset), exp_name=f"TAU{reset}", quirks__reset_threshold_each_epoch=reset,
                       quirks__single_rank_quantile=reset)
        taus = []
        for epoch in range(2):
            trainer.train_one_epoch(run, epoch)
            taus.append((run.epoch_info["tau"], run.step_records[-1]["rgrad_08quantile"]))
            run.epoch += 1
        assert taus[0][0] == 1.0
        assert taus[1][0] == (1.0 if reset else taus[0][1])


def test_19_value_net_lora_mode_trains_only_its_adapter_and_the_scaled_projection(fresh):
    run, samples = fresh
    base = copy.deepcopy(run.transformer)
    with adapters_disabled(base):
        original = base.proj_out.weight.detach().clone()
    base.delete_adapters("default")
    config = run.config
    net = build_value_net("lora", base, config, "cpu", torch.float32)
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert "proj_out.weight" in trainable and "proj_out.bias" not in trainable
    assert all(n == "proj_out.weight" or ".default_value." in n for n in trainable)
    torch.testing.assert_close(net.proj_out.weight, original * 1e-5)
    value = ValueNet(net, "lora", negative_embeds=True)
    b = _column(run, samples, 2)
    nu = value(b.x, b.s, b.text, b.pooled)
    assert nu.shape == b.x.shape
    positive = ValueNet(net, "lora", negative_embeds=False)(b.x, b.s, b.text, b.pooled)
    assert not torch.equal(nu, positive)  # N6: the faithful default sees the empty prompt's rows
    copy_net = build_value_net("copy", base, config, "cpu", torch.float32)
    assert [n for n, p in copy_net.named_parameters() if p.requires_grad] == ["proj_out.weight"]  # C2 fixed


def test_19_the_terminal_loss_counts_only_samples_at_the_last_step(fresh):
    run, samples = fresh
    calls = []

    def constant_value(x, s, text, pooled):
        calls.append(s)
        return torch.full_like(x, 0.5, dtype=torch.float32)

    algorithm = copy.copy(run.algorithm)
    algorithm.value_net = constant_value
    algorithm.consistency_loss = lambda *a, **k: torch.zeros(())
    b = _column(run, samples, 5)
    _, stats = algorithm.step(b, 1.0)
    assert stats["loss_terminal"].item() == 0.0
    last = len(run.timesteps) - 1
    b = _column(run, samples, last)
    b.s = torch.stack([run.timesteps[last], run.timesteps[3]])  # one terminal sample, one not
    _, stats = algorithm.step(b, 1.0)
    assert stats["loss_terminal"].item() == pytest.approx(0.25 / (1 + 1e-6), rel=1e-6)


def test_22_the_saved_lora_reproduces_the_policy_in_a_fresh_pipeline(fresh, tmp_path):
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import load_file

    from sd35fo.checkpoints import save_lora
    from sd35fo.guidance import transformer_velocity

    run, samples = fresh
    with moved_adapter(run):
        save_lora(run.transformer, str(tmp_path / "lora"))
        saved = load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
        assert len(saved) == len(run.policy_params) and all("lora_" in k for k in saved)
        b = _column(run, samples, 4)
        with torch.no_grad():
            ours = transformer_velocity(run.transformer, b.x, b.s, b.text, b.pooled, 5.0)
            pipe = StableDiffusion3Pipeline.from_pretrained(run.config.pretrained.model)
            pipe.load_lora_weights(str(tmp_path / "lora"))
            theirs = transformer_velocity(pipe.transformer, b.x, b.s, b.text, b.pooled, 5.0)
        assert torch.equal(ours, theirs)


def test_26_same_seed_same_world_size_gives_the_same_epoch_and_faithful_seeding_repeats_ranks(fresh, tmp_path):
    run, samples = fresh
    again = trainer.sample_epoch(run, 0)
    assert again["prompts"] == samples["prompts"] and torch.equal(again["latents"], samples["latents"])
    other_rank = copy.copy(run)
    other_rank.dist = Dist(rank=1)
    assert torch.equal(trainer.sample_epoch(other_rank, 0)["latents"][:, 0], samples["latents"][:, 0])  # N1
    per_rank = make_run(tmp_path, name="hpsv2_geneval", exp_name="PER_RANK", quirks__same_seed_all_ranks=False)
    rank0 = trainer.sample_epoch(per_rank, 0)
    per_rank.dist = Dist(rank=1)
    rank1 = trainer.sample_epoch(per_rank, 0)
    assert not torch.equal(rank0["latents"][:, 0], rank1["latents"][:, 0])


def test_gradient_checkpointing_gives_the_same_gradients(fresh):
    run, samples = fresh
    b = _column(run, samples, 6)
    grads = []
    with moved_adapter(run):
        for checkpointing in (False, True):
            if checkpointing:
                run.transformer.enable_gradient_checkpointing()
            run.transformer.train()
            loss, _ = run.algorithm.step(b, 1.0)
            grads.append(torch.autograd.grad(loss, run.policy_params))
        run.transformer.disable_gradient_checkpointing()
    for a, c in zip(*grads):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-9)


def test_the_fp32_and_jvp_value_net_derivatives_agree_on_the_real_architecture(tmp_path):
    """Value net 'lora' on the tiny MMDiT-X: the exact (double-backward) directional derivatives of the jvp mode and
    the fp32 finite differences along unit directions give the same three terms, and a jvp step trains the value
    net only through L_cons and L_term."""
    run = make_run(tmp_path, name="hpsv2_geneval", exp_name="JVP", model__use_value_net=True,
                   training__finite_differences="jvp")
    samples = trainer.sample_epoch(run, 0)
    b = _column(run, samples, 6)
    algorithm = run.algorithm
    with moved_adapter(run):
        sigma = run.sigmas[b.step].view(-1, 1, 1, 1)
        _, g, _, _ = algorithm.reward_guidance(b, sigma, 1.0)
        v_ref = algorithm.velocity.reference(b.x, b.s, b.text, b.pooled)
        nu = algorithm.value_net(b.x, b.s, b.text, b.pooled)
        grad_v = nu / algorithm.beta - eta(sigma, "quad") * g
        terms = {}
        for mode in ("jvp", "fp32"):
            algorithm.fd = mode
            terms[mode] = {k: v.detach() for k, v in algorithm.consistency_terms(b, sigma, nu, grad_v, v_ref, 1.0,
                                                                                  g=g).items()}
        algorithm.fd = "jvp"
        # measured: 5e-7 (Δ_t), 6e-3 (F1: the one-sided fp32 difference), 4e-6 (F2) relative
        for key, tolerance in (("delta_t", 1e-3), ("f1", 2e-2), ("f2", 1e-3)):
            a, c = terms["jvp"][key], terms["fp32"][key]
            assert (a - c).norm() <= tolerance * a.norm(), (key, (a - c).norm().item(), a.norm().item())
        loss, stats = algorithm.step(b, 1.0)
        loss.backward()
    assert torch.isfinite(loss) and stats["loss_consistency"] > 0
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in run.value_params)


def test_the_jvp_of_the_real_transformer_is_its_central_difference_in_float64(fresh):
    """The double-backward JVP through the MMDiT-X (attention, RMS qk-norm, adaLN, LoRA) against a float64 central
    difference: measured 7e-6 relative at h = 1e-3."""
    from sd35fo.algorithm import jvp
    from sd35fo.guidance import GuidedVelocity

    run, samples = fresh
    model = copy.deepcopy(run.transformer).double()
    velocity = GuidedVelocity(model, 5.0)
    b = _column(run, samples, 6)
    text, pooled, s = b.text.double(), b.pooled.double(), b.s.double()
    x = b.x.double()
    tangent = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def reference(x_):
        return velocity.reference_with_graph(x_, s, text, pooled)

    exact = jvp(reference, x, tangent)
    with torch.no_grad():
        central = (reference(x + 1e-3 * tangent) - reference(x - 1e-3 * tangent)) / 2e-3
    assert ((exact - central).norm() / exact.norm()).item() < 1e-4
