"""approxdist-train under faults, in one process: data that tries to run code or is
corrupt, a run into a folder that holds another, resumes that change the schedule or the
settings, loads that fail half-way, saves that are interrupted, a loss that diverges.

Each run is the real command line (`cli`), single process, on sklearn's digits."""
import json
import math
import os
import pickle
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import approxdist as ad
from approxdist.train import checkpoint as ckpt
from approxdist.train import trainer as trainer_module
from approxdist.train.__main__ import cli
from approxdist.train.args import build_parser
from approxdist.train.data import build_datasets
from approxdist.train.models import SmallCNN
from approxdist.train.trainer import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# digits: 1437 training images, so 22 steps per epoch at batch 64
RUN = ["--model", "mlp", "--dataset", "digits", "--batch-size", "64", "--no-progress"]
STEPS_PER_EPOCH = 1437 // 64


pytestmark = pytest.mark.usefixtures("single_process")  # tests/conftest.py


def _cli(*flags, callbacks=()):
    """Exit status of approxdist-train with these flags (0, or SystemExit's code)."""
    try:
        return cli([*RUN, *flags], callbacks=callbacks)
    except SystemExit as exc:
        return exc.code


def _records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("approxdist-train: error:"), err
    return err[0]


# -- item 4: CIFAR batches are data, never code -------------------------------------------------
class _Payload:
    """What a crafted batch holds: unpickling it calls os.mkdir(marker)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _cifar_folder(root, *, protocol=pickle.DEFAULT_PROTOCOL, bytes_keys=False, n=4):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data, labels = rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n).tolist()
        batch = {"batch_label": "x", "data": data, "labels": labels, "filenames": [f"{i}.png" for i in range(n)]}
        if bytes_keys:  # as Python 2's pickles of the original files read without encoding=latin1
            batch = {k.encode(): v for k, v in batch.items()}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
        arrays[name] = (data, labels)
    return arrays


@pytest.mark.parametrize("protocol, bytes_keys", [(2, False), (2, True), (5, False)])
def test_genuine_cifar_batches_load_through_the_restricted_unpickler(tmp_path, protocol, bytes_keys):
    arrays = _cifar_folder(tmp_path, protocol=protocol, bytes_keys=bytes_keys)
    train, val, _ = build_datasets("cifar10", str(tmp_path))
    data, labels = arrays["test_batch"]
    assert torch.equal(val.images, torch.as_tensor(data).reshape(-1, 3, 32, 32))
    assert val.labels.tolist() == labels and len(train) == 20


def test_cifar_pickle_payload_is_refused_and_runs_nothing(tmp_path):
    _cifar_folder(tmp_path)
    marker = tmp_path / "payload-ran"
    with open(tmp_path / "data_batch_3", "wb") as f:
        pickle.dump({"data": _Payload(str(marker)), "labels": [0]}, f)
    with pytest.raises(ValueError, match=r"data_batch_3 is not a CIFAR-10 batch, refused.*(posix|os)\.mkdir"):
        build_datasets("cifar10", str(tmp_path))
    assert not marker.exists()
    with open(tmp_path / "data_batch_3", "rb") as f:  # the payload is live: a plain load runs it
        pickle.load(f)
    assert marker.exists()


@pytest.mark.parametrize("damage, match", [
    ("truncate", "corrupt or truncated"),
    ("shape", r"'data' must be a uint8 array of shape \(n, 3072\)"),
    ("labels", "'labels' must be 4 integers"),
    ("not a dict", "a dict with 'data' and 'labels'"),
])
def test_corrupt_cifar_batch_is_one_line_naming_the_file(tmp_path, capsys, damage, match):
    _cifar_folder(tmp_path)
    path = tmp_path / "data_batch_2"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    else:
        batch = {"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 3]}
        if damage == "shape":
            batch["data"] = np.zeros((4, 100), np.uint8)
        elif damage == "labels":
            batch["labels"] = [0, 1, 2]
        else:
            batch = [batch]
        with open(path, "wb") as f:
            pickle.dump(batch, f)
    assert _cli("--dataset", "cifar10", "--data-path", str(tmp_path), "--epochs", "1") == 2
    line = _one_error_line(capsys)
    assert str(path) in line
    assert re.search(match, line), line


def test_empty_or_mismatched_imagefolder_is_one_line(tmp_path, capsys):
    from PIL import Image

    for split in ("train", "val"):
        (tmp_path / split).mkdir()
    assert _cli("--dataset", "imagefolder", "--data-path", str(tmp_path)) == 2
    assert "holds no usable ImageFolder data" in _one_error_line(capsys)
    for split, classes in (("train", "ab"), ("val", "a")):
        for c in classes:
            (tmp_path / split / c).mkdir()
            Image.new("RGB", (8, 8)).save(tmp_path / split / c / "0.png")
    assert _cli("--dataset", "imagefolder", "--data-path", str(tmp_path)) == 2
    assert "2 classes in train/ and 1 in val/" in _one_error_line(capsys)


# -- item 5: a new run does not destroy the previous one ------------------------------------------
def test_run_into_a_folder_holding_a_run_is_refused_unless_overwrite(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert _cli("--epochs", "1", "--max-steps", "3", "--output-dir", out) == 0
    capsys.readouterr()
    files = {f: (tmp_path / "run" / f).read_bytes() for f in ("checkpoint.pt", "metrics.jsonl")}
    assert _cli("--epochs", "1", "--max-steps", "2", "--output-dir", out) == 2
    line = _one_error_line(capsys)
    assert "already holds a run" in line and "--resume auto" in line and "fresh --output-dir" in line
    assert "--overwrite" in line
    assert files == {f: (tmp_path / "run" / f).read_bytes() for f in files}  # untouched
    assert _cli("--epochs", "1", "--max-steps", "2", "--output-dir", out, "--overwrite") == 0
    (rec,) = _records(out)  # the old run's record is gone, not mixed with the new one
    assert rec["step"] == 2 and torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["step"] == 2


# -- item 7a: a longer resumed run gets a schedule over its own length ---------------------------
def _lr_recorder(lrs):
    def callback(trainer, step):
        lrs.append((step, trainer.optimizer.param_groups[0]["lr"]))

    return callback


def test_resume_with_more_epochs_continues_on_a_schedule_over_the_new_length(tmp_path, capsys):
    out, first, second = str(tmp_path), [], []
    assert _cli("--epochs", "1", "--output-dir", out, callbacks=[_lr_recorder(first)]) == 0
    assert first[-1] == (STEPS_PER_EPOCH, pytest.approx(0.0, abs=1e-12))
    capsys.readouterr()
    assert _cli("--epochs", "2", "--output-dir", out, "--resume", "auto", callbacks=[_lr_recorder(second)]) == 0
    assert "learning-rate schedule" in capsys.readouterr().out
    total = 2 * STEPS_PER_EPOCH
    assert [s for s, _ in second] == list(range(STEPS_PER_EPOCH + 1, total + 1))
    for step, lr in second:  # the cosine over 2 epochs, from where the first epoch ended
        assert lr == pytest.approx(0.05 * (1 + math.cos(math.pi * step / total)), abs=1e-9), step
    rates = [lr for _, lr in second]
    assert all(a >= b for a, b in zip(rates, rates[1:])) and rates[-1] == pytest.approx(0.0, abs=1e-12)


# -- item 7b: a failed load changes nothing and names the file ------------------------------------
def _sampled_trainer(seed):
    torch.manual_seed(seed)
    model = ad.convert_model(SmallCNN(), 0.5, distributed=True, policy="bernoulli_weight", allow_unbiased=True, seed=seed)
    args = build_parser().parse_args(["--sample-ratio", "0.5", "--policy", "bernoulli_weight"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    config = trainer_module.run_config(args, 10) | {"world_size": 1, "batch_size": 32}

    class NoComm:
        def state_dict(self):
            return {}

        def load_state_dict(self, data):
            pass

    t = Trainer(args, model, opt, sched, config=config, comm=NoComm())
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    torch.nn.functional.cross_entropy(t.model(x), y).backward()
    t.optimizer.step()
    t.scheduler.step()
    return t


def _state(t):
    return ({k: v.clone() for k, v in t.model.state_dict().items()},
            [{n: v.clone() for n, v in t.optimizer.state[p].items()} for p in t.model.parameters()],
            t.scheduler.state_dict()["last_epoch"], ad.nn.sampler_state(t.model))


def _assert_same_state(a, b):
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert all(torch.equal(x[n], y[n]) for x, y in zip(a[1], b[1]) for n in x)
    assert a[2] == b[2]
    assert all(torch.equal(torch.as_tensor(a[3][k]["generator"]), torch.as_tensor(b[3][k]["generator"]))
               for k in a[3] if a[3][k]["generator"] is not None)


def test_sampler_state_mismatch_is_found_before_anything_is_loaded(tmp_path):
    source = _sampled_trainer(0)
    payload = source.checkpoint_payload(0, 1, 0)
    assert payload["sampler_state"]
    payload["sampler_state"] = {"no.such.layer": next(iter(payload["sampler_state"].values()))}
    path = str(tmp_path / "c.pt")
    ckpt.save_atomic(payload, path)
    target = _sampled_trainer(1)
    before = _state(target)
    with pytest.raises(ckpt.CheckpointError, match=r"c\.pt.*sampler state"):
        target.load(path, path)
    _assert_same_state(_state(target), before)


def test_a_load_failing_half_way_is_rolled_back(tmp_path):
    path = str(tmp_path / "c.pt")
    ckpt.save_atomic(_sampled_trainer(0).checkpoint_payload(0, 1, 0), path)
    target = _sampled_trainer(1)
    before = _state(target)
    calls = []

    def broken(data):  # the hook state loads after the model, optimizer and scheduler
        calls.append(data)
        if len(calls) == 1:
            raise ValueError("hook state of another version")

    target.comm.load_state_dict = broken
    with pytest.raises(ckpt.CheckpointError, match=r"c\.pt.*nothing changed.*another version"):
        target.load(path, path)
    _assert_same_state(_state(target), before)


# -- item 7c: the metrics of a resumed epoch say which steps they cover ---------------------------
def test_metrics_of_a_mid_epoch_resume_are_marked_and_a_dead_attempts_records_dropped(tmp_path, capsys):
    out = str(tmp_path)
    assert _cli("--epochs", "1", "--max-steps", "5", "--output-dir", out) == 0
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:  # what an attempt killed after step 5 leaves
        f.write(json.dumps({"kind": "eval", "step": 7, "epoch": 0.3}) + "\n" + '{"kind": "epo')
    capsys.readouterr()
    assert _cli("--epochs", "1", "--output-dir", out, "--resume", "auto") == 0
    assert "dropped 2 record(s) after step 5" in capsys.readouterr().out
    first, second = _records(out)
    assert (first["step"], first["train_steps"], first["partial_epoch"]) == (5, 5, True)
    assert (second["step"], second["train_steps"], second["partial_epoch"]) == (STEPS_PER_EPOCH,
                                                                                 STEPS_PER_EPOCH - 5, True)
    assert first["train_steps"] + second["train_steps"] == STEPS_PER_EPOCH


# -- elastic resize, in one process: another global batch takes the same path as another world size
def test_resume_with_another_global_batch_mid_epoch_goes_on_from_the_samples_used(tmp_path, capsys):
    out = str(tmp_path)
    assert _cli("--epochs", "1", "--max-steps", "7", "--output-dir", out) == 0  # 7 x 64 samples
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["epoch_sample"] == 7 * 64
    capsys.readouterr()
    assert _cli("--epochs", "1", "--output-dir", out, "--resume", "auto", "--batch-size", "96") == 0
    log = capsys.readouterr().out
    left, per_epoch = (1437 - 7 * 64) // 96, 1437 // 96
    assert "global batch 64 -> 96" in log
    assert f"goes on from sample {7 * 64} of its order, {left} step(s) of 96 left" in log
    assert f"continues at step {per_epoch - left} of {per_epoch}" in log
    first, second = _records(out)
    assert (first["train_steps"], second["train_steps"], second["step"]) == (7, left, 7 + left)
    saved = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert (saved["epoch"], saved["step"], saved["step_in_epoch"]) == (1, 7 + left, 0)
    assert second["lr"] == pytest.approx(0.0, abs=1e-12)  # the schedule ends with the epoch


# -- item 7d: a resume with other sampling settings is refused, unless asked for -----------------
@pytest.mark.parametrize("flags, named", [
    (["--sample-ratio", "0.25"], "sample_ratio=0.5 (now 0.25)"),
    (["--policy", "bernoulli_weight", "--allow-unbiased-sampling"], "policy='topk_explore' (now 'bernoulli_weight')"),
    (["--norm-stats", "sampled"], "norm_stats='exact' (now 'sampled')"),
    (["--sample-mode", "forward"], "sample_mode='weight_grad' (now 'forward')"),
    (["--lr", "0.2"], "lr=0.1 (now 0.2)"),  # else ignored: the optimizer's state holds the rate
])
def test_resume_with_other_sampling_settings_is_refused(tmp_path, capsys, flags, named):
    out = str(tmp_path)
    assert _cli("--epochs", "1", "--max-steps", "2", "--sample-ratio", "0.5", "--output-dir", out) == 0
    before = (tmp_path / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    resume = ["--epochs", "1", "--max-steps", "4", "--output-dir", out, "--resume", "auto"]
    sampled = ["--sample-ratio", "0.5"] if flags[0] != "--sample-ratio" else []
    assert _cli(*resume, *sampled, *flags) == 2
    line = _one_error_line(capsys)
    assert named in line and "--allow-config-change" in line and str(tmp_path) in line
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert _cli(*resume, *sampled, *flags, "--allow-config-change") == 0
    saved = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert saved["step"] == 4
    peak = 0.2 if flags[0] == "--lr" else 0.1  # the new flags apply from the resume on
    lr = saved["optimizer"]["param_groups"][0]["lr"]
    assert lr == pytest.approx(peak / 2 * (1 + math.cos(math.pi * 4 / STEPS_PER_EPOCH)), rel=1e-9)


# -- item 7e: an interrupted save leaves the previous checkpoint and no litter --------------------
KILLED_SAVE = """
import os, signal, sys, torch
from approxdist.train import checkpoint as ckpt
def dying_save(obj, f):
    f.write(b"half a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying_save
ckpt.save_atomic({"format": ckpt.FORMAT, "v": torch.zeros(2)}, sys.argv[1])
"""


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, OSError])
def test_save_interrupted_by_an_exception_leaves_no_temporary_file(tmp_path, monkeypatch, interrupt):
    path = str(tmp_path / "c.pt")
    ckpt.save_atomic({"format": ckpt.FORMAT, "v": torch.ones(2)}, path)

    def broken(obj, f):
        f.write(b"partial")
        raise interrupt("stop")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(interrupt):
        ckpt.save_atomic({"format": ckpt.FORMAT, "v": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["c.pt"]
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.ones(2))


def test_save_killed_mid_way_keeps_the_checkpoint_and_the_next_run_removes_the_litter(tmp_path, capsys):
    out = str(tmp_path)
    assert _cli("--epochs", "1", "--max-steps", "3", "--output-dir", out) == 0
    path = os.path.join(out, "checkpoint.pt")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, path], env=env, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    litter = [f for f in os.listdir(out) if f.startswith(".tmp-")]
    assert len(litter) == 1
    assert torch.load(path, weights_only=True)["step"] == 3  # the previous checkpoint, intact
    capsys.readouterr()
    assert _cli("--epochs", "1", "--max-steps", "5", "--output-dir", out, "--resume", "auto") == 0
    assert f"removed 1 temporary file(s) of an interrupted save: {litter[0]}" in capsys.readouterr().out
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]
    assert torch.load(path, weights_only=True)["step"] == 5


# -- item 8: a diverging run stops with an error, keeping what it had ------------------------------
def test_non_finite_loss_stops_the_run_with_status_1_and_saves_nothing(tmp_path, capsys):
    out = str(tmp_path)
    assert _cli("--epochs", "1", "--lr", "1e6", "--checkpoint-every", "1", "--output-dir", out) == 1
    line = _one_error_line(capsys)
    failed_at = int(re.search(r"training loss is (?:nan|inf) at step (\d+)", line).group(1))
    saved = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert saved["step"] == failed_at - 1  # the last step before the loss became non-finite
    assert all(torch.isfinite(v).all() for v in saved["model"].values())
    assert [r["step"] for r in _records(out)] == []  # no epoch record of a diverged epoch


@pytest.mark.parametrize("make, match", [("file", "is not a folder"), ("under a file", "not writable")])
def test_unusable_output_dir_is_one_line(tmp_path, capsys, make, match):
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" if make == "file" else tmp_path / "f" / "sub"
    assert _cli("--epochs", "1", "--output-dir", str(out)) == 2
    assert match in _one_error_line(capsys)
