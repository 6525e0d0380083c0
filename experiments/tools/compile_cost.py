"""torch.compile of converted models (issue 28): graph breaks, compile time, step time.

For each model (torchvision resnet18 at 32 px, the fidelity benchmark's small ViT) and
each form (exact, convert_model(0.5), convert_model(0.5, distributed=True)), one process:
- graph breaks of one training forward (torch._dynamo.explain),
- compile time: the first two compiled training steps (forward, backward, SGD step)
  minus two median eager steps,
- the median step time eager and compiled over --repeats steps, interleaved.

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python experiments/tools/compile_cost.py \
        --json experiments/runs/compile_cost.json

(a fresh inductor cache: with a warm one, the compile time is the cache's load time)

Not a product benchmark: a one-off report of what compile costs and buys on this CPU.
"""
import argparse
import copy
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision

import approxdist as ad

VIT = dict(image_size=32, patch_size=8, num_layers=4, num_heads=4, hidden_dim=64, mlp_dim=128)


def build(name):
    torch.manual_seed(0)
    if name == "resnet18":
        return torchvision.models.resnet18(num_classes=10)
    return torchvision.models.VisionTransformer(num_classes=10, **VIT)


def convert(model, form):
    if form == "exact":
        return model
    return ad.convert_model(model, 0.5, distributed=form == "dist")


def step_fn(model, opt, x, y):
    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(name, form, batch, repeats, backend):
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    base = convert(build(name), form).train()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(copy.deepcopy(base))(x)
    eager_m, comp_m = copy.deepcopy(base), copy.deepcopy(base)
    eager = step_fn(eager_m, torch.optim.SGD(eager_m.parameters(), lr=0.01), x, y)
    torch._dynamo.reset()
    compiled = step_fn(torch.compile(comp_m, backend=backend), torch.optim.SGD(comp_m.parameters(), lr=0.01), x, y)
    eager()  # warm-up
    # Two compiled steps: without a hook popping them, a distributed layer's touched
    # channels are None on the first forward only, which costs one recompile.
    first = timed(compiled) + timed(compiled)
    e, c = [], []
    for _ in range(repeats):
        e.append(timed(eager))
        c.append(timed(compiled))
    eager_s, comp_s = statistics.median(e), statistics.median(c)
    return {"model": name, "form": form, "graph_breaks": explained.graph_break_count,
            "graphs": explained.graph_count, "break_reasons": sorted({str(b.reason)[:160] for b in explained.break_reasons}),
            "compile_s": round(first - 2 * eager_s, 2), "eager_step_ms": round(eager_s * 1e3, 1),
            "compiled_step_ms": round(comp_s * 1e3, 1), "speedup": round(eager_s / comp_s, 3)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet18", "vit"], choices=["resnet18", "vit"])
    p.add_argument("--forms", nargs="+", default=["exact", "local", "dist"], choices=["exact", "local", "dist"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--backend", default="inductor")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    doc = {"tool": "compile_cost", "options": vars(args), "rows": [],
           "environment": {"torch": torch.__version__, "python": platform.python_version(),
                           "threads": torch.get_num_threads()}}
    for name in args.models:
        for form in args.forms:
            row = measure(name, form, args.batch, args.repeats, args.backend)
            doc["rows"].append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(doc, f, indent=1)
    print("| model | form | graph breaks | compile s | eager ms | compiled ms | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for r in doc["rows"]:
        print(f"| {r['model']} | {r['form']} | {r['graph_breaks']} | {r['compile_s']} | {r['eager_step_ms']} "
              f"| {r['compiled_step_ms']} | {r['speedup']}x |")


if __name__ == "__main__":
    main()
