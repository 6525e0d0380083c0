"""Per-bucket timeline of DDP steps with the sparse hook on the 2-node namespace testbed.

    python tools/ddp_timeline.py [--ratio 0.33] [--bucket-mb 25] [--rate 1gbit] [--model resnet18]
                                 [--step-in-hook | --overlap-forward]

Rank 0 prints, for steps 3-6, the end of the forward, of backward, of the step and the
start of the next step (ms from the step's start) and, per bucket, [index, hook called,
collective launched, collective done, elements]. With --overlap-forward a collective
may complete after the next step started. A diagnostic for docs/benchmarks.md (where the
time of a step goes), not a benchmark. Needs root and `ip` (see launch/testbed/).
"""
import argparse
import json
import sys
import time


def worker(ratio, bucket_mb, model_name, step_in_hook, overlap_forward, eager_fraction):
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
    events, starts = [], []

    def now():
        return time.perf_counter()

    def hook(state, bucket):
        called, step = now(), len(starts) - 1
        fut = ad.distributed.sparse_allreduce_hook(state, bucket)
        launched = now()

        def done(f):
            events.append((step, bucket.index(), called, launched, now(), bucket.buffer().numel()))
            return f.value()
        return fut.then(done)

    def payload(state, bucket):  # forward_overlap may split a bucket in two collectives
        called, step = now(), len(starts) - 1
        sent, group, finish = ad.distributed.sparse_allreduce_hook.payload(state, bucket)

        def finished(summed):  # "launched": the first collective's launch
            events.append((step, bucket.index(), called, called, now(), bucket.buffer().numel()))
            return finish(summed)
        return sent, group, finished

    hook.payload = payload
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
    state = ad.distributed.SparseAllReduceState()
    if overlap_forward:  # a step's transfer runs on into the next forward
        state.process_group = dist.new_group()
        hook = ad.distributed.forward_overlap(ddp, hook, opt, eager_fraction=eager_fraction)
    elif step_in_hook:  # the optimizer steps each bucket after its collective (and "done")
        hook = ad.distributed.optimizer_wrapper(hook, opt)
    ddp.register_comm_hook(state, hook)
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
    marks = []
    steps = 7
    for step in range(steps):
        if not overlap_forward or step == 0:
            dist.barrier()
        starts.append(now())
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(ddp(x), y)
        forward = now()
        loss.backward()
        backward = now()
        opt.step()  # with --step-in-hook or --overlap-forward: nothing left to step
        marks.append((forward, backward, now()))
    ad.distributed.finish_steps(ddp)
    starts.append(now())
    if rank == 0:
        def ms(t, step):
            return round((t - starts[step]) * 1e3)

        for step in range(2, steps - 1):
            forward, backward, end = marks[step]
            buckets = sorted([index, ms(c, step), ms(la, step), ms(d, step), n]
                             for s, index, c, la, d, n in events if s == step)
            print(json.dumps({"forward_end": ms(forward, step), "backward_end": ms(backward, step),
                              "step_end": ms(end, step), "next_step": ms(starts[step + 1], step),
                              "buckets": buckets}))
    dist.barrier()
    dist.destroy_process_group()


def main():
    from approxdist.distributed.forward_overlap import EAGER_FRACTION

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ratio", type=float, default=0.33)
    p.add_argument("--bucket-mb", type=float, default=25.0)
    p.add_argument("--rate", default="1gbit")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--step-in-hook", action="store_true",
                   help="step the optimizer per bucket inside the hook (optimizer_wrapper)")
    p.add_argument("--overlap-forward", action="store_true",
                   help="let the next forward overlap the transfer (forward_overlap)")
    p.add_argument("--eager-fraction", type=float, default=EAGER_FRACTION,
                   help="with --overlap-forward (default: %(default)s)")
    p.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._worker:
        return worker(a.ratio, a.bucket_mb, a.model, a.step_in_hook, a.overlap_forward, a.eager_fraction)
    from approxdist.bench.testbed import Testbed

    argv = [sys.executable, __file__, "--_worker", "--ratio", str(a.ratio), "--bucket-mb",
            str(a.bucket_mb), "--model", a.model] + (["--step-in-hook"] if a.step_in_hook else []) \
        + (["--overlap-forward", "--eager-fraction", str(a.eager_fraction)] if a.overlap_forward else [])
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
