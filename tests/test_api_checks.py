"""Arguments torch would accept but the approximate ops could not run (or would run
wrongly) raise one-line ValueErrors naming the argument, whether given to a constructor,
a functional op or assigned after construction; unbatched conv input works as it does
with nn.Conv2d, at every ratio."""
import pytest
import torch
import torch.nn as nn

import approxdist as ad
from approxdist.functional import approx_conv2d, approx_linear, num_samples, sampled_conv2d, sampled_linear
from approxdist.nn import ApproxConv2d, ApproxConv2dDist, ApproxLinear, ApproxLinearDist, convert_model

CONVS = [ApproxConv2d, ApproxConv2dDist]
LINEARS = [ApproxLinear, ApproxLinearDist]


def _one_line(excinfo, name):
    msg = str(excinfo.value)
    assert "\n" not in msg and name in msg, msg


@pytest.mark.parametrize("ratio", [0.5, 1.0])
@pytest.mark.parametrize("weight", [torch.randn(8), torch.randn(2, 8, 3), torch.randn(3, 7)])
def test_linear_operand_shapes(ratio, weight):
    x = torch.randn(4, 8)
    for call in (lambda: approx_linear(x, weight, sample_ratio=ratio),
                 lambda: sampled_linear(x, weight, None, torch.tensor([0, 1]))):
        with pytest.raises(ValueError) as e:
            call()
        _one_line(e, "weight" if weight.dim() != 2 else "input")


@pytest.mark.parametrize("cls", LINEARS)
def test_linear_layer_refuses_an_input_of_other_width(cls):
    # The weight-sampled layer gathered the selected columns of whatever came: a silent
    # wrong result on an input one feature short.
    layer = cls(8, 3, sample_ratio=0.5)
    with pytest.raises(ValueError) as e:
        layer(torch.randn(2, 7))
    _one_line(e, "input")
    with pytest.raises(ValueError) as e:
        approx_linear(torch.randn(2, 8), layer.weight, torch.randn(4), sample_ratio=0.5)
    _one_line(e, "bias")


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("cls", LINEARS)
def test_linear_with_no_input_features_is_nn_linear(cls):
    torch.manual_seed(0)
    layer = cls(0, 3, sample_ratio=0.5)
    assert torch.equal(layer(torch.randn(2, 0)), nn.functional.linear(torch.randn(2, 0), layer.weight, layer.bias))


@pytest.mark.parametrize("arg,value", [("stride", 0), ("stride", -1), ("stride", 1.5), ("stride", "2"),
                                       ("dilation", 0), ("padding", -1), ("stride", (1, 0))])
def test_conv_geometry(arg, value):
    x, w = torch.randn(2, 4, 6, 6), torch.randn(5, 4, 3, 3)
    calls = [lambda: approx_conv2d(x, w, **{arg: value}, sample_ratio=r) for r in (0.5, 1.0)]
    calls += [lambda: sampled_conv2d(x, w, None, torch.tensor([0, 2]), **{arg: value})]
    calls += [lambda: cls(4, 5, 3, **{arg: value}, sample_ratio=0.5) for cls in CONVS]
    for call in calls:
        with pytest.raises(ValueError) as e:
            call()
        _one_line(e, arg)


@pytest.mark.parametrize("cls", CONVS)
def test_conv_attributes_assigned_after_construction(cls):
    layer = cls(4, 5, 3, sample_ratio=0.5)
    layer.stride = (0, 0)  # was ZeroDivisionError
    with pytest.raises(ValueError) as e:
        layer(torch.randn(2, 4, 6, 6))
    _one_line(e, "stride")
    with pytest.raises(ValueError) as e:
        cls(4, 5, 0)
    _one_line(e, "kernel_size")


def test_conv_operand_shapes():
    x = torch.randn(2, 4, 6, 6)
    for weight, name in ((torch.randn(5, 4), "weight"), (torch.randn(5, 3, 3, 3), "input")):
        with pytest.raises(ValueError) as e:
            approx_conv2d(x, weight, sample_ratio=0.5)
        _one_line(e, name)
    for cls in CONVS:
        with pytest.raises(ValueError) as e:
            cls(4, 5, 3, sample_ratio=0.5)(x[None])  # 5-D
        _one_line(e, "input")


@pytest.mark.parametrize("cls", CONVS)
@pytest.mark.parametrize("ratio", [1.0, 0.5])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_unbatched_conv_input_is_the_batch_of_one(cls, ratio, padding_mode):
    # As nn.Conv2d: (C, H, W) in, (C_out, H', W') out, the same values as the batch of one.
    torch.manual_seed(0)
    a = cls(4, 5, 3, padding=1, padding_mode=padding_mode, sample_ratio=ratio, minimal_k=1)
    b = cls(4, 5, 3, padding=1, padding_mode=padding_mode, sample_ratio=ratio, minimal_k=1)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 6, 6)
    out = a(x)
    ref = b(x[None])
    assert out.shape == ref.shape[1:] and torch.equal(out, ref[0])
    out.sum().backward()
    ref.sum().backward()
    assert torch.equal(a.weight.grad, b.weight.grad)
    if ratio == 1.0:
        plain = nn.Conv2d(4, 5, 3, padding=1, padding_mode=padding_mode)
        plain.load_state_dict(a.state_dict())
        assert torch.equal(out, plain(x))
    assert torch.equal(approx_conv2d(x, a.weight, a.bias, padding=1, sample_ratio=ratio, policy="topk"),
                       approx_conv2d(x[None], a.weight, a.bias, padding=1, sample_ratio=ratio, policy="topk")[0])


def test_agreement_and_check_every_are_validated_on_assignment():
    state = ad.distributed.SparseAllReduceState()
    for name, bad in (("agreement", "x"), ("check_every", 0), ("check_every", True), ("process_group", "abc")):
        with pytest.raises(ValueError) as e:
            setattr(state, name, bad)
        _one_line(e, name)
    assert state.agreement == "local" and state.check_every == 100 and state.process_group is None
    state.agreement = "check"
    assert state.agreement == "check"
    with pytest.raises(ValueError, match="process_group"):
        ad.distributed.SparseAllReduceState("abc")


@pytest.mark.parametrize("bad", ["a", 1.5, True, 2 ** 70])
def test_seed_is_validated(bad):
    calls = [lambda: ApproxLinearDist(8, 3, seed=bad), lambda: ApproxConv2dDist(4, 5, 3, seed=bad),
             lambda: convert_model(nn.Sequential(nn.Linear(8, 3)), 0.5, distributed=True, seed=bad),
             lambda: setattr(ApproxLinearDist(8, 3), "seed", bad)]
    for call in calls:
        with pytest.raises(ValueError) as e:
            call()
        _one_line(e, "seed")


def test_assigning_a_seed_restarts_the_stream():
    x = torch.randn(2, 16)
    a = ApproxLinearDist(16, 4, sample_ratio=0.5, policy="bernoulli_weight", seed=1)
    b = ApproxLinearDist(16, 4, sample_ratio=0.5, policy="bernoulli_weight", seed=2)
    b.load_state_dict(a.state_dict())
    a(x)
    a.seed = 2  # was ignored once the generator had drawn
    a(x)
    b(x)
    assert torch.equal(a.last_indices, b.last_indices)
    assert torch.equal(a.sampler_state()["generator"], b.sampler_state()["generator"])


@pytest.mark.parametrize("cls", LINEARS)
def test_weight_layout_is_validated_and_applied_on_assignment(cls):
    layer = cls(8, 3, sample_ratio=0.5)
    assert not layer.weight.is_contiguous()  # input-major by default
    with pytest.raises(ValueError) as e:
        layer.weight_layout = "bogus"
    _one_line(e, "weight_layout")
    layer.weight_layout = "contiguous"  # was recorded but not applied
    assert layer.weight.is_contiguous() and layer.weight_layout == "contiguous"


def test_convert_model_flags_and_module():
    for kw, name in ((dict(distributed="no"), "distributed"), (dict(skip_first_conv="no"), "skip_first_conv")):
        with pytest.raises(ValueError) as e:
            convert_model(nn.Sequential(nn.Linear(8, 3)), 0.5, **kw)
        _one_line(e, name)
    with pytest.raises(TypeError, match="module"):
        convert_model("model", 0.5)
    for bad in (3.5, -1, "3"):
        with pytest.raises(ValueError, match="n must be"):
            num_samples(bad, 0.5)
