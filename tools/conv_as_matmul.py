"""A lead, measured: weight-bound sampled convolutions as one matmul over stored taps.

    python tools/conv_as_matmul.py [--ratio 0.5] [--reps 25] [--threads 1] [--json F]

At 32 px resnet18's layer4 runs at 1x1 (layer3 at 2x2): its convolutions are weight
traffic, and a sampled one pays for gathering the selected input channels into a
row-major copy and for oneDNN's own reorder of that copy, in the forward and again in
the backward. Stored as (I, kh, kw, O) instead, the selected channels are k whole blocks
that *are* the (k*kh*kw, O) matrix of an im2col product: the forward is unfold + one
matmul, with no weight copy besides the gather, and the weight gradient is one matmul
whose rows are those blocks.

This script times forward and forward+backward (one process, batch 16 at 32 px, CPU
threads --threads) of three resnet18s built from the same weights: the exact model, the
approximate one as `convert_model(distributed=True)` makes it, and the same with
layer3.0.conv1 and the layer4 3x3 convolutions replaced by `TapsMajorConv` (top-k
input channels by weight norm, as the default policy). It is not wired into the
library: the layout would have to be taught to the hook's bucket views, the prepared
weights and the checkpoints first (docs/benchmarks.md has the figures).
"""
import argparse
import copy
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

REPLACED = ["layer3.0.conv1"] + [f"layer4.{b}.conv{c}" for b in (0, 1) for c in (1, 2)]


class TapsMajorConv(nn.Module):
    """A sampled conv whose weight is stored (I, kh, kw, O): top-k input channels by the
    norm of their block, gathered as whole blocks, then unfold and one matmul."""

    def __init__(self, conv: nn.Conv2d, ratio: float):
        super().__init__()
        if conv.groups != 1 or conv.dilation != (1, 1) or conv.bias is not None:
            raise ValueError("conv: only groups=1, dilation 1 and no bias are supported")
        out_ch, in_ch, kh, kw = conv.weight.shape
        self.shape = (out_ch, in_ch, kh, kw)
        self.k = max(1, int(round(in_ch * ratio)))
        self.weight = nn.Parameter(conv.weight.detach().permute(1, 2, 3, 0).contiguous())
        self.stride, self.padding = conv.stride, conv.padding

    def selected(self) -> torch.Tensor:
        in_ch = self.shape[1]
        with torch.no_grad():
            norms = self.weight.view(in_ch, -1).norm(dim=1)
            return norms.topk(self.k).indices.sort().values

    def forward(self, x):
        out_ch, _, kh, kw = self.shape
        idx = self.selected()
        w = self.weight.index_select(0, idx).view(self.k * kh * kw, out_ch)
        n, _, h, wd = x.shape
        ho = (h + 2 * self.padding[0] - kh) // self.stride[0] + 1
        wo = (wd + 2 * self.padding[1] - kw) // self.stride[1] + 1
        cols = F.unfold(x.index_select(1, idx), (kh, kw), padding=self.padding, stride=self.stride)
        return torch.matmul(cols.transpose(1, 2), w).transpose(1, 2).reshape(n, out_ch, ho, wo)


def build(ratio: float, seed: int = 0) -> dict:
    import torchvision

    import approxdist as ad

    torch.manual_seed(seed)
    base = torchvision.models.resnet18(num_classes=10)
    current = ad.convert_model(copy.deepcopy(base), ratio, distributed=True)
    taps = ad.convert_model(copy.deepcopy(base), ratio, distributed=True)
    for name in REPLACED:
        parent, attr = name.rsplit(".", 1)
        setattr(taps.get_submodule(parent), attr, TapsMajorConv(base.get_submodule(name), ratio))
    return {"exact": base, "current": current, "taps_major": taps}


def measure(models: dict, reps: int, warmup: int = 3, batch: int = 16, size: int = 32) -> dict:
    """Median forward and forward+backward ms per model, the models interleaved."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, 3, size, size, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    fwd = {k: [] for k in models}
    step = {k: [] for k in models}
    for rep in range(warmup + reps):
        for name, model in models.items():
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            if rep >= warmup:
                fwd[name].append((t1 - t0) * 1e3)
                step[name].append((t2 - t0) * 1e3)
    return {name: {"forward_ms": statistics.median(fwd[name]), "step_ms": statistics.median(step[name])}
            for name in models}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--reps", type=int, default=25)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if not 0 < a.ratio <= 1:
        p.error(f"--ratio must be in (0, 1], got {a.ratio}")
    if a.reps < 1:
        p.error(f"--reps must be >= 1, got {a.reps}")
    if a.threads < 1:
        p.error(f"--threads must be >= 1, got {a.threads}")
    torch.set_num_threads(a.threads)
    result = {"ratio": a.ratio, "threads": a.threads, "reps": a.reps, "torch": torch.__version__,
              "ms": measure(build(a.ratio), a.reps)}
    for name, r in result["ms"].items():
        print(f"{name:10s} forward {r['forward_ms']:6.1f} ms   forward+backward {r['step_ms']:6.1f} ms")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
