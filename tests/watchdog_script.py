"""Worker of tests/test_watchdog.py, one process per rank (torchrun, or RANK/WORLD_SIZE/
MASTER_* set by the test).

MODE=wait: write this pid to PID_DIR/<rank>, wait for the file GO (if set), then
init_distributed() and all-reduce forever (the launcher-death tests kill the launcher).
MODE=stop: train a small DDP model with the sparse hook; rank STOP_RANK SIGSTOPs itself at
step 3; the others print the error that `naming_unresponsive_ranks` raises, with the
seconds it took, and exit 3."""
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

import approxdist as ad
from approxdist.distributed import init_distributed, naming_unresponsive_ranks, register


def wait_mode():
    rank = os.environ.get("RANK", "?")
    (Path(os.environ["PID_DIR"]) / rank).write_text(str(os.getpid()))
    go = os.environ.get("GO")
    while go and not os.path.exists(go):
        time.sleep(0.05)
    init_distributed("gloo")
    t = torch.ones(4)
    while True:
        dist.all_reduce(t)
        time.sleep(0.05)


def stop_mode():
    timeout = float(os.environ["TIMEOUT"])
    rank, world, _ = init_distributed("gloo", timeout=timeout)
    torch.manual_seed(0)
    model = ad.convert_model(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), 0.5,
                             distributed=True)
    ddp = nn.parallel.DistributedDataParallel(model)
    register(ddp)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    stop_rank = int(os.environ["STOP_RANK"])
    start = None
    try:
        with naming_unresponsive_ranks(rank, world, timeout):
            for step in range(1000):
                if step == 3:
                    if rank == stop_rank:
                        os.kill(os.getpid(), signal.SIGSTOP)
                    start = time.monotonic()
                loss = ddp(torch.randn(4, 8)).square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
    except Exception as exc:  # noqa: BLE001 - reported to the test
        print(f"ELAPSED {time.monotonic() - start:.1f}", flush=True)
        print(f"ERROR {type(exc).__name__}: {exc}", flush=True)
        os._exit(3)
    os._exit(0)


if __name__ == "__main__":
    {"wait": wait_mode, "stop": stop_mode}[os.environ["MODE"]]()
    sys.exit(0)
