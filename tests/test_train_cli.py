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
    (["--clip-grad-norm", "1", "--overlap-forward"], "drop --overlap-forward or --clip-grad-norm"),
    (["--weights", "/nonexistent/w.pt"], "--weights"),
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


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _cifar(root, batch3=None):
    import pickle

    import numpy as np

    root.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]}
        data = pickle.dumps(batch if name != "data_batch_3" or batch3 is None else batch3)
        (root / name).write_bytes(data)


@pytest.mark.parametrize("case", ["cifar-payload", "cifar-truncated", "empty-imagefolder", "folder-holds-a-run"])
def test_unusable_data_folder_or_value_is_one_line_before_any_group(tmp_path, case):
    marker = tmp_path / "payload-ran"
    data = tmp_path / "data"
    if case == "cifar-payload":
        _cifar(data, batch3={"data": _Payload(str(marker)), "labels": [0]})
        flags, needle = ["--dataset", "cifar10", "--data-path", str(data)], "refused to unpickle"
    elif case == "cifar-truncated":
        _cifar(data)
        (data / "test_batch").write_bytes((data / "test_batch").read_bytes()[:50])
        flags, needle = ["--dataset", "cifar10", "--data-path", str(data)], "corrupt or truncated"
    elif case == "empty-imagefolder":
        (data / "train").mkdir(parents=True)
        (data / "val").mkdir()
        flags, needle = ["--dataset", "imagefolder", "--data-path", str(data)], "no usable ImageFolder data"
    else:
        data.mkdir()
        (data / "metrics.jsonl").write_text("{}\n")
        flags, needle = ["--output-dir", str(data)], "already holds a run"
    proc = _run(*flags)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("approxdist-train: error:") and needle in lines[0], proc.stderr
    assert not marker.exists()
