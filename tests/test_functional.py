"""approx_linear / approx_conv2d: DESIGN invariants 1 and 2, every policy against a
reference computed here from the selected pairs, and the three modes.

References are built channel by channel (a sum of per-channel products), not with the
gather the library uses, so a wrong index or scale cannot cancel out."""
import pytest
import torch
import torch.nn.functional as F

from approxdist.functional import (
    POLICIES,
    approx_conv2d,
    approx_linear,
    bernoulli_probabilities,
    num_samples,
    sampled_conv2d,
    sampled_linear,
    select_columns,
)

D = torch.float64
RANDOM_POLICIES = ("random", "bernoulli", "bernoulli_weight", "uniform")

# (stride, padding, dilation, kernel) of the convolutions under test
CONV_GEOMETRIES = [(1, 0, 1, 1), (1, 1, 1, 3), (2, 1, 1, 3), (1, 2, 2, 3), ((2, 1), (0, 2), (1, 2), (3, 2)),
                   (2, 0, 1, 1), ((3, 2), 0, 2, 1), (1, 1, 1, 1)]  # 1x1: matmul paths (strided or not)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def linear_case(n=12, out=5, rows=7, bias=True, seed=0, dtype=D):
    g = _gen(seed)
    x = torch.randn(rows, n, generator=g, dtype=dtype)
    w = torch.randn(out, n, generator=g, dtype=dtype)
    b = torch.randn(out, generator=g, dtype=dtype) if bias else None
    return x, w, b


def conv_case(n=10, out=4, kernel=3, size=9, batch=3, bias=True, seed=0, dtype=D):
    g = _gen(seed)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    x = torch.randn(batch, n, size, size + 1, generator=g, dtype=dtype)
    w = torch.randn(out, n, kh, kw, generator=g, dtype=dtype)
    b = torch.randn(out, generator=g, dtype=dtype) if bias else None
    return x, w, b


def pair_scores_ref(x, w, policy):
    """|A_i|*|B_i| (|B_i| for the weight policies), written out per channel."""
    n = w.shape[1]
    wn = torch.stack([w[:, i].double().pow(2).sum().sqrt() for i in range(n)])
    if policy.endswith("_weight"):
        return wn
    xn = torch.stack([x[:, i].double().pow(2).sum().sqrt() for i in range(n)])
    return xn * wn


def linear_ref(x, w, b, idx, scale):
    out = torch.zeros(x.shape[0], w.shape[0], dtype=x.dtype)
    for j, i in enumerate(idx.tolist()):
        s = 1.0 if scale is None else float(scale[j])
        out += s * torch.outer(x[:, i], w[:, i])
    return out if b is None else out + b


def conv_ref(x, w, b, idx, scale, stride=1, padding=0, dilation=1):
    out = None
    for j, i in enumerate(idx.tolist()):
        s = 1.0 if scale is None else float(scale[j])
        term = s * F.conv2d(x[:, i:i + 1], w[:, i:i + 1], None, stride, padding, dilation)
        out = term if out is None else out + term
    if out is None:
        out = F.conv2d(x[:, :1], torch.zeros_like(w[:, :1]), None, stride, padding, dilation)
    return out if b is None else out + b.view(1, -1, 1, 1)


# -- invariant 1: k == n is bit-identical to torch -----------------------------------------

def _grads(out, g, *tensors):
    return torch.autograd.grad(out, [t for t in tensors if t is not None], g)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mode", ["forward", "backward", "blackbox", "weight_grad"])
@pytest.mark.parametrize("kw", [dict(sample_ratio=1.0), dict(sample_ratio=0.25, minimal_k="n"),
                                dict(sample_ratio=0.5, minimal_k=100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_full_k_is_bit_identical(bias, mode, kw, dtype):
    if kw.get("minimal_k") == "n":
        # k == n exactly; backward mode samples the 14 rows and 5 outputs, not the 12 inputs
        kw = dict(kw, minimal_k=14 if mode == "backward" else 12)
    x, w, b = linear_case(bias=bias, dtype=dtype)
    x = x.view(7, 1, 12).expand(7, 2, 12).contiguous()  # 3-D input, like a sequence model
    params = [t.requires_grad_() for t in (x, w, b) if t is not None]
    ref = F.linear(x, w, b)
    out = approx_linear(x, w, b, mode=mode, policy="topk" if mode == "backward" else "random", **kw)
    assert out.dtype == ref.dtype and torch.equal(out, ref)
    g = torch.randn_like(ref)
    for a, r in zip(_grads(out, g, *params), _grads(ref, g, *params)):
        assert torch.equal(a, r)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("geometry", CONV_GEOMETRIES)
@pytest.mark.parametrize("mode", ["forward", "backward", "blackbox", "weight_grad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv_full_k_is_bit_identical(bias, geometry, mode, dtype):
    stride, padding, dilation, kernel = geometry
    x, w, b = conv_case(kernel=kernel, bias=bias, dtype=dtype)
    params = [t.requires_grad_() for t in (x, w, b) if t is not None]
    ref = F.conv2d(x, w, b, stride, padding, dilation)
    out = approx_conv2d(x, w, b, stride, padding, dilation, sample_ratio=0.1, minimal_k=10,
                        mode=mode, policy="bernoulli" if mode != "backward" else "uniform")
    assert torch.equal(out, ref)
    g = torch.randn_like(ref)
    for a, r in zip(_grads(out, g, *params), _grads(ref, g, *params)):
        assert torch.equal(a, r)


def test_select_columns_full_k_keeps_everything_unscaled():
    for policy in POLICIES:
        idx, scale = select_columns(torch.rand(6), 6, policy, _gen(0))
        assert torch.equal(idx, torch.arange(6)) and scale is None


# -- every policy against the reference ----------------------------------------------------

def _selection(scores, k, policy, seed):
    idx, scale = select_columns(scores, k, policy, _gen(seed) if seed is not None else None)
    assert idx.dtype == torch.long and torch.equal(idx, idx.unique())  # sorted and unique
    return idx, scale


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_policy_matches_reference(policy, bias):
    x, w, b = linear_case(bias=bias, seed=3)
    k = num_samples(12, 0.34)
    seed = 11 if policy in RANDOM_POLICIES else None
    out = approx_linear(x, w, b, sample_ratio=0.34, policy=policy,
                        generator=_gen(seed) if seed is not None else None)
    idx, scale = _selection(pair_scores_ref(x, w, policy), k, policy, seed)
    torch.testing.assert_close(out, linear_ref(x, w, b, idx, scale), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("geometry", CONV_GEOMETRIES[:4] + CONV_GEOMETRIES[5:])
def test_conv_policy_matches_reference(policy, geometry):
    stride, padding, dilation, kernel = geometry
    x, w, b = conv_case(kernel=kernel, seed=4)
    k = num_samples(10, 0.5)
    seed = 5 if policy in RANDOM_POLICIES else None
    out = approx_conv2d(x, w, b, stride, padding, dilation, sample_ratio=0.5, policy=policy,
                        generator=_gen(seed) if seed is not None else None)
    idx, scale = _selection(pair_scores_ref(x, w, policy), k, policy, seed)
    ref = conv_ref(x, w, b, idx, scale, stride, padding, dilation)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_topk_keeps_the_largest_scores():
    scores = torch.rand(50, generator=_gen(1), dtype=D)
    idx, scale = select_columns(scores, 17, "topk")
    assert scale is None
    assert set(idx.tolist()) == set(scores.argsort(descending=True)[:17].tolist())


def test_uniform_draws_k_distinct_with_scale_n_over_k():
    idx, scale = select_columns(torch.rand(40), 10, "uniform", _gen(2))
    assert idx.numel() == 10
    assert torch.allclose(scale, torch.full((10,), 4.0, dtype=scale.dtype))


def test_random_scale_is_count_over_k_times_probability():
    scores = torch.rand(30, generator=_gen(3), dtype=D)
    idx, scale = select_columns(scores, 12, "random", _gen(4))
    q = 0.9 * scores / scores.sum() + 0.1 / 30  # the mixed distribution (EPSILON = 0.1)
    counts = scale * 12 * q[idx]
    torch.testing.assert_close(counts, counts.round())
    assert counts.sum().round().item() == 12 and (counts >= 1 - 1e-9).all()


def test_bernoulli_probabilities_sum_to_k_and_stay_at_most_one():
    scores = torch.cat([torch.tensor([100.0, 50.0], dtype=D), torch.rand(20, generator=_gen(5), dtype=D)])
    p = bernoulli_probabilities(scores, 8)
    assert abs(p.sum().item() - 8) < 1e-9 and (p <= 1).all() and (p > 0).all()
    assert p[0] == 1 and p[1] == 1  # the dominant pairs are capped
    free = p < 1
    q = 0.9 * scores / scores.sum() + 0.1 / scores.numel()
    ratio = p[free] / q[free]
    torch.testing.assert_close(ratio, ratio.mean().expand_as(ratio))  # proportional where free
    idx, scale = select_columns(scores, 8, "bernoulli", _gen(6))
    torch.testing.assert_close(scale, 1 / p[idx])


def test_zero_norm_channels_can_still_be_drawn():
    """The uniform mix keeps every probability positive (a dead channel can come back)."""
    scores = torch.zeros(8, dtype=D)
    scores[0] = 1.0
    drawn = set()
    for seed in range(200):
        drawn |= set(select_columns(scores, 2, "bernoulli", _gen(seed))[0].tolist())
    assert drawn == set(range(8))


# -- unbiasedness --------------------------------------------------------------------------

def _assert_unbiased(samples, exact, z=5.0):
    """Mean within z standard errors of the exact value, element by element; the standard
    error comes from the empirical variance of the draws."""
    mean = samples.mean(0)
    se = samples.std(0) / samples.shape[0] ** 0.5
    err = (mean - exact).abs()
    assert (err <= z * se + 1e-12).all(), f"max error/se = {(err / (se + 1e-300)).max():.2f}"
    # the test has power: the standard error is small next to the values themselves
    assert se.max() < 0.1 * exact.abs().max()


@pytest.mark.parametrize("policy", RANDOM_POLICIES)
def test_linear_estimate_is_unbiased(policy):
    x, w, b = linear_case(n=16, out=3, rows=4, seed=7)
    draws = torch.stack([approx_linear(x, w, b, sample_ratio=0.25, policy=policy, generator=_gen(s))
                         for s in range(3000)])
    _assert_unbiased(draws, F.linear(x, w, b))


@pytest.mark.parametrize("policy", ["uniform", "bernoulli"])
@pytest.mark.parametrize("kernel", [3, 1])
def test_conv_estimate_is_unbiased(policy, kernel):
    x, w, b = conv_case(n=8, out=2, size=4, batch=1, kernel=kernel, seed=8)
    pad = kernel // 2
    draws = torch.stack([approx_conv2d(x, w, b, padding=pad, sample_ratio=0.25, policy=policy,
                                       generator=_gen(s)) for s in range(500)])
    _assert_unbiased(draws, F.conv2d(x, w, b, padding=pad))


def test_topk_is_biased_so_the_unbiasedness_test_has_teeth():
    x, w, b = linear_case(n=16, out=3, rows=4, seed=7)
    out = approx_linear(x, w, b, sample_ratio=0.25)
    assert not torch.allclose(out, F.linear(x, w, b), atol=1e-3)


@pytest.mark.parametrize("policy", ["uniform", "random"])
def test_backward_mode_gradients_are_unbiased(policy):
    x, w, b = linear_case(n=6, out=8, rows=8, seed=9)
    x.requires_grad_()
    w.requires_grad_()
    g = torch.randn(8, 8, generator=_gen(10), dtype=D)
    gx_exact, gw_exact = torch.autograd.grad(F.linear(x, w, b), (x, w), g)
    gxs, gws = [], []
    for s in range(1000):
        out = approx_linear(x, w, b, sample_ratio=0.5, policy=policy, mode="backward", generator=_gen(s))
        gx, gw = torch.autograd.grad(out, (x, w), g)
        gxs.append(gx)
        gws.append(gw)
    _assert_unbiased(torch.stack(gxs), gx_exact)
    _assert_unbiased(torch.stack(gws), gw_exact)


# -- modes and invariant 2 -----------------------------------------------------------------

def test_backward_mode_forward_is_exact():
    x, w, b = conv_case(seed=12)
    out = approx_conv2d(x, w, b, padding=1, sample_ratio=0.3, mode="backward")
    assert torch.equal(out, F.conv2d(x, w, b, padding=1))
    x, w, b = linear_case(seed=12)
    assert torch.equal(approx_linear(x, w, b, sample_ratio=0.3, mode="backward"), F.linear(x, w, b))


def test_backward_mode_samples_the_gradients():
    x, w, b = linear_case(n=6, out=8, rows=8, seed=13)
    x.requires_grad_()
    w.requires_grad_()
    out = approx_linear(x, w, b, sample_ratio=0.5, mode="backward")  # topk over out features / rows
    g = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, w), g)
    o_scores = g.norm(dim=0) * w.detach().norm(dim=1)
    o_idx = o_scores.argsort(descending=True)[:4]
    torch.testing.assert_close(gx, g[:, o_idx] @ w.detach()[o_idx])
    r_scores = x.detach().norm(dim=1) * g.norm(dim=1)
    r_idx = r_scores.argsort(descending=True)[:4]
    torch.testing.assert_close(gw, g[r_idx].t() @ x.detach()[r_idx])


@pytest.mark.parametrize("op", ["linear", "conv"])
def test_blackbox_mode_gives_dense_exact_gradients(op):
    if op == "linear":
        x, w, b = linear_case(seed=14)
        exact = lambda x, w, b: F.linear(x, w, b)  # noqa: E731
        approx = lambda x, w, b: approx_linear(x, w, b, sample_ratio=0.25, mode="blackbox")  # noqa: E731
    else:
        x, w, b = conv_case(seed=14)
        exact = lambda x, w, b: F.conv2d(x, w, b, 2, 1)  # noqa: E731
        approx = lambda x, w, b: approx_conv2d(x, w, b, 2, 1, sample_ratio=0.25, mode="blackbox")  # noqa: E731
    for t in (x, w, b):
        t.requires_grad_()
    out = approx(x, w, b)
    assert not torch.allclose(out, exact(x, w, b))  # the forward is sampled
    g = torch.randn_like(out)
    for a, r in zip(torch.autograd.grad(out, (x, w, b), g), torch.autograd.grad(exact(x, w, b), (x, w, b), g)):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
        assert (a != 0).all()  # dense: no zero channels


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("geometry", CONV_GEOMETRIES)
def test_conv_forward_mode_gradients_live_on_the_selection(policy, geometry):
    """Invariant 2, and the gradient inside the selection is that of the reduced product."""
    stride, padding, dilation, kernel = geometry
    x, w, b = conv_case(n=9, kernel=kernel, seed=15)
    seed = 21 if policy in RANDOM_POLICIES else None
    for t in (x, w, b):
        t.requires_grad_()
    out = approx_conv2d(x, w, b, stride, padding, dilation, sample_ratio=0.4, policy=policy,
                        generator=_gen(seed) if seed is not None else None)
    g = torch.randn_like(out)
    gx, gw, gb = torch.autograd.grad(out, (x, w, b), g)
    idx, scale = _selection(pair_scores_ref(x.detach(), w.detach(), policy), num_samples(9, 0.4), policy, seed)
    rest = torch.tensor([i for i in range(9) if i not in set(idx.tolist())], dtype=torch.long)
    assert rest.numel() > 0
    assert (gw[:, rest] == 0).all() and (gx[:, rest] == 0).all()
    s = torch.ones(idx.numel(), dtype=D) if scale is None else scale
    xs = x.detach()[:, idx].requires_grad_()
    ws = w.detach()[:, idx].requires_grad_()
    ref = F.conv2d(xs, ws * s.view(1, -1, 1, 1), b.detach(), stride, padding, dilation)
    rgx, rgw = torch.autograd.grad(ref, (xs, ws), g)
    torch.testing.assert_close(gx[:, idx], rgx, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw[:, idx], rgw, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gb, g.sum((0, 2, 3)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("policy", POLICIES)
def test_linear_forward_mode_gradients_live_on_the_selection(policy):
    x, w, b = linear_case(n=20, seed=16)
    seed = 22 if policy in RANDOM_POLICIES else None
    x = x.view(7, 1, 20).expand(7, 3, 20).contiguous().requires_grad_()  # 3-D input
    w.requires_grad_()
    out = approx_linear(x, w, b, sample_ratio=0.3, policy=policy,
                        generator=_gen(seed) if seed is not None else None)
    assert out.shape == (7, 3, 5)
    gx, gw = torch.autograd.grad(out, (x, w), torch.ones_like(out))
    idx, scale = _selection(pair_scores_ref(x.detach().reshape(-1, 20), w.detach(), policy), 6, policy, seed)
    mask = torch.zeros(20, dtype=torch.bool)
    mask[idx] = True
    assert (gw[:, ~mask] == 0).all() and (gx[..., ~mask] == 0).all()
    s = torch.ones(idx.numel(), dtype=D) if scale is None else scale
    torch.testing.assert_close(gw[:, idx], x.detach().reshape(-1, 20)[:, idx].sum(0).expand(5, -1) * s)


@pytest.mark.parametrize("shape", [(3, 10, 4, 9, 8), (2, 32, 16, 2, 2), (3, 8, 40, 9, 8)],
                         ids=["wide", "deep", "folded"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("stride", [1, 2, (3, 1)])
def test_pointwise_conv_fast_path_matches_conv2d(shape, bias, stride):
    """1x1 convolutions run as matrix products on the sampled channels; both ways of
    forming their weight gradient (wide images, deep channels) agree with conv2d."""
    batch, n, out, h, w_ = shape
    g = _gen(23)
    x = torch.randn(batch, n, h, w_, generator=g, dtype=D, requires_grad=True)
    w = torch.randn(out, n, 1, 1, generator=g, dtype=D, requires_grad=True)
    b = torch.randn(out, generator=g, dtype=D, requires_grad=True) if bias else None
    idx = torch.arange(0, n, 2)
    scale = torch.rand(idx.numel(), generator=g, dtype=D) + 0.5
    out_ = sampled_conv2d(x, w, b, idx, scale, stride)
    ref = conv_ref(x, w, b, idx, scale, stride)
    torch.testing.assert_close(out_, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(ref)
    params = [t for t in (x, w, b) if t is not None]
    for a, r in zip(torch.autograd.grad(out_, params, grad), torch.autograd.grad(ref, params, grad)):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def test_sampled_ops_use_exactly_the_given_indices():
    x, w, b = conv_case(seed=17)
    idx = torch.tensor([1, 4, 5, 9])
    scale = torch.tensor([2.0, 0.5, 1.0, 3.0], dtype=D)
    out = sampled_conv2d(x, w, b, idx, scale, 1, 1)
    torch.testing.assert_close(out, conv_ref(x, w, b, idx, scale, 1, 1))
    x, w, b = linear_case(seed=17)
    torch.testing.assert_close(sampled_linear(x, w, b, idx, scale), linear_ref(x, w, b, idx, scale))


@pytest.mark.parametrize("mode", ["forward", "blackbox"])
def test_nothing_drawn_gives_the_bias_and_zero_weight_gradient(mode):
    """Bernoulli sampling can draw no pair at all: the estimate is then the bias."""
    x, w, b = conv_case(seed=18)
    for t in (x, w, b):
        t.requires_grad_()
    none = torch.empty(0, dtype=torch.long)
    out = sampled_conv2d(x, w, b, none, None, 1, 1, 1, mode=mode)
    assert out.shape == F.conv2d(x, w, b, 1, 1).shape
    torch.testing.assert_close(out, b.detach().view(1, -1, 1, 1).expand_as(out))
    gx, gw, gb = torch.autograd.grad(out, (x, w, b), torch.ones_like(out))
    assert torch.equal(gb, torch.full_like(gb, out[:, 0].numel()))
    if mode == "forward":
        assert not gw.any() and not gx.any()


def test_random_policies_leave_the_global_rng_alone():
    x, w, b = linear_case(seed=19)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    for policy in RANDOM_POLICIES:
        approx_linear(x, w, b, sample_ratio=0.5, policy=policy, generator=_gen(1))
    assert torch.equal(torch.get_rng_state(), before)


def test_same_generator_seed_same_estimate():
    x, w, b = linear_case(seed=20)
    for policy in RANDOM_POLICIES:
        a = approx_linear(x, w, b, sample_ratio=0.5, policy=policy, generator=_gen(5))
        c = approx_linear(x, w, b, sample_ratio=0.5, policy=policy, generator=_gen(5))
        assert torch.equal(a, c)


@pytest.mark.parametrize("shape", [(4, 6, 3, 3), (5, 7, 1, 1), (3, 4, 5, 5), (2, 3, 9), (4, 6), (0, 3, 2, 2)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_channel_norms_match_the_definition(shape, dtype):
    from approxdist.functional import channel_norms
    t = torch.randn(*shape, generator=_gen(24)).to(dtype)
    ref = torch.stack([t[:, i].double().pow(2).sum().sqrt() for i in range(shape[1])])
    for view in (t, t.transpose(0, 1).contiguous().transpose(0, 1)):  # contiguous or not
        out = channel_norms(view, 1)
        assert out.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5 if dtype != torch.float64 else 1e-12, atol=1e-6)


@pytest.mark.parametrize("shape", [(6, 9, 3, 3), (5, 7, 1, 1), (1, 8, 2, 3), (4, 6), (3, 1, 2, 2)])
@pytest.mark.parametrize("k", [0, 1, 3, "all"])
@pytest.mark.parametrize("part_layout", ["row_major", "dim1_major"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dim1_major_scatter_equals_zero_fill_and_index_copy(shape, k, part_layout, dtype):
    """The block-gathering scatter of a dim-1-major weight gradient gives the bits and the
    strides of the plain definition (zeros, then the part at the indices)."""
    from approxdist.functional._layout import dim1_major_strides, to_dim1_major
    from approxdist.functional._products import _scatter

    n = shape[1]
    k = n if k == "all" else min(k, n)
    g = _gen(k + n)
    idx = torch.randperm(n, generator=g)[:k].sort().values
    part = torch.randn((shape[0], k) + shape[2:], generator=g).to(dtype)
    if part_layout == "dim1_major":
        part = to_dim1_major(part)
    stride = dim1_major_strides(shape)
    want = torch.zeros(shape, dtype=dtype)
    want.index_copy_(1, idx, part)
    got = _scatter(shape, idx, part, stride=stride)
    assert torch.equal(got, want)
    assert got.stride() == stride and got.dtype == dtype
    if shape[0] > 1 and shape[1] > 1:  # the layers' layout (a size-1 dim keeps its stride)
        assert stride == torch.empty(shape).transpose(0, 1).contiguous().transpose(0, 1).stride()


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("geometry", CONV_GEOMETRIES + ["linear"])
def test_dim1_major_weight_gives_the_row_major_results(geometry, scaled):
    """A weight stored input-channel-major (the distributed layers' layout) gives the
    output and gradients of the same weight stored row-major, and its gradient comes in
    its own layout, zero outside the selection."""
    from approxdist.functional._layout import to_dim1_major

    if geometry == "linear":
        x, w, b = linear_case(n=11, seed=31)
        op = lambda x, w, b, idx, s: sampled_linear(x, w, b, idx, s)  # noqa: E731
    else:
        stride, padding, dilation, kernel = geometry
        x, w, b = conv_case(n=11, kernel=kernel, seed=31)
        op = lambda x, w, b, idx, s: sampled_conv2d(x, w, b, idx, s, stride, padding, dilation)  # noqa: E731
    idx = torch.tensor([0, 3, 4, 9])
    scale = torch.rand(4, generator=_gen(5), dtype=D) + 0.5 if scaled else None
    results = []
    for weight in (w, to_dim1_major(w)):
        xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, weight, b))
        out = op(xs, ws, bs, idx, scale)
        grads = torch.autograd.grad(out, (xs, ws, bs), torch.randn(out.shape, generator=_gen(6), dtype=D))
        assert grads[1].stride() == ws.stride()
        results.append((out,) + grads)
    assert to_dim1_major(w).stride() != w.stride()  # the two runs did use two layouts
    rest = torch.tensor([i for i in range(11) if i not in idx.tolist()])
    assert (results[1][2][:, rest] == 0).all()
    for row_major, dim1 in zip(*results):
        torch.testing.assert_close(dim1, row_major, rtol=1e-12, atol=1e-12)


# (input size, stride, padding, dilation, kernel, (the one tap read, the pixel it reads) or None)
TAP_GEOMETRIES = [
    ((1, 1), 1, 1, 1, 3, ((1, 1), (0, 0))), ((1, 1), 2, 1, 1, 3, ((1, 1), (0, 0))),
    ((1, 1), 1, 2, 1, 5, ((2, 2), (0, 0))), ((1, 1), 1, 2, 2, 3, ((1, 1), (0, 0))),
    ((3, 3), 1, 1, 2, 3, ((1, 1), (1, 1))),  # a larger image of which one pixel is read
    ((1, 1), (2, 1), (1, 0), 1, (3, 1), ((1, 0), (0, 0))), ((1, 1), 2, 1, 1, 2, ((1, 1), (0, 0))),
    ((2, 2), 2, 1, 1, 3, None),  # resnet18's layer4.0.conv1 at 32 px: 4 of 9 taps read
    ((1, 1), 1, 1, 1, 2, None), ((1, 1), 1, 2, 1, 3, None),  # 2x2 and 3x3 outputs
    ((3, 3), 1, 0, 1, 3, None),  # one output pixel, but every tap is read
]


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("layout", ["row_major", "dim1_major"])
@pytest.mark.parametrize("geometry", TAP_GEOMETRIES)
def test_one_output_pixel_read_by_one_tap_is_a_product_with_that_tap(geometry, layout, scaled):
    """Where the output is one pixel and a single tap reads the image (the others fall in
    the padding), the sampled convolution runs as a 1x1 one of that pixel and that tap,
    equal to the convolution over the selected channels in value and gradient; its
    weight gradient comes in the weight's layout, zero outside the selection and at
    every other tap. Other geometries take the convolution."""
    from torch.nn.modules.utils import _pair

    from approxdist.functional._layout import to_dim1_major
    from approxdist.functional._products import Conv2dProduct

    size, stride, padding, dilation, kernel, tap = geometry
    kh, kw = _pair(kernel)
    g = _gen(41)
    x = torch.randn((5, 11) + size, generator=g, dtype=D)
    w = torch.randn(7, 11, kh, kw, generator=g, dtype=D)
    b = torch.randn(7, generator=g, dtype=D)
    product = Conv2dProduct(_pair(stride), _pair(padding), _pair(dilation), (kh, kw))
    assert product._tap(size) == tap
    assert (product.reduce(size) is None) == (tap is None)
    if layout == "dim1_major":
        w = to_dim1_major(w)
    idx = torch.tensor([0, 3, 4, 9])
    scale = torch.rand(4, generator=_gen(5), dtype=D) + 0.5 if scaled else None
    xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
    out = sampled_conv2d(xs, ws, bs, idx, scale, stride, padding, dilation)
    gy = torch.randn(out.shape, generator=_gen(6), dtype=D)
    got = (out,) + torch.autograd.grad(out, (xs, ws, bs), gy)
    assert got[2].stride() == ws.stride()
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, w.contiguous(), b))
    w_sel = wr.index_select(1, idx) * (scale.view(1, -1, 1, 1) if scaled else 1)
    ref = F.conv2d(xr.index_select(1, idx), w_sel, br, stride, padding, dilation)
    want = (ref,) + torch.autograd.grad(ref, (xr, wr, br), gy)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    rest = [i for i in range(11) if i not in idx.tolist()]
    assert (got[2][:, rest] == 0).all() and (got[1][:, rest] == 0).all()
    if tap is not None:
        others = torch.ones(kh, kw, dtype=torch.bool)
        others[tap[0]] = False
        assert (got[2][:, :, others] == 0).all()


@pytest.mark.parametrize("policy", ["topk", "bernoulli"])
def test_approx_conv2d_on_one_pixel_equals_the_conv_of_its_selection(policy, monkeypatch):
    """approx_conv2d chooses its channels from the whole input and weight, then runs the
    one-tap product: the result is the convolution over those channels (scaled)."""
    from approxdist.functional import _products
    from approxdist.functional._core import select_pairs

    taps = []
    apply = _products._TapWeight.apply
    monkeypatch.setattr(_products._TapWeight, "apply", lambda *a: taps.append(a[1:]) or apply(*a))
    g = _gen(8)
    x = torch.randn(6, 12, 1, 1, generator=g, dtype=D, requires_grad=True)
    w = torch.randn(9, 12, 3, 3, generator=g, dtype=D, requires_grad=True)
    out = approx_conv2d(x, w, None, 1, 1, sample_ratio=0.5, policy=policy, generator=_gen(3))
    gx, gw = torch.autograd.grad(out.square().sum(), (x, w))
    idx, scale = select_pairs(x.detach(), w.detach(), 6, policy, _gen(3))
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    w_sel = wr.index_select(1, idx) * (scale.view(1, -1, 1, 1) if scale is not None else 1)
    ref = F.conv2d(xr.index_select(1, idx), w_sel, None, 1, 1)
    rx, rw = torch.autograd.grad(ref.square().sum(), (xr, wr))
    for a, e in ((out, ref), (gx, rx), (gw, rw)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    assert taps == [(1, 1)]  # the one-tap product ran
    assert (gw[:, :, [0, 2]] == 0).all() and (gw[:, :, 1, [0, 2]] == 0).all()


def test_one_pixel_prepared_weight_is_the_tap():
    """sampled_conv2d_weight told of a one-pixel input gathers only the tap that reads
    it, as the forward does (dim-1-major blocks); without input_size, or for another
    size, it is the row-major convolution weight, which a one-pixel forward does not
    take (it gathers anew)."""
    from approxdist.functional import sampled_conv2d_weight
    from approxdist.functional._layout import dim1_major, to_dim1_major

    g = _gen(3)
    w = to_dim1_major(torch.randn(8, 6, 3, 3, generator=g, dtype=D))
    x = torch.randn(4, 6, 1, 1, generator=g, dtype=D)
    idx = torch.tensor([1, 2, 5])
    kept = sampled_conv2d_weight(w, idx, None, 1, 1, 1, input_size=(1, 1))
    assert dim1_major(kept) and kept.shape == (8, 3, 1, 1)
    assert torch.equal(kept, w[:, idx, 1:2, 1:2])
    assert sampled_conv2d_weight(w, idx, None, 1).is_contiguous()
    assert sampled_conv2d_weight(w, idx, None, 1, input_size=(2, 2)).is_contiguous()
    want = F.conv2d(x[:, idx], w[:, idx], None, 1, 1)
    # (doubled, to see which is used) the tap is taken, the full-size weight gathered anew
    out = sampled_conv2d(x, w, None, idx, None, 1, 1, prepared_weight=2 * kept)
    torch.testing.assert_close(out, 2 * want, rtol=1e-12, atol=1e-12)
    out = sampled_conv2d(x, w, None, idx, None, 1, 1, prepared_weight=2 * sampled_conv2d_weight(w, idx, None, 1))
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
