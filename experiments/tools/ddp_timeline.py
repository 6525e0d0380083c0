"""Per-bucket timeline of DDP steps on the 2-node namespace testbed.

    python experiments/tools/ddp_timeline.py [--ratio 0.33] [--bucket-mb 25] [--rate 1gbit] [--model resnet18]
                                 [--image-size 32] [--batch 16]
                                 [--hook sparse|fp16] [--steps 7] [--summary]
                                 [--step-in-hook | --overlap-forward [--eager-fraction F]]

Rank 0 prints, for steps 2 to steps-2, the end of the forward, of backward, of the step
and the start of the next step (ms from the step's start) and, per bucket, [index, hook
called, collective launched, collective done, elements]; with --overlap-forward a
collective may complete after the next step started. It also times every collective the
hook launches (a bucket split in two is two collectives) and prints, per step:
  gap   ms the link stood idle between the previous step's last collective and this
        step's first (what the next forward and backward do before a gradient is ready),
  busy  ms from this step's first launch to its last completion,
  hole  ms inside `busy` with no collective in flight.
--summary prints only the medians of these over the steps. A last line gives rank 0's CPU
time: its main thread's per phase (forward, backward, the optimizer step; medians over
the same steps), the whole process's per step, and how the machine's cores spent those
steps (/proc/stat: user, system, softirq, idle, ...): whether the step waits for the link
or for a core. --hook fp16 runs the exact
model with torch's fp16_compress_hook instead of the sampled one with the sparse hook
(--ratio is then ignored). A diagnostic for experiments/records (where the time of a step
goes), not a benchmark. Needs root and `ip` (see launch/testbed/).
"""
import argparse
import json
import statistics
import sys
import time


def _idle_inside(spans):
    """ms with nothing in flight between the first start and the last end of spans."""
    spans = sorted(spans)
    hole, end = 0.0, spans[0][1]
    for lo, hi in spans[1:]:
        hole += max(0.0, lo - end)
        end = max(end, hi)
    return hole


def _machine_jiffies() -> dict:
    """The machine's CPU time by kind so far (/proc/stat's first line)."""
    with open("/proc/stat") as f:
        values = f.readline().split()[1:9]
    return dict(zip(("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"),
                    map(int, values)))


def worker(a):
    import torch
    import torch.distributed as dist
    import torchvision
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    import approxdist as ad
    from approxdist.distributed import payload_of, with_payload

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = getattr(torchvision.models, a.model)(num_classes=10)
    fp16 = a.hook == "fp16"
    if not fp16:
        ad.convert_model(model, a.ratio, distributed=True)
    ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=a.bucket_mb)
    events, starts, collectives = [], [], []
    backward_of = [0]  # the step whose hook ran last: held collectives may launch later

    def now():
        return time.perf_counter()

    all_reduce = dist.all_reduce

    def timed_all_reduce(tensor, *args, **kwargs):  # every collective the hook launches
        launched = now()
        work = all_reduce(tensor, *args, **kwargs)
        if kwargs.get("async_op"):
            record = [backward_of[0], launched, None]
            collectives.append(record)
            work.get_future().add_done_callback(lambda f: record.__setitem__(2, now()))
        return work

    dist.all_reduce = timed_all_reduce
    # (registered directly, the hook compares payload sizes per bucket in its first step
    # only; the steps reported start at 2)
    state = ad.distributed.SparseAllReduceState()
    if a.overlap_forward:  # a step's transfer runs on into the next forward
        state.process_group = dist.new_group()
    group = state.process_group  # fp16: torch's hook takes the process group as its state
    fp16_payload = payload_of(default_hooks.fp16_compress_hook)

    def hook(state, bucket):
        called, step = now(), len(starts) - 1
        backward_of[0] = step
        fut = default_hooks.fp16_compress_hook(group, bucket) if fp16 \
            else ad.distributed.sparse_allreduce_hook(state, bucket)
        launched = now()

        def done(f):
            events.append((step, bucket.index(), called, launched, now(), bucket.buffer().numel()))
            return f.value()
        return fut.then(done)

    def payload(state, bucket):  # forward_overlap may split a bucket in two collectives
        called, step = now(), len(starts) - 1
        backward_of[0] = step
        sent, group_, finish = fp16_payload(group, bucket) if fp16 \
            else payload_of(ad.distributed.sparse_allreduce_hook)(state, bucket)

        def finished(summed):  # "launched": the first collective's launch
            events.append((step, bucket.index(), called, called, now(), bucket.buffer().numel()))
            return finish(summed)
        return sent, group_, finished

    with_payload(hook, payload)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
    if a.overlap_forward:
        hook = ad.distributed.forward_overlap(ddp, hook, opt, eager_fraction=a.eager_fraction)
    elif a.step_in_hook:  # the optimizer steps each bucket after its collective (and "done")
        hook = ad.distributed.optimizer_wrapper(hook, opt)
    ddp.register_comm_hook(state, hook)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(a.batch, 3, a.image_size, a.image_size, generator=g)
    y = torch.randint(0, 10, (a.batch,), generator=g)
    marks, cpu = [], []
    for step in range(a.steps):
        if not a.overlap_forward or step == 0:
            dist.barrier()
        starts.append(now())
        c0 = time.thread_time()
        if step == 2:
            machine0, process0 = _machine_jiffies(), time.process_time()
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(ddp(x), y)
        forward, c1 = now(), time.thread_time()
        loss.backward()
        backward, c2 = now(), time.thread_time()
        opt.step()  # with --step-in-hook or --overlap-forward: nothing left to step
        marks.append((forward, backward, now()))
        cpu.append((c1 - c0, c2 - c1, time.thread_time() - c2))
        if step == a.steps - 2:  # the last reported step's end: the next one's start
            machine1, process1 = _machine_jiffies(), time.process_time()
            reported_s = now() - starts[2]
    ad.distributed.finish_steps(ddp)
    starts.append(now())
    dist.all_reduce = all_reduce
    if rank == 0:
        def ms(t, step):
            return round((t - starts[step]) * 1e3)

        per_step = []
        done = [(s, t0, t1) for s, t0, t1 in collectives if t1 is not None]
        for step in range(2, a.steps - 1):
            forward, backward, end = marks[step]
            mine = [(ms(t0, step), ms(t1, step)) for s, t0, t1 in done if s == step]
            last_before = max(t1 for s, t0, t1 in done if s == step - 1)
            row = {"step": ms(starts[step + 1], step), "forward_end": ms(forward, step),
                   "backward_end": ms(backward, step),
                   "gap": min(lo for lo, hi in mine) - ms(last_before, step),
                   "busy": max(hi for lo, hi in mine) - min(lo for lo, hi in mine),
                   "hole": _idle_inside(mine)}
            per_step.append(row)
            if not a.summary:
                buckets = sorted([index, ms(c, step), ms(la, step), ms(d, step), n]
                                 for s, index, c, la, d, n in events if s == step)
                print(json.dumps({**row, "step_end": ms(end, step), "buckets": buckets,
                                  "collectives": sorted(mine)}))
        print(json.dumps({"median_ms": {k: statistics.median(r[k] for r in per_step)
                                        for k in per_step[0]}, "steps": len(per_step)}))
        n = a.steps - 3
        delta = {k: machine1[k] - machine0[k] for k in machine0}
        total = sum(delta.values())
        print(json.dumps({"cpu": {
            "main_thread_ms": {name: round(statistics.median(c[i] for c in cpu[2:a.steps - 1]) * 1e3, 1)
                               for i, name in enumerate(("forward", "backward", "step"))},
            "process_ms_per_step": round((process1 - process0) / n * 1e3, 1),
            "wall_ms_per_step": round(reported_s / n * 1e3, 1),
            "machine_share": {k: round(v / total, 3) for k, v in delta.items() if v}}}))
    ad.distributed.shutdown_distributed()


def main():
    from approxdist.distributed import EAGER_FRACTION

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ratio", type=float, default=0.33)
    p.add_argument("--bucket-mb", type=float, default=25.0)
    p.add_argument("--rate", default="1gbit")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=16, help="per rank")
    p.add_argument("--hook", choices=("sparse", "fp16"), default="sparse")
    p.add_argument("--steps", type=int, default=7,
                   help="steps to run; steps 2 to steps-2 are reported (at least 4)")
    p.add_argument("--summary", action="store_true", help="print only the medians over the steps")
    p.add_argument("--step-in-hook", action="store_true",
                   help="step the optimizer per bucket inside the hook (optimizer_wrapper)")
    p.add_argument("--overlap-forward", action="store_true",
                   help="let the next forward overlap the transfer (forward_overlap)")
    p.add_argument("--eager-fraction", type=float, default=EAGER_FRACTION,
                   help="with --overlap-forward (default: %(default)s)")
    p.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.steps < 4:
        p.error(f"--steps must be at least 4, got {a.steps}")
    if a._worker:
        return worker(a)
    from approxdist.bench.testbed import run_on_fresh_testbed

    print(run_on_fresh_testbed([sys.executable, __file__, "--_worker"] + sys.argv[1:],
                               rate=a.rate, port=29577, what="ddp_timeline"), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
