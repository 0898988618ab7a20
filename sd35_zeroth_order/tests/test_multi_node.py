"""More than one node (issue 15), proven on loopback: the tiny paper command started as two "nodes" (two
launchers, one process each, gloo over 127.0.0.1) trains the same numbers as two processes on one node, writes
one run folder, and a killed node ends the job on the other in bounded time."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

COMPONENT = Path(__file__).resolve().parents[1]
PAPER = ["--profile", "lowsnr2", "--sampler", "branch", "--reward", "jpeg_compressibility", "--loss", "matching",
         "--reweight", "fairclip2", "--tiny"]


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "TORCHRUN")}
    return dict(env, OMP_NUM_THREADS="1", PYTHON=sys.executable, WANDB_MODE="disabled")


def _launcher(*args, **popen):
    return subprocess.Popen(["bash", "scripts/single_node/run_sd3.sh", *PAPER, *args], cwd=COMPONENT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _records(run_dir):
    measured = ("checkpoint_path", "elapsed_s")
    return [{k: v for k, v in json.loads(line).items()
             if "time" not in k and "peak_memory" not in k and k not in measured}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _kill_tree(pid):
    """SIGKILL `pid` and every process below it (torchrun starts its ranks in process groups of their own)."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    tree, stack = [], [pid]
    while stack:
        current = stack.pop()
        tree.append(current)
        stack.extend(children.get(current, []))
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _nodes(port, *trainer_args):
    """Node 0 and node 1 of a two-node job, started together (each launcher in its own process group)."""
    return [_launcher("--num-processes", "1", "--num-machines", "2", "--machine-rank", str(rank),
                      "--main-process-ip", "127.0.0.1", "--main-process-port", str(port), "--", *trainer_args,
                      start_new_session=True)
            for rank in (0, 1)]


@pytest.fixture(scope="module")
def one_node_two_processes(tmp_path_factory):
    save = tmp_path_factory.mktemp("one_node")
    done = subprocess.run(["bash", "scripts/single_node/run_sd3.sh", *PAPER, "--num-processes", "2",
                           "--main-process-port", "29861", "--", f"--config.save_dir={save}", "--config.run_name=run",
                           "--config.num_epochs=2"], cwd=COMPONENT, env=_env(), capture_output=True, text=True,
                          timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return save / "run"


def test_two_processes_on_one_node_split_the_epoch(one_node_two_processes):
    rows = [json.loads(line) for line in (one_node_two_processes / "metrics.jsonl").read_text().splitlines()]
    # each rank samples half the epoch: 60 of the 120 branch rows a single process would (world_size=2)
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert [(r["actual_transition_rows"], r["actual_microbatches_per_epoch"]) for r in epochs] == [(60, 2)] * 2
    assert [r["step"] for r in rows if r["kind"] == "step"] == [1, 2, 3, 4]
    assert [r["samples"] for r in epochs] == [120, 240]  # counted over both processes
    assert [r["group_size"] for r in epochs] == [7.5, 7.5]  # seed|t groups normalised over both ranks
    assert all(0.0 < r["eval_kl_divergence"] < 1e-3 for r in epochs)  # averaged gradients moved both replicas
    # the trainer checks the replicas agree before rank 0 saves for both: one checkpoint per epoch
    assert sorted(p.name for p in (one_node_two_processes / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-2"]


def test_two_nodes_on_loopback_train_what_two_processes_on_one_node_train(one_node_two_processes, tmp_path):
    nodes = _nodes(29871, f"--config.save_dir={tmp_path}", "--config.run_name=run", "--config.num_epochs=2")
    outputs = [node.communicate(timeout=400) for node in nodes]
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, out[-3000:] + err[-5000:]
    assert _records(tmp_path / "run") == _records(one_node_two_processes)
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # one run folder, written by the rank-0 node
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-2"]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["world_size"] == 2
    assert "epoch 2/2" in outputs[0][1] and "epoch 2/2" not in outputs[1][1]  # only rank 0 reports


def test_a_killed_node_ends_the_job_on_the_other_in_bounded_time(tmp_path):
    nodes = _nodes(29881, f"--config.save_dir={tmp_path}", "--config.run_name=run", "--config.num_epochs=50")
    metrics = tmp_path / "run" / "metrics.jsonl"
    try:
        deadline = time.time() + 300
        while not (metrics.is_file() and '"kind": "step"' in metrics.read_text()):
            assert time.time() < deadline and nodes[0].poll() is None, "the job never trained a step"
            time.sleep(0.5)
        _kill_tree(nodes[1].pid)  # node 1 disappears: launcher, torchrun agent and its rank (own process group)
        killed = time.time()
        nodes[0].communicate(timeout=120)
        assert nodes[0].returncode != 0
        assert time.time() - killed < 120
    finally:
        for node in nodes:
            _kill_tree(node.pid)


def test_dry_run_prints_each_nodes_command_and_a_missing_address_is_refused():
    done = subprocess.run(["bash", "scripts/single_node/run_sd3.sh", *PAPER, "--num-machines", "2",
                           "--main-process-ip", "10.1.2.3", "--dry-run"], cwd=COMPONENT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for rank in (0, 1):
        command = shlex.split(lines[lines.index(f"# node {rank} of 2:") + 1])
        assert command[command.index("--node_rank") + 1] == str(rank)
        assert command[command.index("--nnodes") + 1] == "2" and "10.1.2.3" in command
    assert "budget: world_size=2 " in done.stdout  # budgets follow the global world size
    gpu = subprocess.run(["bash", "scripts/single_node/run_sd3.sh", "--profile", "lowsnr2", "--sampler", "branch",
                          "--reward", "geneval", "--loss", "matching", "--reweight", "fairclip2", "--num-processes", "2",
                          "--num-machines", "2", "--main-process-ip", "10.1.2.3", "--dry-run"], cwd=COMPONENT,
                         env=_env(), capture_output=True, text=True, timeout=120)
    node1 = shlex.split(gpu.stdout.splitlines()[-1])
    assert node1[:2] == ["accelerate", "launch"] and node1[node1.index("--num_processes") + 1] == "4"
    assert node1[node1.index("--machine_rank") + 1] == "1" and node1[node1.index("--num_machines") + 1] == "2"
    missing = subprocess.run(["bash", "scripts/single_node/run_sd3.sh", *PAPER, "--num-machines", "2", "--dry-run"],
                             cwd=COMPONENT, env=_env(), capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and missing.stderr.splitlines()[0] == (
        "run_sd3.sh: --num-machines 2 needs --main-process-ip: the address of the rank-0 node")
