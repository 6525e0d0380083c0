"""A/B of the sampled layers at two commits: one model, one process, interleaved.

    python experiments/tools/ab_commits.py --base REV [--ratio 0.5] [--reps 25] [--threads 1]
                               [--model resnet18] [--batch 16] [--size 32] [--json F]

Times forward and forward+backward of three copies of one torchvision model built from
the same weights: exact, converted (`convert_model(distributed=True)`) by the
approxdist of commit REV, and converted by the working tree's. Timing code changes in
two processes one after the other mixes the change with the machine's slow spells;
here the three run in turn, step by step, and the medians are compared. REV's package
is exported with `git archive` into a temporary folder under another name
(`approxdist_base`), which works because the package imports itself relatively.
"""
import argparse
import copy
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def import_base(rev: str, into: Path):
    """approxdist as of commit `rev`, imported as the module approxdist_base."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "approxdist"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    (into / "approxdist").rename(into / "approxdist_base")
    sys.path.insert(0, str(into))
    return importlib.import_module("approxdist_base")


def measure(models: dict, x, y, reps: int, warmup: int = 3) -> dict:
    import torch.nn.functional as F

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
    p.add_argument("--base", required=True, help="the commit to compare the working tree with")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--reps", type=int, default=25)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if not 0 < a.ratio <= 1:
        p.error(f"--ratio must be in (0, 1], got {a.ratio}")
    for flag in ("reps", "threads", "batch", "size"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(a, flag)}")
    import torch
    import torchvision

    sys.path.insert(0, str(ROOT))
    import approxdist

    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            base_pkg = import_base(a.base, Path(tmp))
        except subprocess.CalledProcessError as e:
            p.error(f"--base {a.base!r}: git archive failed: {e.stderr.decode().strip()}")
        torch.manual_seed(0)
        exact = getattr(torchvision.models, a.model)(num_classes=10)
        models = {"exact": exact,
                  "base": base_pkg.convert_model(copy.deepcopy(exact), a.ratio, distributed=True),
                  "this": approxdist.convert_model(copy.deepcopy(exact), a.ratio, distributed=True)}
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(a.batch, 3, a.size, a.size, generator=gen)
        y = torch.randint(0, 10, (a.batch,), generator=gen)
        ms = measure(models, x, y, a.reps)
    result = {"base": a.base, "ratio": a.ratio, "model": a.model, "batch": a.batch, "size": a.size,
              "threads": a.threads, "reps": a.reps, "torch": torch.__version__, "ms": ms}
    for name, r in ms.items():
        print(f"{name:6s} forward {r['forward_ms']:6.1f} ms   forward+backward {r['step_ms']:6.1f} ms")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
