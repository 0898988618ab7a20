"""scripts/single_node/run_sd3.sh and run_all.sh, run with bash in a subprocess (spec §1.1, §1.2, §1.5)."""
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN_SD3 = ROOT / "scripts" / "single_node" / "run_sd3.sh"
RUN_ALL = ROOT / "scripts" / "single_node" / "run_all.sh"
PAPER_FLAGS = ["--profile", "lowsnr2", "--sampler", "branch", "--reward", "geneval", "--loss", "matching",
               "--reweight", "fairclip2"]
PAPER_ID = "sd3.lowsnr2.branch.geneval.matching.fairclip2"


def _env(**extra):
    env = {key: value for key, value in os.environ.items() if key not in ("WORLD_SIZE", "TORCHRUN")}
    env.update(PYTHON=sys.executable, **extra)
    return env


def run_sd3(*args, cwd="/", timeout=120, **env):
    # from "/" on purpose: the launcher must find its component by itself
    return subprocess.run(["bash", str(RUN_SD3), *args], cwd=cwd, env=_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def _command(result):
    """The accelerate command printed by --dry-run (last stdout line), as argv."""
    return shlex.split(result.stdout.strip().splitlines()[-1])


def test_help_prints_usage_with_every_flag_and_exits_0():
    result = run_sd3("--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: bash scripts/single_node/run_sd3.sh")
    for flag in ("--profile", "--sampler", "--reward", "--loss", "--reweight", "--num-processes",
                 "--main-process-port", "--accelerate-config", "--model", "--output-dir", "--tiny", "--dry-run",
                 "--list", "-h, --help"):
        assert flag in result.stdout, flag
    assert run_sd3("-h").stdout == result.stdout


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "run_sd3.sh: unknown argument: --bogus"),
    (["--profile"], "run_sd3.sh: --profile needs a value"),
    (["--sampler", "ddim"], "run_sd3.sh: --sampler must be one of: default branch (got 'ddim')"),
    (["--num-processes", "two"], "run_sd3.sh: --num-processes must be a positive integer (got 'two')"),
])
def test_bad_arguments_exit_1_with_the_reason_and_usage(args, message):
    result = run_sd3(*args, "--dry-run")
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == message and lines[1].startswith("usage:")


def test_list_prints_the_values_the_config_matrix_accepts():
    spec = importlib.util.spec_from_file_location("sd3_matrix_for_launcher", ROOT / "config" / "sd3_matrix.py")
    matrix = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(matrix)
    result = run_sd3("--list")
    assert result.returncode == 0
    listed = dict(line.split(": ", 1) for line in result.stdout.strip().splitlines())
    assert list(listed) == ["profiles", "samplers", "rewards", "losses", "reweights"]
    for (_, allowed), name in zip(matrix.FIELDS, listed):
        assert listed[name].split() == list(allowed)


def test_paper_command_dry_run_prints_the_spec_launch_line():
    result = run_sd3(*PAPER_FLAGS, "--num-processes", "4", "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[:3] == ["profile=lowsnr2 sampler=branch reward=geneval loss=matching reweight=fairclip2",
                         f"config_id={PAPER_ID}", "train_script=scripts/train_sd3_pr.py"]
    # the per-process budget of spec §1.5, as checked for 4 processes
    assert lines[3].startswith("budget: world_size=4 rollouts_per_epoch=12 ")
    assert "rows_per_epoch=1440 anchor_rows_per_epoch=240 microbatch_rows=108 microbatches_per_epoch=14" in lines[3]
    assert lines[4] == ("accelerate launch --num_machines 1 --num_processes 4 --main_process_port 29700 "
                        f"scripts/train_sd3_pr.py --config config/sd3_matrix.py:{PAPER_ID}")


def test_defaults_follow_the_spec_and_the_reward_preset():
    default = _command(run_sd3("--dry-run"))  # base / default / pickscore / ppo / base on 2 processes
    assert default == ["accelerate", "launch", "--num_machines", "1", "--num_processes", "2", "--main_process_port",
                       "29502", "scripts/train_sd3.py", "--config", "config/sd3_matrix.py:sd3.base.default.pickscore.ppo.base"]
    # no --num-processes: the geneval preset's 4 processes (upstream always used 2 and split the budget for 4)
    paper = _command(run_sd3(*PAPER_FLAGS, "--dry-run"))
    assert paper[paper.index("--num_processes") + 1] == "4"


def test_every_option_reaches_the_command_with_quoting_intact():
    result = run_sd3(*PAPER_FLAGS, "--num-processes", "1", "--main-process-port", "31000",
                     "--accelerate-config", "/cfg/acc 1.yaml", "--model", "/models/my sd35",
                     "--output-dir", "/runs/out dir", "--dry-run", "--", "--config.train.learning_rate=1e-4",
                     "--config.seed=7")
    assert result.returncode == 0, result.stderr
    assert _command(result) == [
        "accelerate", "launch", "--config_file", "/cfg/acc 1.yaml", "--num_machines", "1", "--num_processes", "1",
        "--main_process_port", "31000", "scripts/train_sd3_pr.py", "--config", f"config/sd3_matrix.py:{PAPER_ID}",
        "--config.pretrained.model=/models/my sd35", "--config.save_dir=/runs/out dir",
        "--config.train.learning_rate=1e-4", "--config.seed=7"]
    assert "budget: world_size=1 rollouts_per_epoch=48" in result.stdout  # the single-GPU budget


@pytest.mark.parametrize("args, first_words", [
    (["--reweight", "fairclip2"], "config error: train.reweight_type='fair_clip2' is defined only for"),
    (["--sampler", "default", "--reward", "geneval"], "config error: sample.num_batches_per_epoch=9"),
    (["--profile", "lowsnr2", "--sampler", "branch"], "config error: train.updates_per_epoch=2 must divide the 9 microbatches"),
    (["--profile", "nosuch"], "config error: profile='nosuch' in config id"),
    (["--", "--config.train.nokey=1"], "config error: no config key train.nokey"),
])
def test_configs_that_cannot_run_stop_the_launcher_with_one_line(args, first_words):
    result = run_sd3("--dry-run", *args)
    assert result.returncode == 1
    assert result.stderr.strip().startswith(first_words) and len(result.stderr.strip().splitlines()) == 1
    assert "accelerate launch" not in result.stdout


def test_the_number_of_processes_decides_which_budgets_run():
    assert run_sd3("--sampler", "default", "--reward", "geneval", "--num-processes", "2", "--dry-run").returncode == 0
    fixed = run_sd3(*PAPER_FLAGS, "--num-processes", "2", "--dry-run", "--", "--config.train.updates_per_epoch=3")
    assert fixed.returncode == 0 and "microbatches_per_epoch=27" in fixed.stdout and "gradient_accumulation=9" in fixed.stdout


def test_launcher_sets_no_cluster_specific_network_settings_and_documents_them():
    text = RUN_SD3.read_text()
    code = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert not any("NCCL_" in line for line in code if "NCCL_IB_HCA, NCCL_IB_GID_INDEX" not in line)
    assert "NCCL_IB_HCA" in run_sd3("--help").stdout  # the usage says to export them yourself


def test_tiny_dry_run_targets_the_tiny_config_on_one_cpu_process():
    """One process runs the trainer script directly (no launcher in between: its one-line errors stay one
    line); the GenEval reward gets the kit's server, whose address the launcher passes on when it runs."""
    rsm_testkit = pytest.importorskip("rsm_testkit")
    result = run_sd3(*PAPER_FLAGS, "--tiny", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert _command(result) == ["env", "ACCELERATE_USE_CPU=true", sys.executable, "scripts/train_sd3_pr.py",
                                "--config", f"config/sd3_matrix.py:tiny:{PAPER_ID}",
                                f"--config.pretrained.model={rsm_testkit.get_tiny_model('sd35')}"]
    assert "budget: world_size=1 rollouts_per_epoch=2 images_per_rollout=2" in result.stdout
    server = next(line for line in result.stdout.splitlines() if line.startswith("tiny geneval server"))
    assert server.endswith(f"{sys.executable} -m rsm_testkit.services geneval --port 0")
    assert "--config.reward_options.geneval.url" in server


def test_tiny_runs_of_served_rewards_get_the_kits_server():
    reward = "unifiedreward"  # geneval: above and end to end; deqa and qwenvl take the same path
    result = run_sd3("--tiny", "--reward", reward, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert f"-m rsm_testkit.services {reward} --port 0" in result.stdout
    given = run_sd3("--tiny", "--reward", reward, "--dry-run", "--", f"--config.reward_options.{reward}.url=http://h:1")
    assert "rsm_testkit.services" not in given.stdout  # a URL given: nothing is started


def test_relative_output_dir_and_model_are_relative_to_where_the_user_is(tmp_path):
    (tmp_path / "models" / "sd35").mkdir(parents=True)
    result = run_sd3("--dry-run", "--output-dir", "runs/mine", "--model", "models/sd35", cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    command = _command(result)
    assert f"--config.save_dir={tmp_path / 'runs' / 'mine'}" in command
    assert f"--config.pretrained.model={tmp_path / 'models' / 'sd35'}" in command
    assert "--config.pretrained.model=org/model" in _command(run_sd3("--dry-run", "--model", "org/model"))


def test_run_all_sweeps_sampler_loss_reweight_in_order_and_passes_arguments():
    env = _env(DRY_RUN="1", PROFILE="lowsnr2", REWARD="geneval", SAMPLERS="branch", LOSS_TYPES="ppo matching",
               REWEIGHTS="base tempflow")
    result = subprocess.run(["bash", str(RUN_ALL), "--num-processes", "4"], cwd="/", env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    headers = [line for line in lines if line.startswith("[")]
    assert headers == [f"[{i}/4] profile=lowsnr2 sampler=branch reward=geneval loss={loss} reweight={reweight}"
                       for i, (loss, reweight) in enumerate([("ppo", "base"), ("ppo", "tempflow"),
                                                             ("matching", "base"), ("matching", "tempflow")], 1)]
    commands = [line for line in lines if line.startswith("accelerate launch")]
    assert commands[-1].endswith("config/sd3_matrix.py:sd3.lowsnr2.branch.geneval.matching.tempflow")
    assert all("--num_processes 4" in command for command in commands) and len(commands) == 4
    assert lines[-1] == "Completed all 4 runs."


def test_run_all_stops_at_a_run_that_cannot_start():
    env = _env(DRY_RUN="1", SAMPLERS="default", LOSS_TYPES="ppo", REWEIGHTS="fairclip2 base")
    result = subprocess.run(["bash", str(RUN_ALL)], cwd="/", env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Completed" not in result.stdout and "[2/2]" not in result.stdout
    assert "fair_clip2" in result.stderr


def test_cpu_runs_on_several_processes_dry_run_torchrun_with_gloo():
    """`accelerate launch --cpu` starts one process whatever --num_processes says, so CPU runs on N > 1
    processes go through torchrun (from $PYTHON's environment unless TORCHRUN names one)."""
    rsm_testkit = pytest.importorskip("rsm_testkit")
    tiny = run_sd3(*PAPER_FLAGS, "--tiny", "--num-processes", "2", "--dry-run")
    assert tiny.returncode == 0, tiny.stderr
    assert _command(tiny) == [
        "env", "ACCELERATE_USE_CPU=true", sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
        "--nproc_per_node", "2", "--master_port", "29700", "scripts/train_sd3_pr.py", "--config",
        f"config/sd3_matrix.py:tiny:{PAPER_ID}", f"--config.pretrained.model={rsm_testkit.get_tiny_model('sd35')}"]
    assert "budget: world_size=2 " in tiny.stdout
    # --cpu without --tiny: the full config, torchrun named by TORCHRUN, the chosen port
    cpu = _command(run_sd3("--cpu", "--num-processes", "3", "--main-process-port", "31000", "--dry-run",
                           TORCHRUN="/opt/bin/torchrun"))
    assert cpu == ["env", "ACCELERATE_USE_CPU=true", "/opt/bin/torchrun", "--nnodes", "1", "--nproc_per_node", "3",
                   "--master_port", "31000", "scripts/train_sd3.py", "--config",
                   "config/sd3_matrix.py:sd3.base.default.pickscore.ppo.base"]
    # one CPU process runs the script itself; GPU runs on N > 1 keep accelerate launch
    assert _command(run_sd3("--cpu", "--num-processes", "1", "--dry-run"))[:4] == [
        "env", "ACCELERATE_USE_CPU=true", sys.executable, "scripts/train_sd3.py"]
    gpu = _command(run_sd3("--num-processes", "3", "--dry-run", TORCHRUN="/opt/bin/torchrun"))
    assert gpu[:6] == ["accelerate", "launch", "--num_machines", "1", "--num_processes", "3"] and "--cpu" not in gpu


def test_accelerate_config_on_a_torchrun_run_is_refused_with_one_line():
    result = run_sd3("--cpu", "--num-processes", "2", "--accelerate-config", "/cfg/a.yaml", "--dry-run")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines()[0] == ("run_sd3.sh: --accelerate-config does not apply to CPU runs on 2 "
                                             "processes (they use torchrun)")


def test_an_accelerate_config_file_decides_the_layout_when_no_flag_does(tmp_path):
    """Issue 15: the launcher no longer forces --num_machines 1 over the user's accelerate config."""
    config = tmp_path / "two nodes.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_machines: 2\n"
                      "num_processes: 8\nmachine_rank: 1\nmain_process_ip: 10.0.0.5\n")
    result = run_sd3(*PAPER_FLAGS, "--accelerate-config", str(config), "--dry-run", "--",
                     "--config.latent_chunk_size=11")
    assert result.returncode == 0, result.stderr
    assert "budget: world_size=8 " in result.stdout  # 2 machines x 4 processes, from the file
    command = _command(result)
    assert command[:4] == ["accelerate", "launch", "--config_file", str(config)]
    assert "--num_machines" not in command and "--num_processes" not in command
