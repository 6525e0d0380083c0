"""No orphaned worker, no silent hang: the worker's tie to its launcher and the
collective timeout.

A worker started by torchrun, srun or mpirun must not outlive its launcher: when the
launcher is killed (``kill -9`` of torchrun), nothing else stops the workers, which then
train on and write checkpoints into a folder a relaunched job uses. `exit_with_parent`
asks Linux to SIGKILL this process when its parent dies (``prctl(PR_SET_PDEATHSIG)``).

A rank that stops answering (SIGSTOP, a hung host, a dead link) stalls every collective
of the others. gloo and NCCL honour the process group's timeout; `collective_timeout`
picks it (argument, else ``APPROXDIST_COLLECTIVE_TIMEOUT_S``, else 30 minutes, torch's
default). Their error does not say which rank is missing: `naming_unresponsive_ranks`
turns it into a `CollectiveTimeoutError` that does, by asking every rank to check in
through the rendezvous store and naming those that do not.
"""
import contextlib
import ctypes
import os
import re
import signal
import sys
import threading
import time
from datetime import timedelta
from typing import List, Optional

__all__ = ["exit_with_parent", "collective_timeout", "CollectiveTimeoutError", "unresponsive_ranks",
           "naming_unresponsive_ranks", "TIMEOUT_ENV", "DEFAULT_TIMEOUT_S"]

TIMEOUT_ENV = "APPROXDIST_COLLECTIVE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800.0
_PR_SET_PDEATHSIG = 1
# What gloo (and NCCL's watchdog) say when a collective fails for want of a peer.
_PEER_FAILURE = re.compile(r"Timed out|timed out|Timeout|Connection (?:closed|reset) by peer|"
                           r"Connection reset|Broken pipe|NCCL.*(?:timeout|Watchdog)")


class CollectiveTimeoutError(RuntimeError):
    """A collective failed because one or more ranks stopped answering; `.ranks` lists
    them (empty when none could be told apart)."""

    def __init__(self, message, ranks=()):
        super().__init__(message)
        self.ranks = list(ranks)


def exit_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Have Linux send `sig` to this process when its parent (the launcher) dies.

    Returns False where that cannot be asked (not Linux). If the parent is already gone
    (it died before this call: the process was re-parented to init), exits at once with
    status 1 rather than run unsupervised."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if parent == 1 or os.getppid() != parent:
        print(f"approxdist: the launcher of pid {os.getpid()} is gone; exiting", file=sys.stderr, flush=True)
        os._exit(1)
    return True


def collective_timeout(timeout: Optional[float] = None) -> float:
    """Seconds a collective may wait for its peers: `timeout`, else the environment
    variable APPROXDIST_COLLECTIVE_TIMEOUT_S, else 1800 (torch's default)."""
    source = "timeout"
    if timeout is None:
        raw = os.environ.get(TIMEOUT_ENV)
        if raw is None or raw == "":
            return DEFAULT_TIMEOUT_S
        source = TIMEOUT_ENV
        try:
            timeout = float(raw)
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds > 0, got {raw!r}") from None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0 \
            or timeout == float("inf"):
        raise ValueError(f"{source} must be a finite number of seconds > 0, got {timeout!r}")
    return float(timeout)


def _store(wait_s: float):
    """A client of the rendezvous store, with a short timeout of its own."""
    import torch.distributed as dist

    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    return dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=wait_s),
                         wait_for_workers=False)


def unresponsive_ranks(rank: int, world_size: int, wait_s: float = 5.0) -> List[int]:
    """After a failed collective: the ranks that do not check in within `wait_s`.

    Every rank whose collective failed calls this; each writes its own key in the
    rendezvous store and waits for the others'. A stopped or hung rank never writes. When
    the store itself does not answer, the rank that hosts it (rank 0, unless torchrun's
    agent does) is the one named. The store is asked from a daemon thread: a TCPStore
    client of a stopped server blocks in its constructor whatever its timeout."""
    result = {}
    worker = threading.Thread(target=_check_in, args=(rank, world_size, wait_s, result), daemon=True)
    worker.start()
    worker.join(wait_s + 1)
    if "missing" in result:
        return result["missing"]
    return [] if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else [0]


def _check_in(rank, world_size, wait_s, result):
    deadline = time.monotonic() + wait_s
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    prefix = f"approxdist/checkin/{attempt}/"
    try:
        store = _store(wait_s)
        if store is None:
            result["missing"] = []
            return
        store.set(f"{prefix}{rank}", "1")
        missing = [r for r in range(world_size) if r != rank]
        while missing and time.monotonic() < deadline:
            missing = [r for r in missing if not store.check([f"{prefix}{r}"])]
            time.sleep(0.05)
        result["missing"] = missing
    except Exception:  # noqa: BLE001 - the store is down: the caller names its host
        pass


@contextlib.contextmanager
def naming_unresponsive_ranks(rank: int, world_size: int, timeout: float, wait_s: float = 5.0):
    """Re-raise a collective's peer failure as a CollectiveTimeoutError naming the ranks
    that stopped answering (see `unresponsive_ranks`); other errors pass unchanged."""
    try:
        yield
    except Exception as exc:
        if world_size < 2 or isinstance(exc, CollectiveTimeoutError) or not _PEER_FAILURE.search(str(exc)):
            raise
        ranks = unresponsive_ranks(rank, world_size, wait_s)
        who = (f"rank(s) {', '.join(map(str, ranks))} did not respond" if ranks
               else "every rank answered afterwards (a transient stall or a lost connection)")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CollectiveTimeoutError(
            f"rank {rank}: a collective failed (collective timeout {timeout:g} s, "
            f"{TIMEOUT_ENV} / --timeout): {who}; cause: {first[:300]}", ranks) from exc
