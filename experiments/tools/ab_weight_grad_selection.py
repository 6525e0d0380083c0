"""A/B prototype behind mode 'weight_grad' (issue 27): the exact model, with each sampled
layer's weight gradient masked to k selected input channels by a tensor hook, so selections
the library does not have can be tried: 'topk' (by weight norm), 'rand' (uniform each step,
unscaled), 'randscaled' (scaled n/k), 'cyclic' (a fresh permutation walked k at a time).
Constant learning rate (the fidelity bench's protocol before its cosine decay).

    python experiments/tools/ab_weight_grad_selection.py cnn128 OUT.json exact,topk:0.5,rand:0.33 0,1,2
"""
import json
import sys
import time

import torch
import torch.nn.functional as F

import approxdist as ad
from approxdist.bench import fidelity as fb


def layers_to_mask(task, seed, ratio):
    conv = fb.build(task, seed); ad.convert_model(conv, ratio, distributed=True, seed=seed)
    out = {}
    for name, m in conv.named_modules():
        if isinstance(m, ad.nn.WeightSampled):
            n = m.weight.shape[1]; k = m.num_samples_of(n)
            if k < n: out[name] = (n, k)
    return out

def run(task, sel, ratio, seed, steps=None, lr=None, bs=32, eval_every=10, target=0.97, data=None):
    lr0, steps0, optname = fb.TASK_DEFAULTS[task]
    steps = steps or steps0; lr = lr or lr0
    (xtr, ytr), (xva, yva) = data
    masks = layers_to_mask(task, seed, ratio) if sel != "exact" else {}
    model = fb.build(task, seed)
    mods = dict(model.named_modules())
    g = torch.Generator().manual_seed(1000 + seed)
    state = {"step": 0}
    cur = {}
    perms = {}
    def choose(name, w, n, k):
        if sel in ("topk",):
            nrm = w.detach().flatten(2).norm(dim=(0, 2)) if w.dim() > 2 else w.detach().norm(dim=0)
            return nrm.topk(k).indices, 1.0
        if sel.startswith("rand"):
            idx = torch.randperm(n, generator=g)[:k]
            return idx, (n / k if sel == "randscaled" else 1.0)
        if sel == "cyclic":
            t = state["step"]; blocks = -(-n // k)
            if name not in perms or t % blocks == 0:
                perms[name] = torch.randperm(n, generator=g)
            b = t % blocks
            idx = perms[name][b * k:(b + 1) * k]
            if idx.numel() < k:
                idx = torch.cat([idx, perms[name][:k - idx.numel()]])
            return idx, 1.0
        raise ValueError(sel)
    def mk_hook(name):
        def hook(grad):
            idx, scale = cur[name]
            mask = torch.zeros(grad.shape[1], dtype=grad.dtype); mask[idx] = scale
            return grad * mask.view([1, -1] + [1] * (grad.dim() - 2))
        return hook
    for name in masks:
        mods[name].weight.register_hook(mk_hook(name))
    opt = fb.make_optimizer(optname, model.parameters(), lr)
    order = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(len(ytr), generator=order), 0
    curve, hit = [], None
    model.train()
    for step in range(1, steps + 1):
        state["step"] = step - 1
        for name, (n, k) in masks.items():
            cur[name] = choose(name, mods[name].weight, n, k)
        if pos + bs > len(ytr):
            perm, pos = torch.randperm(len(ytr), generator=order), 0
        idx = perm[pos:pos + bs]; pos += bs
        loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        if step % eval_every == 0 or step == steps:
            acc = fb.accuracy(model, xva, yva)
            curve.append([step, round(acc, 4)])
            if hit is None and acc >= target: hit = step
    return {"task": task, "sel": sel, "ratio": ratio, "seed": seed, "final": curve[-1][1], "hit": hit, "curve": curve}

if __name__ == "__main__":
    torch.set_num_threads(1)
    task = sys.argv[1]; out = sys.argv[2]
    configs = sys.argv[3].split(",")  # sel:ratio
    seeds = [int(s) for s in sys.argv[4].split(",")]
    data = fb.task_data(task)
    res = []
    for c in configs:
        sel, ratio = c.split(":") if ":" in c else (c, "1")
        for s in seeds:
            t0 = time.time()
            r = run(task, sel, float(ratio), s, data=data); r["sec"] = round(time.time() - t0, 1)
            res.append(r); print(c, s, r["final"], r["hit"], r["sec"], flush=True)
            json.dump(res, open(out, "w"))
