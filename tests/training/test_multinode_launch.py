"""Multi-node launch as users run it: the Slurm batch script of stage I and its torchrun command.

- examples/syne/slurm_torchrun.sh builds the per-node torchrun command from SLURM_* variables;
  checked for given variables, and for clear errors without them.
- examples/syne/slurm_stage1.sbatch is valid bash, and run with stand-ins for srun / scancel /
  scontrol (no Slurm here) it launches that command once per node; near the time limit
  (USR1) it signals the steps with SIGTERM, waits for them and requeues the job.
- The command the builder prints, started as two launchers (two "nodes" of one rank each) with
  a c10d rendezvous on 127.0.0.1, trains the tiny run for 2 steps and checkpoints, both ranks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.launch import REPO_ROOT, free_port
from tests.training.pretrain_launch import launch_nodes, make_run_files, records

BUILDER = REPO_ROOT / "examples" / "syne" / "slurm_torchrun.sh"
SBATCH = REPO_ROOT / "examples" / "syne" / "slurm_stage1.sbatch"
STAGE1 = ["pretrain_syne.py", "--config", "examples/syne/llama3_8b_stage1.yaml"]


def _fake_tools(directory: Path) -> dict:
    """srun / scancel / scontrol stand-ins in ``directory/bin`` that log their arguments into
    ``directory`` (a file per tool)."""
    tools = {
        # scontrol: expands node[01-08] like Slurm's hostlist; logs requeue requests
        "scontrol": """if [ "$1 $2" = "show hostnames" ]; then
  case "$3" in node\\[01-08\\]) printf 'node0%s\\n' 1 2 3 4 5 6 7 8;; *) echo "$3";; esac
else echo "$*" >> "$LOG/scontrol"; fi""",
        # srun: logs its arguments and pid; exits $FAKE_SRUN_EXIT at once, or runs until SIGTERM
        "srun": """printf '%s\\n' "$@" > "$LOG/srun"; echo $$ > "$LOG/srun.pid"
if [ -n "${FAKE_SRUN_EXIT:-}" ]; then exit "$FAKE_SRUN_EXIT"; fi
trap 'echo TERM >> "$LOG/srun.signals"; exit 0' TERM
while :; do sleep 0.05; done""",
        # scancel --signal=TERM: Slurm delivers the signal to the step's processes
        "scancel": """echo "$*" >> "$LOG/scancel"; kill -TERM "$(cat "$LOG/srun.pid")\"""",
    }
    (directory / "bin").mkdir()
    for name, body in tools.items():
        path = directory / "bin" / name
        path.write_text("#!/bin/bash\n" + body + "\n")
        path.chmod(0o755)
    return dict(os.environ, PATH=f"{directory / 'bin'}{os.pathsep}{os.environ['PATH']}",
                LOG=str(directory))


def _build(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(BUILDER), *args], env=env, capture_output=True, text=True,
                          timeout=30)


@pytest.mark.parametrize("slurm, expected", [
    (dict(SLURM_JOB_NUM_NODES="8", SLURM_GPUS_ON_NODE="8", SLURM_JOB_NODELIST="node[01-08]",
          SLURM_JOB_ID="4242"),
     "--nnodes 8 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint node01:29500 "
     "--rdzv-id megasyne-4242-0"),
    # no SLURM_GPUS_ON_NODE: the count of --gpus-per-node=h100:4; a requeued job's 2nd restart
    (dict(SLURM_NNODES="2", SLURM_GPUS_PER_NODE="h100:4", SLURM_JOB_NODELIST="gpu7",
          SLURM_JOB_ID="17", SLURM_RESTART_COUNT="2", MEGASYNE_RDZV_PORT="31000"),
     "--nnodes 2 --nproc_per_node 4 --rdzv-backend c10d --rdzv-endpoint gpu7:31000 "
     "--rdzv-id megasyne-17-2"),
])
def test_torchrun_command_from_slurm_variables(tmp_path, slurm, expected):
    env = {k: v for k, v in _fake_tools(tmp_path).items() if not k.startswith("SLURM_")}
    out = _build({**env, **slurm}, *STAGE1, "--set", "run_dir=/shared/run x")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["torchrun", *expected.split(), *STAGE1, "--set",
                                       "run_dir=/shared/run x"]


@pytest.mark.parametrize("slurm, message", [
    (dict(), "SLURM_JOB_NUM_NODES is '': run this inside a Slurm allocation"),
    (dict(SLURM_JOB_NUM_NODES="2", SLURM_JOB_ID="1"), "cannot tell the GPUs per node"),
    (dict(SLURM_JOB_NUM_NODES="2", SLURM_GPUS_PER_NODE="gpu:0", SLURM_JOB_ID="1"),
     "ask for them with --gpus-per-node=N"),
    (dict(SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="8", SLURM_JOB_ID="1"),
     "SLURM_JOB_NODELIST is not set"),
])
def test_torchrun_command_outside_slurm_fails_clearly(tmp_path, slurm, message):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    out = _build({**env, **slurm}, *STAGE1)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("error: slurm_torchrun.sh: ") and message in out.stderr


def test_sbatch_script_is_valid_bash_and_asks_for_requeue():
    for script in (SBATCH, BUILDER):
        check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
    directives = [line.split()[1] for line in SBATCH.read_text().splitlines()
                  if line.startswith("#SBATCH")]
    assert {"--requeue", "--ntasks-per-node=1", "--signal=B:USR1@900",
            "--open-mode=append"} <= set(directives)


def _sbatch(tmp_path: Path, **extra) -> tuple[subprocess.Popen, dict]:
    env = {k: v for k, v in _fake_tools(tmp_path).items() if not k.startswith("SLURM_")}
    env.update(SLURM_JOB_ID="77", SLURM_JOB_NUM_NODES="8", SLURM_GPUS_ON_NODE="8",
               SLURM_JOB_NODELIST="node[01-08]", SLURM_SUBMIT_DIR=str(REPO_ROOT),
               MEGASYNE_VENV=str(tmp_path / "no-venv"), **extra)
    return subprocess.Popen(["bash", str(SBATCH)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True), env


def test_sbatch_launches_one_torchrun_per_node_and_passes_its_status(tmp_path):
    proc, _ = _sbatch(tmp_path, FAKE_SRUN_EXIT="3", RUN_DIR="/shared/runs/syne")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    assert (tmp_path / "srun").read_text().splitlines() == [
        "--ntasks-per-node=1", "--kill-on-bad-exit=1", "torchrun", "--nnodes", "8",
        "--nproc_per_node", "8", "--rdzv-backend", "c10d", "--rdzv-endpoint", "node01:29500",
        "--rdzv-id", "megasyne-77-0", *STAGE1, "--set", "run_dir=/shared/runs/syne"]
    assert not (tmp_path / "scontrol").exists()  # no requeue after a normal end


def test_sbatch_near_the_time_limit_checkpoints_then_requeues(tmp_path):
    proc, _ = _sbatch(tmp_path)
    deadline = time.time() + 30
    while not (tmp_path / "srun.pid").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "srun.pid").exists(), proc.stderr.read() if proc.poll() is not None else ""
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@900 delivers
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err  # srun's status: the trainer checkpointed and exited 0
    assert (tmp_path / "scancel").read_text() == "--signal=TERM 77\n"
    assert (tmp_path / "srun.signals").read_text() == "TERM\n"
    assert (tmp_path / "scontrol").read_text() == "requeue 77\n"
    assert "requeueing job 77" in out


@pytest.mark.slow
def test_two_launchers_meet_by_rendezvous_and_train(tmp_path):
    """The builder's command for 2 nodes x 1 GPU, started twice on this machine."""
    make_run_files(tmp_path, docs_per_source=30)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    built = _build({**env, "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "1",
                    "SLURM_JOB_ID": str(os.getpid()), "MEGASYNE_RDZV_HOST": "127.0.0.1",
                    "MEGASYNE_RDZV_PORT": str(free_port())}, "pretrain_syne.py")
    assert built.returncode == 0, built.stderr
    torchrun_args = built.stdout.splitlines()[1:-1]  # between "torchrun" and the script
    results = launch_nodes(tmp_path, "run", torchrun_args, "train_steps=2", "save_interval=2",
                           timeout=300)
    for r in results:
        assert r.returncode == 0, r.stderr[-6000:]
    steps = [r for r in records(tmp_path, "run") if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    ckpt = tmp_path / "run" / "checkpoints" / "iter_0000002"
    if not ckpt.is_dir():
        ckpt = next((tmp_path / "run" / "checkpoints").glob("iter_*2"))
    # Each global rank saved its RNG state with the checkpoint: both ranks reached the save.
    assert sorted(p.name for p in (ckpt / "rng").iterdir()) == ["rank00000.pt", "rank00001.pt"]
    assert sum("done: {'step': 2" in r.stdout for r in results) == 1  # rank 0 reports, once
