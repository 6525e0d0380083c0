"""Optimizer step time by weight layout (experiments/records/compute_kernels_training.md).

    python experiments/tools/optimizer_layout.py [--model resnet18] [--repeats 15] [--threads 1]

`convert_model(..., distributed=True)` stores sampled weights input-channel-major by
default (`weight_layout="input_major"`), and their gradients and optimizer state follow.
This times `optimizer.step()` of torch's SGD (momentum 0.9) and AdamW, each in its
for-loop, foreach and fused implementation, over the parameters of the model converted
with either layout, on the CPU, with random gradients. Variants are interleaved, the order
reversed every other repeat; medians. A diagnostic, not a benchmark command.
"""
import argparse
import statistics
import time

import torch
import torchvision

import approxdist as ad

IMPLS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
OPTIMIZERS = {"SGD": lambda ps, kw: torch.optim.SGD(ps, lr=0.01, momentum=0.9, **kw),
              "AdamW": lambda ps, kw: torch.optim.AdamW(ps, lr=0.001, **kw)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--ratio", type=float, default=0.33)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    if a.repeats < 1 or a.threads < 1:
        p.error("--repeats and --threads must be >= 1")
    torch.set_num_threads(a.threads)
    variants = {}
    for layout in ("contiguous", "input_major"):
        torch.manual_seed(0)
        model = ad.convert_model(getattr(torchvision.models, a.model)(num_classes=1000), a.ratio,
                                 distributed=True, weight_layout=layout)
        params = [q for q in model.parameters() if q.requires_grad]
        for q in params:
            # The gradient in the parameter's layout, as the sampled layers and DDP give it.
            q.grad = torch.empty_like(q).normal_()
        for oname, make in OPTIMIZERS.items():
            for iname, kw in IMPLS.items():
                opt = make(params, kw)
                opt.step()  # creates the state (momentum / moments) in the parameter's layout
                variants[(oname, iname, layout)] = opt
    keys = list(variants)
    times = {k: [] for k in keys}
    for rep in range(a.repeats):
        for k in (keys if rep % 2 == 0 else keys[::-1]):
            t0 = time.perf_counter()
            variants[k].step()
            times[k].append(time.perf_counter() - t0)
    n_noncontig = sum(not q.is_contiguous() for q in model.parameters())
    print(f"{a.model} converted at {a.ratio} (distributed=True): {n_noncontig} input-major "
          f"parameters; optimizer.step() in ms, {a.threads} thread(s), median of {a.repeats}")
    print(f"{'optimizer':<10}{'impl':<10}{'contiguous':>12}{'input_major':>13}{'ratio':>8}")
    for oname in OPTIMIZERS:
        for iname in IMPLS:
            c = statistics.median(times[(oname, iname, "contiguous")]) * 1e3
            m = statistics.median(times[(oname, iname, "input_major")]) * 1e3
            print(f"{oname:<10}{iname:<10}{c:>12.2f}{m:>13.2f}{m / c:>7.2f}x")


if __name__ == "__main__":
    main()
