"""Per-bucket timeline of DDP steps with the sparse hook on the 2-node namespace testbed.

    python tools/ddp_timeline.py [--ratio 0.33] [--bucket-mb 25] [--rate 1gbit] [--model resnet18]
                                 [--step-in-hook]

Rank 0 prints, for steps 3-6, the end of the forward, the end of backward and of the
step (ms from the step's start) and, per bucket, [index, hook called, collective
launched, collective done, elements]. A diagnostic for docs/benchmarks.md (where the
time of a step goes), not a benchmark. Needs root and `ip` (see launch/testbed/).
"""
import argparse
import json
import sys
import time


def worker(ratio, bucket_mb, model_name, step_in_hook=False):
    import torch
    import torch.distributed as dist
    import torchvision

    import approxdist as ad

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)(num_classes=10)
    ad.convert_model(model, ratio, distributed=True)
    ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=bucket_mb)
    events, t0 = [], [0.0]

    def ms():
        return round((time.perf_counter() - t0[0]) * 1e3)

    def hook(state, bucket):
        called = ms()
        fut = ad.distributed.sparse_allreduce_hook(state, bucket)
        launched = ms()

        def done(f):
            events.append([bucket.index(), called, launched, ms(), bucket.buffer().numel()])
            return f.value()
        return fut.then(done)

    opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
    if step_in_hook:  # the optimizer steps each bucket after its collective (and "done")
        hook = ad.distributed.optimizer_wrapper(hook, opt)
    ddp.register_comm_hook(ad.distributed.SparseAllReduceState(), hook)
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
    lines = []
    for step in range(6):
        dist.barrier()
        events.clear()
        t0[0] = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(ddp(x), y)
        forward = ms()
        loss.backward()
        backward = ms()
        opt.step()  # with --step-in-hook: nothing left to step
        if step >= 2:
            lines.append({"forward_end": forward, "backward_end": backward, "step_end": ms(),
                          "buckets": list(events)})
    if rank == 0:
        print("\n".join(json.dumps(line) for line in lines))
    dist.barrier()
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ratio", type=float, default=0.33)
    p.add_argument("--bucket-mb", type=float, default=25.0)
    p.add_argument("--rate", default="1gbit")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--step-in-hook", action="store_true",
                   help="step the optimizer per bucket inside the hook (optimizer_wrapper)")
    p.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._worker:
        return worker(a.ratio, a.bucket_mb, a.model, a.step_in_hook)
    from approxdist.bench.testbed import Testbed

    argv = [sys.executable, __file__, "--_worker", "--ratio", str(a.ratio), "--bucket-mb",
            str(a.bucket_mb), "--model", a.model] + (["--step-in-hook"] if a.step_in_hook else [])
    with Testbed(2, a.rate) as tb:
        res = tb.run_all(lambda i: argv, env_of=lambda i: tb.env(i, port=29577), timeout=600)
    for i, r in enumerate(res):
        if r["returncode"] != 0:
            sys.stderr.write(f"node {i} exited with {r['returncode']}:\n{r['stderr'][-3000:]}\n")
            return 1
    print(res[0]["stdout"], end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
