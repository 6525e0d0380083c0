"""Elastic resize: a run checkpointed on 2 gloo processes goes on on 1 and on 3 (torchrun),
from an epoch's end and from the middle of an epoch. The data is re-sharded (every sample
of an epoch used once), the global batch changes and the log says so, the step counters,
the learning-rate schedule and the metrics stay consistent. The torchrun runs are slow
(about 100 s on 2 busy cores); the same code path (another global batch) runs in one
process in test_train_faults.py."""
import json
import math
import os
import re
import shutil

import pytest
import torch

from approxdist.train.data import ResumableDistributedSampler
from test_train_dist import torchrun

N_TRAIN, BATCH = 1437, 32  # digits' training split; per process
COMMON = ["--dataset", "digits", "--model", "cnn", "--batch-size", str(BATCH), "--comm-hook", "sparse",
          "--sample-ratio", "0.5", "--policy", "bernoulli_weight", "--allow-unbiased-sampling"]


def _epochs(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("kind") == "epoch"]


def _checkpoint(out):
    return torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)


def _spe(world):
    return N_TRAIN // (world * BATCH)


def test_resharded_epoch_uses_each_sample_once():
    # 2 ranks x 4 do 5 steps (40 samples); 3 ranks x 5 take the rest from sample 40 on
    first = [ResumableDistributedSampler(100, 2, r, 4, seed=3) for r in range(2)]
    for s in first:
        s.set_epoch(1)
    used = [i for s in first for i in list(s)[: 5 * 4]]
    rest = [ResumableDistributedSampler(100, 3, r, 5, seed=3) for r in range(3)]
    left = (100 - 40) // 15
    for s in rest:
        s.set_epoch(1, s.batches_per_epoch - left, start_sample=40)
    later = [i for s in rest for i in s]
    assert len(later) == left * 15 == 60 and first[0].consumed(5) == 40
    assert len(set(used + later)) == 100  # each sample of the epoch once
    assert rest[0].consumed(rest[0].batches_per_epoch) == 100
    order = torch.randperm(100, generator=torch.Generator().manual_seed(4)).tolist()
    assert set(used) == set(order[:40])


@pytest.fixture(scope="module")
def two_rank_epoch(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("w2"))
    torchrun(COMMON + ["--epochs", "1", "--output-dir", out])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 3])
def test_resume_on_another_world_size_at_an_epoch_end(tmp_path, two_rank_epoch, world):
    out = str(tmp_path / f"w{world}")
    shutil.copytree(two_rank_epoch, out)
    first = _spe(2)
    assert _checkpoint(out)["step"] == first
    proc = torchrun(COMMON + ["--epochs", "2", "--output-dir", out, "--resume", "auto"], nproc=world)
    assert (f"elastic resize: world size 2 -> {world}, global batch {2 * BATCH} -> {world * BATCH}"
            in proc.stdout), proc.stdout
    assert f"continues at step {_spe(world)} of {2 * _spe(world)}" in proc.stdout
    ck = _checkpoint(out)
    assert (ck["epoch"], ck["step"], ck["step_in_epoch"]) == (2, first + _spe(world), 0)
    assert ck["config"]["world_size"] == world
    assert ck["scheduler"]["last_epoch"] == 2 * _spe(world)  # the schedule's own position: its end
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    recs = _epochs(out)
    assert [(r["epoch"], r["step"], r["world_size"], r["train_steps"]) for r in recs] == [
        (1, first, 2, first), (2, first + _spe(world), world, _spe(world))]
    assert recs[1]["lr"] == pytest.approx(0.0, abs=1e-9) and 0 <= recs[1]["top1"] <= 100
    if world > 1:  # the sparse hook's counters go on
        assert ck["comm"]["sparse"]["state_dict"]["steps"] == first + _spe(world)


@pytest.mark.slow
def test_resume_on_another_world_size_mid_epoch(tmp_path):
    out = str(tmp_path)
    torchrun(COMMON + ["--epochs", "1", "--max-steps", "7", "--output-dir", out])
    ck = _checkpoint(out)
    assert (ck["epoch"], ck["step"], ck["step_in_epoch"], ck["epoch_sample"]) == (0, 7, 7, 7 * 2 * BATCH)
    proc = torchrun(COMMON + ["--epochs", "1", "--output-dir", out, "--resume", "auto"], nproc=3)
    left = (N_TRAIN - 7 * 2 * BATCH) // (3 * BATCH)
    assert "elastic resize: world size 2 -> 3" in proc.stdout
    m = re.search(r"mid-epoch resize: epoch 1 goes on from sample (\d+) of its order, (\d+) step", proc.stdout)
    assert m and (int(m.group(1)), int(m.group(2))) == (7 * 2 * BATCH, left), proc.stdout
    ck = _checkpoint(out)
    assert (ck["epoch"], ck["step"], ck["step_in_epoch"]) == (1, 7 + left, 0)
    first, second = _epochs(out)
    assert (first["train_steps"], second["train_steps"], second["step"]) == (7, left, 7 + left)
    assert second["partial_epoch"] and second["world_size"] == 3
    # the schedule is at the end of the 3-process epoch
    assert ck["scheduler"]["last_epoch"] == _spe(3) and second["lr"] == pytest.approx(0.0, abs=1e-9)
    assert math.isfinite(second["train_loss"])
