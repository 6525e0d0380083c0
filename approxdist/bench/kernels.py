"""`approxdist-bench kernels`: pack + unpack of a resnet50-sized gradient set, per backend.

Why this set: it is what the sparse hook moves every step for the paper's largest
ImageNet model (161 parameters, ~25.6M elements): 3x3 and 1x1 conv weights sampled
along input channels, the fc weight along input features, the first conv and every 1-D
tensor dense (as `convert_model(skip_first_conv=True)` leaves them). Indices are the
top-k input channels by weight norm (the "topk_weight" policy), k = max(int(n*ratio), 1).

Each backend is timed against the pure-PyTorch path (APPROXDIST_KERNELS=torch),
interleaved so that drift in machine load hits both alike; the figure is the median.
Both run with validate=False and a preallocated `out=`, as the hook's hot path would,
so what is timed is the copying. Bandwidth counts bytes read + written (2 x the packed
bytes per direction); "copy" is a plain `dst.copy_(src)` of the packed bytes, the
machine's ceiling for this traffic.
"""
import argparse
import json
import math
import os
import statistics
import time

import torch

import approxdist.kernels as kernels

__all__ = ["main", "resnet50_set"]

LAYOUTS = ("dim1", "contiguous")


def resnet50_set(ratio, device, dtype=torch.float32, seed=0, layout="dim1"):
    """(grads, indices) shaped like resnet50's parameters, indices from weight norms.

    layout "dim1": the sampled gradients are dim-1-major, as the distributed layers lay
    out their weights (and DDP their gradients); "contiguous": plain row-major."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet50()
    gen = torch.Generator().manual_seed(seed)
    grads, indices = [], []
    for name, p in model.named_parameters():
        w = p.detach()
        grads.append(torch.randn(w.shape, generator=gen).to(device=device, dtype=dtype))
        if w.dim() < 2 or name == "conv1.weight":
            indices.append(None)
            continue
        n = w.shape[1]
        k = min(max(int(n * ratio), 1), n)
        norms = w.transpose(0, 1).reshape(n, -1).norm(dim=1)
        indices.append(norms.topk(k).indices.sort().values.to(device))
        if layout == "dim1":
            grads[-1] = grads[-1].transpose(0, 1).contiguous().transpose(0, 1)
    return grads, indices


def _timer(device):
    if device.type == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
    else:
        def run(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
    return run


def _with_env(mode, fn):
    old = os.environ.get("APPROXDIST_KERNELS")
    if mode == "torch":
        os.environ["APPROXDIST_KERNELS"] = "torch"
    else:
        os.environ.pop("APPROXDIST_KERNELS", None)
    try:
        return fn()
    finally:
        if old is None:
            os.environ.pop("APPROXDIST_KERNELS", None)
        else:
            os.environ["APPROXDIST_KERNELS"] = old


def bench_ratio(ratio, device, dtype, repeats, warmup, layout="dim1", divisor=1):
    grads, indices = resnet50_set(ratio, device, dtype, layout=layout)
    numel = kernels.packed_numel(grads, indices)
    nbytes = numel * grads[0].element_size()
    out = torch.empty(numel, dtype=dtype, device=device)
    src = torch.empty_like(out).normal_()
    compiled = kernels.backend()
    modes = ["torch"] + ([compiled] if compiled != "torch" else [])
    ops = {
        "pack": lambda: kernels.pack(grads, indices, out=out, validate=False, divisor=divisor),
        "unpack": lambda: kernels.unpack(out, grads, indices, validate=False),
    }
    timer = _timer(device)
    times = {(m, op): [] for m in modes for op in ops}
    times.update({("copy", "pack"): [], ("copy", "unpack"): []})
    for rep in range(warmup + repeats):
        for m in modes:
            for op, fn in ops.items():
                t = _with_env(m, lambda: timer(fn))
                if rep >= warmup:
                    times[(m, op)].append(t)
        for op in ("pack", "unpack"):
            t = timer(lambda: out.copy_(src))
            if rep >= warmup:
                times[("copy", op)].append(t)
    rows = []
    ref_total = None
    for m in modes + ["copy"]:
        pack_s = statistics.median(times[(m, "pack")])
        unpack_s = statistics.median(times[(m, "unpack")])
        total = pack_s + unpack_s
        if m == "torch":
            ref_total = total
        rows.append({
            "ratio": ratio, "layout": layout, "divisor": divisor, "backend": m, "packed_elements": numel, "packed_bytes": nbytes,
            "pack_ms": pack_s * 1e3, "unpack_ms": unpack_s * 1e3,
            "pack_GBps": 2 * nbytes / pack_s / 1e9, "unpack_GBps": 2 * nbytes / unpack_s / 1e9,
            "speedup_vs_torch": ref_total / total,
        })
    return rows, sum(g.numel() for g in grads)


def _table(rows):
    head = f"{'ratio':>5} {'layout':>10} {'backend':>7} {'packed':>10} {'pack ms':>9} {'unpack ms':>9} " \
           f"{'pack GB/s':>9} {'unpack GB/s':>11} {'speedup':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['ratio']:>5} {r['layout']:>10} {r['backend']:>7} {r['packed_elements']:>10} {r['pack_ms']:>9.3f} "
                     f"{r['unpack_ms']:>9.3f} {r['pack_GBps']:>9.1f} {r['unpack_GBps']:>11.1f} "
                     f"{r['speedup_vs_torch']:>6.2f}x")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="approxdist-bench kernels", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when present)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.33])
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per figure (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the CPU")
    parser.add_argument("--layouts", nargs="+", default=["dim1"], choices=LAYOUTS,
                        help="gradient layouts: dim1 (the distributed layers' weights, default) "
                             "and/or contiguous (row-major)")
    parser.add_argument("--divisor", type=float, default=1,
                        help="pack(divisor=): the hook divides by the world size while packing "
                             "(default 1: no division)")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if not (math.isfinite(args.divisor) and args.divisor > 0):
        raise ValueError(f"--divisor must be a finite number > 0 (a world size), got {args.divisor}")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (30 if device.type == "cuda" else 7)
    dtype = getattr(torch, args.dtype)
    rows, total = [], 0
    for ratio in args.ratios:
        for layout in args.layouts:
            r, total = bench_ratio(ratio, device, dtype, repeats, args.warmup, layout, args.divisor)
            rows.extend(r)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"pack+unpack, resnet50 parameter set ({total / 1e6:.1f}M elements, {args.dtype}), {where}; "
          f"backend() = {kernels.backend()}; median of {repeats}"
          + (f"; pack divides by {args.divisor:g}" if args.divisor != 1 else ""))
    print(_table(rows))
    if args.json:
        meta = {"device": where, "dtype": args.dtype, "repeats": repeats, "divisor": args.divisor,
                "torch": torch.__version__,
                "backend": kernels.backend(), "total_elements": total}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    return 0
