"""Self time per op of an exact and an approximate training step, side by side.

    python experiments/tools/profile_ops.py [--model resnet18] [--ratio 0.5] [--image-size 112]
        [--batch 16] [--steps 3] [--threads 1] [--ops native_batch_norm,threshold_backward,...]

Both models start from the same weights (the approximate one converted with
`distributed=True`); each is warmed up for 2 steps, then profiled over --steps steps of
forward + backward (no optimizer) with torch.profiler. Prints, per matching op, the self
CPU time per step in each model and their ratio, and whether every BatchNorm input was
contiguous (a strided input would slow BatchNorm down). For the "did op X get slower in
the approximate step" questions in experiments/records.
"""
import argparse
import copy

import torch
import torchvision
from torch.profiler import ProfilerActivity, profile

import approxdist as ad

DEFAULT_OPS = ("native_batch_norm", "native_batch_norm_backward", "threshold_backward", "relu_",
               "add_", "convolution_backward", "mkldnn_convolution", "index_select", "copy_")


def _positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _ratio(text):
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def profile_model(model, x, y, steps):
    """({op: self ms per step}, every BatchNorm input contiguous)."""
    loss_fn = torch.nn.CrossEntropyLoss()
    contiguous = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: contiguous.append(inp[0].is_contiguous()))
             for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    model.train()
    for _ in range(2):
        loss_fn(model(x), y).backward()
    for h in hooks:
        h.remove()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            loss_fn(model(x), y).backward()
    times = {e.key.removeprefix("aten::"): e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages()}
    return times, all(contiguous)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--ratio", type=_ratio, default=0.5)
    p.add_argument("--image-size", type=_positive(int), default=112)
    p.add_argument("--batch", type=_positive(int), default=16)
    p.add_argument("--steps", type=_positive(int), default=3)
    p.add_argument("--threads", type=_positive(int), default=1)
    p.add_argument("--ops", default=",".join(DEFAULT_OPS), help="aten op names, comma-separated")
    args = p.parse_args(argv)
    if not hasattr(torchvision.models, args.model):
        p.error(f"--model must be a torchvision model name, got {args.model!r}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = getattr(torchvision.models, args.model)(num_classes=10)
    exact = copy.deepcopy(base)
    approx = ad.convert_model(copy.deepcopy(base), args.ratio, distributed=True)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size)
    y = torch.randint(0, 10, (args.batch,))
    t_exact, c_exact = profile_model(exact, x, y, args.steps)
    t_approx, c_approx = profile_model(approx, x, y, args.steps)
    print(f"{args.model} at {args.image_size} px, batch {args.batch}, ratio {args.ratio}, "
          f"{args.threads} thread(s): self CPU ms per step (fwd + bwd), {args.steps} profiled steps")
    print(f"{'op':32s} {'exact':>9s} {'approx':>9s} {'ratio':>7s}")
    for op in args.ops.split(","):
        a, b = t_exact.get(op, 0.0), t_approx.get(op, 0.0)
        ratio = f"{b / a:6.2f}x" if a > 0 else "      -"
        print(f"{op:32s} {a:9.2f} {b:9.2f} {ratio}")
    print(f"BatchNorm inputs contiguous: exact {c_exact}, approx {c_approx}")


if __name__ == "__main__":
    main()
