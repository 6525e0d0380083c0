"""convert_model on torchvision models: nothing a checkpoint or an optimizer sees changes
(state_dict keys and values, Parameter objects, requires_grad, dtype), eval outputs stay
the same, training steps work and leave the layers that must stay exact exact."""
import copy

import pytest
import torch
import torch.nn as nn
import torchvision

from approxdist.nn import (
    ApproxConv2d,
    ApproxConv2dDist,
    ApproxLinear,
    ApproxLinearDist,
    convert_model,
)

APPROX = (ApproxConv2d, ApproxConv2dDist, ApproxLinear, ApproxLinearDist)
# (name, input size): small inputs that every model still accepts
MODELS = [("resnet18", 32), ("resnet50", 32), ("mobilenet_v2", 32), ("vgg11", 32)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a small shared machine OpenMP threads that spin-wait for
    each other slow these whole-model steps down tenfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(name):
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(num_classes=5)


def _kinds(model):
    return {name: type(m) for name, m in model.named_modules()}


@pytest.fixture(scope="module", params=MODELS, ids=[m for m, _ in MODELS])
def case(request):
    name, size = request.param
    model = _model(name)
    if name == "vgg11":  # its 25088x4096 classifier is most of its cost and not what we test
        model.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 5))
    torch.manual_seed(1)
    return name, model, torch.randn(2, 3, size, size)


@pytest.mark.parametrize("distributed", [False, True])
def test_convert_keeps_state_and_eval_outputs(case, distributed):
    name, original, x = case
    model = copy.deepcopy(original)
    params_before = dict(model.named_parameters())
    converted = convert_model(model, 0.5, distributed=distributed)
    assert converted is model
    ref_state, state = original.state_dict(), model.state_dict()
    assert list(state) == list(ref_state)
    for key in ref_state:
        assert torch.equal(state[key], ref_state[key]), key
    for pname, p in model.named_parameters():  # the very Parameter objects (optimizers keep working)
        assert p is params_before[pname]
    original.eval(), model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), original(x))

    kinds, before = _kinds(model), _kinds(original)
    convs = [n for n, t in before.items() if t is nn.Conv2d]
    assert kinds[convs[0]] is nn.Conv2d  # the first conv stays exact
    for n in convs[1:]:
        groups = original.get_submodule(n).groups
        expected = nn.Conv2d if groups > 1 else (ApproxConv2dDist if distributed else ApproxConv2d)
        assert kinds[n] is expected, n
    for n, t in before.items():
        if t is nn.Linear:
            assert kinds[n] is (ApproxLinearDist if distributed else ApproxLinear), n
    if name == "mobilenet_v2":
        assert any(t is nn.Conv2d and original.get_submodule(n).groups > 1 for n, t in kinds.items())


def test_training_step_works_and_is_sampled(case):
    name, original, x = case
    model = convert_model(copy.deepcopy(original), 0.5, distributed=True).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    y = torch.tensor([1, 3])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = nn.functional.cross_entropy(model(x), y)
    assert torch.isfinite(loss)
    loss.backward()
    sampled = [m for m in model.modules() if isinstance(m, APPROX)]
    assert sampled
    for m in sampled:
        n = m.weight.shape[1]
        idx = m.last_indices
        assert idx.numel() == max(n // 2, 1) and torch.equal(idx, idx.sort().values)
        outside = torch.ones(n, dtype=torch.bool)
        outside[idx] = False
        assert not m.weight.grad[:, outside].any()  # invariant 2 in a real network
    opt.step()
    after = model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    changed = [k for k in before if k.endswith("weight") and not torch.equal(before[k], after[k])]
    assert len(changed) >= len(sampled)


@pytest.mark.parametrize("mode", ["forward", "blackbox", "weight_grad"])
def test_convert_with_every_local_policy_trains(mode):
    original = _model("resnet18")
    x = torch.randn(2, 3, 32, 32)
    for policy in ("topk", "topk_weight", "random", "bernoulli", "bernoulli_weight", "uniform"):
        model = convert_model(copy.deepcopy(original), 0.33, policy=policy, mode=mode).train()
        loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 4]))
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_exclude_by_name_glob_and_type():
    model = _model("resnet18")
    convert_model(model, 0.5, exclude=("fc", "layer4.*", nn.Linear))
    kinds = _kinds(model)
    assert kinds["fc"] is nn.Linear
    assert all(t is nn.Conv2d for n, t in kinds.items() if n.startswith("layer4.") and "conv" in n)
    assert kinds["layer3.0.conv1"] is ApproxConv2d
    model = convert_model(_model("resnet18"), 0.5, exclude=nn.Conv2d, skip_first_conv=False)
    kinds = _kinds(model)
    assert kinds["conv1"] is nn.Conv2d and kinds["layer1.0.conv1"] is nn.Conv2d and kinds["fc"] is ApproxLinear


def test_skip_first_conv_false_converts_it():
    model = convert_model(_model("resnet18"), 0.5, skip_first_conv=False)
    assert type(model.conv1) is ApproxConv2d


def test_requires_grad_dtype_and_idempotence():
    model = _model("resnet18").double()
    model.layer1.requires_grad_(False)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    convert_model(model, 0.25, minimal_k=4, policy="uniform", mode="blackbox")
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == frozen
    assert all(p.dtype == torch.float64 for p in model.parameters())
    layer = model.layer2[0].conv1
    assert (layer.sample_ratio, layer.minimal_k, layer.policy, layer.mode) == (0.25, 4, "uniform", "blackbox")
    kinds = _kinds(model)
    convert_model(model, 0.5)  # a second call applies its own arguments to the converted layers
    assert _kinds(model) == kinds
    assert (layer.sample_ratio, layer.minimal_k, layer.policy, layer.mode) == (0.5, 1, "topk", "forward")
    out = model.train()(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    assert out.dtype == torch.float64


def test_convert_a_bare_layer_and_keep_hooks():
    lin = nn.Linear(8, 3)
    seen = []
    lin.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    new = convert_model(lin, 0.5)
    assert type(new) is ApproxLinear and new.weight is lin.weight
    new(torch.randn(2, 8))
    assert seen == [torch.Size([2, 3])]


def test_distributed_layers_get_distinct_seeds():
    model = convert_model(_model("resnet18"), 0.5, distributed=True, policy="bernoulli_weight", allow_unbiased=True, seed=10)
    seeds = [m.seed for m in model.modules() if isinstance(m, ApproxConv2dDist)]
    assert len(seeds) == len(set(seeds)) and min(seeds) == 10


@pytest.mark.parametrize("distributed", [True, False])
def test_sampled_layers_store_weights_dim1_major(distributed):
    """convert_model keeps values and Parameter objects but lays the sampled weights out
    with input channels outermost; gradients come in that layout (no copy by
    AccumulateGrad or DDP), and dtype/device moves keep it."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {name: p for name, p in model.named_parameters()}
    convert_model(model, 0.5, distributed=distributed)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p is params[name] for name, p in model.named_parameters())
    sampled = [m for m in model.modules() if isinstance(m, APPROX)]
    assert len(sampled) == 20  # every conv but the first, and fc
    for m in sampled:
        assert m.weight.transpose(0, 1).is_contiguous() and not m.weight.is_contiguous(), m
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    for m in sampled:
        assert m.weight.grad.stride() == m.weight.stride(), m
    model.double()
    assert all(m.weight.dtype == torch.float64 and m.weight.transpose(0, 1).is_contiguous() for m in sampled)


def test_weight_layout_option():
    model = convert_model(torchvision.models.resnet18(num_classes=10), 0.5, distributed=True,
                          weight_layout="contiguous")
    assert all(p.is_contiguous() for p in model.parameters())
    layer = ApproxConv2dDist(8, 4, 3, sample_ratio=0.5)
    assert layer.weight_layout == "input_major" and layer.weight.transpose(0, 1).is_contiguous()
    with pytest.raises(ValueError, match="weight_layout must be one of"):
        convert_model(nn.Sequential(nn.Linear(4, 4)), 0.5, distributed=True, weight_layout="rows")
    with pytest.raises(ValueError, match="weight_layout must be one of"):
        ApproxLinearDist(4, 4, weight_layout="channels_last")
    with pytest.raises(ValueError, match="weight_layout must be one of"):
        ApproxConv2d(4, 4, 3, weight_layout=None)
    plain = convert_model(nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 4)), 0.5, weight_layout="contiguous")
    assert all(p.is_contiguous() for p in plain.parameters())
    relaid = convert_model(nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 4)), 0.5)
    assert all(m.weight.transpose(0, 1).is_contiguous() and not m.weight.is_contiguous()
               for m in relaid if isinstance(m, ApproxLinear))
