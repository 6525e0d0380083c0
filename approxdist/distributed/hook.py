"""The sparse all-reduce DDP communication hook.

In forward-sampling mode the weight gradient of a weight-sampled layer is exactly zero
outside its selected input channels, on every rank, and every rank selected the same
channels. So all-reducing only the selected slices gives the dense all-reduce's result:
the hook packs them (and every dense gradient of the bucket) into one flat buffer,
launches a single all_reduce in the hook body, and scatters the result back. No index
is ever sent.
"""
import time

import torch
import torch.distributed as dist

from .. import kernels
from ..nn import pop_touched_of, sampled_layers_of, touched_count_of
from .agreement import check_indices, check_payload_sizes, install_broadcast, outside_digest
from .buckets import sampling_views
from .compress import compress_wrapper
from .forward_overlap import EAGER_FRACTION, forward_overlap
from .futures import then
from .overlap import optimizer_wrapper
from .payload import with_payload
from .state import SparseAllReduceState


def _selection(state, group, params, views):
    """(indices per parameter, sampled layers, their indices, their positions in the
    bucket): one layer per sampled weight, with the union of the channels of every layer
    holding it."""
    indices, layers, layer_idx, where = [], [], [], []
    for i, (p, view) in enumerate(zip(params, views)):
        holders = sampled_layers_of(p)
        if not holders:
            indices.append(None)
            continue
        idx = pop_touched_of(p)
        if state.agreement == "broadcast":
            for layer in holders:
                if id(layer) not in state._synced_layers:
                    # Registered without register(): this step's forward ran
                    # unsynchronised, so reduce this weight densely once; later forwards
                    # follow rank 0.
                    install_broadcast(layer, group)
                    state._synced_layers.add(id(layer))
                    idx = None
        indices.append(idx if view.dim() == p.dim() else None)  # a flat piece goes whole
        layers.append(holders[0])
        layer_idx.append(idx)
        where.append(i)
    return indices, layers, layer_idx, where


def _check_step_sizes(state, group, device):
    """Compare every sampled weight's payload size across ranks once per step, at the
    step's first bucket. A blocking collective there waits for nothing:
    later in the step it would queue behind the buckets already in flight and hold
    backward until their transfer ends. The channels are counted without being reset
    (each bucket still takes its own)."""
    if state._sizes_step == state.steps:
        return
    state._sizes_step = state.steps
    names, sizes = [], []
    for name, weight in state.step_weights:
        names.append(name)
        sizes.append(touched_count_of(weight) * (weight.numel() // weight.shape[1]))
    check_payload_sizes(state, group, sizes + [sum(sizes)], names, device, scope="step")


def _learn_step_weights(state, layers, names, last):
    """A hook registered without register() compares the payload sizes before every
    bucket in the first step: a blocking collective that queues behind the buckets in
    flight and holds backward until their transfer ends. It learns the model's sampled
    weights meanwhile, and from the second step on compares them once per step, as
    register() sets up."""
    seen = state._seen_weights
    for layer, name in zip(layers, names):
        seen.setdefault(id(layer.weight), (name, layer.weight))
    if last and seen:
        state.step_weights = tuple(seen.values())
        state._seen_weights = {}


def sparse_allreduce_hook(state: SparseAllReduceState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average the bucket's gradients across ranks, sending only the sampled slices.

    Register with ``ddp.register_comm_hook(state, sparse_allreduce_hook)`` or
    ``approxdist.distributed.register(ddp)``. Works on NCCL and gloo, with several
    buckets: the one collective is issued here, never from a callback.
    """
    sent, group, finish = sparse_payload(state, bucket)
    fut = dist.all_reduce(sent, group=group, async_op=True).get_future()
    return then(fut, lambda f: finish(f.value()[0]))


def sparse_payload(state: SparseAllReduceState, bucket: dist.GradBucket):
    """The sparse hook's work but the collective: (payload, group, finish). payload is
    the flat tensor to sum across ranks in `group` (already divided by the world size),
    finish(summed payload) scatters it back and returns the reduced bucket buffer.
    forward_overlap uses it to launch one bucket's payload in two collectives."""
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    buffer = bucket.buffer()
    if buffer.is_sparse or buffer.layout != torch.strided:
        raise TypeError("approxdist: sparse gradients are not supported by sparse_allreduce_hook "
                        "(use dense gradients, e.g. nn.Embedding(sparse=False))")
    params = bucket.parameters()
    views = sampling_views(buffer, params)
    checking = state.agreement == "check" and state.steps % state.check_every == 0
    if state.step_weights and not checking:
        _check_step_sizes(state, group, buffer.device)  # (before _selection resets channels)
    indices, layers, layer_idx, where = _selection(state, group, params, views)
    # The views and indices are the hook's own, so packed_numel's structural checks
    # (~0.4 ms for a resnet50 bucket) are skipped; pack checks the size against its plan.
    pieces = kernels.reference.slice_numels(views, indices)
    names = [state.param_names.get(id(layer.weight), f"{type(layer).__name__}{tuple(layer.weight.shape)}")
             for layer in layers]
    if layers:
        # Ranks that selected different channels would hand all_reduce tensors of other
        # sizes (gloo aborts, NCCL hangs or misreads): compare first, raise naming the layer.
        if checking:
            check_indices(state, group, layers, layer_idx, names,  # the digests hold the counts
                          outside=[outside_digest(views[i], indices[i]) for i in where])
        elif not state.step_weights:  # registered without register(): per bucket
            sizes = [pieces[i] for i in where] + [sum(pieces)]
            check_payload_sizes(state, group, sizes, names, buffer.device)

    if not state.step_weights:
        _learn_step_weights(state, layers, names, bucket.is_last())
    state.buckets += 1
    state.dense_bytes += buffer.numel() * buffer.element_size()

    dense = all(idx is None for idx in indices)
    if dense:
        buffer.div_(world)
        sent = buffer
    else:
        t0 = time.perf_counter()
        out = state.packed_buffer(params, sum(pieces), buffer.dtype, buffer.device)
        sent = kernels.pack(views, indices, out, validate=False, divisor=world)
        state.pack_seconds += time.perf_counter() - t0
    if bucket.is_last():  # every bucket of the step has taken its buffer by now
        state.release_unused_buffers()
        state.steps += 1
    state.payload_bytes += sent.numel() * sent.element_size()
    if dense:
        return sent, group, lambda summed: summed

    def scatter(summed):
        t1 = time.perf_counter()
        kernels.unpack(summed, views, indices, validate=False)
        state.unpack_seconds += time.perf_counter() - t1
        return buffer

    return sent, group, scatter


with_payload(sparse_allreduce_hook, sparse_payload)


def register(ddp_model, state=None, *, optimizer=None, overlap_forward=False,
             eager_fraction=EAGER_FRACTION, compress=None):
    """Register the sparse hook on a DistributedDataParallel model; returns its state.

    Also records the sampled layers' names (for error messages) and, for agreement='broadcast',
    makes every weight-sampled layer follow rank 0's selection from the first step.

    optimizer: a torch.optim optimizer over the model's parameters to step inside the
    hook, bucket by bucket, as soon as each bucket is reduced (overlap.optimizer_wrapper):
    the step then overlaps the transfer of later buckets, and the sampled layers gather
    their next forward's weights there too. Keep calling ``optimizer.step()`` after
    backward: it steps only what no bucket stepped. Not with gradient clipping by the
    global norm, a GradScaler, or find_unused_parameters=True.

    overlap_forward (needs optimizer): backward returns once every collective is
    launched and the next forward overlaps the transfer, each module waiting only for
    its own parameters' bucket (forward_overlap.forward_overlap; eager_fraction is its
    launch plan). The hook gets a process group of its own unless `state` names one,
    so DDP's buffer broadcast does not queue behind the transfer. After backward the
    parameters' .grad hold zeros.

    compress: None, "fp16" or "bf16": the sampled slices travel in that type
    (compress.compress_wrapper: a sixth of the dense float32 bytes at sample_ratio 0.33,
    rounded as torch's fp16 hook rounds)."""
    from ..nn import WeightSampled

    # (first: compress_wrapper refuses a bad `compress` before anything is changed)
    hook = sparse_allreduce_hook if compress is None else compress_wrapper(sparse_allreduce_hook, compress)
    state = state if state is not None else SparseAllReduceState()
    module = ddp_model.module
    state.param_names = {id(m.weight): name for name, m in module.named_modules()
                         if isinstance(m, WeightSampled)}
    weights = {id(m.weight): (name, m.weight) for name, m in module.named_modules()
               if isinstance(m, WeightSampled)}
    state.step_weights = tuple(weights.values())
    if state.agreement == "broadcast":
        group = state.process_group if state.process_group is not None else dist.group.WORLD
        for m in module.modules():
            if isinstance(m, WeightSampled):
                install_broadcast(m, group)
                state._synced_layers.add(id(m))
    if overlap_forward:
        if optimizer is None:
            raise ValueError("overlap_forward: needs optimizer= (the forward steps each bucket)")
        if state.process_group is None:
            state.process_group = dist.new_group(backend=dist.get_backend(ddp_model.process_group))
        hook = forward_overlap(ddp_model, hook, optimizer, eager_fraction=eager_fraction)
    elif optimizer is not None:
        if getattr(ddp_model, "find_unused_parameters", False):
            raise ValueError("optimizer: the in-hook step needs find_unused_parameters=False (DDP "
                             "leaves an unused parameter's gradient None, the bucket holds zeros)")
        hook = optimizer_wrapper(hook, optimizer)
    ddp_model.register_comm_hook(state, hook)
    return state
