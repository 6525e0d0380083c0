"""A run saved mid-way and resumed in fresh processes ends with the same parameters as
an uninterrupted run: model, optimizer, hook state and sampler generators all restored."""
import os

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import approxdist as ad
from distharness import run_ranks
from models import batch_for, make_model


def _setup():
    model = ad.convert_model(make_model("cnn"), 0.4, distributed=True, policy="bernoulli_weight", allow_unbiased=True, seed=3)
    ddp = DDP(model)
    state = ad.distributed.register(ddp)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, ddp, state, opt


def _steps(ddp, opt, rank, start, stop):
    loss_fn = nn.CrossEntropyLoss()
    for step in range(start, stop):
        x, y = batch_for("cnn", rank, step)
        loss_fn(ddp(x), y).backward()
        opt.step()
        opt.zero_grad()


def run_worker(rank, world, phase, path):
    model, ddp, state, opt = _setup()
    if phase == "whole":
        _steps(ddp, opt, rank, 0, 6)
    elif phase == "first":
        _steps(ddp, opt, rank, 0, 3)
        if rank == 0:
            ckpt = {"model": model.state_dict(), "opt": opt.state_dict(), "hook": state.state_dict(),
                    "sampler": ad.nn.sampler_state(model)}
            torch.save(ckpt, path + ".tmp")
            os.replace(path + ".tmp", path)
        dist.barrier()
        return None
    else:
        ckpt = torch.load(path, weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        state.load_state_dict(ckpt["hook"])
        ad.nn.load_sampler_state(model, ckpt["sampler"])
        _steps(ddp, opt, rank, 3, 6)
    return {"params": [p.detach().clone() for p in model.parameters()], "stats": state.stats}


def test_resume_equals_uninterrupted(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    whole = run_ranks(run_worker, 2, "whole", path)
    run_ranks(run_worker, 2, "first", path)
    resumed = run_ranks(run_worker, 2, "resume", path)
    for w, r in zip(whole, resumed):
        for a, b in zip(w["params"], r["params"]):
            assert torch.equal(a, b)
        assert w["stats"]["steps"] == r["stats"]["steps"] == 6
        assert w["stats"]["payload_bytes"] == r["stats"]["payload_bytes"]
