"""The optimizer step inside the comm hook, one bucket at a time.

DDP reduces the buckets during backward and waits for all of them at its end; the
optimizer step comes after that and cannot overlap the transfer. Stepping each
bucket's parameters as soon as its reduction completes moves the step into the time the
link is still busy with later buckets. PyTorch has a private form of this
(`_hook_then_optimizer`, functional optimizers only); it reads the reduced gradients
through `GradBucket.gradients()`, whose row-major views scramble the gradient of a
dim-1-major weight. Here the user's own `torch.optim` optimizer steps, on views in
DDP's layout (buckets.parameter_views).

After the step, the weight-sampled layers of the bucket select the channels of their
next forward and gather those weights (`WeightSampled.prepare_next`): work that the
forward, which no transfer overlaps, would otherwise do.

The user's `optimizer.step()` stays in the training loop. It steps only the parameters
that no bucket stepped since its last call: none after a synchronised backward, all of
them after a backward under `no_sync()`, and any parameter the optimizer holds that DDP
does not reduce. Every step is the optimizer's own code on the same gradients, so the
parameters equal those of the usual loop bit for bit.
"""
import threading

import torch

from ..nn import sampled_layers_of
from .buckets import parameter_views
from .futures import then

__all__ = ["optimizer_wrapper", "in_hook_steps"]


def _narrow(groups, keep):
    """Restrict every param group to the parameters keep(p) accepts; returns the full
    lists for _restore."""
    full = [g["params"] for g in groups]
    for g, ps in zip(groups, full):
        g["params"] = [p for p in ps if keep(p)]
    return full


def _restore(groups, full):
    for g, ps in zip(groups, full):
        g["params"] = ps


def _check_supported(optimizer) -> None:
    """Raise for optimizers whose step cannot be split by parameter."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError("optimizer: LBFGS needs a closure over all parameters at once; its step "
                         "cannot run bucket by bucket (do not pass it to the hook)")


def hyperparameters(groups) -> list:
    """Every param group's settings (all but its parameters), as the step would read them."""
    return [{k: v for k, v in g.items() if k != "params"} for g in groups]


_MISSING = object()


def _swap_hyperparameters(groups, hyper) -> list:
    """Set each group's settings to `hyper`'s; returns what _unswap_hyperparameters needs
    to put the old ones back."""
    old = []
    for g, h in zip(groups, hyper):
        old.append({k: g.get(k, _MISSING) for k in h})
        g.update(h)
    return old


def _unswap_hyperparameters(groups, old) -> None:
    for g, o in zip(groups, old):
        for k, v in o.items():
            if v is _MISSING:
                g.pop(k, None)
            else:
                g[k] = v


class BucketStepper:
    """Steps an optimizer on a subset of its parameters (one bucket) with given
    gradients, and makes the user's later `step()` skip what a bucket claimed.

    A bucket claims its parameters when it is stepped, or earlier (`claim`) when its
    step is deferred (distributed/forward_overlap.py); a second claim before the user's
    `step()` means a second synchronised backward, which raises."""

    def __init__(self, optimizer):
        _check_supported(optimizer)
        self.optimizer = optimizer
        self._lock = threading.Lock()  # gloo completes buckets on several threads
        self._in_bucket = False
        self._claimed = set()  # ids of parameters claimed by buckets since the user's last step()
        self._held = None  # the full parameter lists while the user's step() runs
        self.buckets = 0  # buckets stepped so far
        optimizer.register_step_pre_hook(self._before_user_step)
        optimizer.register_step_post_hook(self._after_user_step)

    def _owned(self, params) -> list:
        ids = {id(p) for p in params}
        return [p for g in self.optimizer.param_groups for p in g["params"] if id(p) in ids]

    def _claim(self, owned) -> None:
        twice = [p for p in owned if id(p) in self._claimed]
        if twice:
            raise RuntimeError(
                "approxdist: a second synchronised backward before optimizer.step(): the comm "
                "hook steps the optimizer after every reduction, so accumulate gradients under "
                "ddp.no_sync() and call optimizer.step() after each synchronised backward")
        self._claimed.update(id(p) for p in owned)

    def claim(self, params) -> None:
        """Mark params as stepped by a bucket (later, with step_bucket(claimed=True))."""
        with self._lock:
            self._claim(self._owned(params))

    def step_bucket(self, params, grads, *, claimed=False, hyper=None) -> None:
        """One optimizer step on `params` with `grads`. claimed: claim() already ran for
        them; hyper: the param groups' settings to step with (hyperparameters() taken
        earlier; None: the current ones)."""
        optimizer = self.optimizer
        with self._lock:
            owned = self._owned(params)
            if not owned:
                return
            if not claimed:
                self._claim(owned)
            ids = {id(p) for p in owned}
            grad_of = {id(p): g for p, g in zip(params, grads)}
            kept = [(p, p.grad) for p in owned]
            groups = optimizer.param_groups
            full = _narrow(groups, lambda p: id(p) in ids)
            old = _swap_hyperparameters(groups, hyper) if hyper is not None else None
            try:
                for p in owned:
                    p.grad = grad_of[id(p)]
                self._in_bucket = True
                optimizer.step()
            finally:
                self._in_bucket = False
                if old is not None:
                    _unswap_hyperparameters(groups, old)
                _restore(groups, full)
                for p, grad in kept:
                    p.grad = grad
            self.buckets += 1

    def step_reduced(self, params, value, *, claimed=False, hyper=None, prepare=False):
        """step_bucket with a hook future's value (the reduced bucket, or a list holding
        it) as the gradients of `params`; then (prepare=True) the bucket's weight-sampled
        layers prepare their next forward. Returns the reduced bucket."""
        reduced = value[0] if isinstance(value, (list, tuple)) else value
        grads = parameter_views(reduced, params)
        # A compressing wrapper (fp16_compress_wrapper) may leave the bucket in its own
        # dtype; DDP casts it into the gradients, and so does this step.
        grads = [g if g.dtype == p.dtype else g.to(p.dtype) for p, g in zip(params, grads)]
        self.step_bucket(params, grads, claimed=claimed, hyper=hyper)
        if prepare:
            for p in params:
                for layer in sampled_layers_of(p):
                    layer.prepare_next()
        return reduced

    def _before_user_step(self, optimizer, args, kwargs):
        if self._in_bucket or not self._claimed:
            return
        self._held = _narrow(optimizer.param_groups, lambda p: id(p) not in self._claimed)

    def _after_user_step(self, optimizer, args, kwargs):
        if self._in_bucket:
            return
        if self._held is not None:
            _restore(optimizer.param_groups, self._held)
            self._held = None
        self._claimed.clear()


def _stepper_of(optimizer) -> BucketStepper:
    stepper = getattr(optimizer, "_approxdist_stepper", None)
    if stepper is None:
        stepper = BucketStepper(optimizer)
        optimizer._approxdist_stepper = stepper
    return stepper


def in_hook_steps(optimizer) -> int:
    """How many buckets comm hooks have stepped `optimizer` on (0: never wrapped)."""
    stepper = getattr(optimizer, "_approxdist_stepper", None)
    return 0 if stepper is None else stepper.buckets


def optimizer_wrapper(hook, optimizer, *, prepare=True):
    """A comm hook that runs `hook`, then steps `optimizer` on the bucket's parameters
    with the reduced gradients, then (prepare=True) lets the bucket's weight-sampled
    layers prepare their next forward.

    Works around any hook whose future holds the reduced bucket (DDP's allreduce_hook,
    fp16_compress_hook, PowerSGD, sparse_allreduce_hook). Not for a loop that changes the
    gradients between backward and step (clipping by the global norm, a GradScaler) or
    a model with find_unused_parameters=True (DDP leaves an unused parameter's gradient
    None, the bucket holds zeros for it).
    """
    stepper = _stepper_of(optimizer)

    def hook_then_step(state, bucket):
        fut = hook(state, bucket)
        params = bucket.parameters()

        return then(fut, lambda f: stepper.step_reduced(params, f.value(), prepare=prepare))

    hook_then_step.__name__ = f"{getattr(hook, '__name__', 'hook')}_then_step"
    return hook_then_step
