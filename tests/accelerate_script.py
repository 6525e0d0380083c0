"""Hugging Face Accelerate with the sparse hook: run by tests/test_integrations.py under
`accelerate launch --cpu --num_processes 2` (gloo). The model is converted before
`accelerator.prepare`, which wraps it in DistributedDataParallel; the hook is registered
on what `prepare` returned. Each rank saves its parameters, the hook's stats, the
analytic payload per step, and the same training's parameters under DDP's own all-reduce,
to OUTDIR/rank<r>.pt."""
import copy
import os
import sys

import torch
import torch.nn as nn
from accelerate import Accelerator

import approxdist as ad
from models import analytic_bytes, make_model


def train(accelerator, net, hook):
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 32, generator=g), torch.randint(0, 5, (48,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    ddp, opt, loader = accelerator.prepare(net, opt, loader)
    state = ad.distributed.register(ddp) if hook else None   # after prepare: ddp is DDP-wrapped
    for xb, yb in loader:
        accelerator.backward(nn.functional.cross_entropy(ddp(xb), yb))
        opt.step()
        opt.zero_grad()
    return ddp, state


def main(outdir):
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    base = ad.convert_model(make_model("mlp", seed=0), 0.5, distributed=True)
    init = [p.detach().clone() for p in base.parameters()]
    sparse, state = train(accelerator, copy.deepcopy(base), hook=True)
    plain, _ = train(accelerator, copy.deepcopy(base), hook=False)
    torch.save({"wrapped": type(sparse).__name__, "world": accelerator.num_processes,
                "backend": torch.distributed.get_backend(),
                "init": init,
                "sparse": [p.detach().clone() for p in accelerator.unwrap_model(sparse).parameters()],
                "plain": [p.detach().clone() for p in accelerator.unwrap_model(plain).parameters()],
                "stats": state.stats, "analytic": analytic_bytes(accelerator.unwrap_model(sparse))},
               os.path.join(outdir, f"rank{accelerator.process_index}.pt"))
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
