"""pack/unpack: every available backend gives the pure-PyTorch reference's bits.

Backends: "torch" (APPROXDIST_KERNELS=torch) and "compiled" (C++ on CPU tensors, CUDA on
CUDA tensors; skipped where it cannot be built). CUDA cases run only where a GPU is
present (tests/gpu/run.sh).
"""
import subprocess
import sys
import warnings

import pytest
import torch

import approxdist.kernels as K
from approxdist.kernels import loader, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
        torch.float64: torch.int64}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
INDEX_KINDS = ["empty", "all", "single", "runs", "scattered", "edges"]


def _compiled_available(device):
    ext = loader.load()
    return ext is not None and (device == "cpu" or ext.with_cuda())


@pytest.fixture(params=["torch", "compiled"])
def backend(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setenv("APPROXDIST_KERNELS", "torch")
    else:
        monkeypatch.delenv("APPROXDIST_KERNELS", raising=False)
    return request.param


def _skip_unless(backend, device):
    if backend == "compiled" and not _compiled_available(device):
        pytest.skip(f"compiled kernels unavailable for {device} here")


def make_index(kind, n, gen):
    if kind == "empty" or n == 0:
        return torch.empty(0, dtype=torch.long)
    if kind == "all":
        return torch.arange(n)
    if kind == "single":
        return torch.randint(n, (1,), generator=gen)
    if kind == "edges":
        return torch.tensor(sorted({0, n - 1}))
    if kind == "runs":  # a few runs of consecutive positions
        mask = torch.zeros(n, dtype=torch.bool)
        for _ in range(3):
            start = int(torch.randint(n, (1,), generator=gen))
            length = int(torch.randint(1, max(2, n // 3), (1,), generator=gen))
            mask[start:start + length] = True
        return mask.nonzero().flatten()
    k = max(1, n // 3)
    return torch.randperm(n, generator=gen)[:k].sort().values


def make_case(seed, dtype, device):
    """A bucket-like list: conv weights of several kernel sizes, linear weights, dense tensors."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(8, 13, 3, 3), (16, 7, 1, 1), (5, 9, 7, 7), (4, 6, 5, 5), (11, 17), (3, 40),
              (33,), (6, 5), (2, 3, 3, 3), (1, 1), (7, 1, 3, 3)]
    grads, indices = [], []
    for j, shape in enumerate(shapes):
        g = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device)
        grads.append(g)
        if len(shape) == 1 or j == 7:  # 1-D, and one dense 2-D tensor
            indices.append(None)
        else:
            kind = INDEX_KINDS[(seed + j) % len(INDEX_KINDS)]
            indices.append(make_index(kind, shape[1], gen).to(device))
    return grads, indices


def spec_pack(grads, indices):
    """The layout as the docs state it, written the obvious way."""
    parts = [g.reshape(-1) if idx is None else g.index_select(1, idx).reshape(-1)
             for g, idx in zip(grads, indices)]
    return torch.cat(parts) if parts else torch.empty(0)


def bits(t):
    return t.view(BITS[t.dtype]) if t.dtype in BITS else t


def assert_bits_equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(bits(a), bits(b))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_spec(seed, dtype):
    grads, indices = make_case(seed, dtype, "cpu")
    out = torch.empty(K.packed_numel(grads, indices), dtype=dtype)
    assert_bits_equal(reference.pack_into(grads, indices, out), spec_pack(grads, indices))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(6))
def test_pack_equals_reference(backend, device, dtype, seed):
    _skip_unless(backend, device)
    grads, indices = make_case(seed, dtype, device)
    packed = K.pack(grads, indices)
    assert packed.device.type == device and packed.numel() == K.packed_numel(grads, indices)
    assert_bits_equal(packed.cpu(), spec_pack([g.cpu() for g in grads],
                                              [None if i is None else i.cpu() for i in indices]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(6))
def test_unpack_writes_selection_only(backend, device, dtype, seed):
    _skip_unless(backend, device)
    grads, indices = make_case(seed, dtype, device)
    before = [g.clone() for g in grads]
    n = K.packed_numel(grads, indices)
    flat = (torch.randn(n, dtype=torch.float64) * 100).to(dtype).to(device)
    expected = [g.clone() for g in before]
    reference.unpack_from(flat, expected, indices)
    K.unpack(flat, grads, indices)
    for g, e, b, idx in zip(grads, expected, before, indices):
        assert_bits_equal(g.cpu(), e.cpu())
        if idx is not None and g.dim() >= 2:  # unselected columns keep their old bits
            keep = torch.ones(g.shape[1], dtype=torch.bool, device=device)
            keep[idx] = False
            assert_bits_equal(g[:, keep].cpu(), b[:, keep].cpu())
    # and the written slices read back as flat
    assert_bits_equal(K.pack(grads, indices).cpu(), flat.cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_large_tensors_split_across_threads(backend, device):
    # Big enough for many work items per tensor (C++) and many blocks (CUDA).
    _skip_unless(backend, device)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(256, 384, 3, 3, generator=gen), torch.randn(1000, 2048, generator=gen),
             torch.randn(300_001, generator=gen), torch.randn(512, 256, 1, 1, generator=gen)]
    indices = [torch.randperm(384, generator=gen)[:192].sort().values,
               torch.randperm(2048, generator=gen)[:683].sort().values, None,
               torch.arange(256)]
    grads = [g.to(device) for g in grads]
    indices = [None if i is None else i.to(device) for i in indices]
    packed = K.pack(grads, indices)
    assert_bits_equal(packed.cpu(), spec_pack([g.cpu() for g in grads],
                                              [None if i is None else i.cpu() for i in indices]))
    target = [torch.zeros_like(g) for g in grads]
    K.unpack(packed, target, indices)
    for g, t, idx in zip(grads, target, indices):
        if idx is None:
            assert_bits_equal(t, g)
        else:
            assert_bits_equal(t.index_select(1, idx), g.index_select(1, idx))
            assert int((t != 0).sum()) <= g.numel() // g.shape[1] * idx.numel()


@pytest.mark.parametrize("device", DEVICES)
def test_out_buffer(backend, device):
    _skip_unless(backend, device)
    grads, indices = make_case(3, torch.float32, device)
    n = K.packed_numel(grads, indices)
    storage = torch.full((n + 8,), 7.0, device=device)
    out = storage[4:4 + n]  # an offset view, as a slice of a larger comm buffer would be
    ret = K.pack(grads, indices, out=out)
    assert ret.data_ptr() == out.data_ptr()
    assert_bits_equal(out.cpu(), spec_pack([g.cpu() for g in grads],
                                           [None if i is None else i.cpu() for i in indices]))
    assert torch.all(storage[:4] == 7) and torch.all(storage[4 + n:] == 7)
    with pytest.raises(ValueError, match="out"):
        K.pack(grads, indices, out=torch.empty(n + 1, device=device))
    with pytest.raises(ValueError, match="dtype"):
        K.pack(grads, indices, out=torch.empty(n, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match="1-D"):
        K.pack(grads, indices, out=torch.empty(n, 1, device=device))
    with pytest.raises(ValueError, match="1-D"):
        K.pack(grads, indices, out=torch.empty(2 * n, device=device)[::2])
    other = "cuda" if device == "cpu" else "cpu"
    if other == "cpu" or torch.cuda.is_available():
        with pytest.raises(ValueError, match="on"):
            K.pack(grads, indices, out=torch.empty(n, device=other))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_raise(backend, device):
    _skip_unless(backend, device)
    w = torch.randn(4, 6, 3, 3, device=device)
    ok = torch.tensor([0, 2, 5], device=device)

    def raises(match, grads, indices):
        with pytest.raises(ValueError, match=match):
            K.pack(grads, indices)
        # a flat of the right size when it has one, so unpack's own index checks are reached
        n = sum(g.numel() // g.shape[1] * i.numel() if i is not None and g.dim() > 1 and g.shape[1]
                else g.numel() for g, i in zip(grads, indices))
        with pytest.raises(ValueError, match=match):
            K.unpack(torch.zeros(n, device=device, dtype=grads[0].dtype), grads, indices)

    raises("contiguous or dim-1-major", [w.transpose(2, 3)], [ok])
    raises("contiguous or dim-1-major", [w.to(memory_format=torch.channels_last)], [ok])
    raises("contiguous or dim-1-major", [torch.randn(4, 12, 3, 3, device=device)[:, ::2]], [ok])
    raises("sorted", [w], [torch.tensor([2, 0, 5], device=device)])
    raises("sorted", [w], [torch.tensor([0, 2, 2], device=device)])
    raises("outside|out of range", [w], [torch.tensor([0, 6], device=device)])
    raises("outside|out of range", [w], [torch.tensor([-1, 3], device=device)])
    raises("None for the 1-D", [torch.randn(5, device=device)], [torch.tensor([0], device=device)])
    raises("int64", [w], [ok.int()])
    raises("int64", [w], [ok.view(3, 1)])
    raises("only 6 positions", [w], [torch.arange(7, device=device)])
    raises("dtype", [w, torch.randn(3, device=device, dtype=torch.float64)], [ok, None])
    with pytest.raises(ValueError, match="same length"):
        K.pack([w], [ok, None])
    with pytest.raises(ValueError, match="list"):
        K.pack(w, [ok])
    with pytest.raises(ValueError, match="flat"):
        K.unpack(torch.zeros(5, device=device), [w], [ok])
    with pytest.raises(ValueError, match="grads\\[1\\] must be a tensor"):
        K.pack([w, "x"], [ok, None])
    with pytest.raises(ValueError, match="indices\\[0\\] must be a LongTensor"):
        K.pack([w], [[0, 2]])
    if device == "cuda":
        raises("indices\\[0\\] is on", [w], [ok.cpu()])


@pytest.mark.parametrize("device", DEVICES)
def test_validate_false_same_result(backend, device):
    _skip_unless(backend, device)
    grads, indices = make_case(1, torch.float32, device)
    assert_bits_equal(K.pack(grads, indices, validate=False), K.pack(grads, indices))
    flat = torch.randn(K.packed_numel(grads, indices), device=device)
    a, b = [g.clone() for g in grads], [g.clone() for g in grads]
    K.unpack(flat, a, indices, validate=False)
    K.unpack(flat, b, indices)
    for x, y in zip(a, b):
        assert_bits_equal(x, y)


@pytest.mark.parametrize("device", DEVICES)
def test_edge_shapes(backend, device):
    _skip_unless(backend, device)
    grads = [torch.randn(0, 5, 3, 3, device=device), torch.randn(4, 0, device=device),
             torch.randn(0, device=device), torch.randn(3, 5, device=device)]
    indices = [torch.tensor([1, 4], device=device), torch.empty(0, dtype=torch.long, device=device),
               None, torch.tensor([1, 2, 4], device=device)[::1]]
    packed = K.pack(grads, indices)
    assert_bits_equal(packed, grads[3][:, [1, 2, 4]].reshape(-1))
    # a non-contiguous index view is accepted (indices are small; they are copied)
    strided = torch.tensor([1, 9, 2, 9, 4], device=device)[::2]
    assert_bits_equal(K.pack([grads[3]], [strided]), packed)
    empty = K.pack([], [])
    assert empty.numel() == 0
    K.unpack(torch.empty(0), [], [])


def test_env_forces_reference(monkeypatch):
    monkeypatch.setenv("APPROXDIST_KERNELS", "torch")
    assert K.backend() == "torch"
    assert K.build() == "torch"
    monkeypatch.setenv("APPROXDIST_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match="APPROXDIST_KERNELS"):
        K.backend()


def test_backend_names_the_machine(monkeypatch):
    monkeypatch.delenv("APPROXDIST_KERNELS", raising=False)
    name = K.backend()
    ext = loader.load()
    if ext is None:
        assert name == "torch"
    elif torch.cuda.is_available():
        assert name == ("cuda" if ext.with_cuda() else "torch")
    else:
        assert name == "cpp"


def test_build_failure_warns_once_and_falls_back(monkeypatch):
    monkeypatch.delenv("APPROXDIST_KERNELS", raising=False)
    monkeypatch.setattr(loader, "_state", {"tried": False, "ext": None})

    def broken(*args, **kwargs):
        raise RuntimeError("simulated compiler failure")

    monkeypatch.setattr(loader, "_build", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert K.backend() == "torch"
        grads, indices = make_case(2, torch.float32, "cpu")
        assert_bits_equal(K.pack(grads, indices), spec_pack(grads, indices))
        assert K.build() == "torch"
    messages = [str(w.message) for w in caught if "approxdist" in str(w.message)]
    assert len(messages) == 1 and "simulated compiler failure" in messages[0]


def test_missing_sources_fall_back(monkeypatch):
    monkeypatch.delenv("APPROXDIST_KERNELS", raising=False)
    monkeypatch.setattr(loader, "_state", {"tried": False, "ext": None})
    monkeypatch.setattr(loader, "sources_dir", lambda: None)
    with pytest.warns(RuntimeWarning, match="csrc"):
        assert K.backend() == "torch"


def test_import_does_not_build():
    code = ("import approxdist, approxdist.kernels as k, sys; "
            "print(k.loader._state['tried'], 'torch.utils.cpp_extension' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def _dim1_major(g):
    """The same values laid out with dim 1 outermost, as distributed sampled weights are."""
    return g.transpose(0, 1).contiguous().transpose(0, 1) if g.dim() >= 2 else g


def spec_pack_dim1(grads, indices):
    """The documented layout of dim-1-major tensors: selected blocks in memory order."""
    parts = []
    for g, idx in zip(grads, indices):
        mem = g.transpose(0, 1) if g.dim() >= 2 and not g.is_contiguous() else g
        if idx is None:
            parts.append(mem.reshape(-1))
        else:
            parts.append(mem.index_select(0 if mem is not g else 1, idx).reshape(-1))
    return torch.cat(parts)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("seed", range(6))
def test_dim1_major_layout(backend, device, dtype, seed):
    """Dim-1-major gradients (every other one, mixed with contiguous ones) pack to their
    selected blocks in memory order and unpack into exactly those positions."""
    _skip_unless(backend, device)
    grads, indices = make_case(seed, dtype, device)
    grads = [_dim1_major(g) if j % 2 == 0 else g for j, g in enumerate(grads)]
    assert any(not g.is_contiguous() for g in grads)
    packed = K.pack(grads, indices)
    assert packed.numel() == K.packed_numel(grads, indices)
    assert_bits_equal(packed.cpu(), spec_pack_dim1([g.cpu() for g in grads],
                                                   [None if i is None else i.cpu() for i in indices]))
    flat = torch.randn(packed.numel(), dtype=torch.float64).to(dtype).to(device)
    targets = [g.clone(memory_format=torch.preserve_format) for g in grads]
    K.unpack(flat, targets, indices)
    for g, t, idx in zip(grads, targets, indices):
        assert t.stride() == g.stride()
        if idx is None:
            continue
        outside = torch.ones(g.shape[1], dtype=torch.bool, device=device)
        outside[idx] = False
        assert_bits_equal(t[:, outside], g[:, outside])
    assert_bits_equal(K.pack(targets, indices).cpu(), flat.cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("divisor", [2, 3, 4, 7.5, 8])
@pytest.mark.parametrize("tiny", [False, True])
def test_pack_divides_like_div_(backend, device, dtype, divisor, tiny):
    """pack(divisor=d) has the bits of pack().div_(d), the division the hook needs (the
    C++ path divides each piece as it copies it, and multiplies by the reciprocal of a
    power of two), for both layouts; `tiny` scales the values down to the smallest
    normal numbers of the dtype, so many quotients are subnormal."""
    _skip_unless(backend, device)
    grads, indices = make_case(3, dtype, device)
    grads = [_dim1_major(g) if j % 3 == 0 else g for j, g in enumerate(grads)]
    if tiny:
        grads = [g.mul_(torch.finfo(dtype).tiny * 3) for g in grads]
        assert any((g != 0).any() for g in grads)
    expected = K.pack(grads, indices).div_(divisor)
    assert_bits_equal(K.pack(grads, indices, divisor=divisor), expected)
    out = torch.empty_like(expected)
    assert_bits_equal(K.pack(grads, indices, out=out, validate=False, divisor=divisor), expected)


@pytest.mark.parametrize("bad", [0, -2, float("nan"), float("inf"), "2", True])
def test_pack_rejects_bad_divisor(bad):
    grads, indices = make_case(0, torch.float32, "cpu")
    with pytest.raises(ValueError, match="divisor"):
        K.pack(grads, indices, divisor=bad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("divisor", [1, 2, 3])
def test_large_dim1_major_streamed(backend, device, dtype, divisor):
    """Several MB packed: the C++ path writes long blocks with non-temporal stores (and
    divides while it copies). A 3-element dense tensor first puts every later piece of
    the flat buffer off 16-byte alignment; the result must still have the spec's bits."""
    _skip_unless(backend, device)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(3, generator=gen), _dim1_major(torch.randn(1024, 2048, 1, 1, generator=gen)),
             _dim1_major(torch.randn(256, 384, 3, 3, generator=gen)), torch.randn(700_001, generator=gen),
             torch.randn(96, 100, generator=gen)]
    indices = [None, torch.randperm(2048, generator=gen)[:1100].sort().values,
               torch.randperm(384, generator=gen)[:129].sort().values, None,
               torch.randperm(100, generator=gen)[:37].sort().values]
    grads = [g.to(dtype).to(device) for g in grads]
    indices = [None if i is None else i.to(device) for i in indices]
    # at least kStreamBytes (csrc/pack.cpp), so the C++ path streams
    assert K.packed_numel(grads, indices) * grads[0].element_size() >= (4 << 20)
    expected = spec_pack_dim1([g.cpu() for g in grads], [None if i is None else i.cpu() for i in indices])
    if divisor != 1:
        expected = expected.div_(divisor)
    packed = K.pack(grads, indices, divisor=divisor)
    assert_bits_equal(packed.cpu(), expected)
    flat = torch.randn(packed.numel(), generator=gen).to(dtype).to(device)
    targets = [g.clone(memory_format=torch.preserve_format) for g in grads]
    K.unpack(flat, targets, indices)
    assert_bits_equal(K.pack(targets, indices).cpu(), flat.cpu())
    for g, t, idx in zip(grads, targets, indices):
        if idx is not None:
            outside = torch.ones(g.shape[1], dtype=torch.bool, device=device)
            outside[idx] = False
            assert_bits_equal(t[:, outside], g[:, outside])
