"""`python -m approxdist.demo`: exact vs approximate training of a small CNN on real data.

The data are scikit-learn's `load_digits` (1,797 real 8x8 handwritten digits that ship
inside the package, so nothing is downloaded). The same network, from the same initial
weights and the same batches, is trained twice: once exact, once after
`convert_model(model, sample_ratio)`. Evaluation is always exact, as in the paper: the
sampling only makes training cheaper.

The multiply-accumulates are counted analytically, layer by layer, from the shapes seen
in one forward pass: a sampled layer does k/n of its layer's MACs, in the forward and
in both backward products alike, so the forward count gives the fraction for the step.
"""
import argparse
import copy
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import convert_model
from .functional import num_samples
from .nn import ApproxConv2d, ApproxConv2dDist, ApproxLinear, ApproxLinearDist

_SAMPLED = (ApproxConv2d, ApproxConv2dDist, ApproxLinear, ApproxLinearDist)


class DigitsCNN(nn.Module):
    """Three 3x3 convolutions and two linear layers: about 0.1 M parameters, 8x8 input."""

    def __init__(self, classes=10, width=32):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.fc1 = nn.Linear(2 * width * 2 * 2, 128)
        self.fc2 = nn.Linear(128, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.max_pool2d(F.relu(self.bn3(self.conv3(x))), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def load_digits_split(test_fraction=0.2, seed=0):
    """(x_train, y_train, x_test, y_test): a fixed shuffled split, standardised with the
    training statistics. Needs scikit-learn (the 'data' extra)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the demo needs scikit-learn: pip install 'approxdist[data]'") from e
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).view(-1, 1, 8, 8)
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return x[train], y[train], x[test], y[test]


def count_macs(model, sample_input):
    """(exact MACs, MACs as trained) per sample of one forward pass of model.

    A conv does out_pixels * out_channels * (in_channels / groups) * kh * kw MACs and a
    linear layer out * in; a sampled layer in training mode does k/n of them, with k from
    its sample_ratio and minimal_k."""
    counts = []

    def hook(module, args, out):
        if isinstance(module, nn.Conv2d):
            n = module.in_channels // module.groups
            per_channel = out[0].numel() * module.kernel_size[0] * module.kernel_size[1]
        else:
            n = module.in_features
            per_channel = out[0].numel()
        k = n
        if isinstance(module, _SAMPLED):
            k = num_samples(n, module.sample_ratio, module.minimal_k)
        counts.append((per_channel * n, per_channel * k))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(sample_input[:1])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


def evaluate(model, x, y, batch_size=512):
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch_size):
            correct += (model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
    return correct / len(y)


def train(model, x, y, epochs, batch_size=64, lr=0.05, seed=0):
    """Plain SGD with momentum and a cosine schedule; the batches come from a generator
    seeded with `seed`, so two runs see the same batches in the same order."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = epochs * ((len(y) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch_size):
            idx = order[i:i + batch_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
    return model


def run_demo(sample_ratio=0.5, epochs=15, seed=0, threads=1, verbose=True):
    """Train exact and approximate, return {'exact': {...}, 'approx': {...}} with the test
    accuracy, wall seconds, MACs per sample and the fraction of MACs saved.

    One intra-op thread by default: the layers are so small that splitting them across
    threads costs more than it gains, and on a busy machine OpenMP threads that spin-wait
    for each other slow training down tenfold. threads=None keeps torch's setting."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(sample_ratio, epochs, seed, verbose)
    finally:
        torch.set_num_threads(previous)


def _run(sample_ratio, epochs, seed, verbose):
    x_train, y_train, x_test, y_test = load_digits_split(seed=seed)
    torch.manual_seed(seed)
    initial = DigitsCNN()
    variants = {"exact": copy.deepcopy(initial),
                "approx": convert_model(copy.deepcopy(initial), sample_ratio)}
    results = {}
    for name, model in variants.items():
        exact_macs, macs = count_macs(model, x_train)
        # a few untimed steps on a copy first: oneDNN builds its kernels on first use
        train(copy.deepcopy(model), x_train[:256], y_train[:256], 1, seed=seed)
        t0 = time.perf_counter()
        train(model, x_train, y_train, epochs, seed=seed)
        seconds = time.perf_counter() - t0
        results[name] = {"test_accuracy": evaluate(model, x_test, y_test), "train_seconds": seconds,
                         "macs_per_sample": macs, "macs_saved": 1 - macs / exact_macs}
    if verbose:
        print(f"load_digits: {len(y_train)} train / {len(y_test)} test images, {epochs} epochs, "
              f"seed {seed}, torch {torch.__version__}, {torch.get_num_threads()} threads")
        print(f"{'variant':<28} {'test acc':>8} {'train s':>8} {'MACs/sample':>12} {'MACs saved':>10}")
        for name, label in (("exact", "exact"), ("approx", f"approx (sample_ratio={sample_ratio:g})")):
            r = results[name]
            print(f"{label:<28} {r['test_accuracy'] * 100:7.2f}% {r['train_seconds']:8.1f} "
                  f"{r['macs_per_sample']:12,d} {r['macs_saved'] * 100:9.1f}%")
        print("(the first convolution stays exact; evaluation is exact for both)")
    return results


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m approxdist.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--sample-ratio", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = p.parse_args(argv)
    run_demo(args.sample_ratio, args.epochs, args.seed, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
