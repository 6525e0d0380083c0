"""Gradient communication for `approxdist-train`: which DDP hook, and how many bytes it sent.

Every hook reports the same three counters (steps, payload bytes, dense bytes) so the
epoch lines compare like with like: ``dense_bytes`` is what a float all-reduce of the same
buckets would have sent, ``payload_bytes`` what this hook put on the wire per rank.
PowerSGD's payload depends on its internal matrix shapes, so it reports none.

Every state can be turned into weights_only-safe plain data and back, for checkpoints.
"""
import numpy as np
import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

from ..distributed import COMPRESS
from .checkpoint import to_plain

# the sparse hook, plain or with its slices cast (register(compress=...))
SPARSE_HOOKS = ("sparse", *(f"sparse-{c}" for c in COMPRESS))


class _Counting:
    """Wraps a torch hook's state with byte counters; the hook itself is unchanged."""

    def __init__(self, inner, bytes_per_element):
        self.inner = inner
        self.bytes_per_element = bytes_per_element  # None: payload unknown (PowerSGD)
        self.steps = self.payload_bytes = self.dense_bytes = 0

    def count(self, bucket):
        buf = bucket.buffer()
        self.dense_bytes += buf.numel() * buf.element_size()
        if self.bytes_per_element is not None:
            self.payload_bytes += buf.numel() * self.bytes_per_element(buf)
        if bucket.is_last():
            self.steps += 1


def _counted(hook):
    def counted_hook(state, bucket):
        state.count(bucket)
        return hook(state.inner, bucket)

    counted_hook.__name__ = f"counted_{hook.__name__}"
    return counted_hook


class Comm:
    """The hook in use: ``stats()`` for the logs, ``state_dict()``/``load_state_dict()`` for
    checkpoints."""

    def __init__(self, name, state, kind):
        self.name, self.state, self.kind = name, state, kind

    def stats(self):
        if self.kind == "sparse":
            s = dict(self.state.stats)
            return {"steps": int(s.get("steps", 0)), "payload_bytes": int(s.get("payload_bytes", 0)),
                    "dense_bytes": int(s.get("dense_bytes", 0))}
        if self.kind == "none":
            return {"steps": 0, "payload_bytes": 0, "dense_bytes": 0}
        payload = self.state.payload_bytes if self.state.bytes_per_element is not None else None
        return {"steps": self.state.steps, "payload_bytes": payload, "dense_bytes": self.state.dense_bytes}

    def state_dict(self):
        if self.kind == "none":
            return {}
        if self.kind == "sparse":
            return {"sparse": _sparse_plain_state(self.state)}
        counters = {"steps": self.state.steps, "payload_bytes": self.state.payload_bytes,
                    "dense_bytes": self.state.dense_bytes}
        out = {"counters": counters}
        if self.kind == "powersgd":
            out["powersgd"] = _powersgd_plain_state(self.state.inner)
        return out

    def load_state_dict(self, data):
        if self.kind == "none" or not data:
            return
        if self.kind == "sparse":
            _load_sparse_state(self.state, data["sparse"])
            return
        for key, value in data["counters"].items():
            setattr(self.state, key, int(value))
        if self.kind == "powersgd" and "powersgd" in data:
            _load_powersgd_state(self.state.inner, data["powersgd"])


def _half_bytes(_buf):
    return 2


def _same_bytes(buf):
    return buf.element_size()


def build_comm(ddp_model, name, *, agreement="local", powersgd_rank=1, powersgd_start_iter=2,
               optimizer=None, overlap_forward=False):
    """Register hook ``name`` on ``ddp_model`` (None: single process, nothing to register).

    optimizer: step it inside the hook, bucket by bucket (approxdist's optimizer_wrapper),
    or, with overlap_forward, in the next forward, which then overlaps the transfer
    (approxdist's forward_overlap; the hook gets a process group of its own)."""
    import torch.distributed as dist

    import approxdist.distributed as add

    if ddp_model is None:
        return Comm(name, None, "none")
    if overlap_forward and (optimizer is None or name == "powersgd"):
        raise ValueError("overlap_forward needs an optimizer and a hook other than powersgd (PowerSGD "
                         "issues its second all-reduce from a callback)")

    def wrap(hook):
        if optimizer is None:
            return hook
        if overlap_forward:
            return add.forward_overlap(ddp_model, hook, optimizer)
        return add.optimizer_wrapper(hook, optimizer)

    if name in SPARSE_HOOKS:
        state = add.SparseAllReduceState(agreement=agreement)
        state = add.register(ddp_model, state, optimizer=optimizer, overlap_forward=overlap_forward,
                             compress=name.partition("-")[2] or None) or state
        return Comm(name, state, "sparse")
    if name == "powersgd":
        inner = psgd.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=powersgd_rank,
            start_powerSGD_iter=powersgd_start_iter,
            min_compression_rate=2,
            random_seed=0,
        )
        state = _Counting(inner, None)
        ddp_model.register_comm_hook(state, wrap(_counted(psgd.powerSGD_hook)))
        return Comm(name, state, "powersgd")
    hooks = {
        "allreduce": (default_hooks.allreduce_hook, _same_bytes),
        "fp16": (default_hooks.fp16_compress_hook, _half_bytes),
        "bf16": (default_hooks.bf16_compress_hook, _half_bytes),
    }
    if name not in hooks:
        raise ValueError(f"comm hook must be one of {', '.join(SPARSE_HOOKS)}, powersgd, "
                         f"{', '.join(hooks)}; got {name!r}")
    hook, size = hooks[name]
    group = dist.new_group() if overlap_forward else None  # None: the default process group
    state = _Counting(group, size)
    ddp_model.register_comm_hook(state, wrap(_counted(hook)))
    return Comm(name, state, name)


def _sparse_plain_state(state):
    """SparseAllReduceState's state_dict is plain data (no group, no parameter ids), so it
    loads with weights_only=True; fall back to its counters for states without one."""
    if hasattr(state, "state_dict"):
        return {"state_dict": to_plain(state.state_dict())}
    return {"stats": to_plain(dict(state.stats))}


def _load_sparse_state(state, data):
    if "state_dict" in data and hasattr(state, "load_state_dict"):
        state.load_state_dict(dict(data["state_dict"]))
        return
    for key in ("steps", "payload_bytes", "dense_bytes"):
        if key in data.get("stats", {}) and hasattr(state, key):
            setattr(state, key, data["stats"][key])


def _powersgd_plain_state(state):
    """PowerSGD's step counter and random state, not its error-feedback and warm-start
    memories: those are flat tensors in the layout of a DDP bucket, and a fresh DDP (every
    resumed or restarted process) reduces its first step in construction order and then
    rebuilds its buckets in gradient-ready order. Put back, they would add one layout's
    residuals to another layout's gradients. A resumed PowerSGD run therefore restarts its
    error feedback from zero, as PowerSGD itself does at its first compressed step: it
    continues correctly but not bit for bit (the other hooks are stateless or fully saved)."""
    kind, keys, pos, has_gauss, cached = state.rng.get_state()
    return {"iter": int(state.iter), "total_numel_before_compression": int(state.total_numel_before_compression),
            "total_numel_after_compression": int(state.total_numel_after_compression),
            "rng": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}


def _load_powersgd_state(state, data):
    state.iter = int(data["iter"])
    state.total_numel_before_compression = int(data["total_numel_before_compression"])
    state.total_numel_after_compression = int(data["total_numel_after_compression"])
    kind, keys, pos, has_gauss, cached = data["rng"]
    state.rng.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


__all__ = ["Comm", "build_comm", "SPARSE_HOOKS"]
