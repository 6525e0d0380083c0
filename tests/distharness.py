"""Real multi-process gloo runs for the tests: no mocks of torch.distributed.

`run_ranks(fn, world_size, *args)` spawns world_size processes, each calling
fn(rank, world_size, *args) inside an initialised gloo group, and returns the list of
their return values (torch.save'd through temporary files). An exception on any rank
is re-raised in the test with that rank's traceback."""
import os
import socket
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from approxdist.distributed import shutdown_distributed


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, outdir, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = ("ok", fn(rank, world_size, *args))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        result = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    if result[0] == "error":
        # The error is recorded. Tearing down after a collective failed half-way (an
        # exception inside DDP's reducer, a peer gone) can abort in C++ destructors
        # ("terminate called without an active exception"), which would hide it.
        os._exit(0)
    try:
        # As approxdist-train does (seen once in ~10 full runs as both ranks aborting).
        shutdown_distributed()
    except Exception:  # noqa: BLE001
        pass


class RankError(RuntimeError):
    pass


def run_ranks(fn, world_size, *args):
    with tempfile.TemporaryDirectory() as outdir:
        mp.start_processes(_entry, args=(world_size, free_port(), outdir, fn, args),
                           nprocs=world_size, join=True, start_method="spawn")
        results = [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False)
                   for r in range(world_size)]
    errors = [f"rank {r}: {msg}" for r, (status, msg) in enumerate(results) if status == "error"]
    if errors:
        raise RankError("\n".join(errors))
    return [value for _, value in results]
