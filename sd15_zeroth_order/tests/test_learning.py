"""The RSM trainer learns: a seeded tiny run maximising a reward ends with more of it than the same run minimising it.

Two runs of `train_grpo_pr.py --tiny` on the same seed see the same prompts, initial latents and branch noise
every epoch; they differ only in the sign of the reward (`reward_fn={aesthetic_score: -1.0}`), hence in the
direction of their updates. The paired difference d_e = r(up run) − r(down run), both measured with the reward
r, is exactly 0 in epoch 1 (same initial policy) and must grow positive; so must the evaluation reward's.

Settings (tiny models with random weights give a weak signal; each choice was needed for a clear one):
  - reward: the kit's tiny aesthetic scorer (responds to colour and brightness, which a LoRA moves; the tiny
    HPS, tried first, gave no consistent direction in 10 epochs);
  - one prompt, `group_strategy: seed` and k = 4 branches at two steps: groups of the k branches of one root, so
    advantages rank branch noises of one state (with `prompt` groups the two roots of an epoch start from
    different shared latents and the advantage mostly ranks those latents, which no update can change);
  - learning_rate 0.1 with adam_epsilon 1e-3: gradients here are ~3e-5 per element, so Adam with eps 1e-3 takes
    SGD-like steps of lr/eps = 100 × the gradient (plain Adam's sign-like first steps of every LoRA element drown
    the estimate in noise); train_clip_range 1e-2 lets an epoch move the policy further than 1e-4.
Measured on this kit (seed 0): d over epochs 6-10 = 0.0037, 0.0061, 0.0025, 0.0032, 0.0049; eval reward 0.0561 vs
0.0523 (d = 0.0038). The thresholds leave a margin of about 3x. (Seed 1 gives a weaker signal, d ≈ 0.0004.)
"""
import json

import numpy as np

from test_train import finish, start

EPOCHS = 10
SETTINGS = ["--set", f"num_train_epochs={EPOCHS}", "--set", f"eval_freq={EPOCHS}", "--set", f"save_freq={EPOCHS}",
            "--set", "group_strategy=seed", "--set", "eval_batch_size=4", "--set",
            "exploration_k=[4, 0, 4, 0, 0, 0, 0, 0, 0, 0]", "--set", "learning_rate=0.1", "--set", "adam_epsilon=1e-3",
            "--set", "train_clip_range=1e-2", "--set", "seed=0"]


def _rewards(run_dir, sign):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    return sign * np.array([r["reward_mean"] for r in epochs]), sign * epochs[-1]["eval_reward_mean"]


def test_maximising_the_reward_ends_above_minimising_it_on_the_same_noise(tmp_path):
    prompts = tmp_path / "one_prompt.txt"
    prompts.write_text("a cat sleeping on a mat\n")
    common = ["--output-dir", str(tmp_path), "--set", f"prompt_file={prompts}", *SETTINGS]
    up = start("grpo_pr", *common, "--set", "run_name=up", "--set", "reward_fn=aesthetic_score")
    down = start("grpo_pr", *common, "--set", "run_name=down", "--set", "reward_fn={aesthetic_score: -1.0}")
    finish(up), finish(down)
    r_up, eval_up = _rewards(tmp_path / "up", 1.0)
    r_down, eval_down = _rewards(tmp_path / "down", -1.0)  # the down run logs −r
    d = r_up - r_down
    assert abs(d[0]) < 1e-6, d  # epoch 1: the same initial policy on the same noise
    assert d[-5:].mean() > 0.0013, (d.round(5).tolist(), r_up.round(5).tolist())
    assert eval_up - eval_down > 0.0013, (eval_up, eval_down)
    assert r_up[-4:].mean() - r_up[:4].mean() > 0.0013, r_up.round(5).tolist()
