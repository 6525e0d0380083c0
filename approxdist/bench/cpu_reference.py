"""`approxdist-bench cpu`: how fast this machine computes today, for a benchmark's record.

The machines this project runs on differ from day to day: the same exact resnet18 step
took 51-52 ms on one day and 97-102 ms on another (docs/benchmarks.md), and with every
core busy a core may run slower still (cores that share a physical core or a crowded
host). A step time is only comparable with another day's beside such a figure, so
`approxdist-bench comm` records this one in its JSON and markdown.

The workload: the exact torchvision resnet18 (10 classes), forward + backward of a batch
of 16 random 32 px images, one thread (the communication benchmark's model and shapes).
`alone_ms` is its median step in one process; `all_cores_ms` the median over one process
pinned to each core, all timing at once (they start together after their warm-up), and
`slowdown` their ratio: how much a rank loses when the other ranks compute beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import time

__all__ = ["WORKLOAD", "measure", "describe", "main"]

WORKLOAD = "exact resnet18 (10 classes) forward+backward, batch 16 at 32 px, 1 thread"
WARMUP = 3


def _worker(argv: list[str]) -> int:
    """Build the workload, warm up, say 'ready', wait for a line on stdin, time it."""
    p = argparse.ArgumentParser(prog="cpu_reference.py _worker")
    p.add_argument("--reps", type=int, required=True)
    p.add_argument("--cpu", type=int, default=None)
    a = p.parse_args(argv)
    if a.cpu is not None:
        os.sched_setaffinity(0, {a.cpu})
    import torch
    import torch.nn.functional as F

    from .comm.hooks import make_model

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = make_model("resnet18")  # the communication benchmark's own model
    x = torch.randn(16, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (16,), generator=gen)

    def step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    for _ in range(WARMUP):
        step()
    print("ready", flush=True)
    sys.stdin.readline()
    times = []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    print(json.dumps({"ms": statistics.median(times)}), flush=True)
    return 0


def _run_together(cpus: list, reps: int, timeout: float, cmd: list | None = None) -> list[float]:
    """One worker per entry of cpus (None: not pinned), timing at the same time; each has
    `timeout` seconds to get ready and as many to finish. cmd: the worker's command
    (tests)."""
    cmd = cmd or [sys.executable, "-m", "approxdist.bench.cpu_reference", "_worker", "--reps", str(reps)]
    procs = [subprocess.Popen(cmd + ([] if c is None else ["--cpu", str(c)]), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for c in cpus]
    try:
        deadline = time.monotonic() + timeout
        for proc in procs:  # every one built and warmed up before any starts timing
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise RuntimeError(f"the CPU reference worker was not ready within {timeout:g} s")
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the CPU reference worker failed (exit code {proc.wait(timeout)})")
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        out = []
        for proc in procs:
            line, _ = proc.communicate(timeout=timeout)
            if proc.returncode != 0:
                raise RuntimeError(f"the CPU reference worker failed (exit code {proc.returncode})")
            out.append(json.loads(line.strip().splitlines()[-1])["ms"])
        return out
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def measure(reps: int = 10, timeout: float = 300.0) -> dict:
    """The workload's median step alone and with one copy on every usable core."""
    if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
        raise ValueError(f"reps must be an integer >= 1, got {reps!r}")
    cores = sorted(os.sched_getaffinity(0))
    alone = _run_together([cores[0]], reps, timeout)[0]
    together = _run_together(cores, reps, timeout) if len(cores) > 1 else [alone]
    all_cores = statistics.median(together)
    return {"workload": WORKLOAD, "reps": reps, "cores": len(cores), "alone_ms": alone,
            "all_cores_ms": all_cores, "per_core_ms": together, "slowdown": all_cores / alone}


def describe(ref: dict) -> str:
    """One sentence for a benchmark's markdown."""
    return (f"CPU reference ({ref['workload']}; `approxdist-bench cpu`): {ref['alone_ms']:.1f} ms "
            f"alone, {ref['all_cores_ms']:.1f} ms with one copy on each of the {ref['cores']} "
            f"cores ({ref['slowdown']:.2f}x)")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_worker"]:
        return _worker(argv[1:])
    p = argparse.ArgumentParser(prog="approxdist-bench cpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=10, help="timed steps per process (default: %(default)s)")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    a = p.parse_args(argv)
    if a.reps < 1:
        p.error(f"--reps must be >= 1, got {a.reps}")
    ref = measure(a.reps)
    print(describe(ref))
    if a.json:
        from pathlib import Path

        Path(a.json).write_text(json.dumps(ref, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
