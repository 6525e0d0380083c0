"""approxdist-train under real torchrun with 2 gloo processes: every comm hook, exact resume,
and recovery from a killed worker under --max-restarts 1."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOOKS = [("allreduce", 1.0), ("fp16", 1.0), ("bf16", 1.0), ("powersgd", 1.0), ("sparse", 0.5),
         ("sparse-fp16", 0.5)]


def torchrun(flags, *, max_restarts=0, env=None, timeout=300, entry=("-m", "approxdist.train"), nproc=2):
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_", "MV2_"))}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        run_env.pop(k, None)
    run_env.update(OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + run_env.get("PYTHONPATH", ""))
    run_env.update(env or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "--max-restarts", str(max_restarts), "--monitor-interval", "0.5", *entry,
           "--no-progress", *flags]
    proc = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _epochs(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("kind") == "epoch"]


def _checkpoint(out_dir):
    return torch.load(os.path.join(out_dir, "checkpoint.pt"), weights_only=True)


def _check_hook_run(proc, out, hook, ratio, steps):
    (rec,) = _epochs(out)
    assert rec["step"] == steps and rec["world_size"] == 2 and rec["comm_hook"] == hook
    assert rec["train_loss"] == rec["train_loss"] and 0 <= rec["top1"] <= rec["top5"] <= 100
    # Only rank 0 prints epoch lines.
    assert sum(line.startswith("epoch ") for line in proc.stdout.splitlines()) == 1
    dense, sent = rec["dense_bytes"], rec["payload_bytes"]
    assert dense > 0
    if hook == "allreduce":
        assert sent == dense
    elif hook in ("fp16", "bf16"):
        assert 2 * sent == dense
    elif hook == "powersgd":
        assert sent is None
    else:  # half the channels of every sampled layer, plus the exact first conv and biases
        half = 2 if hook == "sparse-fp16" else 1  # its slices in 2 bytes; dense counts float32
        assert 0.4 * dense < half * sent < 0.6 * dense, (sent, dense)
    ck = _checkpoint(out)
    assert ck["step"] == steps and ck["config"]["comm_hook"] == hook


@pytest.mark.parametrize("hook, ratio", HOOKS, ids=[h for h, _ in HOOKS])
def test_digits_every_hook(tmp_path, hook, ratio):
    out = str(tmp_path / hook)
    proc = torchrun(["--dataset", "digits", "--model", "cnn", "--epochs", "1", "--max-steps", "4",
                     "--batch-size", "16", "--comm-hook", hook, "--sample-ratio", str(ratio), "--output-dir", out])
    _check_hook_run(proc, out, hook, ratio, 4)


@pytest.mark.parametrize("hook, ratio", [("sparse", 0.5), ("fp16", 1.0)], ids=["sparse", "fp16"])
def test_step_in_hook_trains_the_same_model(tmp_path, hook, ratio):
    """--step-in-hook moves the optimizer step into the comm hook's callbacks, and
    --overlap-forward into the next forward: the checkpointed model and optimizer state
    equal those of the usual loop, bit for bit."""
    ckpts = []
    for i, flag in enumerate(([], ["--step-in-hook"], ["--overlap-forward"])):
        out = str(tmp_path / f"{hook}{i}")
        proc = torchrun(["--dataset", "digits", "--model", "cnn", "--epochs", "1", "--max-steps", "6",
                         "--batch-size", "16", "--comm-hook", hook, "--sample-ratio", str(ratio),
                         "--bucket-cap-mb", "0.01", "--output-dir", out, *flag])
        _check_hook_run(proc, out, hook, ratio, 6)
        (rec,) = _epochs(out)
        # several buckets per step: 0.01 MB caps split the cnn's gradients
        assert rec["in_hook_steps"] > 6 if flag else rec["in_hook_steps"] == 0
        ckpts.append(_checkpoint(out))
    usual = ckpts[0]
    for in_hook in ckpts[1:]:
        assert usual["model"].keys() == in_hook["model"].keys()
        for key, value in usual["model"].items():
            assert torch.equal(value, in_hook["model"][key]), key
        for pid, state in usual["optimizer"]["state"].items():
            assert torch.equal(state["momentum_buffer"], in_hook["optimizer"]["state"][pid]["momentum_buffer"])


def test_evaluating_every_few_steps_changes_no_parameter(tmp_path):
    """--eval-every evaluates mid-epoch (here with --overlap-forward, whose transfers are
    still in flight at the evaluation): the checkpointed model and momentum equal those of
    the usual loop without it, bit for bit, and the eval records carry the training clock."""
    common = ["--dataset", "digits", "--model", "cnn", "--epochs", "1", "--max-steps", "7", "--batch-size", "16",
              "--comm-hook", "sparse", "--sample-ratio", "0.5", "--bucket-cap-mb", "0.01"]
    plain, evaluated = str(tmp_path / "plain"), str(tmp_path / "evaluated")
    torchrun(common + ["--output-dir", plain])
    proc = torchrun(common + ["--output-dir", evaluated, "--overlap-forward", "--eval-every", "3"])
    a, b = _checkpoint(plain), _checkpoint(evaluated)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for pid, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][pid]["momentum_buffer"])
    with open(os.path.join(evaluated, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    evals = [r for r in recs if r.get("kind") == "eval"]
    # at steps 3 and 6; the last step's evaluation is the epoch record's
    assert [r["step"] for r in evals] == [3, 6] and [r["kind"] for r in recs] == ["eval", "eval", "epoch"]
    assert all(0 <= r["top1"] <= 100 and r["val_samples"] > 0 for r in evals)
    sent = [r["payload_bytes_total"] for r in recs]  # what each rank sent so far: the plot's bytes axis
    assert 0 < sent[0] < sent[1] < sent[2] and sent[0] * 2 == sent[1]  # 3 and 6 steps of one payload size
    clock = [r["train_seconds"] for r in recs]
    assert 0 < clock[0] < clock[1] < clock[2] == b["train_seconds"]
    per_epoch = int(re.search(r"(\d+) steps/epoch", proc.stdout).group(1))
    assert [r["epoch"] for r in evals] == [pytest.approx(3 / per_epoch), pytest.approx(6 / per_epoch)]
    assert sum(line.startswith("eval at step ") for line in proc.stdout.splitlines()) == 2


FAKE = [pytest.param(h, r, marks=() if h == "sparse" else pytest.mark.slow, id=h) for h, r in HOOKS]


@pytest.mark.parametrize("hook, ratio", FAKE)
def test_fake_data_every_hook(tmp_path, hook, ratio):
    out = str(tmp_path / hook)
    proc = torchrun(["--dataset", "fake", "--image-size", "16", "--model", "cnn", "--epochs", "1", "--max-steps", "3",
                     "--batch-size", "16", "--comm-hook", hook, "--sample-ratio", str(ratio), "--output-dir", out])
    _check_hook_run(proc, out, hook, ratio, 3)


# Bernoulli sampling draws from per-layer generators, so the resumed run must restore their
# state (and the hook's byte counters) to end where the uninterrupted run ends.
RESUMABLE = ["--dataset", "digits", "--model", "cnn", "--epochs", "2", "--batch-size", "32", "--max-steps", "30",
             "--sample-ratio", "0.5", "--policy", "bernoulli_weight", "--allow-unbiased-sampling",
             "--comm-hook", "sparse", "--checkpoint-every", "4"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("uninterrupted"))
    torchrun(RESUMABLE + ["--output-dir", out])
    return _checkpoint(out)


def _assert_same_run(a, b):
    assert (a["epoch"], a["step"], a["step_in_epoch"]) == (b["epoch"], b["step"], b["step_in_epoch"]) == (1, 30, 8)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for pid in sa:
        assert torch.equal(sa[pid]["momentum_buffer"], sb[pid]["momentum_buffer"]), pid
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 30
    ha, hb = a["comm"]["sparse"]["state_dict"], b["comm"]["sparse"]["state_dict"]
    assert (ha["steps"], ha["payload_bytes"], ha["dense_bytes"]) == (hb["steps"], hb["payload_bytes"], hb["dense_bytes"])


def test_resume_mid_epoch_equals_uninterrupted(tmp_path, uninterrupted):
    out = str(tmp_path)
    torchrun(RESUMABLE + ["--max-steps", "13", "--output-dir", out])
    first = _checkpoint(out)
    assert (first["epoch"], first["step"], first["step_in_epoch"]) == (0, 13, 13)
    assert first["train_seconds"] > 0
    proc = torchrun(RESUMABLE + ["--output-dir", out, "--resume", os.path.join(out, "checkpoint.pt")])
    assert "resumed from" in proc.stdout and "step 13" in proc.stdout
    last = _checkpoint(out)
    _assert_same_run(last, uninterrupted)
    assert last["train_seconds"] > first["train_seconds"]  # the resumed run's clock goes on


def test_killed_worker_restarts_from_last_checkpoint(tmp_path, uninterrupted):
    # Rank 1 SIGKILLs itself after step 6 on the first attempt; torchrun restarts both
    # workers, which continue from the step-4 checkpoint and end where the clean run ends.
    out = str(tmp_path)
    proc = torchrun(RESUMABLE + ["--output-dir", out], max_restarts=1, env={"APPROXDIST_TEST_KILL_AT": "1:6"},
                    entry=(os.path.join(REPO, "tests", "faulty_train.py"),))
    assert "resumed from" in proc.stdout and "step 4 (restart 1)" in proc.stdout, proc.stdout
    _assert_same_run(_checkpoint(out), uninterrupted)
