"""`approxdist-bench compute`: how much faster the approximate layers train than exact ones.

Exact and approximate variants run side by side in one process, interleaved (every
repeat times each variant once, in turn), and the median is reported: on a shared
machine, load changes over seconds hit all variants alike instead of one of them.
The approximate models come from `convert_model` with its defaults (policy 'topk',
mode 'forward', first conv exact), as a user would get them; with --distributed, from
`convert_model(distributed=True)` with its defaults (mode 'weight_grad': the exact
forward and input gradient, the weight gradient of the selected channels only; policy
'topk_explore').

Channel selection (the norms, top-k and sort of every sampled layer) is timed on its
own, on the inputs the layers saw in the measured step, so its share of the step is a
measurement, not an estimate. The distributed layers select from their weights alone
(inside the step; not timed apart: the share reads "-").
"""
import argparse
import copy
import json
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn

from .. import convert_model
from ..functional import num_samples, select_pairs
from ..nn import ApproxConv2d, ApproxLinear

# (name, channels, spatial size, batch) of the single convolutions: ResNet stages.
CONV_SHAPES = [("64ch 56x56 b16", 64, 56, 16), ("256ch 14x14 b32", 256, 14, 32),
               ("512ch 7x7 b32", 512, 7, 32)]
MODELS = ("resnet18", "resnet50")


def _parser():
    p = argparse.ArgumentParser(
        prog="approxdist-bench compute",
        description="Forward+backward time of exact vs approximate (CRS) convolutions and "
                    "whole training steps, interleaved, median of --repeats runs.")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.33],
                   help="sample ratios of the approximate variants (default: 0.5 0.33)")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per variant (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per variant first")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: leave torch's choice)")
    p.add_argument("--only", choices=("convs", "models"), default=None,
                   help="run only the single convolutions or only the whole models")
    p.add_argument("--models", nargs="+", default=list(MODELS), help="torchvision models")
    p.add_argument("--batch", type=int, default=16, help="batch of the whole-model steps")
    p.add_argument("--image-size", type=int, default=112, help="image size of the model steps")
    p.add_argument("--kernels", type=int, nargs="+", default=[3, 1],
                   help="kernel sizes of the single convolutions (default: 3 1)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time (default); cpu: CPU time of this process, summed "
                        "over its threads, steadier on a machine shared with other jobs")
    p.add_argument("--distributed", action="store_true",
                   help="time convert_model(distributed=True)'s layers with its defaults (mode weight_grad, "
                        "policy topk_explore) instead of the single-node ones (mode forward, policy topk)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON")
    return p


_CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}


def _median_times(fns, repeats, warmup, clock="wall"):
    """Median seconds of each callable, calling them in turn (interleaved)."""
    now = _CLOCK[clock]
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = now()
            fn()
            times[i].append(now() - t0)
    return [statistics.median(t) for t in times]


class _SelectionRecorder:
    """Forward pre-hooks that keep the last input of every sampled layer, so the
    selection can be replayed and timed on exactly what the step saw."""

    def __init__(self, model):
        self.inputs = {}
        self.layers = [m for m in model.modules() if isinstance(m, (ApproxConv2d, ApproxLinear))]
        self.handles = [m.register_forward_pre_hook(self._hook) for m in self.layers]

    def _hook(self, module, args):
        self.inputs[module] = args[0].detach()

    def remove(self):
        for h in self.handles:
            h.remove()

    def select_all(self):
        with torch.no_grad():
            for m in self.layers:
                x, w = self.inputs[m], m.weight
                if isinstance(m, ApproxLinear):
                    x = x.reshape(-1, x.shape[-1])
                n = w.shape[1]
                k = num_samples(n, m.sample_ratio, m.minimal_k)
                if k < n:
                    select_pairs(x, w, k, m.policy)


def _selection_times(models, x, args):
    """Median seconds of each model's channel selection, replayed on the inputs its
    sampled layers saw in one forward pass of x (None for the distributed layers)."""
    if args.distributed:
        return [None] * len(models)
    out = []
    for m in models:
        rec = _SelectionRecorder(m)
        with torch.no_grad():
            m(x)
        rec.remove()
        out.append(_median_times([rec.select_all], args.repeats, 1, args.clock)[0])
    return out


def _conv_step(layer, x, g):
    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(g)
    return step


def bench_convs(args):
    rows = []
    for name, ch, size, batch in CONV_SHAPES:
        for ksize in args.kernels:
            torch.manual_seed(0)
            exact = nn.Conv2d(ch, ch, ksize, padding=ksize // 2, bias=False)
            x = torch.randn(batch, ch, size, size, requires_grad=True)
            g = torch.randn(batch, ch, size, size)
            variants = [("exact", exact)]
            for r in args.ratios:
                approx = convert_model(nn.Sequential(copy.deepcopy(exact)), r, skip_first_conv=False,
                                       distributed=args.distributed)
                variants.append((f"{r:g}", approx))
            fns = [_conv_step(m, x, g) for _, m in variants]
            times = _median_times(fns, args.repeats, args.warmup, args.clock)
            sel = _selection_times([m for _, m in variants[1:]], x, args)
            rows.append(_row(f"conv {ksize}x{ksize} {name}", times, sel, args.ratios))
            _print_row(rows[-1])
    return rows


def _model_step(model, opt, x, y):
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
    return step


def bench_models(args):
    import torchvision

    rows = []
    for mname in args.models:
        torch.manual_seed(0)
        exact = getattr(torchvision.models, mname)(num_classes=1000).train()
        x = torch.randn(args.batch, 3, args.image_size, args.image_size)
        y = torch.randint(0, 1000, (args.batch,))
        variants = [exact] + [convert_model(copy.deepcopy(exact), r, distributed=args.distributed)
                              for r in args.ratios]
        fns = [_model_step(m, torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9), x, y)
               for m in variants]
        times = _median_times(fns, args.repeats, args.warmup, args.clock)
        sel = _selection_times(variants[1:], x, args)
        rows.append(_row(f"{mname} step b{args.batch} {args.image_size}px", times, sel, args.ratios))
        _print_row(rows[-1])
    return rows


def _row(name, times, sel, ratios):
    exact = times[0]
    approx = [{"ratio": r, "seconds": t, "speedup": exact / t, "selection_seconds": s,
               "selection_share": None if s is None else s / t} for r, t, s in zip(ratios, times[1:], sel)]
    return {"case": name, "exact_seconds": exact, "approx": approx}


def _header(ratios):
    cols = "".join(f" | {f'ratio {r:g}':>21}" for r in ratios)
    return f"| {'case':<30} | {'exact ms':>9}{cols} |"


def _print_row(row):
    def share(a):
        return "    -" if a["selection_share"] is None else f"{a['selection_share'] * 100:4.1f}%"

    cells = "".join(f" | {a['seconds'] * 1e3:7.1f} {a['speedup']:4.2f}x {share(a)}" for a in row["approx"])
    print(f"| {row['case']:<30} | {row['exact_seconds'] * 1e3:9.1f}{cells} |", flush=True)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {args.repeats}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "distributed": args.distributed,
           "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
           "repeats": args.repeats, "clock": args.clock, "command": "approxdist-bench compute " + " ".join(argv)}
    print(f"# torch {env['torch']}, {env['threads']} threads, median of {args.repeats} interleaved runs, "
          f"{args.clock} clock; " + ("convert_model(distributed=True) defaults (mode weight_grad)"
                                    if args.distributed else "convert_model defaults (mode forward)"))
    print("# each ratio cell: approximate ms, speedup over exact, channel-selection share of the step")
    print(_header(args.ratios))
    print("|" + "-" * 32 + "|" + "-" * 11 + "".join("|" + "-" * 23 for _ in args.ratios) + "|")
    rows = []
    if args.only in (None, "convs"):
        rows += bench_convs(args)
    if args.only in (None, "models"):
        rows += bench_models(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
