"""A/B: the cost of norm_stats='exact' (an extra no-grad exact forward of a quarter of the
batch, every forward or every 4th) in a whole training step, against
norm_stats='sampled' and the exact model.
Interleaved, mean of --repeats (a multiple of 4). Usage: python experiments/tools/ab_norm_stats.py"""
import argparse
import copy
import statistics
import time

import torch
import torchvision

import approxdist as ad


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.33])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--repeats", type=int, default=12)
    a = p.parse_args()
    for name in a.models:
        torch.manual_seed(0)
        base = torchvision.models.get_model(name, num_classes=1000)
        variants = {"exact": base}
        for r in a.ratios:
            for ns, every in (("sampled", 1), ("exact", 1), ("exact", 4)):
                variants[f"{r} norm_stats={ns} every={every}"] = ad.convert_model(
                    copy.deepcopy(base), r, norm_stats=ns, norm_stats_every=every)
        x = torch.randn(a.batch, 3, a.image_size, a.image_size)
        y = torch.randint(0, 1000, (a.batch,))
        opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in variants.items()}
        times = {k: [] for k in variants}
        for i in range(a.repeats + 2):
            for k, m in variants.items():
                t = time.perf_counter()
                loss = torch.nn.functional.cross_entropy(m(x), y)
                opts[k].zero_grad()
                loss.backward()
                opts[k].step()
                if i >= 2:
                    times[k].append(time.perf_counter() - t)
        # The mean, not the median: with every=4 three steps in four skip the pass, and a
        # median would hide its cost. --repeats should be a multiple of 4.
        ex = statistics.mean(times["exact"])
        for k, v in times.items():
            mean = statistics.mean(v)
            print(f"{name:9s} {k:38s} {mean * 1000:8.1f} ms  {ex / mean:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
