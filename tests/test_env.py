"""init_distributed: the launcher environments it reads, and real 2-process gloo groups."""
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from approxdist.distributed import env as adenv
from approxdist.distributed import init_distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH_VARS = [
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
    "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST", "SLURM_NODELIST",
    "SLURM_JOB_ID", "SLURM_JOBID", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
    "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "PMI_LOCAL_RANK", "PALS_LOCAL_RANKID", "MV2_COMM_WORLD_RANK",
    "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK", "TORCHELASTIC_RESTART_COUNT",
]


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node01", ["node01"]),
        ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
        ("gpu[8-11]", ["gpu8", "gpu9", "gpu10", "gpu11"]),
        ("nid[0098-0101]", ["nid0098", "nid0099", "nid0100", "nid0101"]),
        ("r[1-2]n[1,3]", ["r1n1", "r1n3", "r2n1", "r2n3"]),
        ("a-[1-2]-ib, b", ["a-1-ib", "a-2-ib", "b"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert adenv.expand_nodelist(nodelist) == hosts
    assert adenv.first_host(nodelist) == hosts[0]


@pytest.mark.parametrize("bad", ["", "node[01-03", "node01]", "node[3-1]", "node[a-b]"])
def test_expand_nodelist_rejects_malformed(bad):
    with pytest.raises(ValueError, match="nodelist"):
        adenv.expand_nodelist(bad)


def test_detect_torchrun():
    e = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "1234"}
    assert adenv.detect_launch(e) == adenv.LaunchEnv("torchrun", 3, 8, 1, "h0", 1234)


def test_torchrun_wins_over_slurm():
    # torchrun started by srun inside an allocation sees both sets; its own describe its workers.
    e = {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "5", "SLURM_PROCID": "0", "SLURM_NTASKS": "2",
         "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "n[1-2]"}
    launch = adenv.detect_launch(e)
    assert (launch.source, launch.rank, launch.world_size, launch.local_rank) == ("torchrun", 5, 16, 5)


def test_detect_slurm_master_from_nodelist_and_port_from_job():
    e = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-10],cpu1",
         "SLURM_JOB_ID": "4242"}
    launch = adenv.detect_launch(e)
    assert launch == adenv.LaunchEnv("slurm", 5, 8, 1, "gpu07", 15000 + 4242 % 20000)
    # An explicit MASTER_ADDR/PORT is respected, and a step's own task count wins over the job's.
    e.update(MASTER_ADDR="login1", MASTER_PORT="2222", SLURM_STEP_NUM_TASKS="6")
    assert adenv.detect_launch(e) == adenv.LaunchEnv("slurm", 5, 6, 1, "login1", 2222)


@pytest.mark.parametrize(
    "e, expected",
    [
        ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}, (2, 4, 0)),
        ({"PMI_RANK": "1", "PMI_SIZE": "3", "MPI_LOCALRANKID": "1"}, (1, 3, 1)),
        ({"MV2_COMM_WORLD_RANK": "7", "MV2_COMM_WORLD_SIZE": "8", "MV2_COMM_WORLD_LOCAL_RANK": "3"}, (7, 8, 3)),
    ],
)
def test_detect_mpi(e, expected):
    launch = adenv.detect_launch(e)
    assert launch.source == "mpi"
    assert (launch.rank, launch.world_size, launch.local_rank) == expected
    assert launch.master_addr is None  # agreed on at init time (mpi4py broadcast)


def test_detect_none_and_bad_values():
    assert adenv.detect_launch({}) == adenv.LaunchEnv("none", 0, 1, 0, None, None)
    with pytest.raises(ValueError, match="RANK"):
        adenv.detect_launch({"RANK": "zero", "WORLD_SIZE": "2"})


@pytest.fixture
def clean_env(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_no_launcher_is_single_process_without_group(clean_env):
    assert init_distributed() == (0, 1, 0)
    assert not dist.is_initialized()


def test_rank_out_of_range_is_an_error(clean_env):
    clean_env.setenv("SLURM_PROCID", "4")
    clean_env.setenv("SLURM_NTASKS", "4")
    with pytest.raises(ValueError, match="rank 4 out of range"):
        init_distributed("gloo")
    assert not dist.is_initialized()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_backend_default_and_nccl_without_cuda(clean_env):
    assert adenv.resolve_backend(None) == "gloo"
    with pytest.raises(ValueError, match="nccl"):
        init_distributed("nccl")
    with pytest.raises(ValueError, match="backend"):
        init_distributed("carrier-pigeon")


def test_mpi_without_master_addr_needs_mpi4py(clean_env, monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # as if not installed: import fails
    clean_env.setenv("OMPI_COMM_WORLD_RANK", "0")
    clean_env.setenv("OMPI_COMM_WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        init_distributed("gloo")
    assert not dist.is_initialized()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WORKER = textwrap.dedent(
    """
    import json, os, torch, torch.distributed as dist
    from approxdist.distributed import init_distributed
    rank, world, local = init_distributed("gloo")
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    print(json.dumps({"rank": rank, "world": world, "local": local, "sum": t.item(),
                      "group_rank": dist.get_rank(), "group_size": dist.get_world_size(),
                      "master": os.environ["MASTER_ADDR"], "port": os.environ["MASTER_PORT"]}))
    dist.destroy_process_group()
    """
)


def _run_two(per_rank_env):
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    base.update(OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + base.get("PYTHONPATH", ""))
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER], env=dict(base, **e), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for e in per_rank_env
    ]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


def test_torchrun_environment_two_processes():
    port = str(_free_port())
    outs = _run_two([
        {"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        for r in range(2)
    ])
    for r, o in enumerate(outs):
        assert (o["rank"], o["world"], o["local"]) == (r, 2, r)
        assert (o["group_rank"], o["group_size"]) == (r, 2)
        assert o["sum"] == 3.0


def test_slurm_environment_two_processes():
    # Two tasks on two "nodes" of which the first is this machine: the master address must
    # come from the node list (no MASTER_ADDR given), the local ids from SLURM_LOCALID.
    port = str(_free_port())
    outs = _run_two([
        {"SLURM_PROCID": str(r), "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "99",
         "SLURM_JOB_NODELIST": "localhost,node[02-03]", "MASTER_PORT": port}
        for r in range(2)
    ])
    for r, o in enumerate(outs):
        assert (o["rank"], o["world"], o["local"]) == (r, 2, 0)
        assert o["master"] == "localhost" and o["port"] == port
        assert o["sum"] == 3.0


def test_mpi_environment_two_processes():
    port = str(_free_port())
    outs = _run_two([
        {"OMPI_COMM_WORLD_RANK": str(r), "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": str(r),
         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        for r in range(2)
    ])
    assert [(o["rank"], o["world"], o["local"], o["sum"]) for o in outs] == [(0, 2, 0, 3.0), (1, 2, 1, 3.0)]


MPI_SCRIPT = """
import json, torch, torch.distributed as dist
from approxdist.distributed import init_distributed
import os
import shutil
rank, world, local = init_distributed("gloo")
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
# Each rank writes its own file: mpirun's forwarding of a rank's stdout through a pipe
# lost both lines once in two full-suite runs although both ranks exited 0.
with open(os.path.join(os.environ["RESULT_DIR"], f"rank{rank}.json"), "w") as f:
    json.dump({"rank": rank, "world": world, "local": local, "sum": t.item(),
               "master": os.environ["MASTER_ADDR"]}, f)
dist.destroy_process_group()
"""


def _mpi4py_missing():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return True
    return False


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun (Open MPI) is not installed")
@pytest.mark.skipif(_mpi4py_missing(), reason="mpi4py is not installed (pip install mpi4py)")
def test_mpirun_without_master_addr_broadcasts_rank_0s_address(tmp_path):
    """The real mpi4py path: mpirun publishes no rendezvous address, rank 0 broadcasts the
    address of its GLOO_SOCKET_IFNAME interface (lo) over MPI, both ranks initialise gloo
    and an all-reduce sums 1 + 2."""
    drop = ("MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_USE_AGENT_STORE")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("SLURM_", "PMI_", "OMPI_"))}
    env.update(MASTER_PORT=str(_free_port()), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               RESULT_DIR=str(tmp_path), PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]))
    res = subprocess.run(["mpirun", "-np", "2", "--allow-run-as-root", "--oversubscribe",
                          sys.executable, "-c", MPI_SCRIPT], env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    outs = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert [(o["rank"], o["world"], o["local"], o["sum"]) for o in outs] == [(0, 2, 0, 3.0), (1, 2, 1, 3.0)], \
        res.stdout[-2000:] + res.stderr[-2000:]
    assert outs[0]["master"] == outs[1]["master"] == "127.0.0.1"


def test_advertised_address_is_the_socket_interfaces_else_the_host_name():
    assert adenv.advertised_address({"GLOO_SOCKET_IFNAME": "lo"}) == "127.0.0.1"
    assert adenv.advertised_address({"NCCL_SOCKET_IFNAME": "lo,eth9"}) == "127.0.0.1"
    assert adenv.advertised_address({"NCCL_SOCKET_IFNAME": "^docker"}) == socket.gethostname()
    assert adenv.advertised_address({}) == socket.gethostname()
    with pytest.raises(ValueError, match="GLOO_SOCKET_IFNAME='nosuchif0'"):
        adenv.advertised_address({"GLOO_SOCKET_IFNAME": "nosuchif0"})
