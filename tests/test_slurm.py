"""launch/slurm/*.sbatch on a real Slurm cluster: Debian's slurm-wlm and munge on a 2-node
namespace testbed (tests/slurmcluster.py), approxdist-train on digits with the sparse hook.

Proves: both scripts run a 2-node job on CPU-only nodes to completion, with the metrics and
the byte counts the sparse hook must send; NIC reaches gloo (the nodes' host names resolve
to 127.0.1.1 on their own node, as Debian writes /etc/hosts, so gloo without
GLOO_SOCKET_IFNAME advertises an address the other node cannot reach); the tasks get the
job's --cpus-per-task (SRUN_CPUS_PER_TASK); `scancel` mid-run leaves no process behind.
"""
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

import pytest

import slurmcluster
from approxdist.bench import testbed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATIO = 0.5


def _skip_reason():
    for ok, why in (testbed.available(), slurmcluster.available()):
        if not ok:
            return why
    return ""


needs_cluster = pytest.mark.skipif(bool(_skip_reason()), reason=_skip_reason() or "ok")


@pytest.mark.parametrize("script", ["launch/slurm/train.sbatch", "launch/slurm/train_srun.sbatch"])
def test_sbatch_environment_for_srun_and_the_socket_interface(tmp_path, script):
    """What each script hands srun, on any machine: srun and scontrol are stand-ins that
    print the environment (the cluster tests below run the real ones). A GLOO_SOCKET_IFNAME
    of the user's wins over NIC; NCCL_SOCKET_IFNAME, unset, takes NIC."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nenv\n")
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho n0\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SRUN_", "GLOO_", "NCCL_")) and k != "NIC"}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}", SLURM_CPUS_PER_TASK="3",
               SLURM_JOB_NODELIST="n0", SLURM_NNODES="1", SLURM_JOB_ID="7", NIC="ib0",
               GLOO_SOCKET_IFNAME="mine")
    proc = subprocess.run(["bash", os.path.join(REPO, script), "--epochs", "1"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    got = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    assert got.get("SRUN_CPUS_PER_TASK") == "3"
    assert got.get("GLOO_SOCKET_IFNAME") == "mine" and got.get("NCCL_SOCKET_IFNAME") == "ib0"


@pytest.fixture(scope="module")
def cluster():
    if _skip_reason():
        pytest.skip(_skip_reason())
    tag = f"sl{os.getpid() % 100000}"
    with tempfile.TemporaryDirectory(prefix="adslurm-") as tmp, testbed.Testbed(2, "1gbit", tag=tag) as tb:
        with slurmcluster.SlurmCluster(tb, tmp) as cl:
            yield cl
        leftover = cl.pids()
    assert leftover == [], f"processes left in the testbed after the cluster stopped: {leftover}"
    assert tb.namespaces() == []


def _job_env(cl, **extra):
    """What the submitting shell holds: the venv first on PATH (torchrun, python), this
    tree on PYTHONPATH, NIC for gloo; no GLOO_SOCKET_IFNAME of its own."""
    venv_bin = os.path.dirname(sys.executable)
    return cl.env({"PATH": venv_bin + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"),
                   "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "NIC": "eth0", **extra})


@contextlib.contextmanager
def _job(cl, script, out_dir, train_flags):
    """Submit script to 2 CPU-only nodes, one task each with all the node's CPUs; the job
    is cancelled when the test ends however it ends, so it never holds the nodes for the
    next one (and Slurm ends it after --time should the test itself hang)."""
    os.makedirs(out_dir, exist_ok=True)
    job = cl.sbatch(["--nodes", "2", "--ntasks-per-node", "1", "--cpus-per-task", str(cl.cpus),
                     "--gpus-per-node=0", "--time", "10", "--chdir", out_dir,
                     "--output", os.path.join(out_dir, "job-%j.out"), os.path.join(REPO, script),
                     "--no-progress", "--output-dir", os.path.join(out_dir, "run"), *train_flags],
                    env=_job_env(cl))
    try:
        yield job
    finally:
        cl.run(["scancel", job], check=False)


def _job_output(out_dir, job_id):
    path = os.path.join(out_dir, f"job-{job_id}.out")
    return open(path).read()[-6000:] if os.path.exists(path) else "(no job output)"


def _records(out_dir, kind):
    path = os.path.join(out_dir, "run", "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r for r in map(json.loads, f) if r.get("kind") == kind]


def _payload_per_step():
    """Bytes the sparse hook must send per step for approxdist-train's digits CNN at RATIO:
    the selected input channels of every sampled weight plus every dense parameter (the
    library's analytic count, on the same model after one training forward)."""
    import torch

    import approxdist
    from approxdist.bench.comm.hooks import analytic_payload_bytes, dense_payload_bytes
    from approxdist.train.models import build_model

    model = approxdist.convert_model(build_model("cnn", num_classes=10, in_channels=1, image_size=8),
                                     RATIO, distributed=True)
    model.train()
    model(torch.zeros(2, 1, 8, 8))
    return analytic_payload_bytes(model), dense_payload_bytes(model)


TRAIN = ["--dataset", "digits", "--model", "cnn", "--comm-hook", "sparse", "--sample-ratio", str(RATIO),
         "--batch-size", "64"]


# 12-20 s for the cluster and the srun job on 2 cores: the default suite runs that one;
# torchrun's job (17-40 s) and the scancel test (11-28 s) are `-m slow`.
@needs_cluster
@pytest.mark.parametrize("script", [pytest.param("launch/slurm/train.sbatch", marks=pytest.mark.slow),
                                    "launch/slurm/train_srun.sbatch"])
def test_sbatch_trains_on_two_nodes_with_the_sparse_hook(cluster, tmp_path, script):
    out = str(tmp_path / "job")
    with _job(cluster, script, out, [*TRAIN, "--epochs", "2"]) as job:
        info = cluster.wait_job(job, timeout=300)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), _job_output(out, job)
    assert info["NodeList"] == "n[0-1]" and info["NumNodes"] == "2"
    epochs = _records(out, "epoch")
    assert [r["epoch"] for r in epochs] == [1, 2], _job_output(out, job)
    per_step, dense_per_step = _payload_per_step()
    assert per_step < dense_per_step
    steps = 0
    for r in epochs:
        assert r["world_size"] == 2 and r["comm_hook"] == "sparse"
        assert 0 <= r["top1"] <= 100 and r["train_steps"] > 0
        # exactly the sampled slices and the dense parameters, every step, no index bytes
        assert r["payload_bytes"] == per_step * r["train_steps"]
        assert r["dense_bytes"] == dense_per_step * r["train_steps"]
        steps += r["train_steps"]
    assert epochs[-1]["payload_bytes_total"] == per_step * steps
    # digits is learnable in two epochs: the evaluation saw a model that trained
    assert epochs[-1]["top1"] > 50, epochs


def _node_processes(cl):
    """(pid, command line) of every process in the node namespaces other than slurmd and
    the shells that started it."""
    found = []
    for i in range(cl.tb.nodes):
        for pid in cl.node_pids(i):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            if cmd and not cl.is_daemon(pid):
                found.append((pid, cmd))
    return found


def _cpus_allowed(pid):
    with open(f"/proc/{pid}/status") as f:
        (line,) = [line for line in f if line.startswith("Cpus_allowed_list:")]
    count = 0
    for part in line.split(":", 1)[1].strip().split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


@needs_cluster
@pytest.mark.slow
def test_scancel_mid_run_leaves_no_process_behind_and_tasks_get_their_cpus(cluster, tmp_path):
    out = str(tmp_path / "job")
    with _job(cluster, "launch/slurm/train.sbatch", out, [*TRAIN, "--epochs", "200"]) as job:
        deadline = time.monotonic() + 300
        while not _records(out, "epoch"):  # mid-run: training, past the rendezvous and a first epoch
            assert cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), _job_output(out, job)
            assert time.monotonic() < deadline, _job_output(out, job)
            time.sleep(0.5)
        workers = [(pid, cmd) for pid, cmd in _node_processes(cluster) if "approxdist.train" in cmd]
        assert len(workers) >= 4, workers  # torchrun and its worker on each node
        # The tasks are bound to the job's --cpus-per-task CPUs (the cluster binds tasks to
        # cores): srun >= 22.05 reads that count from SRUN_CPUS_PER_TASK only, one CPU without it.
        for pid, cmd in workers:
            assert _cpus_allowed(pid) == cluster.cpus, (pid, cmd)
        cluster.run(["scancel", job])
        info = cluster.wait_job(job, timeout=60)
        assert info["JobState"] == "CANCELLED"
        deadline = time.monotonic() + cluster.kill_wait + 30
        while _node_processes(cluster) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _node_processes(cluster) == []
        assert len(_records(out, "epoch")) < 200
