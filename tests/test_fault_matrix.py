"""The fault matrix of approxdist-train (docs/faults.md): each case breaks a run that has a
checkpoint, then checks that nothing is lost. After every case:

- the run's previous checkpoint still loads (weights_only) and holds finite parameters,
  unless the case's point is a newer one;
- metrics.jsonl parses, its records never pass the checkpoint's step, and the epoch
  records' steps increase;
- no process of the case is left (nothing whose command line names the case's folder);
- the run can go on with `--resume auto` and ends where it should.

Slow (real processes, torchrun for the killed worker): `make test-slow`.
"""
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAULTY = os.path.join(REPO, "tests", "faulty_train.py")
RUN = ["--model", "mlp", "--dataset", "digits", "--batch-size", "64", "--no-progress"]
STEPS_PER_EPOCH = 1437 // 64  # one process; 2 processes: 1437 // 128


def _env(extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_", "MV2_"))}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT"):
        env.pop(k, None)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
    env.update(extra or {})
    return env


def train(*flags, entry=("-m", "approxdist.train"), nproc=0, env=None):
    """approxdist-train in fresh processes (torchrun when nproc); the CompletedProcess."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                "--max-restarts", "0", "--monitor-interval", "0.5"] if nproc else [sys.executable]
    return subprocess.run([*launcher, *entry, *RUN, *flags], env=_env(env), capture_output=True, text=True,
                          timeout=600)


def _checkpoint(out):
    ck = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    return ck


def _left_processes(out):
    mine = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if out.encode() in f.read():
                    mine.append(int(pid))
        except OSError:
            pass
    return mine


def assert_nothing_lost(out, *, step=None):
    """The invariants every case keeps; returns the checkpoint."""
    deadline = time.time() + 20  # torchrun reaps its workers asynchronously
    while _left_processes(out) and time.time() < deadline:
        time.sleep(0.2)
    assert _left_processes(out) == []
    ck = _checkpoint(out)
    if step is not None:
        assert ck["step"] == step
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert all(r["step"] <= ck["step"] for r in records)
    epochs = [r["step"] for r in records if r["kind"] == "epoch"]
    assert epochs == sorted(set(epochs))
    return ck


def one_error_line(proc, needle, status=2):
    assert proc.returncode == status, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("approxdist-train: error:") and needle in lines[0], proc.stderr
    return lines[0]


@pytest.fixture
def run_dir(tmp_path):
    """A run of 3 steps with a checkpoint (step 3, mid-epoch) and its metrics."""
    out = str(tmp_path / "run")
    proc = train("--epochs", "2", "--max-steps", "3", "--output-dir", out)
    assert proc.returncode == 0, proc.stderr
    assert_nothing_lost(out, step=3)
    return out


def _resume_finishes(out, *flags, steps=2 * STEPS_PER_EPOCH):
    proc = train("--epochs", "2", "--output-dir", out, "--resume", "auto", *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ck = assert_nothing_lost(out, step=steps)
    assert (ck["epoch"], ck["step_in_epoch"]) == (2, 0)
    return proc


def _files(out):
    return {f: open(os.path.join(out, f), "rb").read() for f in ("checkpoint.pt", "metrics.jsonl")}


def test_worker_killed_mid_run_then_resumed(tmp_path):
    out = str(tmp_path / "run")
    flags = ["--epochs", "2", "--checkpoint-every", "4", "--output-dir", out, "--comm-hook", "sparse",
             "--sample-ratio", "0.5"]
    proc = train(*flags, entry=(FAULTY,), nproc=2, env={"APPROXDIST_TEST_KILL_AT": "1:6"})
    assert proc.returncode != 0  # no restarts allowed: the job fails
    assert_nothing_lost(out, step=4)
    proc = train(*flags, "--resume", "auto", nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ck = assert_nothing_lost(out, step=2 * (1437 // 128))
    assert ck["comm"]["sparse"]["state_dict"]["steps"] == 2 * (1437 // 128)


def test_save_killed_mid_write_then_resumed(run_dir):
    before = _files(run_dir)
    # the 2nd save of this attempt: --checkpoint-every 2 saves at steps 4 and 6 (4 is the 1st)
    proc = train("--epochs", "2", "--checkpoint-every", "2", "--output-dir", run_dir, "--resume", "auto",
                 entry=(FAULTY,), env={"APPROXDIST_TEST_KILL_IN_SAVE": "2"})
    assert proc.returncode == -signal.SIGKILL
    assert [f for f in os.listdir(run_dir) if f.startswith(".tmp-")]  # the litter of the killed save
    assert_nothing_lost(run_dir, step=4)
    assert _files(run_dir)["checkpoint.pt"] != before["checkpoint.pt"]
    proc = _resume_finishes(run_dir)
    assert "removed 1 temporary file(s) of an interrupted save" in proc.stdout
    assert not [f for f in os.listdir(run_dir) if f.startswith(".tmp-")]


@pytest.mark.parametrize("flags, needle", [
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--momentum", "nan"], "--momentum must be a finite number"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number"),
    (["--sample-ratio", "0"], "--sample-ratio"),
    (["--epochs", "0"], "--epochs"),
])
def test_bad_flags_touch_nothing(run_dir, flags, needle):
    before = _files(run_dir)
    one_error_line(train("--epochs", "2", "--output-dir", run_dir, "--resume", "auto", *flags), needle)
    assert _files(run_dir) == before
    assert_nothing_lost(run_dir, step=3)


def test_new_run_into_a_finished_run_is_refused(run_dir):
    before = _files(run_dir)
    one_error_line(train("--epochs", "1", "--output-dir", run_dir), "already holds a run")
    assert _files(run_dir) == before
    _resume_finishes(run_dir)


@pytest.mark.parametrize("flags, needle", [
    (["--sample-ratio", "0.5"], "sample_ratio=1.0 (now 0.5)"),
    (["--norm-stats-every", "2"], "norm_stats_every=1 (now 2)"),
    (["--seed", "5"], "seed=0 (now 5)"),
])
def test_resume_with_other_settings_is_refused(run_dir, flags, needle):
    before = _files(run_dir)
    one_error_line(train("--epochs", "2", "--output-dir", run_dir, "--resume", "auto", *flags), needle)
    assert _files(run_dir) == before
    _resume_finishes(run_dir)


def test_corrupt_checkpoint_is_refused_and_kept(run_dir):
    path = os.path.join(run_dir, "checkpoint.pt")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    damaged = open(path, "rb").read()
    one_error_line(train("--epochs", "2", "--output-dir", run_dir, "--resume", "auto"), "is corrupt")
    assert open(path, "rb").read() == damaged  # evidence kept for the user, not overwritten


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("damage", ["payload", "truncated", "shape"])
def test_bad_cifar_data_is_refused_before_training(run_dir, tmp_path, damage):
    data = tmp_path / "cifar"
    data.mkdir()
    marker = tmp_path / "payload-ran"
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (data / name).write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]}))
    bad = data / "data_batch_4"
    if damage == "payload":
        bad.write_bytes(pickle.dumps({"data": _Payload(str(marker)), "labels": [0]}))
    elif damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:40])
    else:
        bad.write_bytes(pickle.dumps({"data": np.zeros((2, 1024), np.uint8), "labels": [0, 1]}))
    out = str(tmp_path / "cifar-run")
    line = one_error_line(train("--dataset", "cifar10", "--data-path", str(data), "--output-dir", out), str(bad))
    assert not marker.exists() and "Traceback" not in line
    assert not os.path.exists(os.path.join(out, "checkpoint.pt"))
    assert_nothing_lost(run_dir, step=3)  # the other run's folder, untouched


def test_diverging_run_stops_keeping_its_last_finite_checkpoint(tmp_path):
    # (on resume --lr is the checkpoint's, with the optimizer's state: a fresh run diverges)
    out = str(tmp_path / "diverge")
    line = one_error_line(train("--epochs", "2", "--output-dir", out, "--checkpoint-every", "1", "--lr", "1e6"),
                          "training loss is", status=1)
    failed_at = int(line.split(" at step ")[1].split(":")[0])
    assert failed_at >= 2
    assert_nothing_lost(out, step=failed_at - 1)


def test_diverging_run_on_two_ranks_stops_every_rank(tmp_path):
    out = str(tmp_path / "diverge2")
    proc = train("--epochs", "2", "--output-dir", out, "--checkpoint-every", "1", "--lr", "1e6", nproc=2)
    assert proc.returncode == 1  # torchrun's status for a failed worker
    lines = [line for line in proc.stderr.splitlines() if line.startswith("approxdist-train: error:")]
    assert lines and all("training loss is" in line for line in lines), proc.stderr[-3000:]
    failed_at = int(lines[0].split(" at step ")[1].split(":")[0])
    assert_nothing_lost(out, step=failed_at - 1)
