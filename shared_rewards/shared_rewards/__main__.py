"""`python -m shared_rewards list` prints the catalogue: name, differentiable, weights, options."""
from __future__ import annotations

import argparse
import sys

from .registry import CATALOGUE, reward_class, reward_options


def catalogue_rows() -> list[tuple[str, str, str, str]]:
    rows = []
    for name in sorted(CATALOGUE):
        cls = reward_class(name)
        options = ", ".join(f"{k}={v!r}" for k, v in reward_options(cls).items())
        rows.append((name, "yes" if cls.differentiable else "no", cls.weights_source, options or "-"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared_rewards")
    parser.add_argument("command", choices=["list"])
    parser.parse_args(argv)
    header = ("name", "differentiable", "weights", "options")
    rows = [header] + catalogue_rows()
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3])
    return 0


if __name__ == "__main__":
    sys.exit(main())
