"""The sparse all-reduce hook on real gloo process groups.

The central invariant: training with the sparse hook gives the same parameters as the
default all-reduce (bitwise on 2 ranks), while sending only the sampled slices."""
import copy
import functools

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

import approxdist as ad
from approxdist.nn import WeightSampled
from distharness import RankError, run_ranks
from models import analytic_bytes, batch_for, make_model


class ByteCounter:
    """Counts what goes through torch.distributed.all_reduce, independently of the hook:
    gradient payloads (floating point) in `bytes`, the integer size and index checks in
    `check_bytes`."""

    def __init__(self):
        self.bytes, self.check_bytes, self.calls, self._orig = 0, 0, 0, None

    def __enter__(self):
        self._orig = dist.all_reduce

        def counting(tensor, *args, **kwargs):
            if tensor.is_floating_point():
                self.bytes += tensor.numel() * tensor.element_size()
            else:
                self.check_bytes += tensor.numel() * tensor.element_size()
            self.calls += 1
            return self._orig(tensor, *args, **kwargs)

        dist.all_reduce = counting
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._orig


def _train(ddp, opt, name, rank, steps, accum, dtype, start=0, zero="zeros"):
    """zero: how gradients are cleared after each step: "zeros" (set_to_none=False),
    "none" (torch's default) or "keep" (never: they accumulate across reductions)."""
    loss_fn = nn.CrossEntropyLoss()
    for step in range(start, start + steps):
        for micro in range(accum):
            x, y = batch_for(name, rank, step * accum + micro, dtype=dtype)
            if micro < accum - 1:
                with ddp.no_sync():
                    loss_fn(ddp(x).float(), y).backward()
            else:
                loss_fn(ddp(x).float(), y).backward()
        opt.step()
        if zero != "keep":
            opt.zero_grad(set_to_none=(zero == "none"))


def _unsampleable(p):
    # neither contiguous nor dim-1-major: a channels_last 3x3 conv weight
    return p.dim() >= 2 and not p.is_contiguous() and not p.transpose(0, 1).is_contiguous()


def compare_worker(rank, world, name, ratio, policy, steps, ddp_kw, accum=1, dtype=torch.float32,
                   wrapper=None, kernels="auto", memory_format=None, resync=False, zero="zeros", mode=None):
    """Train a sparse-hook and a default-hook copy of one model; return both parameter sets.

    resync=True starts every step of the default-hook model from the sparse model's
    parameters, buffers and momentum: the final difference is then that of one step's
    reduction, not rounding compounded over the steps (see
    test_sparse_equals_dense_resnet18)."""
    import os

    os.environ["APPROXDIST_KERNELS"] = kernels
    base = make_model(name).to(dtype)
    models = []
    for _ in range(2):
        m = copy.deepcopy(base)
        ad.convert_model(m, ratio, distributed=True, policy=policy, seed=7, mode=mode, allow_unbiased=True)
        if memory_format is not None:
            m.to(memory_format=memory_format)
        models.append(m)
    sparse = DDP(models[0], **ddp_kw)
    dense = DDP(models[1], **ddp_kw)
    state = ad.distributed.SparseAllReduceState()
    if wrapper is None:
        ad.distributed.register(sparse, state)
    elif wrapper.startswith("ad:"):  # approxdist's own: register(compress=...)
        ad.distributed.register(sparse, state, compress=wrapper[3:])
        dense.register_comm_hook(None, getattr(default_hooks, f"{wrapper[3:]}_compress_hook"))
    else:
        wrap = getattr(default_hooks, f"{wrapper}_compress_wrapper")
        sparse.register_comm_hook(state, wrap(ad.distributed.sparse_allreduce_hook))
        dense.register_comm_hook(None, getattr(default_hooks, f"{wrapper}_compress_hook"))
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (sparse, dense)]
    rng_before = torch.get_rng_state()
    counter = ByteCounter()
    if not resync:
        with counter:
            _train(sparse, opts[0], name, rank, steps, accum, dtype, zero=zero)
        rng_untouched = torch.equal(rng_before, torch.get_rng_state())
        _train(dense, opts[1], name, rank, steps, accum, dtype, zero=zero)
    else:
        for step in range(steps):
            dense.module.load_state_dict(sparse.module.state_dict())
            opts[1].load_state_dict(copy.deepcopy(opts[0].state_dict()))  # no shared momentum
            with counter:
                _train(sparse, opts[0], name, rank, 1, accum, dtype, start=step, zero=zero)
            _train(dense, opts[1], name, rank, 1, accum, dtype, start=step, zero=zero)
        rng_untouched = torch.equal(rng_before, torch.get_rng_state())
    return {
        "sparse": [p.detach().clone() for p in models[0].parameters()],
        "dense": [p.detach().clone() for p in models[1].parameters()],
        "stats": state.stats,
        "counted": counter.bytes,
        "counted_checks": counter.check_bytes,
        "sampled_weights": len({id(m.weight) for m in models[0].modules() if isinstance(m, WeightSampled)}),
        "analytic": analytic_bytes(models[0]) * steps,
        "dense_bytes": sum(p.numel() * p.element_size() for p in models[0].parameters()) * steps,
        "dense_conv_analytic": analytic_bytes(models[0], dense=_unsampleable) * steps,
        "indices": [m.last_indices for m in models[0].modules() if isinstance(m, WeightSampled)],
        "rng_untouched": rng_untouched,
    }


def _assert_equal_runs(results, exact, rtol=1e-6):
    for r in results:
        for ps, pd in zip(r["sparse"], r["dense"]):
            if exact:
                assert torch.equal(ps, pd), (ps - pd).abs().max()
            else:
                torch.testing.assert_close(ps, pd, rtol=rtol, atol=1e-7)
    for ps0, ps1 in zip(results[0]["sparse"], results[-1]["sparse"]):
        assert torch.equal(ps0, ps1), "ranks disagree"


@pytest.mark.parametrize("mode", ["weight_grad", "forward"])
@pytest.mark.parametrize("world", [2, 3])
def test_sparse_equals_dense_small_cnn(world, mode):
    results = run_ranks(functools.partial(compare_worker, mode=mode), world, "cnn", 0.5, "topk_weight", 4, {})
    _assert_equal_runs(results, exact=(world == 2))
    for r in results:
        assert r["stats"]["payload_bytes"] == r["analytic"] == r["counted"]
        assert r["stats"]["payload_bytes"] < r["stats"]["dense_bytes"]
        assert r["stats"]["steps"] == 4
        # The size check, once per step at its first bucket (register() knows every
        # sampled weight): 16 bytes per sampled weight plus 16 for the total; counted
        # apart from the payload.
        checks, weights, steps = r["stats"]["check_bytes"], r["sampled_weights"], r["stats"]["steps"]
        assert r["counted_checks"] == checks == 16 * (weights + 1) * steps


@pytest.mark.parametrize("world,mode", [(2, "weight_grad"), (2, "forward"),
                                        pytest.param(3, "weight_grad", marks=pytest.mark.slow)])
def test_sparse_equals_dense_resnet18(world, mode):
    """Bitwise on 2 ranks over both steps (the second on DDP's rebuilt buckets). On 3 ranks
    the ring sums each element in an order that depends on where it sits in the buffer,
    packed or dense, so the two reductions differ in the last bit; resnet18's second step
    amplifies that to ~1e-5 relative (measured: 8e-8 after one step, 9e-6 after two). So
    on 3 ranks every step of the default-hook run starts from the sparse run's state,
    and the parameters must agree within 1e-6 after each step's reduction."""
    worker = functools.partial(compare_worker, mode=mode, resync=world > 2)
    results = run_ranks(worker, world, "resnet18", 0.33, "topk_weight", 2, {})
    _assert_equal_runs(results, exact=(world == 2))
    r = results[0]
    assert r["stats"]["payload_bytes"] == r["analytic"] == r["counted"]
    assert r["stats"]["ratio"] < 0.4


@pytest.mark.parametrize("ddp_kw", [
    {"bucket_cap_mb": 0.01},
    {"bucket_cap_mb": 0.01, "gradient_as_bucket_view": True},
    {"static_graph": True, "bucket_cap_mb": 0.01},
    {"find_unused_parameters": True},
], ids=["buckets", "bucket_view", "static_graph", "find_unused"])
def test_ddp_options(ddp_kw):
    results = run_ranks(compare_worker, 2, "cnn", 0.5, "topk_weight", 3, ddp_kw)
    _assert_equal_runs(results, exact=True)
    r = results[0]
    assert r["stats"]["payload_bytes"] == r["analytic"] == r["counted"]
    if "bucket_cap_mb" in ddp_kw:
        assert r["stats"]["buckets"] > r["stats"]["steps"], "expected several buckets per step"


def test_channels_last_weights_are_sent_whole():
    """A model moved to channels_last after conversion: its conv weights are in a layout
    the kernels do not sample, so the hook sends those gradients whole (never a wrong
    slice); the linear layer stays sampled and the result is still the dense one."""
    results = run_ranks(compare_worker, 2, "cnn", 0.5, "topk_weight", 3, {}, 1, torch.float32,
                        None, "auto", torch.channels_last)
    _assert_equal_runs(results, exact=True)
    r = results[0]
    assert r["stats"]["payload_bytes"] == r["dense_conv_analytic"] == r["counted"]
    assert r["analytic"] < r["dense_conv_analytic"] < r["stats"]["dense_bytes"]


def test_no_sync_accumulation_reduces_the_union():
    # bernoulli_weight draws a different selection for every micro-batch.
    results = run_ranks(compare_worker, 2, "cnn", 0.3, "bernoulli_weight", 3, {}, 3)
    _assert_equal_runs(results, exact=True)


@pytest.mark.parametrize("zero", ["none", "keep"])
def test_gradients_set_to_none_or_never_cleared(zero):
    """torch's default zero_grad (None gradients), and gradients never cleared, so each
    reduction's result stays in .grad and the next step's gradients add to it. The hook
    sends only the slices touched since its last reduction; the others hold the
    previous result, the same on every rank, which the dense average leaves as it is.
    bernoulli_weight draws other channels every step, so those slices are not empty."""
    results = run_ranks(compare_worker, 2, "cnn", 0.4, "bernoulli_weight", 4, {}, 1, torch.float32,
                        None, "auto", None, False, zero)
    _assert_equal_runs(results, exact=True)
    r = results[0]
    assert r["stats"]["payload_bytes"] == r["counted"] < r["stats"]["dense_bytes"]


def test_bernoulli_weight_same_indices_and_global_rng_untouched():
    results = run_ranks(compare_worker, 2, "cnn", 0.4, "bernoulli_weight", 6, {})
    _assert_equal_runs(results, exact=True)
    for a, b in zip(results[0]["indices"], results[1]["indices"]):
        assert torch.equal(a, b)
    assert all(r["rng_untouched"] for r in results)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gradients(dtype):
    results = run_ranks(compare_worker, 2, "mlp", 0.5, "topk_weight", 3, {}, 1, dtype)
    _assert_equal_runs(results, exact=True)
    r = results[0]
    assert r["stats"]["payload_bytes"] == r["analytic"] == r["counted"]


@pytest.mark.parametrize("agreement_ratio", [0.33, 0.5])
def test_sparse_equals_dense_topk_explore(agreement_ratio):
    """The default selection moves every step; the hook stays bitwise lossless and sends
    exactly the analytic payload."""
    results = run_ranks(compare_worker, 2, "cnn", agreement_ratio, "topk_explore", 4, {})
    _assert_equal_runs(results, exact=True)
    for r in results:
        assert r["stats"]["payload_bytes"] == r["analytic"] == r["counted"]
    for a, b in zip(results[0]["indices"], results[1]["indices"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("wrapper", ["fp16", "bf16"])
def test_compress_wrappers(wrapper):
    results = run_ranks(compare_worker, 2, "cnn", 0.33, "topk_weight", 3, {}, 1, torch.float32, wrapper)
    _assert_equal_runs(results, exact=True)
    r = results[0]
    # The wrapper hands the hook a 2-byte buffer: a sixth of fp32 dense for 0.33 sampling.
    assert r["stats"]["payload_bytes"] * 2 == r["analytic"]


@pytest.mark.parametrize("compress", ["fp16", "bf16"])
def test_register_compress_equals_torchs_compressed_all_reduce(compress):
    """register(compress=...) against torch's dense fp16/bf16 hook: the same parameters bit
    for bit, a sixth of the float32 bytes at 0.33 on the wire, and dense_bytes that
    still count float32 (DDP's default hook), so their ratio is the bytes saved."""
    results = run_ranks(compare_worker, 2, "cnn", 0.33, "topk_weight", 3, {}, 1, torch.float32,
                        f"ad:{compress}")
    _assert_equal_runs(results, exact=True)
    r = results[0]
    assert r["stats"]["payload_bytes"] * 2 == r["analytic"] == r["counted"] * 2
    assert r["stats"]["dense_bytes"] == r["dense_bytes"]
    assert r["stats"]["ratio"] == pytest.approx(r["analytic"] / 2 / r["dense_bytes"])


def test_compress_names_the_argument():
    from approxdist.distributed.compress import compress_wrapper

    with pytest.raises(ValueError, match="compress"):
        compress_wrapper(ad.distributed.sparse_allreduce_hook, "int8")
    assert compress_wrapper(ad.distributed.sparse_allreduce_hook, "fp16").payload is not None


@pytest.mark.parametrize("kernels", ["torch", "auto"])
def test_each_kernel_backend(kernels):
    results = run_ranks(compare_worker, 2, "cnn", 0.33, "bernoulli_weight", 2, {"bucket_cap_mb": 0.01},
                        1, torch.float32, None, kernels)
    _assert_equal_runs(results, exact=True)


def hook_sees_indices_worker(rank, world):
    model = ad.convert_model(make_model("cnn"), 0.5, distributed=True)
    ddp = DDP(model)
    seen = []
    state = ad.distributed.SparseAllReduceState()

    def spy(state, bucket):
        from approxdist.nn import sampled_layer_of

        for p in bucket.parameters():
            layer = sampled_layer_of(p)
            if layer is not None:
                seen.append(layer.last_indices.clone())
        return ad.distributed.sparse_allreduce_hook(state, bucket)

    ddp.register_comm_hook(state, spy)
    x, y = batch_for("cnn", rank, 0)
    nn.CrossEntropyLoss()(ddp(x), y).backward()
    layers = [m for m in model.modules() if isinstance(m, WeightSampled)]
    zero_outside = []
    for m in layers:
        outside = torch.ones(m.weight.shape[1], dtype=torch.bool)
        outside[m.last_indices] = False
        zero_outside.append(bool((m.weight.grad[:, outside] == 0).all()))
    return {"seen": len(seen), "layers": len(layers), "zero_outside": zero_outside,
            "k": [m.last_indices.numel() for m in layers], "n": [m.weight.shape[1] for m in layers]}


def test_hook_sees_recorded_indices():
    for r in run_ranks(hook_sees_indices_worker, 2):
        assert r["seen"] == r["layers"] > 0
        assert all(r["zero_outside"])
        assert r["k"] == [n // 2 for n in r["n"]]


def copied_model_worker(rank, world, how):
    import io

    converted = ad.convert_model(make_model("cnn"), 0.5, distributed=True)
    analytic = analytic_bytes(converted)  # of the original, registered at construction
    dense = sum(p.numel() * p.element_size() for p in converted.parameters())
    if how == "deepcopy":
        model = copy.deepcopy(converted)
    elif how == "pickle":
        buf = io.BytesIO()
        torch.save(converted, buf)
        buf.seek(0)
        model = torch.load(buf, weights_only=False)
    else:  # a weight replaced after construction; register() finds it again
        model = converted
        model.conv2.weight = nn.Parameter(model.conv2.weight.detach().clone())
    ddp = DDP(model)
    state = ad.distributed.SparseAllReduceState()
    if how == "replaced":
        ad.distributed.register(ddp, state)
    else:
        ddp.register_comm_hook(state, ad.distributed.sparse_allreduce_hook)
    x, y = batch_for("cnn", rank, 0)
    nn.CrossEntropyLoss()(ddp(x), y).backward()
    return state.stats["payload_bytes"], analytic, dense


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "replaced"])
def test_copied_models_and_replaced_weights_stay_sampled(how):
    """The hook finds a layer through its weight; a deep copy, an unpickled model or a
    replaced weight must not fall back to sending that gradient whole."""
    for payload, analytic, dense in run_ranks(copied_model_worker, 2, how):
        assert payload == analytic < dense


def direct_check_worker(rank, world):
    model = make_model("cnn")
    ad.convert_model(model, 0.5, distributed=True, seed=7)
    ddp = DDP(model, bucket_cap_mb=0.01)  # several buckets
    state = ad.distributed.SparseAllReduceState()
    ddp.register_comm_hook(state, ad.distributed.sparse_allreduce_hook)  # not register()
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    per_step, buckets = [], []
    for step in range(3):
        before, b0 = state.check_bytes, state.buckets
        _train(ddp, opt, "cnn", rank, 1, 1, torch.float32, start=step)
        per_step.append(state.check_bytes - before)
        buckets.append(state.buckets - b0)
    weights = len({id(m.weight) for m in model.modules() if isinstance(m, WeightSampled)})
    return per_step, buckets, weights


def test_hook_registered_directly_checks_sizes_once_per_step_after_the_first():
    """Registered the plain DDP way, the hook compares the payload sizes before each
    bucket in its first step (a blocking collective that waits for the buckets in
    flight), learns the model's sampled weights there, and from then on compares them
    once per step, as register() sets up: 16 bytes per sampled weight plus 16."""
    for per_step, buckets, weights in run_ranks(direct_check_worker, 2):
        # (DDP's first step has one bucket, its later ones several: bucket by bucket
        # those would send 16 more bytes per extra bucket)
        assert min(buckets[1:]) > 1, buckets
        assert per_step == [16 * (weights + 1)] * 3


def test_world_size_one():
    results = run_ranks(compare_worker, 1, "cnn", 0.5, "topk_weight", 2, {})
    _assert_equal_runs(results, exact=True)


def sparse_grad_worker(rank, world):
    model = nn.Sequential(nn.EmbeddingBag(10, 4, sparse=True), nn.Linear(4, 2))
    ddp = DDP(model)
    ad.distributed.register(ddp)
    out = ddp(torch.tensor([[1, 2], [3, 4]]))
    out.sum().backward()


def test_sparse_gradients_rejected():
    with pytest.raises(RankError, match="sparse gradients are not supported"):
        run_ranks(sparse_grad_worker, 2)


def buffer_reuse_worker(rank, world):
    model = make_model("cnn")
    ad.convert_model(model, 0.5, distributed=True, seed=7)
    ddp = DDP(model, bucket_cap_mb=0.01)
    state = ad.distributed.register(ddp)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    seen = []
    for step in range(6):
        if step == 4:  # more channels: every packed buffer must grow
            for m in model.modules():
                if isinstance(m, WeightSampled):
                    m.sample_ratio = 0.75
        before = state.payload_bytes
        _train(ddp, opt, "cnn", rank, 1, 1, torch.float32, start=step)
        seen.append({"ptrs": {k: v[0].data_ptr() for k, v in state._buffers.items()},
                     "sizes": {k: v[0].numel() for k, v in state._buffers.items()},
                     "payload": state.payload_bytes - before})
    return seen


def test_packed_buffers_are_reused_and_regrown():
    """The hook keeps one packed buffer per bucket from step to step (a fresh allocation
    each step costs page faults): after DDP's bucket rebuild (step 1) the same tensors come
    back every step; a larger selection regrows them, and buffers of buckets that no
    longer exist are dropped."""
    seen = run_ranks(buffer_reuse_worker, 2)[0]
    stable = seen[1]["ptrs"]
    assert len(stable) > 1, "expected several buckets with sampled layers"
    assert seen[2]["ptrs"] == seen[3]["ptrs"] == stable
    assert seen[4]["payload"] > seen[3]["payload"]
    assert seen[4]["ptrs"].keys() == stable.keys()
    assert all(seen[4]["sizes"][k] > seen[3]["sizes"][k] for k in stable)
    assert seen[5]["ptrs"] == seen[4]["ptrs"]


def test_unused_packed_buffers_are_released():
    state = ad.distributed.SparseAllReduceState()
    a, b = [torch.zeros(3)], [torch.zeros(4)]
    first = state.packed_buffer(a, 10, torch.float32, "cpu")
    assert state.packed_buffer(a, 6, torch.float32, "cpu").data_ptr() == first.data_ptr()
    assert state.packed_buffer(a, 6, torch.float32, "cpu").numel() == 6
    state.steps += 1
    state.packed_buffer(b, 5, torch.float32, "cpu")
    state.release_unused_buffers()  # a was not used in this step
    assert [k[0] for k in state._buffers] == [(id(b[0]),)]
    assert "_buffers" not in state.__getstate__()
