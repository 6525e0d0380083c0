"""Every torchvision classification model under convert_model, local and distributed:
a training step at a small input it accepts, eval outputs bitwise equal to the
unconverted model, state_dict keys and values unchanged, and at sample_ratio 1 a
training step whose gradients are bitwise those of the unconverted model. One model per
family runs in `make test`, the whole of list_models under -m slow; the sparse hook on
efficientnet_b0 (squeeze-excitation, inplace activations, stochastic depth) equals
DDP's all-reduce on 2 gloo ranks.

Tensors are compared with torch.equal against copies; tensors of 4M elements or more
through SHA-256 digests of their bytes (exact too), so the largest models (600M
parameters) need no second copy of their weights."""
import hashlib
import math

import pytest
import torch
import torch.nn as nn
import torchvision
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.efficientnet import EfficientNet, FusedMBConvConfig, MBConvConfig
from torchvision.models.maxvit import MaxVit
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2
from torchvision.models.vision_transformer import VisionTransformer

import approxdist as ad
from approxdist.nn import WeightSampled
from hookcompare import assert_hook_equals_allreduce

ALL = torchvision.models.list_models(module=torchvision.models)
APPROX = (ad.nn.ApproxLinear, ad.nn.ApproxConv2d, ad.nn.ApproxMultiheadAttention, WeightSampled)


def _size(name):
    """The smallest input side the model takes (and its constructor arguments)."""
    if name.startswith("vit_"):
        patch = int(name.rsplit("_", 1)[1])
        return 2 * patch, {"image_size": 2 * patch}
    if name == "maxvit_t":
        return 224, {}  # four stages of windows of 7: 7 * 32
    if name == "inception_v3":
        return 299, {}  # its auxiliary head needs the 17x17 grid of 299 px inputs
    if name == "alexnet":
        return 64, {}
    return 32, {}


def _builder(name):
    size, kw = _size(name)
    return (lambda: torchvision.models.get_model(name, weights=None, num_classes=5, **kw)), size


def _small_head(name, features):
    """alexnet / vgg11 with a small classifier: their 4096-wide one is most of their cost
    and tests nothing the small one does not."""
    def build():
        model = torchvision.models.get_model(name, weights=None, num_classes=5)
        model.classifier = nn.Sequential(nn.Dropout(), nn.Linear(features, 64), nn.ReLU(inplace=True),
                                         nn.Dropout(), nn.Linear(64, 5))
        return model
    return build


def _swin(**kw):
    return lambda: SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                                   window_size=[4, 4], stochastic_depth_prob=0.2, num_classes=5, **kw)


# One model per family for `make test`: the cheapest model of each builder, or a small
# instance of its class where the smallest one is large (the whole list runs under -m slow).
FAMILY = {
    "alexnet(small head)": (_small_head("alexnet", 256 * 6 * 6), 64),
    "convnext(small)": (lambda: ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)],
                                         stochastic_depth_prob=0.1, num_classes=5), 32),
    "densenet121": _builder("densenet121"),
    "efficientnet_b0": _builder("efficientnet_b0"),
    "efficientnet_v2(small)": (lambda: EfficientNet([FusedMBConvConfig(1, 3, 1, 16, 16, 1), FusedMBConvConfig(4, 3, 2, 16, 24, 1),
                                                     MBConvConfig(4, 3, 2, 24, 32, 1)],
                                                    dropout=0.2, stochastic_depth_prob=0.2, num_classes=5,
                                                    last_channel=64), 32),
    "googlenet": _builder("googlenet"),
    "inception_v3(aux_logits=False)": (
        lambda: torchvision.models.inception_v3(weights=None, num_classes=5, aux_logits=False, init_weights=True), 75),
    "maxvit(small)": (lambda: MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[16, 32],
                                     block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.2, num_classes=5), 32),
    "mnasnet0_5": _builder("mnasnet0_5"),
    "mobilenet_v2": _builder("mobilenet_v2"),
    "mobilenet_v3_small": _builder("mobilenet_v3_small"),
    "regnet_x_400mf": _builder("regnet_x_400mf"),
    "regnet_y_400mf": _builder("regnet_y_400mf"),
    "resnet18": _builder("resnet18"),
    "resnext(small)": (lambda: ResNet(Bottleneck, [1, 1, 1, 1], groups=8, width_per_group=4, num_classes=5), 32),
    "shufflenet_v2_x0_5": _builder("shufflenet_v2_x0_5"),
    "squeezenet1_1": _builder("squeezenet1_1"),
    "swin(small)": (_swin(), 32),
    "swin_v2(small)": (_swin(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2), 32),
    "vgg11(small head)": (_small_head("vgg11", 512 * 7 * 7), 32),
    "vit(small)": (lambda: VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                            mlp_dim=64, num_classes=5, dropout=0.1, attention_dropout=0.1), 32),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _Fingerprint:
    """A tensor's values, kept as a copy or, from 4M elements on, as a digest of its bytes."""

    def __init__(self, t):
        t = t.detach()
        if t.numel() < 1 << 22:
            self.copy, self.digest = t.clone(), None
        else:
            flat = t.cpu().contiguous().reshape(-1)
            self.copy, self.digest = None, hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()

    def __eq__(self, other):
        if self.copy is not None:
            return other.copy is not None and self.copy.shape == other.copy.shape and torch.equal(self.copy, other.copy)
        return self.digest == other.digest

    def __repr__(self):
        return f"<{self.digest or tuple(self.copy.shape)}>"


def _digest(t):
    return _Fingerprint(t)


def _state(model):
    return [(k, _digest(v)) for k, v in model.state_dict().items()]


def _loss(out, y):
    outs = [out] if isinstance(out, torch.Tensor) else [o for o in out if isinstance(o, torch.Tensor)]
    return sum(nn.functional.cross_entropy(o, y) for o in outs)


def _train_grads(model, x, y):
    """Digests of every gradient after one seeded training forward and backward; the
    buffers (BatchNorm statistics) are put back, the gradients cleared."""
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    model.train()
    torch.manual_seed(1)  # dropout and stochastic depth draw the same masks in every run
    _loss(model(x), y).backward()
    grads = [(n, None if p.grad is None else _digest(p.grad)) for n, p in model.named_parameters()]
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for k, v in model.named_buffers():
            v.copy_(buffers[k])
    return grads


def _eval_out(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def check_model(build, size, distributed):
    torch.manual_seed(0)
    model = build()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, size, size, generator=g)
    y = torch.randint(0, 5, (2,), generator=g)
    state = _state(model)
    out = _eval_out(model, x)
    grads = _train_grads(model, x, y)

    ad.convert_model(model, 1.0, distributed=distributed)
    assert _state(model) == state
    assert torch.equal(_eval_out(model, x), out)
    assert _train_grads(model, x, y) == grads

    ad.convert_model(model, 0.5, distributed=distributed)  # a second call applies the new ratio
    sampled = [m for m in model.modules() if isinstance(m, APPROX)]
    assert sampled and all(m.sample_ratio == 0.5 for m in sampled)
    assert _state(model) == state
    assert torch.equal(_eval_out(model, x), out)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    loss = _loss(model(x), y)
    assert math.isfinite(loss.item())
    loss.backward()
    if distributed:  # lossless: no gradient outside what the hook would send (invariant 2)
        for name, m in model.named_modules():
            if isinstance(m, WeightSampled) and m.weight.grad is not None:
                sent = m.pop_touched()
                outside = torch.ones(m.weight.shape[1], dtype=torch.bool)
                outside[sent] = False
                assert not m.weight.grad[:, outside].any(), name
    opt.step()
    assert _state(model) != state
    if distributed:  # some layer computed on fewer than all of its input features
        assert any(m.last_indices is not None and m.last_indices.numel() < m.weight.shape[1]
                   for m in model.modules() if isinstance(m, WeightSampled))


@pytest.mark.parametrize("distributed", [False, True], ids=["local", "dist"])
@pytest.mark.parametrize("family", list(FAMILY))
def test_one_model_per_family(family, distributed):
    build, size = FAMILY[family]
    check_model(build, size, distributed)


@pytest.mark.slow
@pytest.mark.parametrize("distributed", [False, True], ids=["local", "dist"])
@pytest.mark.parametrize("name", ALL)
def test_every_torchvision_model(name, distributed):
    build, size = _builder(name)
    check_model(build, size, distributed)


@pytest.mark.slow
def test_family_table_covers_every_builder_class():
    """A family added to torchvision shows up here, not as a silently untested model."""
    torch.manual_seed(0)
    covered = {type(build()) for build, _ in FAMILY.values()}
    seen = {type(torchvision.models.get_model(name, weights=None, **_size(name)[1])) for name in ALL
            if not name.startswith(("vit_h", "vit_l", "regnet_y_128", "regnet_y_32", "regnet_x_32"))}
    assert seen <= covered, seen - covered


def test_sparse_hook_equals_allreduce_efficientnet_b0():
    assert_hook_equals_allreduce("efficientnet_b0")
