"""Prints the keys that differ between two presets, each with the reason the paper changes it.

    python config/diff.py                                        # pruned baseline -> ours (Figure 5(a, b))
    python config/diff.py config/hpsv2_geneval.py config/hpsv2.py   # any two presets
"""
import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# Why each key that separates the pruned baseline from ours changes (paper §5, spec §1.5, §6.3).
REASONS = {
    "training.use_saved_rgrad_x1": "estimator: the terminal reward gradient grad r(D(z_N)), computed once per trajectory "
                                   "at sampling and reused at every timestep, replaces the one-step lookahead gradient "
                                   "recomputed at every training timestep (no reward call during training)",
    "model.eta_mode": "temporal weight: eta = 1 - sigma instead of (1 - sigma)^2 (more guidance on early, noisy steps)",
    "model.reward_scale": "strength: beta = 1.5e7 instead of 3e7 (beta eta matches mid-trajectory, spec §1.5)",
}


def load(path):
    spec = importlib.util.spec_from_file_location("sd35fo_preset_for_diff", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def flatten(tree, prefix=""):
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_keys(a, b):
    """{key: (value in a, value in b)} for every flattened key that differs."""
    fa, fb = flatten(a.to_dict()), flatten(b.to_dict())
    missing = "<absent>"
    return {k: (fa.get(k, missing), fb.get(k, missing)) for k in sorted(set(fa) | set(fb))
            if fa.get(k, missing) != fb.get(k, missing)}


def main(argv):
    paths = argv[1:] or [os.path.join(HERE, "hpsv2_geneval.py"), os.path.join(HERE, "hpsv2_geneval_ours.py")]
    if len(paths) != 2:
        sys.exit("usage: python config/diff.py [<preset a> <preset b>]")
    for key, (left, right) in changed_keys(load(paths[0]), load(paths[1])).items():
        reason = REASONS.get(key)
        print(f"{key}: {left!r} -> {right!r}" + (f"  # {reason}" if reason else ""))


if __name__ == "__main__":
    main(sys.argv)
