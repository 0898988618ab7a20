"""Runs every test suite of the repository, each in its own pytest process (components are independent
packages with their own `tests/`), and prints one closing line with the totals.

    python ci/run_tests.py                 # every suite
    python ci/run_tests.py shared_rewards  # only these suites
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def suites() -> list[Path]:
    """Every top-level directory with a tests/ folder (ci/ itself included)."""
    return sorted(p.parent for p in REPO.glob("*/tests") if p.is_dir() and not p.parent.name.startswith("."))


def run_suite(suite: Path, extra: list[str]) -> dict[str, int]:
    # Tests never reach a hub: without this, huggingface_hub retries a dead network for ~30 s per call.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "tests", "-q", f"--junitxml={report}", *extra]
        proc = subprocess.run(cmd, cwd=suite, env=env)
        counts = {"passed": 0, "failed": 0, "skipped": 0}
        if report.exists():
            for case in ET.parse(report).getroot().iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    counts["failed"] += 1
                elif case.find("skipped") is not None:
                    counts["skipped"] += 1
                else:
                    counts["passed"] += 1
        if proc.returncode not in (0, 5) and counts["failed"] == 0:
            counts["failed"] = 1  # pytest died before reporting (collection error, crash)
        return counts


def main(argv: list[str]) -> int:
    names = [a for a in argv if not a.startswith("-")]
    extra = [a for a in argv if a.startswith("-")]
    selected = [s for s in suites() if not names or s.name in names]
    totals = {"passed": 0, "failed": 0, "skipped": 0}
    lines = []
    for suite in selected:
        start = time.perf_counter()
        print(f"\n=== {suite.name} ===", flush=True)
        counts = run_suite(suite, extra)
        for k in totals:
            totals[k] += counts[k]
        lines.append(f"{suite.name:22s} {counts['passed']:4d} passed {counts['failed']:3d} failed "
                     f"{counts['skipped']:3d} skipped  {time.perf_counter() - start:7.1f} s")
    print("\n" + "\n".join(lines))
    print(f"tests: {totals['passed']} passed, {totals['failed']} failed, {totals['skipped']} skipped")
    return 1 if totals["failed"] or totals["passed"] == 0 else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
