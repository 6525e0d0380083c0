"""Page faults and CPU time per training step, two gloo ranks on loopback.

    python experiments/tools/step_faults.py [--model resnet18] [--hooks sparse0.33+overlap,fp16,sparse0.5]
                                [--steps 20] [--batch 16] [--image-size 32] [--bucket-mb 5]

Runs the steps of `approxdist-bench comm` (same models, hooks and loop; hook names as
there) and prints, per hook, one JSON line from rank 0: minor and major page faults per
step, user and system CPU ms per step (getrusage of the process, every thread), and the
wall ms per step. Run it twice, once with glibc told to keep freed memory
(MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 in the
environment), to see what mapping and unmapping large tensors costs a step. A diagnostic
for experiments/records, not a benchmark: loopback is not a slow link.
"""
import argparse
import json
import os
import resource
import sys


def measure(model, hook, steps, batch, image_size, bucket_mb):
    """This rank's faults and CPU per step over `steps` steps after 3 warm-up steps."""
    import time

    import torch
    import torch.distributed as dist

    import approxdist as ad
    from approxdist.bench import comm

    spec = comm.parse_hook(hook)
    cfg = {"model": model, "hook": hook, "bucket_mb": bucket_mb}
    ddp, _, _, opt = comm.build(cfg, spec, seed=0)
    crit = torch.nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(dist.get_rank())
    x = torch.randn(batch, 3, image_size, image_size, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)

    def step():
        opt.zero_grad(set_to_none=True)
        crit(ddp(x), y).backward()
        opt.step()

    for _ in range(3):
        step()
    ad.distributed.finish_steps(ddp)
    dist.barrier()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        step()
    ad.distributed.finish_steps(ddp)
    t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    return {"hook": hook, "model": model, "steps": steps,
            "minor_faults_per_step": (r1.ru_minflt - r0.ru_minflt) / steps,
            "major_faults_per_step": (r1.ru_majflt - r0.ru_majflt) / steps,
            "user_ms_per_step": round((r1.ru_utime - r0.ru_utime) / steps * 1e3, 2),
            "sys_ms_per_step": round((r1.ru_stime - r0.ru_stime) / steps * 1e3, 2),
            "wall_ms_per_step": round((t1 - t0) / steps * 1e3, 2),
            "glibc_keeps_memory": "MALLOC_MMAP_THRESHOLD_" in os.environ}


def _rank(rank, port, a):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    from approxdist.distributed import shutdown_distributed

    dist.init_process_group("gloo")
    done = False
    try:
        for hook in a.hooks.split(","):
            out = measure(a.model, hook, a.steps, a.batch, a.image_size, a.bucket_mb)
            if rank == 0:
                print(json.dumps(out), flush=True)
        done = True
    finally:
        shutdown_distributed(wait=done)  # a gloo abort at exit without it, seen once in CI


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--hooks", default="sparse0.33+overlap,fp16,sparse0.5")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--bucket-mb", type=float, default=5.0)
    a = p.parse_args(argv)
    from approxdist.bench.comm import free_port, make_model, parse_hook

    try:
        make_model(a.model)
        for h in a.hooks.split(","):
            parse_hook(h)
    except ValueError as e:
        p.error(str(e))
    for name in ("steps", "batch", "image_size"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(free_port(), a), nprocs=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
