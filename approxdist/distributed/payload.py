"""The payload protocol: a hook whose reduction is one sum of a flat tensor says so.

forward_overlap can split such a bucket between two collectives (a share launched during
backward, the rest held for the next forward), and a benchmark can time the work around
the collective. Both need the hook's work *but* the collective, which a plain
`(state, bucket) -> Future` hook does not expose. A hook that can offer it carries a
`Payload` function (`with_payload`); `payload_of` finds it, also for torch's own
allreduce and fp16 hooks, whose payload form is known here.

A payload function returns `(payload, group, finish)`: `payload` is the flat tensor to sum
across the ranks of `group` (already divided by their number), `finish(summed)` turns the
summed payload into the reduced bucket buffer (scattering it back, casting it back).
"""
from typing import Any, Callable, Optional, Protocol, Tuple, runtime_checkable

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

__all__ = ["Payload", "PayloadHook", "payload_of", "with_payload"]

Finish = Callable[[torch.Tensor], torch.Tensor]


class Payload(Protocol):
    """`(state, bucket) -> (payload, group, finish)`: a hook's work but the collective."""

    def __call__(self, state: Any, bucket: dist.GradBucket) -> Tuple[torch.Tensor, Any, Finish]:
        ...


@runtime_checkable
class PayloadHook(Protocol):
    """A DDP comm hook that also offers its `Payload` form (see `with_payload`)."""

    payload: Payload

    def __call__(self, state: Any, bucket: dist.GradBucket) -> torch.futures.Future:
        ...


def with_payload(hook: Callable, payload: Payload) -> PayloadHook:
    """Attach `payload` to `hook` (returns `hook`): the one place the protocol is set, so
    a wrapper that keeps a hook's reduction a flat sum passes the form on explicitly."""
    hook.payload = payload
    return hook


def _group_of(state):
    return state if isinstance(state, dist.ProcessGroup) else dist.group.WORLD


def _allreduce_payload(state, bucket):
    """torch's allreduce_hook as (payload, group, finish); state: its process group."""
    group = _group_of(state)
    return bucket.buffer().div_(group.size()), group, lambda summed: summed


def _fp16_payload(state, bucket):
    """torch's fp16_compress_hook as (payload, group, finish)."""
    group = _group_of(state)
    buffer = bucket.buffer()
    compressed = buffer.to(torch.float16).div_(group.size())

    def decompress(summed):
        buffer.copy_(summed)
        return buffer

    return compressed, group, decompress


def payload_of(hook: Callable) -> Optional[Payload]:
    """hook's `Payload` form when its reduction is one sum of a flat tensor: the one it
    carries (approxdist's sparse hook, or a wrapper passing it on), or that of torch's
    allreduce_hook and fp16_compress_hook; None for other hooks."""
    if isinstance(hook, PayloadHook):
        return hook.payload
    known = {default_hooks.allreduce_hook: _allreduce_payload,
             default_hooks.fp16_compress_hook: _fp16_payload}
    return known.get(hook)
