"""`python -m shared_rewards list` prints the whole catalogue."""
import subprocess
import sys

from shared_rewards import CATALOGUE


def test_list_prints_every_reward_with_its_options():
    out = subprocess.run([sys.executable, "-m", "shared_rewards", "list"], capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert lines[0].split()[:4] == ["name", "differentiable", "weights", "options"]
    names = [line.split()[0] for line in lines[1:]]
    assert names == sorted(CATALOGUE)
    jpeg = next(line for line in lines if line.startswith("jpeg_compressibility"))
    assert "quality=95" in jpeg and "divisor=1.0" in jpeg


def test_list_rejects_an_unknown_command():
    out = subprocess.run([sys.executable, "-m", "shared_rewards", "show"], capture_output=True, text=True)
    assert out.returncode != 0 and "invalid choice" in out.stderr
