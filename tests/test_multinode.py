"""The multi-node launchers for real, on 2 nodes of the namespace testbed (1gbit links).

- launch/mpirun.sh runs inside node 0; Open MPI starts the remote rank through
  launch/testbed/mpi_agent.sh (instead of ssh), which enters node 1's namespace with a
  fresh environment, so whatever rank 1 sees came through mpirun's -x list, as on a
  cluster. With MASTER_ADDR and without it (rank 0 broadcasts its address over mpi4py),
  and Horovod (`--dist horovod`, MPI controller) under it.
- launch/torchrun_multinode.sh, one torchrun per node inside its namespace.

Every job trains the same 5 steps of the sparse hook; the sparse reduction is lossless and
exact on 2 ranks, so each must end with the weights, accuracy and byte counts of the same
job run by torchrun on this machine's loopback. A wrapper interpreter records what rank 1
got: the forwarded variables and the CPUs it may use (--bind-to none).

Without root/iproute2, mpirun, mpi4py or Horovod the tests skip, saying which. The testbed,
every process started inside it and the temp dirs go away also on failure.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from approxdist.bench.testbed import Testbed, available, c10d_uses_local_addr

ROOT = Path(__file__).resolve().parents[1]
AGENT = ROOT / "launch" / "testbed" / "mpi_agent.sh"
BIN = Path(sys.executable).parent
CAN, WHY = available()
needs_netns = pytest.mark.skipif(not CAN, reason=f"cannot create network namespaces: {WHY}")
needs_mpirun = pytest.mark.skipif(shutil.which("mpirun") is None,
                                  reason="mpirun is not installed (apt-get install -y openmpi-bin libopenmpi-dev)")
FLAGS = ["--dataset", "digits", "--model", "cnn", "--epochs", "1", "--max-steps", "5", "--batch-size", "32",
         "--lr", "0.1", "--seed", "0", "--no-progress", "--sample-ratio", "0.5", "--comm-hook", "sparse",
         "--weight-layout", "contiguous"]  # Horovod's layout, so all launchers give the same weights
# Set in the caller's environment; mpirun.sh must bring them to the remote rank.
FORWARDED = {"NCCL_APPROXDIST_PROBE": "nccl-1", "GLOO_APPROXDIST_PROBE": "gloo-1",
             "TORCH_APPROXDIST_PROBE": "torch-1", "LD_LIBRARY_PATH": "/opt/approxdist-probe/lib"}
UNLISTED = "ADPROBE_UNLISTED"  # ...and this one not (FORWARD names it in one case)
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "TORCHELASTIC_USE_AGENT_STORE")


def _mpi4py_missing():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return True
    return False


def _base_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_VARS and not k.startswith(("OMPI_", "PMI_", "SLURM_", "HOROVOD_"))}
    # a rank that cannot reach the rendezvous fails within a minute, not after 30
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), APPROXDIST_COLLECTIVE_TIMEOUT_S="60", **extra)
    return env


@pytest.fixture(scope="module")
def testbed():
    if not CAN:
        pytest.skip(f"cannot create network namespaces: {WHY}")
    with Testbed(2, "1gbit", tag=f"mn{os.getpid() % 100000}") as tb:
        try:
            yield tb
        finally:
            _kill_leftovers(tb)


def _pids(tb, i):
    out = subprocess.run(["ip", "netns", "pids", tb.netns(i)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _kill_leftovers(tb):
    """A process left in a node (an orted that outlived mpirun) keeps the namespace alive:
    kill what is still inside this testbed's nodes, which only this module started."""
    for i in range(tb.nodes):
        for pid in _pids(tb, i):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same job under torchrun on this machine (loopback): metrics and weights."""
    out = tmp_path_factory.mktemp("reference")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "approxdist.train", *FLAGS, "--output-dir", str(out)],
                          env=_base_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return _result(out)


def _result(out):
    import torch

    with open(os.path.join(out, "metrics.jsonl")) as f:
        epoch = [r for r in map(json.loads, f) if r.get("kind") == "epoch"][-1]
    return epoch, torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["model"]


def _check_metrics(epoch):
    assert epoch["world_size"] == 2 and epoch["step"] == 5 and epoch["comm_hook"] == "sparse", epoch
    assert epoch["payload_bytes_total"] == epoch["payload_bytes"] and epoch["dense_bytes_total"] == epoch["dense_bytes"]
    assert 0.4 * epoch["dense_bytes"] < epoch["payload_bytes"] < 0.6 * epoch["dense_bytes"], epoch


def _check_same_as(run, reference):
    import torch

    (epoch, weights), (ref, ref_weights) = run, reference
    _check_metrics(epoch)
    for key in ("payload_bytes", "dense_bytes", "top1", "val_loss", "train_loss"):
        assert epoch[key] == ref[key], f"{key}: {epoch[key]} on the testbed, {ref[key]} on loopback"
    assert weights.keys() == ref_weights.keys()
    for key in weights:
        assert torch.equal(weights[key], ref_weights[key]), f"{key} differs from the loopback run"


def _wrapper(tmp_path):
    """An interpreter that first records the rank's environment and allowed CPUs."""
    path = tmp_path / "python"
    path.write_text("#!/bin/sh\n"
                    f"{{ env; grep Cpus_allowed_list /proc/self/status; }} > {tmp_path}/env.$OMPI_COMM_WORLD_RANK\n"
                    f'exec {sys.executable} "$@"\n')
    path.chmod(0o755)
    return path


def _rank_env(tmp_path, rank):
    lines = (tmp_path / f"env.{rank}").read_text().splitlines()
    env = dict(line.split("=", 1) for line in lines if "=" in line)
    cpus = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Cpus_allowed_list:"))
    return env, cpus


def _cpu_list(text):
    cpus = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def _run_in_node0(tb, argv, env, tmp_path, timeout=300):
    """argv inside node 0 (mpirun there starts node 1's rank); (returncode, output)."""
    log = tmp_path / "launcher.log"
    with open(log, "w") as f:
        proc = tb.popen(0, argv, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            tb.stop_all()
    return proc.returncode, log.read_text()


def _wait_nodes_empty(tb, seconds=10.0):
    """Every process the job started in the nodes has exited (orted included)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_pids(tb, i) for i in range(tb.nodes)):
        time.sleep(0.1)
    return {i: _pids(tb, i) for i in range(tb.nodes) if _pids(tb, i)}


def _mpirun_sh(tb, tmp_path, *, master_addr, port, extra=(), **env_extra):
    hosts = tmp_path / "hosts"
    hosts.write_text("".join(f"{tb.address(i)} slots=1\n" for i in range(tb.nodes)))
    out = tmp_path / "run"
    env = _base_env(TESTBED_TAG=tb.tag, NP="2", HOSTFILE=str(hosts), NIC="eth0", MASTER_PORT=str(port),
                    PYTHON=str(_wrapper(tmp_path)), MPIRUN="mpirun", HOROVOD_CYCLE_TIME="1",
                    MPIRUN_ARGS=f"--mca plm_rsh_agent {AGENT} --mca btl self,tcp",
                    **FORWARDED, **{UNLISTED: "unlisted"}, **env_extra)
    if master_addr:
        env["MASTER_ADDR"] = tb.address(0)
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    # env -u: GLOO_SOCKET_IFNAME must come from mpirun.sh's NIC, not from Testbed.popen
    argv = ["env", "-u", "GLOO_SOCKET_IFNAME", "bash", str(ROOT / "launch" / "mpirun.sh"), *extra, *FLAGS,
            "--output-dir", str(out)]
    code, log = _run_in_node0(tb, argv, env, tmp_path)
    assert code == 0, log[-5000:]
    assert _wait_nodes_empty(tb) == {}, "processes left in the nodes after mpirun exited"
    return _result(out)


def _check_remote_env(tmp_path, *, unlisted_forwarded=False):
    """Rank 1 runs in node 1 with only what mpirun forwarded, and unbound."""
    env, cpus = _rank_env(tmp_path, 1)
    assert env["OMPI_COMM_WORLD_RANK"] == "1"
    for key, value in FORWARDED.items():
        assert env.get(key) == value, f"{key} did not reach the remote rank: {env.get(key)!r}"
    assert env.get("PYTHONPATH") == str(ROOT) and env.get("OMP_NUM_THREADS") == "1"
    assert env.get("GLOO_SOCKET_IFNAME") == env.get("NCCL_SOCKET_IFNAME") == "eth0"
    # the agent starts ranks with a clean environment: a variable nobody listed stays behind
    assert env.get(UNLISTED) == ("unlisted" if unlisted_forwarded else None)
    assert _cpu_list(cpus) == os.sched_getaffinity(0), f"rank 1 bound to CPUs {cpus} (--bind-to none expected)"


@needs_netns
@needs_mpirun
@pytest.mark.skipif(_mpi4py_missing(), reason="mpi4py is not installed (pip install mpi4py)")
def test_mpirun_two_nodes_without_master_addr(testbed, tmp_path):
    """The mpi4py path: rank 0 broadcasts the address of its NIC (all namespaces share one
    host name, which resolves to 127.0.0.1). Non-slow: the one multi-node run of `make test`."""
    epoch, _ = _mpirun_sh(testbed, tmp_path, master_addr=False, port=29601, FORWARD=UNLISTED)
    _check_metrics(epoch)
    _check_remote_env(tmp_path, unlisted_forwarded=True)


@pytest.mark.slow
@needs_netns
@needs_mpirun
def test_mpirun_two_nodes_with_master_addr_equals_loopback(testbed, reference, tmp_path):
    _check_same_as(_mpirun_sh(testbed, tmp_path, master_addr=True, port=29602), reference)
    _check_remote_env(tmp_path)


@pytest.mark.slow
@needs_netns
@needs_mpirun
def test_horovod_under_mpirun_two_nodes_equals_loopback(testbed, reference, tmp_path):
    probe = "import horovod.torch as hvd; print(int(hvd.mpi_built()))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or proc.stdout.split()[-1:] != ["1"]:
        why = (proc.stderr.strip().splitlines() or ["built without MPI"])[-1]
        pytest.skip(f"Horovod with MPI is not available ({why}); build it with `make horovod`")
    run = _mpirun_sh(testbed, tmp_path, master_addr=False, port=29603, extra=["--dist", "horovod"])
    _check_same_as(run, reference)
    env, _ = _rank_env(tmp_path, 1)
    assert env.get("HOROVOD_CYCLE_TIME") == "1"


@pytest.mark.slow
@needs_netns
def test_torchrun_multinode_two_nodes_equals_loopback(testbed, reference, tmp_path):
    tb, out = testbed, tmp_path / "run"
    torchrun = BIN / "torchrun"
    assert torchrun.is_file(), f"torch is installed but {torchrun} is missing"

    def env_of(i):
        env = _base_env(NNODES="2", NPROC_PER_NODE="1", MASTER_ADDR=tb.address(0), MASTER_PORT="29604",
                        NIC="eth0", LOCAL_ADDR=tb.address(i), RDZV_CONF=f"is_host={int(i == 0)}",
                        TORCHRUN=str(torchrun), RDZV_ID=f"mn-{tb.tag}")
        if not c10d_uses_local_addr():  # torch 2.4: see Testbed.torchrun_args
            env.update(RDZV_BACKEND="static", NODE_RANK=str(i))
        return env

    def argv_of(i):  # env -u: GLOO_SOCKET_IFNAME must come from the script's NIC
        return ["env", "-u", "GLOO_SOCKET_IFNAME", "bash", str(ROOT / "launch" / "torchrun_multinode.sh"),
                *FLAGS, "--output-dir", str(out)]

    tb.run_checked(argv_of, env_of=env_of, timeout=600, what="launch/torchrun_multinode.sh")
    _check_same_as(_result(out), reference)
    assert _wait_nodes_empty(tb) == {}
