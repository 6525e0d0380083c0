"""tools/conv_as_matmul.py: the taps-major sampled convolution docs/benchmarks.md cites as
a lead computes what a convolution over the selected input channels computes."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "conv_as_matmul.py")


def _tool():
    spec = importlib.util.spec_from_file_location("conv_as_matmul", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("stride,size", [(1, 1), (1, 4), (2, 4)])
def test_taps_major_conv_is_the_conv_of_the_selected_channels(stride, size):
    tool = _tool()
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(12, 8, 3, stride=stride, padding=1, bias=False)
    layer = tool.TapsMajorConv(conv, 0.5)
    idx = layer.selected()
    norms = conv.weight.detach().transpose(0, 1).reshape(12, -1).norm(dim=1)
    assert torch.equal(idx, norms.topk(6).indices.sort().values)  # top-k by weight norm
    x = torch.randn(3, 12, size, size, requires_grad=True)
    out = layer(x)
    w_ref = conv.weight.detach()[:, idx].clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    ref = F.conv2d(x_ref[:, idx], w_ref, stride=stride, padding=1)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)
    # the weight gradient: the selected channels' blocks, zero elsewhere
    gw = layer.weight.grad.permute(3, 0, 1, 2)  # back to (O, I, kh, kw)
    torch.testing.assert_close(gw[:, idx], w_ref.grad)
    others = [c for c in range(12) if c not in idx.tolist()]
    assert not gw[:, others].any()


def test_the_run_times_three_models_and_names_bad_flags(tmp_path):
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, TOOL, "--reps", "1", "--json", str(out)], capture_output=True,
                       text=True, timeout=300, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert set(data["ms"]) == {"exact", "current", "taps_major"}
    assert all(v["step_ms"] >= v["forward_ms"] > 0 for v in data["ms"].values())
    assert sum(line.split()[0] in data["ms"] for line in r.stdout.splitlines() if line.strip()) == 3
    for args, name in ((["--ratio", "0"], "--ratio"), (["--reps", "0"], "--reps"), (["--threads", "0"], "--threads")):
        bad = subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, timeout=60, cwd=REPO)
        assert bad.returncode == 2 and name in bad.stderr
