"""The next forward overlapping this step's transfer.

Under DDP a step's forward starts only after the last bucket of the previous step is
reduced: on a slow link the transfer and the forward add up. Here backward returns as
soon as every bucket's reduction is launched, and each module waits, in a forward
pre-hook, only for the bucket that holds its own parameters, which the optimizer then
steps (overlap.BucketStepper, on the main thread). The rest of the transfer overlaps
the forward.

The order of the collectives decides how much: the forward needs the first layers'
parameters first, which DDP reduces last. So a step launches the first buckets as DDP
hands them over (the deep layers, "eager"; they keep the link busy during backward),
holds the others, and launches those at the last bucket in reverse order: the first
layers' bucket first. The eager share is exact: the bucket that crosses it is split in
two collectives, one launched as DDP hands the bucket over and one held, for hooks whose
reduction is one sum of a flat tensor (payload_of: approxdist's sparse hook, torch's
allreduce and fp16 hooks). It keeps the link busy for as long as the backward runs
without moving a whole deep bucket ahead of the held ones. The plan depends only on the
bucket sizes (this step's, and the previous step's total), so every rank issues the
same collectives in the same order.

The last held collective is launched only once the one before it is in: gloo runs two
collectives at a time, and launched together the two would share the link and both end
with the transfer, leaving the forward of both their layers after the last byte. Held
back, the one before arrives first and its layers run forward while the last one is on
the wire. It is launched from the main thread (a module's forward pre-hook, or a wait
for the one before it), never from a callback, so every rank still issues the same
collectives in the same order.

The parameters equal those of the usual loop bit for bit: the same reductions, the same
optimizer steps, with the settings (learning rate, ...) of the user's `optimizer.step()`
call that follows the backward. One exception: on three or more ranks a split bucket's
sums may differ in the last bit, since a collective's summation order depends on the
length of the tensor (as it does on DDP's bucket size). What changes: after backward a
parameter's .grad holds zeros (DDP copies the hook's placeholder result), and a
parameter is updated only when its module runs forward next, when `finish_steps` is
called, or when a state_dict is taken.
"""
import weakref

import torch
import torch.distributed as dist

from .futures import then
from .overlap import _stepper_of, hyperparameters
from .payload import payload_of

__all__ = ["forward_overlap", "finish_steps", "EAGER_FRACTION"]

EAGER_FRACTION = 0.3  # the default share of elements launched during backward
# A piece of a split bucket is at least this share of the bucket's payload; a bucket
# that would give a smaller one goes whole, eager.
MIN_PIECE = 0.05


def _summed(collected, payload):
    """payload, once both its collectives are done: waiting on each (done already)
    makes the current CUDA stream wait for it, which the collected future alone does
    not (NCCL; a no-op on gloo)."""
    for part in collected.value():
        part.wait()
    return payload


class _Reduction:
    """One bucket of the last synchronised backward: its collective and deferred step."""
    __slots__ = ("params", "future", "hyper")

    def __init__(self, params):
        self.params = params
        self.future = None  # None while the bucket is held back
        self.hyper = None  # the settings of the user's step() after this backward


class _Finisher:
    """A module hook that waits for and steps the module's own pending buckets (all
    pending buckets: whole=True). It holds its ForwardOverlap weakly, and a copy or a
    pickle of the module gets an inert one: a deep-copied model (an EMA copy, say) does
    not drag the live reductions along."""

    def __init__(self, overlap=None, whole=False):
        self._overlap = weakref.ref(overlap) if overlap is not None else None
        self._whole = whole

    def __call__(self, module, *args, **kwargs):
        overlap = self._overlap() if self._overlap is not None else None
        if overlap is not None and overlap.open:
            overlap.finish(None if self._whole else module.parameters(recurse=False))

    def __reduce__(self):
        return (_Finisher, ())


class ForwardOverlap:
    def __init__(self, ddp, hook, optimizer, eager_fraction):
        if getattr(ddp, "gradient_as_bucket_view", False):
            raise ValueError("ddp: forward overlap needs gradient_as_bucket_view=False (the "
                             "gradients would be views of buckets still being reduced)")
        if getattr(ddp, "find_unused_parameters", False):
            raise ValueError("ddp: forward overlap needs find_unused_parameters=False (DDP leaves "
                             "an unused parameter's gradient None, the bucket holds zeros)")
        if not 0 < eager_fraction <= 1:
            raise ValueError(f"eager_fraction must be in (0, 1], got {eager_fraction!r}")
        self.hook = hook
        self.payload = payload_of(hook)
        self.stepper = _stepper_of(optimizer)
        self.eager_fraction = eager_fraction
        self.pending = {}  # id(parameter) -> its bucket's _Reduction, until stepped
        self.open = set()  # the _Reductions not stepped yet
        self.held = []  # (reduction, launch) launched at the step's last bucket, in reverse
        self.deferred = None  # (reduction, launch, the reduction launched before it)
        self.total = None  # bucket elements of the previous synchronised backward
        self._seen = 0  # of this one, so far
        self._zeros = {}  # (numel, dtype, device) -> the placeholder result DDP copies
        self.handles = [optimizer.register_step_pre_hook(self._before_user_step)]
        if hasattr(optimizer, "register_state_dict_pre_hook"):
            self.handles.append(optimizer.register_state_dict_pre_hook(lambda opt: self.finish()))
            self.handles.append(optimizer.register_load_state_dict_pre_hook(
                lambda opt, state: self.finish()))
        own, whole = _Finisher(self), _Finisher(self, whole=True)
        for module in ddp.module.modules():
            if next(module.parameters(recurse=False), None) is None:
                continue
            self.handles.append(module.register_forward_pre_hook(own))
            if hasattr(module, "register_state_dict_pre_hook"):
                self.handles.append(module.register_state_dict_pre_hook(own))
        load_hook = getattr(ddp.module, "register_load_state_dict_pre_hook", None)
        if load_hook is not None:
            self.handles.append(load_hook(whole))
        # Parameters no module's pre-hook covers (used outside their module's forward):
        # stepped when the forward ends, before anything can use their gradients.
        self.handles.append(ddp.register_forward_hook(whole))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def __call__(self, state, bucket):
        if bucket.index() == 0:
            self.finish()  # a backward with no forward since the last one
            self._seen = 0
        params = bucket.parameters()
        self.stepper.claim(params)
        reduction = _Reduction(params)
        self.open.add(reduction)
        for p in params:
            self.pending[id(p)] = reduction
        buffer = bucket.buffer()
        seen, self._seen = self._seen, self._seen + buffer.numel()
        if self.total is None:
            # The first synchronised backward (DDP may rebuild its buckets in the next
            # forward): reduce synchronously, and learn the bucket sizes for the plan.
            reduction.future = self.hook(state, bucket)
            zeros = self._placeholder(buffer)
            out = then(reduction.future, lambda f: zeros)
        else:
            # The first eager_fraction of the elements (of the previous step's total) go
            # out as DDP hands them over, the rest is held: the same plan on every rank,
            # whatever DDP's layout. A bucket straddling the boundary is split in two
            # collectives when the hook's payload allows (payload_of), else eager.
            budget = self.eager_fraction * self.total - seen
            share = budget / max(buffer.numel(), 1)
            if budget <= 0:
                self.held.append((reduction, lambda: self.hook(state, bucket)))
            elif share >= 1 - MIN_PIECE or self.payload is None or share < MIN_PIECE:
                reduction.future = self.hook(state, bucket)
            else:
                self._split(reduction, state, bucket, share)
            out = torch.futures.Future()
            out.set_result(self._placeholder(buffer))
        if bucket.is_last():
            launches = list(reversed(self.held))
            self.held = []
            if len(launches) >= 2:  # the last one goes once the one before it is in
                self.deferred = launches[-1] + (launches[-2][0],)
                launches = launches[:-1]
            for held, launch in launches:
                held.future = launch()
            self.total = self._seen
        return out

    def _release(self, force=False) -> None:
        """Launch the deferred last collective if the one before it is done (force: now)."""
        if self.deferred is None:
            return
        reduction, launch, before = self.deferred
        if force or before.future.done():
            self.deferred = None
            reduction.future = launch()

    def _split(self, reduction, state, bucket, share) -> None:
        """Launch the first `share` of the bucket's payload now and hold the rest."""
        payload, group, finish = self.payload(state, bucket)
        flat = payload.view(-1)
        cut = int(flat.numel() * share)
        head = dist.all_reduce(flat[:cut], group=group, async_op=True).get_future()

        def launch_tail():
            tail = dist.all_reduce(flat[cut:], group=group, async_op=True).get_future()
            return then(torch.futures.collect_all([head, tail]), lambda f: finish(_summed(f, payload)))

        self.held.append((reduction, launch_tail))

    def _placeholder(self, buffer):
        key = (buffer.numel(), buffer.dtype, buffer.device)
        zeros = self._zeros.get(key)
        if zeros is None:
            zeros = self._zeros[key] = torch.zeros_like(buffer)
        return zeros

    def _before_user_step(self, optimizer, args, kwargs):
        if self.stepper._in_bucket:
            return
        hyper = None
        for reduction in self.open:
            if reduction.hyper is None:
                hyper = hyper if hyper is not None else hyperparameters(optimizer.param_groups)
                reduction.hyper = hyper

    def finish(self, params=None) -> None:
        """Wait for the reductions of `params` (all pending ones: None) and step them;
        first step every bucket whose reduction has already completed, so that its step
        is not left for the end of the forward, and let its weight-sampled layers select
        and gather for their forward (WeightSampled.prepare_next) while this one waits."""
        if not self.open:
            return
        self._release()
        if params is None:
            needed = set(self.open)
        else:  # (a module's forward pre-hook: nothing to do once its bucket is stepped)
            needed = {self.pending[id(p)] for p in params if id(p) in self.pending}
            if not needed:
                return
        if self.deferred is not None:
            reduction, _, before = self.deferred
            if reduction in needed:
                self._release(force=True)
            elif before in needed:  # in as soon as it is: then the last one goes
                before.future.wait()
                self._release(force=True)
        for reduction in [r for r in self.open - needed if r.future is not None and r.future.done()]:
            self._finish(reduction, prepare=True)
        for reduction in needed:
            self._finish(reduction)

    def _finish(self, reduction, prepare=False) -> None:
        if reduction not in self.open:
            return
        if reduction.future is None:
            raise RuntimeError("approxdist: a bucket's reduction was never launched (did the "
                               "synchronised backward stop early?)")
        self.stepper.step_reduced(reduction.params, reduction.future.wait(), claimed=True,
                                  hyper=reduction.hyper, prepare=prepare)
        self.open.discard(reduction)
        for p in reduction.params:
            if self.pending.get(id(p)) is reduction:
                del self.pending[id(p)]


def forward_overlap(ddp, hook, optimizer, *, eager_fraction=EAGER_FRACTION):
    """A comm hook that lets the next forward overlap this step's transfer.

    Wraps `hook` (any hook whose future holds the reduced bucket: DDP's allreduce_hook,
    fp16_compress_hook, sparse_allreduce_hook) for `ddp`; register the result with
    ``ddp.register_comm_hook(state, ...)``. Backward returns once every collective is
    launched; each module's parameters are stepped by `optimizer` (with the settings of
    the `optimizer.step()` call after backward, which steps only what no bucket holds)
    when the module next runs forward. eager_fraction (0 < f <= 1, default 0.3): the
    share of the bucket elements launched as soon as DDP hands them over, deepest layers
    first (at least part of the first bucket); the rest is launched at the last bucket,
    first layers first. The bucket crossing the share goes in two collectives when the
    hook allows (a `payload` attribute, as approxdist's sparse hook has, or torch's
    allreduce_hook / fp16_compress_hook), else whole and eager. Enough to keep the link
    busy while backward runs on is best: on a slow link, where the transfer takes
    several times the backward, a small share (docs/benchmarks.md).

    After backward, DDP's parameters' .grad hold zeros: not for gradient clipping or a
    GradScaler. Not with gradient_as_bucket_view=True or find_unused_parameters=True.
    Give the hook its own process group (`dist.new_group()`), or DDP's buffer broadcast
    at the start of the forward waits behind the transfer. A parameter read outside its
    module's forward (logging, EMA) may not be updated yet: call finish_steps(ddp)
    first; state_dict() does."""
    old = getattr(ddp, "_approxdist_forward_overlap", None)
    if old is not None:
        old.remove()
    overlap = ForwardOverlap(ddp, hook, optimizer, eager_fraction)
    ddp._approxdist_forward_overlap = overlap

    def overlapped(state, bucket):
        return overlap(state, bucket)

    overlapped.__name__ = f"{getattr(hook, '__name__', 'hook')}_overlapped"
    return overlapped


def finish_steps(ddp) -> None:
    """Wait for every reduction forward_overlap left in flight and apply its step."""
    overlap = getattr(ddp, "_approxdist_forward_overlap", None)
    if overlap is not None:
        overlap.finish()
