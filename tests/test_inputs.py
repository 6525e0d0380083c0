"""Bad arguments raise a ValueError naming the argument; half-precision inputs and
torch.autocast keep their dtypes (the original code cast everything to float32)."""
import math

import pytest
import torch
import torch.nn.functional as F

import approxdist as ad
from approxdist.functional import approx_conv2d, approx_linear, num_samples
from approxdist.nn import ApproxConv2d, ApproxConv2dDist, ApproxLinear, ApproxLinearDist, convert_model

BAD_RATIOS = [0, 0.0, -0.5, 1.5, math.nan, math.inf, True, False, "0.5", None]


def _linear_args():
    return torch.randn(4, 6), torch.randn(3, 6)


@pytest.mark.parametrize("ratio", BAD_RATIOS)
def test_bad_sample_ratio(ratio):
    x, w = _linear_args()
    for call in (lambda: approx_linear(x, w, sample_ratio=ratio),
                 lambda: approx_conv2d(x.view(1, 4, 6, 1).transpose(0, 1), w.view(3, 6, 1, 1)[:, :1],
                                       sample_ratio=ratio),
                 lambda: num_samples(10, ratio),
                 lambda: ApproxLinear(6, 3, sample_ratio=ratio),
                 lambda: ApproxConv2d(6, 3, 3, sample_ratio=ratio),
                 lambda: ApproxConv2dDist(6, 3, 3, sample_ratio=ratio),
                 lambda: convert_model(torch.nn.Linear(6, 3), ratio)):
        with pytest.raises(ValueError, match="sample_ratio"):
            call()


@pytest.mark.parametrize("minimal_k", [0, -1, 1.5, True, "2"])
def test_bad_minimal_k(minimal_k):
    x, w = _linear_args()
    for call in (lambda: approx_linear(x, w, sample_ratio=0.5, minimal_k=minimal_k),
                 lambda: num_samples(10, 0.5, minimal_k),
                 lambda: ApproxLinear(6, 3, minimal_k=minimal_k),
                 lambda: convert_model(torch.nn.Linear(6, 3), 0.5, minimal_k)):
        with pytest.raises(ValueError, match="minimal_k"):
            call()


def test_bad_policy_and_mode():
    x, w = _linear_args()
    with pytest.raises(ValueError, match="policy"):
        approx_linear(x, w, sample_ratio=0.5, policy="top-k")
    with pytest.raises(ValueError, match="mode"):
        approx_linear(x, w, sample_ratio=0.5, mode="sideways")
    with pytest.raises(ValueError, match="policy"):
        ApproxConv2d(4, 4, 3, policy="best")
    with pytest.raises(ValueError, match="mode"):
        ApproxLinear(4, 4, mode="both")
    with pytest.raises(ValueError, match="policy"):
        ApproxLinearDist(4, 4, policy="topk")  # the *Dist forms sample from weights only
    with pytest.raises(ValueError, match="policy"):
        convert_model(torch.nn.Linear(6, 3), 0.5, distributed=True, policy="random")
    with pytest.raises(ValueError, match="mode"):
        convert_model(torch.nn.Linear(6, 3), 0.5, mode="dense")
    with pytest.raises(ValueError, match="exclude"):
        convert_model(torch.nn.Sequential(torch.nn.Linear(6, 3)), 0.5, exclude=(3,))


@pytest.mark.parametrize("policy", ["topk_weight", "bernoulli_weight"])
def test_weight_policy_with_backward_mode(policy):
    x, w = _linear_args()
    with pytest.raises(ValueError, match="mode='backward'"):
        approx_linear(x, w, sample_ratio=0.5, policy=policy, mode="backward")
    with pytest.raises(ValueError, match="policy"):
        ApproxLinear(6, 3, policy=policy, mode="backward")
    layer = ApproxLinear(6, 3, policy=policy)
    with pytest.raises(ValueError, match="backward"):
        layer.mode = "backward"
    assert layer.mode == "forward"


def test_attribute_setters_validate():
    layer = ApproxConv2d(4, 4, 3, sample_ratio=0.5)
    for attr, value in (("sample_ratio", 0), ("sample_ratio", float("nan")), ("minimal_k", 0),
                        ("policy", "nope"), ("mode", "nope")):
        with pytest.raises(ValueError, match=attr):
            setattr(layer, attr, value)
    assert (layer.sample_ratio, layer.minimal_k, layer.policy, layer.mode) == (0.5, 1, "topk", "forward")


def test_groups_are_not_implemented():
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(NotImplementedError, match="groups"):
        approx_conv2d(x, torch.randn(4, 2, 3, 3), groups=2, sample_ratio=0.5)
    with pytest.raises(NotImplementedError, match="groups"):
        ApproxConv2d(4, 4, 3, groups=4)


def test_string_padding_in_the_functional_op():
    with pytest.raises(ValueError, match="padding"):
        approx_conv2d(torch.randn(1, 4, 5, 5), torch.randn(4, 4, 3, 3), padding="same", sample_ratio=0.5)


# -- dtypes ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["forward", "backward", "blackbox", "weight_grad"])
@pytest.mark.parametrize("kernel", [3, 1])
def test_half_inputs_keep_their_dtype(dtype, mode, kernel):
    torch.manual_seed(0)
    x = torch.randn(8, 16, dtype=dtype, requires_grad=True)
    w = torch.randn(4, 16, dtype=dtype, requires_grad=True)
    b = torch.randn(4, dtype=dtype, requires_grad=True)
    out = approx_linear(x, w, b, sample_ratio=0.5, mode=mode)
    assert out.dtype == dtype
    out.float().sum().backward()
    assert x.grad.dtype == w.grad.dtype == b.grad.dtype == dtype
    xc = torch.randn(2, 8, 6, 6, dtype=dtype, requires_grad=True)
    wc = torch.randn(4, 8, kernel, kernel, dtype=dtype, requires_grad=True)
    out = approx_conv2d(xc, wc, None, 1, kernel // 2, sample_ratio=0.5, mode=mode)
    assert out.dtype == dtype
    out.float().sum().backward()
    assert xc.grad.dtype == wc.grad.dtype == dtype
    ref = F.conv2d(xc.detach().double(), wc.detach().double(), None, 1, kernel // 2)
    if mode == "backward":  # exact forward, up to the half-precision rounding
        torch.testing.assert_close(out.double(), ref, rtol=0.05, atol=0.25)


@pytest.mark.parametrize("mode", ["forward", "backward", "blackbox", "weight_grad"])
def test_autocast_bfloat16_on_cpu(mode):
    torch.manual_seed(0)
    model = torch.nn.Sequential(ApproxConv2d(3, 8, 3, padding=1, sample_ratio=0.5, mode=mode),
                                torch.nn.ReLU(),
                                ApproxConv2d(8, 8, 3, padding=1, sample_ratio=0.5, mode=mode),
                                torch.nn.Flatten(),
                                ApproxLinear(8 * 36, 5, sample_ratio=0.5, mode=mode))
    x = torch.randn(2, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    for p in model.parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32


def test_autocast_dist_layers():
    model = torch.nn.Sequential(ApproxConv2dDist(4, 4, 3, sample_ratio=0.5),
                                torch.nn.Flatten(), ApproxLinearDist(4 * 9, 3, sample_ratio=0.5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 4, 5, 5))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert model[0].weight.grad.dtype == torch.float32


def test_double_model_stays_double():
    model = convert_model(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 3)).double(), 0.5)
    out = model(torch.randn(1, 3, 7, 7, dtype=torch.float64))
    assert out.dtype == torch.float64
    assert ad.functional.num_samples(4, 0.5) == 2
