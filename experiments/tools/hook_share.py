"""The sparse hook's pack+unpack time as a share of a one-rank DDP training step.

    python experiments/tools/hook_share.py --device cuda [--model resnet50] [--ratio 0.33]
        [--batch 32] [--image-size 224] [--steps 10] [--warmup 3] [--json FILE]

For the GPU path of the "pack+unpack under 3% of the step" target (tests/gpu/run.sh runs
it), where the loopback benchmark (`approxdist-bench comm`, 2 gloo ranks on the CPU)
cannot go. One rank (NCCL on a GPU, gloo on the CPU): with one GPU there is no second
rank, and the transfer then costs next to nothing, so the step is compute alone and the
share is an upper bound of the share in a multi-rank step, where pack and unpack move
the same bytes and the step only gets longer.

Pack and unpack are timed where the hook calls them: on a GPU with CUDA events on the
stream they run on (the kernels are asynchronous, so host clocks would time only their
launch), on the CPU with the host clock. Steps are timed the same way, fwd + bwd +
optimizer, after `--warmup` untimed steps (DDP rebuilds its buckets after the first).
"""
import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torchvision
from torch.nn.parallel import DistributedDataParallel as DDP

import approxdist as ad
import approxdist.kernels as kernels


class Timer:
    """Elapsed seconds of code regions: CUDA events on a GPU, the host clock on the CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.spans = []  # (start, end) pairs not yet read

    def start(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def stop(self, begin):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.spans.append((begin, e))
        else:
            self.spans.append((begin, time.perf_counter()))

    def take(self) -> float:
        """Seconds of all spans since the last take (synchronises a GPU)."""
        if self.cuda:
            torch.cuda.synchronize()
            total = sum(b.elapsed_time(e) for b, e in self.spans) / 1e3
        else:
            total = sum(e - b for b, e in self.spans)
        self.spans = []
        return total


def _timed(fn, timer):
    def wrapper(*args, **kwargs):
        begin = timer.start()
        out = fn(*args, **kwargs)
        timer.stop(begin)
        return out
    return wrapper


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--ratio", type=float, default=0.33)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--bucket-mb", type=float, default=25.0)
    p.add_argument("--json")
    a = p.parse_args(argv)
    if not 0 < a.ratio <= 1:
        p.error(f"--ratio must be in (0, 1], got {a.ratio}")
    for name in ("batch", "image_size", "steps"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.warmup < 1:
        p.error(f"--warmup must be >= 1 (DDP rebuilds its buckets after the first step), got {a.warmup}")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no GPU visible")

    device = torch.device(a.device, 0) if a.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        net = ad.convert_model(getattr(torchvision.models, a.model)(num_classes=1000), a.ratio,
                               distributed=True).to(device)
        ddp = DDP(net, device_ids=[device.index] if device.type == "cuda" else None,
                  bucket_cap_mb=a.bucket_mb)
        state = ad.distributed.register(ddp)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(a.batch, 3, a.image_size, a.image_size, generator=gen).to(device)
        y = torch.randint(1000, (a.batch,), generator=gen).to(device)

        hook_timer, step_timer = Timer(device), Timer(device)
        kernels.pack = _timed(kernels.pack, hook_timer)  # the hook calls kernels.pack / .unpack
        kernels.unpack = _timed(kernels.unpack, hook_timer)

        def step():
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()

        for _ in range(a.warmup):
            step()
        hook_timer.take()
        steps, hooks = [], []
        for _ in range(a.steps):
            begin = step_timer.start()
            step()
            step_timer.stop(begin)
            steps.append(step_timer.take())
            hooks.append(hook_timer.take())
        stats = state.stats
        result = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "kernels_backend": kernels.backend(),
            "model": a.model, "ratio": a.ratio, "batch": a.batch, "image_size": a.image_size,
            "bucket_mb": a.bucket_mb, "steps": a.steps,
            "step_s": statistics.median(steps), "pack_unpack_s": statistics.median(hooks),
            "payload_bytes_per_step": stats["payload_bytes"] / stats["steps"],
            "dense_bytes_per_step": stats["dense_bytes"] / stats["steps"],
        }
        result["pack_unpack_share"] = result["pack_unpack_s"] / result["step_s"]
    finally:
        dist.destroy_process_group()
    print(f"{result['model']} at {a.ratio}, batch {a.batch} at {a.image_size} px, one rank on "
          f"{result['device']} ({result['kernels_backend']} kernels): step {result['step_s'] * 1e3:.2f} ms, "
          f"pack+unpack {result['pack_unpack_s'] * 1e3:.3f} ms = {100 * result['pack_unpack_share']:.2f}% "
          f"(medians of {a.steps}); payload {result['payload_bytes_per_step'] / 1e6:.2f} of "
          f"{result['dense_bytes_per_step'] / 1e6:.2f} MB per step")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
