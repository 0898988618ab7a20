"""Every `algorithm` value trains end to end on the tiny kit (in-process, one epoch), with the overrides the README
gives for it: finite losses and updates, ratio statistics for ddpo, the log-approximation error for ddpo/logrho,
and for uw-lambda the reference model inside the sampler."""
import json

import pytest
import torch

from sd15zo import trainer_grpo, trainer_grpo_pr
from sd15zo.config import load_config

ALGORITHM_SETS = {
    "uw-sigma": [],  # the presets
    "uw-lambda": ["algorithm=uw-lambda", "const_weight=0.5168997049331665", "weight_scale_factor=1.0"],
    "vw": ["algorithm=vw", "const_weight=null", "weight_scale_factor=1.0"],
    "ddpo": ["algorithm=ddpo", "const_weight=null", "weight_scale_factor=1.0"],
    "logrho": ["algorithm=logrho", "const_weight=null", "weight_scale_factor=1.0"],
}


@pytest.mark.parametrize("trainer, algorithm", [("grpo_pr", a) for a in ALGORITHM_SETS if a != "uw-sigma"] +
                         [("grpo", "ddpo"), ("grpo", "uw-lambda")])
def test_every_algorithm_trains_one_epoch(tmp_path, one_cpu_thread, trainer, algorithm):
    from accelerate import Accelerator

    module = trainer_grpo_pr if trainer == "grpo_pr" else trainer_grpo
    config = load_config(trainer, tiny=True, sets=[f"logging_dir={tmp_path}", "run_name=r", "num_train_epochs=1",
                                                   "train_approx_kl=every_microbatch", *ALGORITHM_SETS[algorithm]])
    run = module.train(config, Accelerator(cpu=True))
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "step"]
    assert run.global_step == 2 and len(steps) == 2
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"], r["approx_kl"]])).all() for r in steps)
    assert steps[0]["approx_kl"] == 0.0 and steps[1]["approx_kl"] > 0  # the policy leaves the reference
    if algorithm in ("ddpo", "logrho"):
        assert all("log_approx_error" in r for r in steps)
    if algorithm == "ddpo":
        assert steps[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-4) and "ratio_max" in steps[0]
    assert rows[-1]["eval_approx_kl"] > 0
