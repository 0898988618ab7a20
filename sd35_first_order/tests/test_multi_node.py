"""More than one node (issue 15), proven on loopback: ours' tiny paper command started as two "nodes" (two torchrun
launchers with --nnodes 2, one process each, gloo over 127.0.0.1) trains what two processes on one node train and
writes one run folder from global rank 0; it resumes across nodes; an error on one node stops both with one line;
a killed node ends the job on the other in bounded time.

Each node gets its own HOME and the command says `--output_dir=~/runs`: the same command line gives the two nodes
two different save folders, as on a cluster without a shared filesystem, so the tests also prove that nothing but
global rank 0 reads or writes the save folder."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import COMPONENT, OURS, clean_env

RUN = "hpscore_vggflow_OURS_seed0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node(rank, port, home, *args, rendezvous="static"):
    """One node of a two-node job: torchrun with its own flags, one process, HOME=`home`, in a process group of its
    own; its console goes to `<home>/node<rank>.log`."""
    if rendezvous == "static":
        where = ["--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port)]
    else:  # c10d: torchrun assigns the node ranks
        where = ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "loopback"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", *where,
               "train_vggflow.py", *args, "--tiny", "--output_dir=~/runs"]
    home.mkdir(parents=True, exist_ok=True)
    with open(home / f"node{rank}.log", "w") as console:
        return subprocess.Popen(command, cwd=COMPONENT, env=clean_env(HOME=str(home)), stdout=console,
                                stderr=subprocess.STDOUT, start_new_session=True)


def two_nodes(homes, *args, timeout=300, expect=0):
    port = free_port()
    nodes = [node(rank, port, home, *args) for rank, home in enumerate(homes)]
    try:
        for n in nodes:
            n.wait(timeout=timeout)
    finally:
        for n in nodes:
            kill_tree(n.pid)
    consoles = [(home / f"node{rank}.log").read_text() for rank, home in enumerate(homes)]
    for n, console in zip(nodes, consoles):
        assert n.returncode == expect, console[-6000:]
    return consoles


def records(run_dir):
    measured = ("checkpoint_path", "elapsed_s")
    return [{k: v for k, v in json.loads(line).items() if "time" not in k and "memory" not in k and k not in measured}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def process_tree(pid):
    """`pid` and every process below it (torchrun starts its ranks in process groups of their own)."""
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
        tree.append(stack.pop())
        stack.extend(children.get(tree[-1], []))
    return tree


def kill_tree(pid):
    for member in process_tree(pid):  # listed before killing: orphans leave the tree
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def two_node_run(tmp_path_factory):
    """(homes, consoles) of the 2-epoch two-node run."""
    base = tmp_path_factory.mktemp("two_nodes")
    homes = [base / "node0", base / "node1"]
    return homes, two_nodes(homes, *OURS)


def test_two_nodes_on_loopback_train_what_two_processes_on_one_node_train(two_node_run, two_processes_on_one_node):
    homes, consoles = two_node_run
    run_dir = homes[0] / "runs" / RUN
    assert records(run_dir) == records(two_processes_on_one_node)
    assert [r["samples"] for r in records(run_dir) if r["kind"] == "epoch"] == [4, 8]  # global world size 2
    a = torch.load(run_dir / "checkpoints" / "checkpoint-2" / "training_state.pt", weights_only=True)
    b = torch.load(two_processes_on_one_node / "checkpoints" / "checkpoint-2" / "training_state.pt", weights_only=True)
    assert a["world_size"] == 2 and all(torch.equal(x, y) for x, y in zip(a["policy"], b["policy"]))
    start = json.loads((run_dir / "run.json").read_text())["starts"][0]
    assert start["world_size"] == 2 and start["nodes"] == 1  # one host: the two "nodes" share 127.0.0.1
    # one run folder, written by global rank 0; the second node never touched its own save folder
    assert [p.name for p in (homes[0] / "runs").iterdir()] == [RUN]
    assert not (homes[1] / "runs").exists()
    assert "epoch 2/2" in consoles[0] and "epoch 2/2" not in consoles[1]  # only global rank 0 reports


def test_a_two_node_run_resumes_when_only_the_first_node_sees_the_checkpoint(two_node_run, tmp_path):
    """Global rank 0 reads the checkpoint and sends the state to the other node: the resumed run ends with the
    uninterrupted run's records and weights."""
    homes, _ = two_node_run
    done = homes[0] / "runs" / RUN
    killed = homes[0] / "killed" / RUN
    killed.parent.mkdir()
    subprocess.run(["cp", "-r", str(done), str(killed)], check=True)
    subprocess.run(["rm", "-r", str(killed / "checkpoints" / "checkpoint-2")], check=True)
    lines = (killed / "metrics.jsonl").read_text().splitlines(keepends=True)
    (killed / "metrics.jsonl").write_text("".join(lines[:2]))  # step 1 and epoch 1: what checkpoint-1 saw
    consoles = two_nodes(homes, OURS[0], f"--resume=~/killed/{RUN}")  # the paper command, resumed
    assert "resuming checkpoint-1 (epoch 1)" in consoles[0]
    assert records(killed) == records(done)
    a = torch.load(killed / "checkpoints" / "checkpoint-2" / "training_state.pt", weights_only=True)
    b = torch.load(done / "checkpoints" / "checkpoint-2" / "training_state.pt", weights_only=True)
    assert all(torch.equal(x, y) for x, y in zip(a["policy"], b["policy"]))
    assert not (homes[1] / "killed").exists()


def test_a_start_up_error_on_one_node_stops_both_with_one_line_naming_its_rank(tmp_path):
    """Prompt files only on node 0 (`--data_dir=~/data`): node 1's check fails; both nodes end at once, node 0
    printing node 1's line with its rank, node 1 its own line; no run folder is left."""
    from sd35fo.tiny import prompt_data_dir

    homes = [tmp_path / "node0", tmp_path / "node1"]
    homes[0].mkdir()
    subprocess.run(["cp", "-r", prompt_data_dir(), str(homes[0] / "data")], check=True)
    consoles = two_nodes(homes, *OURS, "--data_dir=~/data", expect=1, timeout=120)
    message = ("experiment.prompt_fn='from_jsonl': prompt file 'geneval/train_metadata.jsonl' not found (neither as "
               f"given nor in {homes[1] / 'data'})")
    error0 = [line for line in consoles[0].splitlines() if line.startswith("error: ")]
    error1 = [line for line in consoles[1].splitlines() if line.startswith("error: ")]
    assert len(error0) == 1 and error0[0].startswith(f"error: rank 1 of 2 (host {socket.gethostname()}): {message}")
    assert len(error1) == 1 and error1[0].startswith(f"error: {message}")
    assert not (homes[0] / "runs").exists() and not (homes[1] / "runs").exists()


def test_a_killed_node_ends_the_job_on_the_other_in_bounded_time(tmp_path):
    """torchrun's c10d rendezvous (`--rdzv_endpoint`, node ranks assigned by torchrun), a shared HOME: once the job
    trains, the second launcher's whole tree (torchrun agent and its rank) is killed; the first ends with an error
    within seconds instead of waiting out the process-group timeout."""
    port = free_port()
    nodes = [node(rank, port, tmp_path, *OURS, "--config.training.num_epochs=50", rendezvous="c10d")
             for rank in (0, 1)]
    metrics = tmp_path / "runs" / RUN / "metrics.jsonl"
    try:
        deadline = time.time() + 300
        while not (metrics.is_file() and '"kind": "step"' in metrics.read_text()):
            assert time.time() < deadline and nodes[0].poll() is None and nodes[1].poll() is None, \
                "the job never trained a step"
            time.sleep(0.5)
        kill_tree(nodes[1].pid)
        killed = time.time()
        nodes[0].communicate(timeout=120)
        assert nodes[0].returncode != 0 and time.time() - killed < 120
    finally:
        for n in nodes:
            kill_tree(n.pid)
