"""EMA of the LoRA parameters (spec §7.3; §9 item 30)."""
import pytest
import torch

from sd35zo.ema import ParameterEMA, ema_decay, ema_updates_at


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.nn.Parameter(torch.randn(3, 4, generator=g, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(5, generator=g, dtype=torch.float64))
    return [a, b]


def _perturb(params, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_decay_schedule_is_warmup_capped_at_point_nine():
    # Hand values of min((1+s)/(10+s), 0.9): s=0 -> 0.1, s=7 -> 8/17, s=80 -> 81/90 = 0.9, s=1000 -> cap.
    assert ema_decay(0) == pytest.approx(0.1)
    assert ema_decay(7) == pytest.approx(8 / 17)
    assert ema_decay(80) == pytest.approx(0.9)
    assert ema_decay(79) == pytest.approx(80 / 89)
    assert ema_decay(1000) == 0.9


def test_updates_only_when_step_plus_one_is_multiple_of_eight():
    assert [s for s in range(40) if ema_updates_at(s)] == [7, 15, 23, 31, 39]


def test_step_moves_average_by_one_minus_decay_only_on_update_steps():
    params = _params()
    ema = ParameterEMA(params)
    start = [p.detach().clone() for p in params]
    expected = [s.clone() for s in start]
    for s in range(24):
        _perturb(params, seed=100 + s)
        moved = ema.step(params, s)
        assert moved == ((s + 1) % 8 == 0)
        if moved:
            d = min((1 + s) / (10 + s), 0.9)
            expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, params)]
        for e, sh in zip(expected, ema.shadow):
            torch.testing.assert_close(sh.double(), e, rtol=1e-6, atol=1e-6)  # shadows are fp32


def test_shadows_are_fp32_copies_of_initial_parameters():
    params = _params()
    ema = ParameterEMA(params)
    assert all(s.dtype == torch.float32 for s in ema.shadow)
    for s, p in zip(ema.shadow, params):
        torch.testing.assert_close(s, p.detach().float())
    with torch.no_grad():
        params[0].add_(1.0)
    torch.testing.assert_close(ema.shadow[0], (params[0].detach() - 1.0).float())  # a copy, not a view


def test_frozen_parameters_are_not_averaged():
    params = _params()
    params[1].requires_grad_(False)
    ema = ParameterEMA(params)
    before = ema.shadow[1].clone()
    _perturb(params, seed=3)
    assert ema.step(params, 7)
    assert torch.equal(ema.shadow[1], before)
    assert not torch.equal(ema.shadow[0], params[0].detach().float())


def test_upstream_cadence_repeats_update_per_microbatch_and_option_applies_it_once():
    # Branch trainer: 7 microbatches share global_step 7 -> upstream applies the update 7 times.
    for once, expected_moves in ((False, 7), (True, 1)):
        params = _params()
        ema = ParameterEMA(params, once_per_step=once)
        _perturb(params, seed=5)
        target = [p.detach().float() for p in params]
        start = [s.clone() for s in ema.shadow]
        moves = sum(ema.step(params, 7) for _ in range(7))
        assert moves == expected_moves
        keep = (8 / 17) ** expected_moves  # each update keeps a fraction d(7) of the distance
        for s0, t, sh in zip(start, target, ema.shadow):
            torch.testing.assert_close(sh, t + keep * (s0 - t), rtol=1e-5, atol=1e-6)


def test_copy_to_and_restore_round_trip_parameters_exactly():
    params = _params()
    ema = ParameterEMA(params)
    for s in range(16):
        _perturb(params, seed=200 + s)
        ema.step(params, s)
    live = [p.detach().clone() for p in params]
    ema.copy_ema_to(params)
    for p, sh in zip(params, ema.shadow):
        assert torch.equal(p.detach(), sh.to(p.dtype))
    assert not torch.equal(params[0].detach(), live[0])
    ema.copy_temp_to(params)
    for p, l in zip(params, live):
        assert torch.equal(p.detach(), l)  # bit-exact, fp64 parameters included
    with pytest.raises(RuntimeError, match="copy_ema_to"):
        ema.copy_temp_to(params)


def test_state_dict_resume_continues_identically():
    params_a = _params()
    ema_a = ParameterEMA(params_a, once_per_step=True)
    for s in range(8):
        _perturb(params_a, seed=300 + s)
        ema_a.step(params_a, s)
    saved = ema_a.state_dict()

    params_b = [torch.nn.Parameter(p.detach().clone()) for p in params_a]
    ema_b = ParameterEMA([torch.nn.Parameter(torch.zeros_like(p)) for p in params_b])
    ema_b.load_state_dict(saved)
    assert ema_b.once_per_step and ema_b._last_step == 7
    assert not ema_b.step(params_b, 7)  # cadence memory survives the resume
    for s in range(8, 16):
        for ps in (params_a, params_b):
            _perturb(ps, seed=400 + s)
        ema_a.step(params_a, s)
        ema_b.step(params_b, s)
    for x, y in zip(ema_a.shadow, ema_b.shadow):
        assert torch.equal(x, y)


def test_mismatched_parameter_lists_raise():
    params = _params()
    ema = ParameterEMA(params)
    with pytest.raises(ValueError, match="holds 2 parameters but got 1"):
        ema.step(params[:1], 7)
    bad = ema.state_dict()
    bad["shadow"] = bad["shadow"][:1]
    with pytest.raises(ValueError, match="holds 1 tensors"):
        ema.load_state_dict(bad)
    with pytest.raises(ValueError, match="max_decay"):
        ParameterEMA(params, max_decay=1.0)
