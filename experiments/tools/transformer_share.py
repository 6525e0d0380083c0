"""How much of each torchvision transformer convert_model samples (issue 28).

For every vit_*, swin_*, swin_v2_* and maxvit_* of torchvision.models (random weights,
10 classes): the parameters, the share of them in sampled weights, and the analytic
payload of the sparse hook at --ratio (of the dense gradient): every sampled weight
sends k of its n input channels, k = num_samples(n, ratio, minimal_k), every other
parameter whole. tests/test_attention.py checks one training forward's payload against
this count (slow: every model).

    python experiments/tools/transformer_share.py --json experiments/runs/transformer_share.json
"""
import argparse
import json

import torch
import torchvision

import approxdist as ad


def share(name, ratio):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10)
    ad.convert_model(model, ratio, distributed=True)
    dense = sum(p.numel() for p in model.parameters())
    sampled, sent = 0, dense
    for m in model.modules():
        if isinstance(m, ad.nn.WeightSampled):
            w = m.weight
            n = w.shape[1]
            k = ad.functional.num_samples(n, m.sample_ratio, m.minimal_k)
            sampled += w.numel()
            sent -= w.numel() - w.numel() // n * k
    return {"model": name, "params_m": round(dense / 1e6, 1), "sampled_share": round(sampled / dense, 4),
            "payload_fraction": round(sent / dense, 4)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ratio", type=float, default=0.33)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    names = [n for n in torchvision.models.list_models(module=torchvision.models)
             if n.startswith(("vit_", "swin_", "maxvit"))]
    rows = []
    for name in names:
        rows.append(share(name, args.ratio))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tool": "transformer_share", "ratio": args.ratio, "torchvision": torchvision.__version__,
                       "rows": rows}, f, indent=1)
    print(f"| model | parameters (M) | in sampled weights | payload at {args.ratio} (of dense) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['params_m']} | {r['sampled_share']:.1%} | {r['payload_fraction']:.3f} |")


if __name__ == "__main__":
    main()
