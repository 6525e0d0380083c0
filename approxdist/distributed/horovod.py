"""The sparse reduction for Horovod users: a drop-in for `hvd.DistributedOptimizer`.

Horovod reduces each gradient as soon as autograd has accumulated it. This optimizer
keeps that overlap but reduces *buckets* instead: parameters are grouped once, at
construction, in reverse registration order (the order backward produces them), so every
rank forms the same buckets without negotiation. When the last gradient of a bucket is
ready, the selected input channels of every sampled weight plus every dense gradient are
packed with `approxdist.kernels.pack` into one flat buffer, averaged with
`hvd.allreduce_async_` and scattered back in `synchronize()`. As in the DDP hook the
gradient of an unselected channel is zero on every rank, so the result equals Horovod's
own dense reduction of the same gradients, and no index is sent.

Horovod is imported only when an optimizer is built, so `import approxdist` never needs
it; without it `DistributedOptimizer` raises an ImportError that says how to install it.
"""
import itertools
import time
import warnings
from contextlib import contextmanager

import torch

from .. import kernels
from ..nn import pop_touched_of, sampled_layer_of
from .agreement import IndexMismatchError, PayloadSizeError, index_digest
from .state import SparseAllReduceState

__all__ = ["DistributedOptimizer", "INSTALL_HINT", "load_horovod"]

INSTALL_HINT = (
    "approxdist.horovod needs Horovod with its PyTorch extension (horovod.torch). Install it "
    "with `make horovod` (tools/build_horovod.sh: Open MPI from apt, then Horovod 0.28.1 built "
    "against the installed torch; rerun it whenever torch changes). See docs/horovod.md.")

_AGREEMENTS = ("local", "check")
_instances = itertools.count()  # numbers optimizers identically on every rank: collective names


def load_horovod():
    """horovod.torch, or an ImportError that says how to install it (Horovod is optional:
    nothing imports it before a Horovod run asks for it)."""
    try:
        import horovod.torch as hvd
    except Exception as exc:  # ImportError, or an extension built against another torch
        raise ImportError(f"{INSTALL_HINT} (importing horovod.torch failed: {exc})") from exc
    return hvd


class _Bucket:
    """Parameters reduced by one collective. `ready` counts gradients handed over this step."""

    __slots__ = ("name", "params", "ready", "handle", "flat", "ctx", "indices")

    def __init__(self, name, params):
        self.name = name
        self.params = params
        self.reset()

    def reset(self):
        self.ready = 0
        self.handle = self.flat = self.ctx = self.indices = None


def _plan_buckets(params, cap_bytes, prefix):
    """Group parameters (given in registration order) into buckets of at most `cap_bytes`
    of dense gradient, one dtype and device per bucket, last parameters first: backward
    finishes them first, so the first bucket can be sent while backward still runs."""
    open_buckets, done = {}, []
    for p in reversed(params):
        key = (p.dtype, p.device)
        params_, size = open_buckets.get(key, ([], 0))
        params_.append(p)
        size += p.numel() * p.element_size()
        if size >= cap_bytes:
            done.append(params_)
            open_buckets.pop(key, None)
        else:
            open_buckets[key] = (params_, size)
    done.extend(params_ for params_, _ in open_buckets.values())
    return [_Bucket(f"{prefix}.bucket{i}", ps) for i, ps in enumerate(done)]


class _SparseDistributedOptimizer(torch.optim.Optimizer):
    """Mixed into the wrapped optimizer's class, like Horovod's own `_DistributedOptimizer`:
    `step()` synchronizes first, so existing training loops need no change."""

    def __init__(self, params, defaults, named_parameters, compression, backward_passes_per_step,
                 op, gradient_predivide_factor, process_set, bucket_cap_mb, agreement, check_every):
        super(self.__class__, self).__init__(params)
        self.defaults = defaults  # the base __init__ filled in its class defaults
        hvd = load_horovod()
        self._ad_hvd = hvd
        self._ad_compression = compression
        self._ad_op = op
        self._ad_predivide = gradient_predivide_factor
        self._ad_process_set = process_set
        self._ad_state = SparseAllReduceState(agreement=agreement, check_every=check_every)

        params = [p for group in self.param_groups for p in group["params"]]
        # Horovod's collectives (broadcast_parameters too) need contiguous tensors; the
        # sampled layers' default input-major weight layout is made contiguous here
        # (same values and Parameter objects).
        with torch.no_grad():
            for p in params:
                if not p.is_contiguous():
                    p.data = p.data.contiguous()
        params_in_order = [p for p in params if p.requires_grad]
        self._ad_state.param_names = {id(p): name for name, p in named_parameters}
        prefix = f"approxdist.opt{next(_instances)}"
        self._ad_buckets = _plan_buckets(params_in_order, bucket_cap_mb * 2 ** 20, prefix)
        self._ad_bucket_of = {p: b for b in self._ad_buckets for p in b.params}
        self.backward_passes_per_step = backward_passes_per_step
        self._ad_delay = {p: backward_passes_per_step for p in params_in_order}
        self._ad_synchronized = False
        self._ad_should_synchronize = True
        self._ad_hooks = []
        if process_set.included():
            for p in params_in_order:
                self._ad_hooks.append(p.register_post_accumulate_grad_hook(self._ad_make_hook()))

    # -- gradient hooks: hand each bucket to Horovod once its last gradient is ready ----------
    def _ad_make_hook(self):
        def hook(p):
            if self._ad_delay[p] <= 0:
                raise AssertionError(
                    "Gradients were computed more than backward_passes_per_step times before "
                    "step()/synchronize(). Increase backward_passes_per_step to accumulate "
                    "gradients locally.")
            self._ad_delay[p] -= 1
            if self._ad_delay[p] == 0:
                bucket = self._ad_bucket_of[p]
                bucket.ready += 1
                if bucket.ready == len(bucket.params):
                    self._ad_launch(bucket)
        return hook

    def _ad_launch(self, bucket):
        hvd, state = self._ad_hvd, self._ad_state
        grads, indices, layers = [], [], []
        for p in bucket.params:
            if p.grad is None:
                # Another rank may have used this parameter (a dynamic graph): send zeros,
                # as Horovod does, so the collective still matches.
                p.grad = torch.zeros_like(p)
            if p.grad.is_sparse or p.grad.layout != torch.strided:
                raise TypeError("approxdist.horovod: sparse gradients are not supported "
                                "(use dense gradients, e.g. nn.Embedding(sparse=False))")
            layer = sampled_layer_of(p)  # one of them where layers share p (tied weights)
            idx = pop_touched_of(p)  # the union of every use's channels
            if layer is not None:
                layers.append((layer, idx))
            grads.append(p.grad)
            indices.append(idx)
        if state.agreement == "check" and layers and state.steps % state.check_every == 0:
            self._ad_check(bucket, layers)

        t0 = time.perf_counter()
        if len(grads) == 1 and indices[0] is None and grads[0].is_contiguous():
            flat, indices = grads[0].view(-1), None  # nothing to gather: reduce in place
        else:
            flat = kernels.pack(grads, indices, validate=False)
        state.pack_seconds += time.perf_counter() - t0
        compressed, ctx = self._ad_compression.compress(flat)
        state.payload_bytes += compressed.numel() * compressed.element_size()
        state.dense_bytes += sum(g.numel() * g.element_size() for g in grads)
        state.buckets += 1
        if self._ad_op == hvd.Average:
            # Horovod applies the remaining 1/size after the sum, as its own optimizer does.
            prescale, postscale = 1.0 / self._ad_predivide, self._ad_predivide
        else:
            prescale = postscale = 1.0
        bucket.handle = hvd.allreduce_async_(compressed, name=bucket.name, op=self._ad_op,
                                             prescale_factor=prescale, postscale_factor=postscale,
                                             process_set=self._ad_process_set)
        bucket.flat, bucket.ctx, bucket.indices = flat, ctx, indices

    def _ad_check(self, bucket, layers):
        """Compare digests of this bucket's selections across ranks (one MAX all-reduce of
        [d, -d]: max == -max(-d) means every rank holds d); raise naming the first layer
        whose selection differs."""
        hvd, state = self._ad_hvd, self._ad_state
        digests = torch.stack([index_digest(idx, layer.weight.shape[1]) for layer, idx in layers])
        both = hvd.allreduce(torch.cat([digests, -digests]), name=f"{bucket.name}.check", op=hvd.Max,
                             process_set=self._ad_process_set)
        state.checks += 1
        hi, neg_lo = both[: len(layers)], both[len(layers):]
        for row, (layer, _) in enumerate(layers):
            if not torch.equal(hi[row], -neg_lo[row]):
                name = state.param_names.get(id(layer.weight), type(layer).__name__)
                raise IndexMismatchError(
                    f"approxdist: ranks selected different channels for {name!r} at step "
                    f"{state.steps} (local digest {digests[row].tolist()}); the weights have "
                    "diverged across ranks (broadcast them with hvd.broadcast_parameters).")

    # -- Horovod's optimizer contract ----------------------------------------------------------
    def synchronize(self):
        """Finish every reduction of this step: send the buckets whose gradients never all
        arrived (unused parameters), wait, and write the averages into the gradients."""
        if not self._ad_process_set.included():
            self._ad_synchronized = True
            return
        for bucket in self._ad_buckets:
            if bucket.handle is None:
                self._ad_launch(bucket)
        t_unpack = 0.0
        for bucket in self._ad_buckets:
            output = self._ad_synchronize(bucket)
            reduced = self._ad_compression.decompress(output, bucket.ctx)
            t0 = time.perf_counter()
            if bucket.indices is None:  # reduced in place in the gradient itself
                if reduced.data_ptr() != bucket.flat.data_ptr():
                    bucket.flat.copy_(reduced)
            else:
                kernels.unpack(reduced, [p.grad for p in bucket.params], bucket.indices, validate=False)
            t_unpack += time.perf_counter() - t0
            bucket.reset()
        for p in self._ad_delay:
            self._ad_delay[p] = self.backward_passes_per_step
        self._ad_state.unpack_seconds += t_unpack
        self._ad_state.steps += 1
        self._ad_synchronized = True

    def _ad_synchronize(self, bucket):
        """hvd.synchronize(bucket.handle). Horovod compares the shapes across ranks itself
        and fails every rank cleanly; the error is re-raised naming the bucket's sampled
        weights, whose selections are what differ."""
        try:
            return self._ad_hvd.synchronize(bucket.handle)
        except Exception as exc:
            if "mismatched" not in str(exc).lower():
                raise
            state = self._ad_state
            here = [f"{state.param_names.get(id(p), tuple(p.shape))!r} ({idx.numel()} of {p.shape[1]} channels)"
                    for p, idx in zip(bucket.params, bucket.indices or []) if idx is not None]
            raise PayloadSizeError(
                f"approxdist.horovod: the sparse payload of a bucket differs across ranks at step "
                f"{state.steps} ({bucket.flat.numel()} elements here; its sampled weights here: "
                f"{', '.join(here) or 'none sampled'}): the ranks selected different channels (a "
                "training forward that recorded a gradient ran on some ranks only, or the weights "
                f"diverged). Horovod: {str(exc).splitlines()[0]}") from exc

    @contextmanager
    def skip_synchronize(self):
        """For `synchronize(); clip_grad_norm_(...); with skip_synchronize(): step()`."""
        self._ad_should_synchronize = False
        try:
            yield
        finally:
            self._ad_should_synchronize = True

    def step(self, closure=None):
        if self._ad_should_synchronize:
            if self._ad_synchronized:
                warnings.warn("optimizer.step() called without optimizer.skip_synchronize() after "
                              "optimizer.synchronize(): the gradients are reduced twice.")
            self.synchronize()
        self._ad_synchronized = False
        return super(self.__class__, self).step(closure)

    def zero_grad(self, set_to_none=True):
        if any(b.handle is not None for b in self._ad_buckets):
            raise AssertionError("optimizer.zero_grad() was called after loss.backward() but before "
                                 "optimizer.step() or optimizer.synchronize(): the reductions in "
                                 "flight would write into the cleared gradients.")
        return super(self.__class__, self).zero_grad(set_to_none=set_to_none)

    def set_backward_passes_per_step(self, passes):
        _check_passes(passes)
        self.backward_passes_per_step = passes
        for p in self._ad_delay:
            self._ad_delay[p] = passes

    def load_state_dict(self, state_dict):
        for bucket in self._ad_buckets:
            bucket.reset()
        self._ad_synchronized = False
        self._ad_should_synchronize = True
        for p in self._ad_delay:
            self._ad_delay[p] = self.backward_passes_per_step
        return super(self.__class__, self).load_state_dict(state_dict)

    @property
    def sparse_state(self):
        """The `SparseAllReduceState` holding this optimizer's counters (checkpoint it with
        its state_dict() to keep the byte counts across a restart)."""
        return self._ad_state

    @property
    def stats(self):
        """Same counters as the DDP hook's state: steps, payload_bytes (handed to Horovod),
        dense_bytes (what hvd.DistributedOptimizer would have sent), ratio, ..."""
        return self._ad_state.stats


def _check_passes(passes):
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise ValueError(f"backward_passes_per_step must be an integer >= 1, got {passes!r}")


def _named(optimizer, named_parameters):
    """(name, parameter) pairs for every optimized parameter, checked like Horovod does."""
    if named_parameters is None:
        return [(f"allreduce.noname.{i}.{j}", p) for i, group in enumerate(optimizer.param_groups)
                for j, p in enumerate(group["params"])]
    named = list(named_parameters)
    if any(not isinstance(item, tuple) or len(item) != 2 for item in named):
        raise ValueError("named_parameters must be a sequence of (name, parameter) tuples, "
                         "usually model.named_parameters()")
    names = [name for name, _ in named]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise ValueError(f"named_parameters has duplicate names: {', '.join(dups)}")
    known = {id(p) for _, p in named}
    unnamed = [p for group in optimizer.param_groups for p in group["params"] if id(p) not in known]
    if unnamed:
        raise ValueError(f"named_parameters misses {len(unnamed)} parameter(s) of the optimizer "
                         f"(shapes {[tuple(p.shape) for p in unnamed][:5]})")
    return named


def DistributedOptimizer(optimizer, named_parameters=None, compression=None,
                         backward_passes_per_step=1, op=None, gradient_predivide_factor=1.0,
                         process_set=None, *, bucket_cap_mb=25, agreement="local", check_every=100):
    """Wrap `optimizer` so `step()` first averages the gradients over Horovod's processes,
    sending only the sampled channels of approxdist's weight-sampled layers.

    Takes the arguments of `hvd.DistributedOptimizer` (op Average or Sum; not Adasum, whose
    result is not a linear function of the gradients, nor `groups`/`sparse_as_dense`) plus:
      bucket_cap_mb  dense gradient bytes per fused collective (DDP's default: 25);
      agreement      "local" (trust identical weights, the default) or "check" (every
                     `check_every` steps compare the selections across ranks, raise
                     `IndexMismatchError` on a divergence).
    Call `hvd.init()` first and broadcast the initial parameters and optimizer state with
    `hvd.broadcast_parameters` / `hvd.broadcast_optimizer_state`, as with Horovod's own.
    """
    hvd = load_horovod()
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    _check_passes(backward_passes_per_step)
    op = hvd.Average if op is None else op
    if op not in (hvd.Average, hvd.Sum):
        raise ValueError("op must be hvd.Average or hvd.Sum: the sparse reduction is lossless only "
                         f"for linear reductions, got {op!r}")
    if not isinstance(gradient_predivide_factor, (int, float)) or gradient_predivide_factor <= 0:
        raise ValueError(f"gradient_predivide_factor must be a positive number, got {gradient_predivide_factor!r}")
    if gradient_predivide_factor != 1.0 and op != hvd.Average:
        raise ValueError("gradient_predivide_factor needs op=hvd.Average")
    if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)) or bucket_cap_mb <= 0:
        raise ValueError(f"bucket_cap_mb must be a positive number, got {bucket_cap_mb!r}")
    if agreement not in _AGREEMENTS:
        raise ValueError(f"agreement must be one of {', '.join(map(repr, _AGREEMENTS))} with Horovod, "
                         f"got {agreement!r}")
    compression = hvd.Compression.none if compression is None else compression
    process_set = hvd.global_process_set if process_set is None else process_set
    named = _named(optimizer, named_parameters)
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,),
               dict(_SparseDistributedOptimizer.__dict__))
    return cls(optimizer.param_groups, optimizer.defaults, named, compression, backward_passes_per_step,
               op, gradient_predivide_factor, process_set, bucket_cap_mb, agreement, check_every)
