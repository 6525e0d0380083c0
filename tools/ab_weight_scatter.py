"""A/B of the weight-gradient scatter in a whole training step (docs/benchmarks.md, Compute).

    python tools/ab_weight_scatter.py [--model resnet50] [--ratio 0.5] [--repeats 21]

Times, interleaved in one process with the order reversed every other repeat, a training
step (batch 16 at 112 px, SGD with momentum) of the exact model and of two copies of the
converted one: 'old' scatters weight gradients by a zero fill and index_copy_, 'new' with
the library's block scatter (functional/_products.py). Prints the medians and the
speedups over exact. A diagnostic, not a benchmark command.
"""
import argparse
import copy
import statistics
import time

import torch
import torchvision

import approxdist as ad
import approxdist.functional._autograd as autograd_mod
import approxdist.functional._products as products

NEW = products._scatter


def old_scatter(full_shape, idx, part, dim=1, stride=None):
    out = products.zeros_like_layout(full_shape, stride, part)
    if dim == 1 and products.dim1_major(out):
        out.transpose(0, 1).index_copy_(0, idx, part.transpose(0, 1))
    else:
        out.index_copy_(dim, idx, part)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=21)
    a = p.parse_args()
    torch.manual_seed(0)
    exact = getattr(torchvision.models, a.model)(num_classes=10)
    approx = ad.convert_model(copy.deepcopy(exact), a.ratio)
    x, y = torch.randn(16, 3, 112, 112), torch.randint(0, 10, (16,))

    def make(model, scatter=None):
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step():
            if scatter is not None:
                autograd_mod._scatter = products._scatter = scatter
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return step

    steps = {"exact": make(exact), "old": make(approx, old_scatter),
             "new": make(copy.deepcopy(approx), NEW)}
    for fn in steps.values():  # warm-up: the first steps allocate what later ones reuse
        fn()
        fn()
    times = {k: [] for k in steps}
    for r in range(a.repeats):
        order = list(steps.items())
        for name, fn in (order if r % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    autograd_mod._scatter = products._scatter = NEW
    med = {k: statistics.median(v) for k, v in times.items()}
    print(" ".join(f"{k} {v * 1e3:.1f} ms" for k, v in med.items()), "|",
          " ".join(f"{k} {med['exact'] / med[k]:.3f}x" for k in ("old", "new")))


if __name__ == "__main__":
    main()
