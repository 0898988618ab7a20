"""More than one node (issue 15), on loopback: ours' paper command with --tiny started as two "nodes" (two torchrun
launchers, `--nnodes 2 --node_rank 0|1`, one process each, gloo over 127.0.0.1) trains exactly what two processes on
one node train and writes one run folder; the run folder is decided by global rank 0 alone; a start-up check that
fails on node 1 only ends both nodes with its line; a killed node ends the job on the other in bounded time, and
two nodes resuming from its checkpoint end where the uninterrupted run ended."""
import json
import subprocess
import time

import psutil  # accelerate's own dependency

from conftest import COMPONENT, free_port, subprocess_env, torchrun

MEASURED = {"elapsed_s", "checkpoint_path"}  # besides every *time* and peak_memory* key


def _records(run_dir):
    return [{k: v for k, v in json.loads(line).items()
             if "time" not in k and "peak_memory" not in k and k not in MEASURED}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _lora(run_dir, n):
    return (run_dir / "checkpoints" / f"checkpoint-{n}" / "lora" / "pytorch_lora_weights.safetensors").read_bytes()


def _nodes(trainer, *node_args, port=None):
    """Node 0 and node 1 of a two-node job, one process each; node_args[r] are node r's trainer flags. Each
    launcher gets a session of its own, like a launcher on its own machine."""
    port = port or free_port()
    return [subprocess.Popen(torchrun(trainer, *args, port=port, processes=1, nodes=2, node_rank=rank), cwd=COMPONENT,
                             env=subprocess_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
            for rank, args in enumerate(node_args)]


def _both(trainer, *args):
    return _nodes(trainer, args, args)


def _finish(nodes, timeout=400):
    """(exit codes, consoles) of both nodes; a node still running after `timeout` s is killed and fails the test."""
    try:
        outputs = [node.communicate(timeout=timeout)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                _kill_node(node.pid)
    return [node.returncode for node in nodes], outputs


def _kill_node(pid):
    """SIGKILL a node: its torchrun launcher and everything below it (torchrun starts each rank in a process group
    of its own, so killing the launcher's group would leave the rank running)."""
    try:
        launcher = psutil.Process(pid)
        tree = [launcher, *launcher.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in tree:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def test_two_nodes_on_loopback_train_what_two_processes_on_one_node_train(two_process_run, tmp_path):
    """Ours (train_grpo_pr.py); the baseline goes through the same set-up, collectives and checkpointing (its
    two-node run is left out to keep the suite short)."""
    reference, _ = two_process_run("grpo_pr")  # torchrun --nproc_per_node 2, the same command (conftest)
    codes, outputs = _finish(_both("grpo_pr", "--output-dir", str(tmp_path), "--set", "run_name=run"))
    assert codes == [0, 0], outputs[0][-4000:] + outputs[1][-4000:]
    run = tmp_path / "run"
    assert _records(run) == _records(reference)  # same seeds, same global world size: the same numbers
    assert _lora(run, 2) == _lora(reference, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # one run folder
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-2"]
    started = json.loads((run / "run.json").read_text())
    assert (started["world_size"], started["nodes"]) == (2, 2)
    assert "epoch 2/2" in outputs[0] and "run folder:" in outputs[0]  # global rank 0 reports ...
    assert "epoch 2/2" not in outputs[1] and "run folder:" not in outputs[1]  # ... node 1's rank 0 does not


def test_only_global_rank_0_decides_the_run_folder(tmp_path):
    """On a shared save dir node 1 may look after node 0 has created the run folder (or copied a fork's history
    into it); here node 1's view holds a run of that name already. Only global rank 0's view counts: node 1 neither
    refuses nor writes."""
    late = tmp_path / "late_view" / "run"
    late.mkdir(parents=True)
    (late / "metrics.jsonl").write_text('{"kind": "step", "step": 1}\n')
    common = ("--set", "run_name=run", "--set", "num_train_epochs=1")
    codes, outputs = _finish(_nodes("grpo_pr", ("--output-dir", str(tmp_path / "shared"), *common),
                                    ("--output-dir", str(tmp_path / "late_view"), *common)))
    assert codes == [0, 0], outputs[0][-4000:] + outputs[1][-4000:]
    assert [r["kind"] for r in _records(tmp_path / "shared" / "run")] == ["step", "step", "epoch"]
    assert sorted(p.name for p in late.iterdir()) == ["metrics.jsonl"]


def test_a_check_failing_on_node_1_only_ends_both_nodes_with_its_line(tmp_path):
    missing = tmp_path / "not_on_node_1" / "prompts.txt"
    started = time.time()
    codes, outputs = _finish(_nodes("grpo_pr", ("--output-dir", str(tmp_path / "runs")),
                                    ("--output-dir", str(tmp_path / "runs"), "--set", f"prompt_file={missing}")),
                             timeout=120)
    assert codes[0] != 0 and codes[1] != 0 and time.time() - started < 120
    errors = [line for line in outputs[0].splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: prompt_file='{missing}': file not found")
    assert "(on process 1, host " in errors[0]
    assert not (tmp_path / "runs").exists()  # no model loaded, no folder made


def test_a_killed_node_ends_the_job_on_the_other_in_bounded_time_and_both_resume_exactly(two_process_run, tmp_path):
    """Node 1 is killed once checkpoint-1 is saved; node 0 must end on its own (< 120 s). Both nodes then resume
    from checkpoint-1 into a new folder (rank 0 copies the history there) and end where the uninterrupted
    two-process run ended: same records, same LoRA bytes."""
    reference, _ = two_process_run("grpo_pr")
    nodes = _both("grpo_pr", "--output-dir", str(tmp_path), "--set", "run_name=run", "--set", "num_train_epochs=50")
    metrics = tmp_path / "run" / "metrics.jsonl"
    try:
        deadline = time.time() + 300
        while not (metrics.is_file() and '"kind": "epoch"' in metrics.read_text()):  # written after checkpoint-1
            assert time.time() < deadline and nodes[0].poll() is None, "the job never finished an epoch"
            time.sleep(0.5)
        _kill_node(nodes[1].pid)  # node 1 disappears mid-training: its launcher and its rank
        killed = time.time()
        nodes[0].communicate(timeout=120)
        assert time.time() - killed < 120 and nodes[0].returncode != 0
    finally:
        for node in nodes:
            if node.poll() is None:
                _kill_node(node.pid)
            node.communicate()
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-1"
    codes, outputs = _finish(_both("grpo_pr", "--output-dir", str(tmp_path), "--set", "run_name=resumed", "--set",
                                   f"resume_from_checkpoint={checkpoint}", "--set", "num_train_epochs=2"))
    assert codes == [0, 0], outputs[0][-4000:] + outputs[1][-4000:]
    resumed = tmp_path / "resumed"
    assert f"run folder: {resumed} (resuming checkpoint-1 (epoch 1))" in outputs[0]
    assert _records(resumed) == _records(reference)
    assert _lora(resumed, 2) == _lora(reference, 2)
