"""Process-group initialisation from whatever launched us: torchrun, Slurm's srun, or mpirun.

One entry point, `init_distributed`, so the training script never branches on the launcher.
Each launcher publishes rank and world size under its own variable names; this module maps
them onto the ``env://`` rendezvous that `torch.distributed` understands. A plain
``python`` run (no launcher variables) is world size 1 and creates no process group, so
the same script runs on a laptop.
"""
import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import List, Optional, Tuple

from .watchdog import collective_timeout
from .watchdog import exit_with_parent as _exit_with_parent

DEFAULT_PORT = 29500
BACKENDS = ("nccl", "gloo", "mpi")


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher told us. ``master_addr``/``master_port`` may be None when the
    launcher does not publish them (MPI): they are then agreed on at init time."""

    source: str  # "torchrun" | "slurm" | "mpi" | "none"
    rank: int
    world_size: int
    local_rank: int
    master_addr: Optional[str] = None
    master_port: Optional[int] = None


def _int_env(env, name):
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _split_top_level(text: str) -> List[str]:
    """Split on commas that are not inside brackets (``a[1,3],b`` -> ``a[1,3]``, ``b``)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"nodelist {text!r}: unbalanced ']'")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"nodelist {text!r}: unbalanced '['")
    parts.append(text[start:])
    return [p for p in (p.strip() for p in parts) if p]


def _expand_range_list(body: str, nodelist: str) -> List[str]:
    """``01-03,07`` -> ``01 02 03 07``; zero padding of the lower bound is kept, as Slurm does."""
    out = []
    for item in body.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise ValueError(f"nodelist {nodelist!r}: bad range {item!r}")
        lo, hi = m.group(1), m.group(2)
        if hi is None:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"nodelist {nodelist!r}: descending range {item!r}")
        width = len(lo)
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return out


def expand_nodelist(nodelist: str) -> List[str]:
    """Expand Slurm's compressed host list (``node[01-03,07],gpu5``) in pure Python.

    Why not ``scontrol show hostnames``: the training processes started by srun do not
    always have scontrol on their PATH (containers), and the format is small enough to
    parse. Several bracket groups in one name (``r[1-2]n[1-2]``) give their product.
    """
    if not isinstance(nodelist, str) or not nodelist.strip():
        raise ValueError("nodelist must be a non-empty string")
    hosts: List[str] = []
    for part in _split_top_level(nodelist.strip()):
        expanded = [""]
        for m in re.finditer(r"([^\[\]]+)|\[([^\[\]]*)\]", part):
            if m.group(1) is not None:
                choices = [m.group(1)]
            else:
                choices = _expand_range_list(m.group(2), nodelist)
            expanded = [prefix + c for prefix in expanded for c in choices]
        hosts.extend(expanded)
    return hosts


def first_host(nodelist: str) -> str:
    return expand_nodelist(nodelist)[0]


def _slurm_port(env) -> int:
    # Several jobs may share a node: derive the port from the job id so they do not collide.
    job = _int_env(env, "SLURM_JOB_ID") or _int_env(env, "SLURM_JOBID")
    return DEFAULT_PORT if job is None else 15000 + job % 20000


def detect_launch(env=None) -> LaunchEnv:
    """Read rank, world size and local rank from the launcher's variables.

    Order matters: torchrun inside a Slurm allocation also sees SLURM_* variables, and its
    own RANK/WORLD_SIZE are the ones that describe the processes it started.
    """
    env = os.environ if env is None else env
    port = _int_env(env, "MASTER_PORT")
    addr = env.get("MASTER_ADDR") or None

    rank, world = _int_env(env, "RANK"), _int_env(env, "WORLD_SIZE")
    if rank is not None and world is not None:
        local = _int_env(env, "LOCAL_RANK")
        return LaunchEnv("torchrun", rank, world, rank if local is None else local, addr, port)

    rank = _int_env(env, "SLURM_PROCID")
    world = _int_env(env, "SLURM_STEP_NUM_TASKS") or _int_env(env, "SLURM_NTASKS")
    if rank is not None and world is not None:
        local = _int_env(env, "SLURM_LOCALID")
        if addr is None:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            addr = first_host(nodelist) if nodelist else "127.0.0.1"
        return LaunchEnv("slurm", rank, world, 0 if local is None else local, addr, port or _slurm_port(env))

    for r_name, w_name, l_names in (
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", ("OMPI_COMM_WORLD_LOCAL_RANK",)),
        ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", ("MV2_COMM_WORLD_LOCAL_RANK",)),
        ("PMI_RANK", "PMI_SIZE", ("MPI_LOCALRANKID", "PMI_LOCAL_RANK", "PALS_LOCAL_RANKID")),
    ):
        rank, world = _int_env(env, r_name), _int_env(env, w_name)
        if rank is not None and world is not None:
            local = next((v for v in (_int_env(env, n) for n in l_names) if v is not None), 0)
            return LaunchEnv("mpi", rank, world, local, addr, port or DEFAULT_PORT)

    return LaunchEnv("none", 0, 1, 0, addr, port)


def _validate(launch: LaunchEnv):
    if launch.world_size < 1:
        raise ValueError(f"world size must be >= 1, the {launch.source} environment says {launch.world_size}")
    if not 0 <= launch.rank < launch.world_size:
        raise ValueError(f"rank {launch.rank} out of range for world size {launch.world_size} ({launch.source})")
    if launch.local_rank < 0:
        raise ValueError(f"local rank must be >= 0, the {launch.source} environment says {launch.local_rank}")


def resolve_backend(backend: Optional[str] = None) -> str:
    """nccl when CUDA is usable, gloo otherwise; asking for nccl on a CPU-only machine is an
    error now rather than a hang or an opaque failure inside init_process_group."""
    import torch

    if backend is None:
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend 'nccl' needs CUDA, which is not available here (use backend='gloo')")
    return backend


def interface_address(ifname: str) -> str:
    """The IPv4 address of network interface `ifname` (Linux), e.g. "eth0" -> "10.0.0.5"."""
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", ifname.encode()[:15]))  # SIOCGIFADDR
        except OSError as exc:
            raise ValueError(f"network interface {ifname!r} has no IPv4 address here ({exc.strerror})") from None
    return socket.inet_ntoa(packed[20:24])


def advertised_address(env=None) -> str:
    """What rank 0 tells the others to connect to when no launcher publishes MASTER_ADDR:
    the address of the interface the job's traffic is pinned to (GLOO_SOCKET_IFNAME, else
    NCCL_SOCKET_IFNAME; the first of a comma list), else the host name. The host name
    can resolve to an address the other hosts cannot reach (127.0.0.1 in /etc/hosts, a
    management network, or, in the namespace testbed, every node's own name)."""
    env = os.environ if env is None else env
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        value = (env.get(name) or "").split(",")[0].strip()
        if value and not value.startswith(("^", "=")):  # NCCL's exclude/exact-match prefixes
            try:
                return interface_address(value)
            except ValueError as exc:
                raise ValueError(f"{name}={env.get(name)!r}: {exc}") from None
    return socket.gethostname()


def _mpi_master_addr() -> str:
    """Rank 0's address (advertised_address), broadcast over MPI: mpirun does not publish
    a rendezvous address."""
    try:
        from mpi4py import MPI  # noqa: WPS433 (optional dependency)
    except ImportError:
        raise RuntimeError(
            "launched by MPI without MASTER_ADDR: set MASTER_ADDR (e.g. `mpirun -x MASTER_ADDR=host0`) "
            "or install mpi4py so rank 0 can broadcast its address"
        ) from None
    comm = MPI.COMM_WORLD
    return comm.bcast(advertised_address() if comm.Get_rank() == 0 else None, root=0)


def init_distributed(backend: Optional[str] = None, *, timeout: Optional[float] = None,
                     exit_with_parent: bool = True) -> Tuple[int, int, int]:
    """Create the default process group from the launcher's environment.

    Returns ``(rank, world_size, local_rank)``. Without launcher variables this is a
    single-process run: nothing is initialised and ``(0, 1, 0)`` comes back. Calling it
    again once the group exists returns the existing group's values.

    timeout: seconds a collective (and the rendezvous) may wait for the other ranks
    before it fails; default ``APPROXDIST_COLLECTIVE_TIMEOUT_S``, else 1800.
    exit_with_parent: under a launcher, this process is SIGKILLed when the launcher
    dies (Linux; watchdog.exit_with_parent), so no worker outlives a killed torchrun.
    """
    import torch
    import torch.distributed as dist

    backend = resolve_backend(backend)
    seconds = collective_timeout(timeout)
    launch = detect_launch()
    _validate(launch)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), launch.local_rank
    if launch.source == "none":
        return 0, 1, 0
    if not dist.is_available():
        raise RuntimeError("this build of torch has no torch.distributed support")
    if exit_with_parent:
        _exit_with_parent()

    addr = launch.master_addr
    if addr is None:
        addr = _mpi_master_addr() if launch.source == "mpi" and launch.world_size > 1 else "127.0.0.1"
    os.environ.update(
        RANK=str(launch.rank),
        WORLD_SIZE=str(launch.world_size),
        LOCAL_RANK=str(launch.local_rank),
        MASTER_ADDR=addr,
        MASTER_PORT=str(launch.master_port or DEFAULT_PORT),
    )
    if backend == "nccl":
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    store = _elastic_attempt_store(launch)
    wait = timedelta(seconds=seconds)
    if store is not None:
        dist.init_process_group(backend=backend, store=store, rank=launch.rank, world_size=launch.world_size,
                                timeout=wait)
    else:
        dist.init_process_group(backend=backend, init_method="env://", rank=launch.rank,
                                world_size=launch.world_size, timeout=wait)
    return launch.rank, launch.world_size, launch.local_rank


def shutdown_distributed(wait: bool = True) -> None:
    """Destroy the default process group, freeing DDP and the hook state first.

    DDP, its reducer and the hook state (the forward overlap's own process group among
    them) sit in reference cycles; freed only at interpreter exit, after the group is
    gone, gloo's threads sometimes abort ("terminate called without an active
    exception", ~1 approxdist-train run in 6). So: collect them, let every rank finish
    its last collectives before any tears its pairs down (``wait``; pass False when a
    peer may be gone, after a failure), then destroy the group.
    """
    import gc

    import torch.distributed as dist

    gc.collect()
    if wait:
        dist.barrier()
    dist.destroy_process_group()


def _elastic_attempt_store(launch: LaunchEnv):
    """The torchrun agent's store, under a prefix of its own for each restart attempt.

    After an elastic restart the agent serves the same TCPStore as before, still holding
    the first attempt's keys; recent torch versions no longer prefix them per attempt, so
    gloo's rendezvous would read the dead workers' addresses and time out connecting to
    them. A per-attempt prefix gives every attempt a clean namespace (older torch versions
    did exactly this themselves).
    """
    if launch.source != "torchrun" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    import torch.distributed as dist

    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    timeout = timedelta(minutes=int(os.environ.get("APPROXDIST_INIT_TIMEOUT_MIN", "30")))
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), launch.world_size,
                           is_master=False, timeout=timeout)
    return dist.PrefixStore(f"approxdist/attempt_{attempt}", client)


__all__ = ["init_distributed", "detect_launch", "expand_nodelist", "first_host", "resolve_backend", "LaunchEnv"]
