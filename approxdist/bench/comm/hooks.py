"""The hooks under comparison, installed on a DDP model: DDP's all-reduce, fp16
compression, PowerSGD and approxdist's sparse hook, each with the usual loop, the
optimizer stepping inside the hook (+step) or the next forward overlapping the transfer
(+overlap). Also the models and the analytic byte counts the rows are checked against.

Only the standard library is imported at module level: torch comes in with the first
call, so `approxdist-bench --help` starts fast.
"""
from __future__ import annotations

import time
from typing import Any, NamedTuple, Optional

from .specs import DEFAULT_BUCKET_MB, HookSpec, RunConfig

__all__ = ["make_model", "analytic_payload_bytes", "dense_payload_bytes", "HookTimer", "OverlapGroup",
           "install_hook", "Built", "build", "SINGLE_BUCKET_MB", "POWERSGD_START_ITER"]

# PowerSGD's hook issues its second all-reduce from a .then() callback; on gloo that
# crashes once DDP has more than one bucket, so it runs with one bucket (documented).
SINGLE_BUCKET_MB = 10_000
POWERSGD_START_ITER = 2  # the smallest start PyTorch allows with error feedback


def make_model(name: str):
    """A torchvision classifier with 10 classes, or "tiny" (two convs and a linear layer,
    for tests: its steps take milliseconds, its layers still get sampled)."""
    import torch.nn as nn
    import torchvision

    if name == "tiny":
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    builder = getattr(torchvision.models, name, None)
    if builder is None or not callable(builder):
        raise ValueError(f"model must be 'tiny' or a torchvision.models name, got {name!r}")
    return builder(num_classes=10)


def analytic_payload_bytes(model, fp16: bool = False) -> int:
    """Bytes a lossless sparse all-reduce must send per step: the sampled input-channel
    slices of every sampled weight (the union of its layers' channels where several hold
    it; an attention module's packed in_proj_weight is its `weight`) plus every other
    trainable parameter, each counted once; no indices."""
    import torch

    channels = {}  # id(weight) -> the channels its sampled layers used in the last forward
    for mod in model.modules():
        idx = getattr(mod, "last_indices", None)
        weight = getattr(mod, "weight", None)
        if idx is not None and isinstance(weight, torch.nn.Parameter):
            channels.setdefault(id(weight), set()).update(idx.tolist())
    total = 0
    for p in {id(p): p for p in model.parameters() if p.requires_grad}.values():
        used = channels.get(id(p))
        n = p.numel() // p.shape[1] * len(used) if used is not None else p.numel()
        total += n * (2 if fp16 else p.element_size())
    return total


def dense_payload_bytes(model, fp16: bool = False) -> int:
    """Bytes of every trainable gradient: what DDP's all-reduce sends per step."""
    return sum(p.numel() * (2 if fp16 else p.element_size())
               for p in model.parameters() if p.requires_grad)


class HookTimer:
    """Sums the time spent in a hook's body: its own cost on the critical path (casting,
    packing, launching), the wait for the network excluded."""

    def __init__(self):
        self.seconds = 0.0

    def _timed(self, fn):
        def timed_fn(state, bucket):
            t0 = time.perf_counter()
            out = fn(state, bucket)
            self.seconds += time.perf_counter() - t0
            return out
        return timed_fn

    def wrap(self, hook):
        """hook, timed; its payload form too (forward_overlap may launch the payload in
        two collectives, outside the hook's body)."""
        from approxdist.distributed import payload_of, with_payload

        timed_hook = self._timed(hook)
        payload = payload_of(hook)
        if payload is not None:
            with_payload(timed_hook, self._timed(payload))
        return timed_hook


class OverlapGroup:
    """The extra process group of the +overlap hooks, made by the first +overlap config
    that asks (every rank runs the same configs in the same order, so they create it
    together) and reused by the others of the same worker."""

    def __init__(self):
        self._group = None

    def get(self):
        import torch.distributed as dist

        if self._group is None:
            self._group = dist.new_group()
        return self._group


def install_hook(ddp, spec: HookSpec, timer: HookTimer, optimizer, eager_fraction=None,
                 groups: Optional[OverlapGroup] = None):
    """Register the hook `spec` names on ddp; returns the sparse hook's state, else None.

    "+step" wraps the hook in approxdist's optimizer_wrapper: `optimizer` steps each
    bucket's parameters in the hook's callback (DDP's all-reduce then runs as torch's
    Python allreduce_hook, the built-in C++ one takes no wrapper). "+overlap" wraps it in
    forward_overlap: the next forward steps each bucket as it needs it."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    import approxdist.distributed as add

    def wrap(hook):
        if spec.overlap:
            return add.forward_overlap(ddp, hook, optimizer, eager_fraction=eager_fraction or add.EAGER_FRACTION)
        return add.optimizer_wrapper(hook, optimizer) if spec.step_in_hook else hook

    # +overlap: the hooks' collectives get a group of their own, so DDP's buffer
    # broadcast at the start of the forward does not queue behind the transfer.
    group = (groups or OverlapGroup()).get() if spec.overlap else None
    if spec.kind == "allreduce":
        if spec.step_in_hook:
            ddp.register_comm_hook(group or dist.group.WORLD, wrap(timer.wrap(default_hooks.allreduce_hook)))
        return None  # else DDP's built-in C++ all-reduce: what users get without a hook
    if spec.kind == "fp16":
        ddp.register_comm_hook(group or dist.group.WORLD, wrap(timer.wrap(default_hooks.fp16_compress_hook)))
        return None
    if spec.kind == "powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=group, matrix_approximation_rank=spec.rank,
            start_powerSGD_iter=POWERSGD_START_ITER, use_error_feedback=True, warm_start=True)
        ddp.register_comm_hook(state, wrap(timer.wrap(powerSGD_hook.powerSGD_hook)))
        return None

    state = add.SparseAllReduceState(group)
    hook = add.sparse_allreduce_hook
    if spec.fp16:
        # PyTorch's wrapper casts the bucket to fp16 and hands it to the sparse hook,
        # which packs from bucket.buffer(), so the sampled slices travel in fp16.
        hook = default_hooks.fp16_compress_wrapper(hook)
    ddp.register_comm_hook(state, wrap(timer.wrap(hook)))
    return state


class Built(NamedTuple):
    """A run's DDP model, the sparse hook's state (None for the others), the timer of the
    hook's body and the optimizer."""

    ddp: Any
    state: Any
    timer: HookTimer
    optimizer: Any


def build(cfg, spec: Optional[HookSpec] = None, seed: int = 0, groups: Optional[OverlapGroup] = None) -> Built:
    """The model of `cfg` (a RunConfig or its dict), sampled for the sparse hook, in DDP
    with the hook installed and an SGD optimizer; seeded with `seed`."""
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    cfg = RunConfig.from_dict(cfg)
    spec = spec or cfg.spec
    torch.manual_seed(seed)
    model = make_model(cfg.model)
    if spec.kind == "sparse":
        import approxdist as ad

        model = ad.convert_model(model, spec.ratio, distributed=True, mode=spec.mode)
    bucket = SINGLE_BUCKET_MB if spec.kind == "powersgd" else (cfg.bucket_mb or DEFAULT_BUCKET_MB)
    ddp = DDP(model, bucket_cap_mb=bucket)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
    timer = HookTimer()
    # the command line puts the effective share in cfg; a plan written by hand may only
    # name it in the hook (+overlapF)
    state = install_hook(ddp, spec, timer, opt, cfg.eager_fraction or spec.eager_fraction, groups)
    return Built(ddp, state, timer, opt)
