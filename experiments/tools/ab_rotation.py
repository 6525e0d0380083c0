"""A/B of topk_explore's rotation (issue 27/28, 2026-12-06): the rotation drawn once from the
seed and walked cyclically (the library's, compile-friendly) against the earlier one, a
permutation redrawn from the layer's generator at each pass (patched in here, as it was
before commit 14eda37). The fidelity bench's protocol (run_one), more seeds.

    python experiments/tools/ab_rotation.py cnn128 0.5,0.33 0,1,2,3,4,5 OUT.json
"""
import json
import statistics
import sys

import torch

from approxdist.bench import fidelity as fb
from approxdist.nn import _dist


def redrawn_explore_select(self, scores, k):
    """The rotation before 14eda37: walked in Python, redrawn from the generator each pass."""
    n = scores.numel()
    r = min(k, max(1, round(self.explore * k))) if self.explore > 0 else 0
    chosen = torch.zeros(n, dtype=torch.bool, device=scores.device)
    if k - r > 0:
        chosen[torch.topk(scores.float(), k - r, sorted=False).indices] = True
    rot = getattr(self, "_old_rotation", None)
    need = r
    while need > 0:
        if rot is None or rot[1] >= n or rot[0].numel() != n:
            rot = (torch.randperm(n, generator=self.generator), 0)
        perm, pos = rot
        rest = perm[pos:]
        count = torch.cumsum(~chosen[rest], 0)
        have = int(count[-1])
        if have >= need:
            end = int(torch.searchsorted(count, need)) + 1
            chosen[rest[:end]] = True
            rot, need = (perm, pos + end), 0
        else:
            chosen[rest] = True
            rot, need = (perm, n), need - have
    self._old_rotation = rot
    return chosen.nonzero().squeeze(1)


def main(task, ratios, seeds, out):
    lr, steps, _ = fb.TASK_DEFAULTS[task]
    data = fb.task_data(task)
    current = _dist.WeightSampled._explore_select
    rows = []
    for seed in seeds:
        for ratio in ratios:
            for variant, fn in (("seed", current), ("redrawn", redrawn_explore_select)):
                _dist.WeightSampled._explore_select = fn
                r = fb.run_one(task, ratio, seed, steps=steps, lr=lr, batch_size=32, eval_every=10,
                               target=0.97, data=data)
                rows.append({"variant": variant, "ratio": ratio, "seed": seed, "final_acc": r["final_acc"],
                             "steps_to_target": r["steps_to_target"]})
                print(variant, ratio, seed, r["final_acc"], r["steps_to_target"], flush=True)
    _dist.WeightSampled._explore_select = current
    for ratio in ratios:
        for variant in ("seed", "redrawn"):
            got = [x for x in rows if x["variant"] == variant and x["ratio"] == ratio]
            steps_ = [x["steps_to_target"] or 10 ** 6 for x in got]
            print(f"{ratio} {variant}: median steps {statistics.median(steps_)}, "
                  f"mean {statistics.mean(steps_):.1f}, median eval {statistics.median(x['final_acc'] for x in got):.4f}")
    with open(out, "w") as f:
        json.dump({"tool": "ab_rotation", "task": task, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(","), [int(s) for s in sys.argv[3].split(",")], sys.argv[4])
