"""Compute cost of the weight layout in the distributed default (mode weight_grad).

    python experiments/tools/ab_weight_layout.py [--model resnet18] [--ratio 0.33]
        [--image-size 32] [--batch 16] [--steps 15] [--threads 1]

One process: the exact model, `convert_model(m, R, distributed=True)` (weights stored
input-major, the default) and the same with `weight_layout="contiguous"` (row-major), each
stepping forward + backward + SGD with momentum, interleaved, median of --steps steps
after 3 warm-up rounds (timed as `approxdist-bench compute` times its models). In weight_grad mode an input-major conv weight is copied to
row-major for every exact forward; row-major, the sparse hook packs a slower layout
(docs/benchmarks.md, Kernels). This measures the first half of that trade.
"""
import argparse
import copy

import torch
import torchvision

import approxdist as ad
from approxdist.bench.compute import _median_times, _model_step  # the compute bench's own timing


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--ratio", type=float, default=0.33)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    if a.steps < 1 or a.batch < 1 or a.threads < 1:
        p.error("--steps, --batch and --threads must be at least 1")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    base = getattr(torchvision.models, a.model)(num_classes=10)
    models = {"exact": copy.deepcopy(base),
              "input_major": ad.convert_model(copy.deepcopy(base), a.ratio, distributed=True),
              "contiguous": ad.convert_model(copy.deepcopy(base), a.ratio, distributed=True,
                                             weight_layout="contiguous")}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, 3, a.image_size, a.image_size, generator=g)
    y = torch.randint(0, 10, (a.batch,), generator=g)
    steps = [_model_step(m, torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9), x, y)
             for m in models.values()]
    times = dict(zip(models, _median_times(steps, a.steps, warmup=3)))
    for name, seconds in times.items():
        print(f"{name:12s} {seconds * 1e3:7.1f} ms  {seconds / times['exact']:.2f}x the exact step")


if __name__ == "__main__":
    main()
