"""More than one node (issue 15), proven on loopback: the tiny "ours" paper command started as two "nodes" (two
torchrun launchers with --nnodes 2, one gloo process each, on 127.0.0.1) trains exactly what two processes on one
node train and writes one run folder; a killed node ends the job on the other in bounded time, and two nodes resume
it from its last checkpoint; a mistake made on one node only ends both nodes with one line naming it."""
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PAPER, free_port, subprocess_env

COMPONENT = Path(__file__).resolve().parents[1]


def _records(run_dir):
    """metrics.jsonl without what differs between any two runs: wall-clock times, memory, paths."""
    def measured(key):
        return "time" in key or "peak_memory" in key or key in ("checkpoint_path", "elapsed_s")

    return [{k: v for k, v in json.loads(line).items() if not measured(k)}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _nodes(logs: Path, rendezvous, *trainer_args, node1_args=()):
    """Node 0 and node 1 of a two-node job, each a torchrun launcher of one process in a session of its own, as a
    user starts them: `rendezvous(rank)` gives torchrun's flags for that node. Console -> logs/node<r>.log."""
    nodes = []
    for rank in (0, 1):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                   *rendezvous(rank), "simple_res-nabladb.py", "--config", PAPER["ours"], "--tiny", *trainer_args,
                   *(node1_args if rank == 1 else ())]
        with open(logs / f"node{rank}.log", "w") as console:
            nodes.append(subprocess.Popen(command, cwd=COMPONENT, env=subprocess_env(), stdout=console,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    return nodes


def _static(port):
    """torchrun's --node_rank/--master_addr/--master_port form."""
    return lambda rank: ["--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port)]


def _c10d(port):
    """torchrun's --rdzv_endpoint form (the rendezvous numbers the nodes)."""
    return lambda rank: ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "sd15fo-test"]


def _finish(nodes, timeout):
    """Wait for every node (killing what is left after `timeout` s); their exit statuses."""
    deadline = time.time() + timeout
    try:
        for node in nodes:
            node.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        for node in nodes:
            _kill_tree(node.pid)
    return [node.returncode for node in nodes]


def _kill_tree(pid):
    """SIGKILL `pid` and every process below it: a whole node (launcher, its agent threads and its ranks, which
    torchrun starts in process groups of their own, so killing the launcher's group is not enough)."""
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


def test_two_nodes_on_loopback_train_what_two_processes_on_one_node_train(two_processes_one_node, tmp_path):
    reference, _ = two_processes_one_node
    runs = tmp_path / "runs"
    nodes = _nodes(tmp_path, _static(free_port()), "--output-dir", str(runs), "--run-name", "run")
    statuses = _finish(nodes, 400)
    consoles = [(tmp_path / f"node{rank}.log").read_text() for rank in (0, 1)]
    assert statuses == [0, 0], consoles[0][-4000:] + consoles[1][-4000:]
    # global rank 0 (node 0) decided, wrote and checkpointed the one run folder; seeds, prompts, the reward
    # statistics and the averaged gradients follow the global rank and world size: the same numbers as one node
    assert _records(runs / "run") == _records(reference)
    assert [p.name for p in runs.iterdir()] == ["run"]
    assert sorted(p.name for p in (runs / "run" / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-2"]
    assert json.loads((runs / "run" / "run.json").read_text())["world_size"] == 2
    assert "epoch 2/2  reward" in consoles[0] and "epoch 2/2  reward" not in consoles[1]  # only rank 0 reports


def test_a_killed_node_ends_the_job_on_the_other_and_two_nodes_resume_it(two_processes_one_node, tmp_path):
    reference, _ = two_processes_one_node
    runs = tmp_path / "runs"
    nodes = _nodes(tmp_path, _static(free_port()), "--output-dir", str(runs), "--run-name", "run",
                   "--set", "train.max_epochs=50")
    try:
        deadline = time.time() + 300
        while not (runs / "run" / "checkpoints" / "checkpoint-1").is_dir():
            assert time.time() < deadline and all(node.poll() is None for node in nodes), \
                "the job never saved a checkpoint: " + (tmp_path / "node0.log").read_text()[-3000:]
            time.sleep(0.2)
        _kill_tree(nodes[1].pid)  # node 1 disappears in epoch 2
        killed = time.time()
        nodes[0].wait(timeout=120)
        assert time.time() - killed < 120 and nodes[0].returncode != 0
    finally:
        for node in nodes:
            _kill_tree(node.pid)
            node.wait()
    # both nodes resume the run folder (on a filesystem both see), with the rendezvous-endpoint flags this time:
    # epoch 2 from checkpoint-1, and the history equals the uninterrupted run's
    nodes = _nodes(tmp_path, _c10d(free_port()), "--resume", str(runs / "run"), "--set", "train.max_epochs=2")
    statuses = _finish(nodes, 400)
    consoles = [(tmp_path / f"node{rank}.log").read_text() for rank in (0, 1)]
    assert statuses == [0, 0], consoles[0][-4000:] + consoles[1][-4000:]
    assert "resuming checkpoint-1 (1 epochs trained)" in consoles[0] + consoles[1]
    assert _records(runs / "run") == _records(reference)


@pytest.mark.parametrize("mistake, message", [
    (["--set", "sample.eta=-1"], "sample.eta=-1.0 must be a finite number > 0"),  # before joining the others
    (["--model", "/nonexistent/sd15"], "model.pretrained='/nonexistent/sd15': no such directory"),  # after
], ids=["bad_value_before_joining", "missing_path_after_joining"])
def test_a_mistake_on_one_node_only_ends_every_node_with_one_line_naming_it(tmp_path, mistake, message):
    runs = tmp_path / "runs"
    nodes = _nodes(tmp_path, _static(free_port()), "--output-dir", str(runs), "--run-name", "run",
                   node1_args=mistake)
    statuses = _finish(nodes, 120)
    assert statuses == [1, 1]
    for rank in (0, 1):  # each node's console says why it stopped
        errors = [line for line in (tmp_path / f"node{rank}.log").read_text().splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(f"error: rank 1 (node 1, host {platform.node()}): {message}")
    assert not runs.exists() or not any(runs.iterdir())  # before any model loaded: no run folder
