"""gloo all-reduce on the 2-node namespace testbed while each node's main thread is busy.

    python tools/loaded_allreduce.py [--rate 1gbit] [--sizes 231744,496640,582144,819200,450351]
                                     [--repeats 6]

Launches the float32 all-reduces of --sizes (elements; the default is what resnet18 at
sample ratio 0.33 holds back for the next forward with forward_overlap at 5 MB buckets)
at once, as forward_overlap does, and times them until the last completes while the
main thread
  idle     waits,
  compute  multiplies 256x256 matrices (cache-resident, compute-bound),
  memory   copies a 48 MB tensor (memory-bound, like a training step's copies),
then prints the median ms and Gbit/s over --repeats rounds per mode. Each node runs one
compute thread, as the benchmarks do (torch.set_num_threads(1)). A diagnostic for
docs/benchmarks.md (how much a busy CPU slows the transfer on this machine), not a
benchmark. Needs root and `ip` (see launch/testbed/).
"""
import argparse
import json
import statistics
import sys
import time

MODES = ("idle", "compute", "memory")


def worker(sizes, repeats):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    group = dist.new_group()
    bufs = [torch.ones(n) for n in sizes]
    a, src = torch.randn(256, 256), torch.randn(12_000_000)
    dst = torch.empty_like(src)
    work = {"idle": lambda: time.sleep(0.0005),
            "compute": lambda: torch.tanh(a @ a * 0.01),
            "memory": lambda: dst.copy_(src)}
    times = {m: [] for m in MODES}
    for _ in range(repeats):
        for mode in MODES:  # interleaved, so a slow spell of the machine hits every mode
            dist.barrier(group=group)
            t0 = time.perf_counter()
            works = [dist.all_reduce(b, group=group, async_op=True) for b in bufs]
            while not all(w.is_completed() for w in works):
                work[mode]()
            for w in works:
                w.wait()
            times[mode].append(time.perf_counter() - t0)
    if dist.get_rank() == 0:
        nbytes = 4 * sum(sizes)
        out = {}
        for mode in MODES:
            med = statistics.median(times[mode])
            # 2 nodes: each sends its payload once (ring all-reduce, 2(n-1)/n of it)
            out[mode] = {"ms": round(med * 1e3, 1), "gbit_per_s": round(8 * nbytes / med / 1e9, 3)}
        print(json.dumps({"bytes": nbytes, "repeats": repeats, **out}))
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", default="1gbit")
    p.add_argument("--sizes", default="231744,496640,582144,819200,450351",
                   help="comma-separated element counts of the concurrent all-reduces")
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    try:
        sizes = [int(s) for s in a.sizes.split(",")]
    except ValueError:
        p.error(f"--sizes must be comma-separated integers, got {a.sizes!r}")
    if not sizes or min(sizes) < 1:
        p.error(f"--sizes must be positive element counts, got {a.sizes!r}")
    if a.repeats < 1:
        p.error(f"--repeats must be at least 1, got {a.repeats}")
    if a._worker:
        return worker(sizes, a.repeats)
    from approxdist.bench.testbed import run_on_fresh_testbed

    print(run_on_fresh_testbed([sys.executable, __file__, "--_worker"] + sys.argv[1:],
                               rate=a.rate, port=29579, what="loaded_allreduce"), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
