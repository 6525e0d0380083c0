"""Bad flags end in one line on stderr and a non-zero status, before any process group.

Each run gets a torchrun-like environment for rank 0 of 2 with nobody listening as rank 1:
had the program reached init_process_group it would wait for the missing rank and the
timeout below would fail the test instead of the exit status.
"""
import os
import socket
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(*flags):
    env = dict(os.environ, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "approxdist.train", *flags], env=env, capture_output=True,
                          text=True, timeout=90)


CASES = [
    (["--sample-ratio", "0"], "--sample-ratio"),
    (["--model", "resnet_nope"], "--model"),
    (["--dataset", "imagefolder", "--data-path", "/nonexistent/imagenet"], "--data-path"),
    (["--comm-hook", "carrier-pigeon"], "--comm-hook"),
    (["--step-in-hook", "--dist", "horovod"], "--step-in-hook"),
]
if not torch.cuda.is_available():
    CASES.append((["--backend", "nccl"], "nccl"))


@pytest.mark.parametrize("flags, needle", CASES, ids=[c[1] for c in CASES])
def test_bad_flag_is_one_line_and_nonzero_before_any_group(flags, needle):
    proc = _run(*flags)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("approxdist-train: error:") and needle in lines[0]
    assert proc.stdout == ""


def test_corrupt_resume_checkpoint_is_one_line_before_any_group(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"\x00" * 64)
    proc = _run("--resume", str(bad))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "corrupt" in lines[0] and str(bad) in lines[0], proc.stderr
