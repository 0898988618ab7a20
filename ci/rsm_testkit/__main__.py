"""`python -m rsm_testkit build` builds (or finds cached) every tiny model and prints where it is."""
from __future__ import annotations

import argparse
import sys
import time

from .factory import build_all, cache_root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rsm_testkit")
    parser.add_argument("command", choices=["build"])
    parser.parse_args(argv)
    start = time.perf_counter()
    paths = build_all()
    for name, path in paths.items():
        print(f"{name:24s} {path}")
    print(f"{len(paths)} tiny models under {cache_root()} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
