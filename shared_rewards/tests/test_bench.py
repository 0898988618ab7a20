"""The reward benchmark runs end to end on the tiny checkpoints and prints its table."""
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_rewards.py"


def test_bench_prints_a_row_per_reward_and_path(tmp_path):
    out_json = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--rewards", "jpeg_compressibility", "aesthetic", "--repeats", "1",
         "--warmup", "0", "--size", "32", "--batch-size", "2", "--json", str(out_json)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert any(line.startswith("reward ") and "fwd img/s" in line for line in lines)
    rows = json.loads(out_json.read_text())["rows"]
    measured = {(r["reward"], r.get("path")) for r in rows if "forward" in r}
    assert ("aesthetic", "tensor") in measured and ("aesthetic", "pil") in measured
    assert any(r == "jpeg_compressibility" for r, _ in measured)
    tensor_row = next(r for r in rows if r["reward"] == "aesthetic" and r.get("path") == "tensor")
    assert tensor_row["forward"] > 0 and tensor_row["forward_backward"] > 0
