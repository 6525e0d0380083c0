"""experiments/tools/hook_share.py, which tests/gpu/run.sh runs on a GPU: checked here on the CPU
(one gloo rank), so a GPU session does not spend its minutes on a broken script."""
import json
import os
import subprocess
import sys

import torch
import torchvision

import approxdist as ad
from models import analytic_bytes

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "experiments", "tools", "hook_share.py")


def _run(*args):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, timeout=300,
                          cwd=REPO)


def test_cpu_run_reports_the_analytic_payload_and_a_share(tmp_path):
    out = tmp_path / "share.json"
    proc = _run("--device", "cpu", "--model", "resnet18", "--ratio", "0.5", "--batch", "2",
                "--image-size", "32", "--steps", "2", "--warmup", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["device"] == "cpu" and r["model"] == "resnet18" and r["steps"] == 2
    model = ad.convert_model(torchvision.models.resnet18(num_classes=1000), 0.5, distributed=True)
    assert r["payload_bytes_per_step"] == analytic_bytes(model)
    dense = sum(p.numel() for p in torchvision.models.resnet18(num_classes=1000).parameters()) * 4
    assert r["dense_bytes_per_step"] == dense
    assert 0 < r["pack_unpack_s"] < r["step_s"]
    assert r["pack_unpack_share"] == r["pack_unpack_s"] / r["step_s"]
    assert "pack+unpack" in proc.stdout and "% (medians of 2)" in proc.stdout


def test_bad_arguments_are_refused_with_their_range():
    for args, msg in ((["--ratio", "0"], "--ratio must be in (0, 1]"),
                      (["--ratio", "1.5"], "--ratio must be in (0, 1]"),
                      (["--steps", "0"], "--steps must be >= 1"),
                      (["--warmup", "0"], "--warmup must be >= 1")):
        proc = _run("--device", "cpu", *args)
        assert proc.returncode == 2 and msg in proc.stderr, (args, proc.stderr)
    if not torch.cuda.is_available():
        proc = _run("--device", "cuda")
        assert proc.returncode == 2 and "no GPU visible" in proc.stderr
