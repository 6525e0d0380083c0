"""approxdist.horovod.DistributedOptimizer under real Horovod launchers.

The pytest side launches this same file as a worker, `horovodrun -np 2 --gloo` and
`mpirun -np 2`, and asserts on the JSON each rank writes. Each case trains two copies of
one converted (approximate) CNN from the same start on the same per-rank batches: one with
approxdist's optimizer, one with Horovod's own DistributedOptimizer. The sparse reduction is
lossless, so the parameters must be bitwise equal, and equal on both ranks, while the bytes
handed to Horovod are the analytic count: k/n of every sampled weight plus every dense
parameter. Without Horovod every test here skips with the reason; the two tests at the
bottom (no Horovod needed) check that approxdist imports without it and says how to get it.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STEPS = 4
# (case name, optimizer, backward passes per step, fp16 compression, bucket cap in MB)
CASES = [
    ("sgd_momentum", "sgd", 1, False, 0.004),  # ~4 KB buckets: several collectives per step
    ("adam_one_bucket", "adam", 1, False, 25.0),
    ("sgd_accumulate2", "sgd", 2, False, 0.004),
    ("sgd_fp16", "sgd", 1, True, 0.004),
]


# ---------------------------------------------------------------------------------------
# worker (runs under horovodrun / mpirun)
# ---------------------------------------------------------------------------------------
def _train(hvd, use_approx, opt_name, passes, fp16, cap_mb):
    import torch
    import torch.nn.functional as F

    import approxdist
    from models import analytic_bytes, batch_for, make_model

    # Ours takes the default (input-major) weight layout and makes it contiguous itself;
    # Horovod's own optimizer needs contiguous weights from the start.
    layout = "input_major" if use_approx else "contiguous"
    model = approxdist.convert_model(make_model("cnn", seed=0), 0.5, distributed=True, weight_layout=layout)
    if opt_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    kw = dict(named_parameters=model.named_parameters(), backward_passes_per_step=passes,
              compression=hvd.Compression.fp16 if fp16 else hvd.Compression.none)
    if use_approx:
        opt = approxdist.horovod.DistributedOptimizer(opt, bucket_cap_mb=cap_mb, **kw)
    else:
        opt = hvd.DistributedOptimizer(opt, **kw)
    # Horovod's documented order: wrap the optimizer, then broadcast (needs contiguous tensors)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    assert all(p.is_contiguous() for p in model.parameters())
    start = [p.detach().clone() for p in model.parameters()]
    payload = []
    for step in range(STEPS):
        # Buckets are handed to Horovod during backward, as soon as they are ready.
        before = opt.stats["payload_bytes"] if use_approx else 0
        opt.zero_grad()
        for micro in range(passes):
            x, y = batch_for("cnn", hvd.rank(), step * passes + micro)
            F.cross_entropy(model(x), y).backward()
        opt.step()
        if use_approx:
            payload.append(opt.stats["payload_bytes"] - before)
    out = {"params": [p.detach().clone() for p in model.parameters()]}
    out["moved"] = all(not torch.equal(a, b) for a, b in zip(out["params"], start))
    if use_approx:
        out.update(payload=payload, stats=opt.stats, analytic=analytic_bytes(model),
                   buckets=len(opt._ad_buckets),
                   dense=sum(p.numel() * p.element_size() for p in model.parameters()))
    return out


def _case(hvd, name, opt_name, passes, fp16, cap_mb):
    import torch

    ours = _train(hvd, True, opt_name, passes, fp16, cap_mb)
    theirs = _train(hvd, False, opt_name, passes, fp16, cap_mb)
    same_as_horovod = all(torch.equal(a, b) for a, b in zip(ours["params"], theirs["params"]))
    flat = torch.cat([p.reshape(-1) for p in ours["params"]])
    root = hvd.broadcast(flat, root_rank=0, name=f"{name}.params")
    return {
        "same_as_horovod": same_as_horovod,
        "max_abs_diff": max((a - b).abs().max().item() for a, b in zip(ours["params"], theirs["params"])),
        "same_on_all_ranks": bool(torch.equal(flat, root)),
        "payload_per_step": ours["payload"],
        "analytic_bytes": ours["analytic"],
        "dense_bytes": ours["dense"],
        "stats": ours["stats"],
        "buckets": ours["buckets"],
        "moved": ours["moved"],
    }


def _divergence(hvd):
    """agreement='check' must name the layer when one rank selects other channels."""
    import torch
    import torch.nn.functional as F

    import approxdist
    from approxdist.distributed.agreement import IndexMismatchError
    from models import batch_for, make_model

    model = approxdist.convert_model(make_model("cnn", seed=0), 0.5, distributed=True)
    if hvd.rank() == 1:
        with torch.no_grad():  # channel norms become their inverses: rank 1's top half is rank 0's bottom half
            w = model.conv2.weight
            w.div_(w.pow(2).sum(dim=(0, 2, 3), keepdim=True))
    opt = approxdist.horovod.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters(),
        agreement="check", check_every=1)
    x, y = batch_for("cnn", hvd.rank(), 0)
    try:
        F.cross_entropy(model(x), y).backward()
        opt.synchronize()
    except IndexMismatchError as exc:
        return str(exc)
    return None


def _tied(hvd):
    """Tied weights (two layers holding one Parameter, each drawing its own channels): the
    union of both uses' channels is reduced, so the result is Horovod's bit for bit."""
    import torch
    import torch.nn.functional as F

    import approxdist
    from test_shared_weights import TiedNet, _batch

    params, differ = [], False
    for ours in (True, False):
        torch.manual_seed(0)
        model = approxdist.convert_model(TiedNet(), 0.5, distributed=True, policy="bernoulli_weight", allow_unbiased=True,
                                         seed=3, weight_layout="contiguous")
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        wrap = approxdist.horovod.DistributedOptimizer if ours else hvd.DistributedOptimizer
        opt = wrap(opt, named_parameters=model.named_parameters())
        for step in range(3):
            x, y = _batch(hvd.rank(), step)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        params.append([p.detach().clone() for p in model.parameters()])
        differ = differ or not torch.equal(model.fc_a.last_indices, model.fc_b.last_indices)
    return {"same_as_horovod": all(torch.equal(a, b) for a, b in zip(*params)), "uses_differ": differ}


def _payload_mismatch(hvd):
    """One rank runs an extra training forward (bernoulli_weight draws move on): the
    payloads differ in size, and every rank gets an error naming the sampled weights."""
    import torch
    import torch.nn.functional as F

    import approxdist
    from approxdist.distributed.agreement import PayloadSizeError
    from models import batch_for, make_model

    model = approxdist.convert_model(make_model("cnn", seed=0), 0.5, distributed=True,
                                     policy="bernoulli_weight", allow_unbiased=True, weight_layout="contiguous")
    opt = approxdist.horovod.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                                  named_parameters=model.named_parameters())
    try:
        for step in range(3):
            x, y = batch_for("cnn", hvd.rank(), step)
            if step == 1 and hvd.rank() == 1:
                model(x)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    except PayloadSizeError as exc:
        return str(exc)
    return None


def worker(out_dir):
    import horovod.torch as hvd
    import torch

    sys.path.insert(0, HERE)
    torch.set_num_threads(1)
    hvd.init()
    result = {"size": hvd.size(), "rank": hvd.rank(), "cases": {}}
    for name, *spec in CASES:
        result["cases"][name] = _case(hvd, name, *spec)
    result["divergence"] = _divergence(hvd)
    result["tied"] = _tied(hvd)
    result["payload_mismatch"] = _payload_mismatch(hvd)  # last: it leaves a failed collective behind
    with open(os.path.join(out_dir, f"rank{hvd.rank()}.json"), "w") as f:
        json.dump(result, f)


# ---------------------------------------------------------------------------------------
# pytest side
# ---------------------------------------------------------------------------------------
def _horovod_or_skip():
    """horovod.torch's build flags, or skip saying why (never silently)."""
    probe = ("import horovod.torch as hvd; "
             "print(int(hvd.gloo_built()), int(hvd.mpi_built()))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
        msg = f"Horovod is not importable ({reason}); build it with `make horovod`"
        print(f"SKIP: {msg}")
        pytest.skip(msg)
    gloo, mpi = (bool(int(v)) for v in proc.stdout.split()[-2:])
    return gloo, mpi


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [ROOT, HERE] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env.setdefault("HOROVOD_CYCLE_TIME", "1")
    return env


def _launch(cmd, tmp_path):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env(), cwd=ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    results = []
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.json") as f:
            results.append(json.load(f))
    return results


def _check(results):
    assert [r["rank"] for r in results] == [0, 1] and all(r["size"] == 2 for r in results)
    for r in results:
        for name, case in r["cases"].items():
            where = f"rank {r['rank']}, case {name}"
            assert case["same_as_horovod"], f"{where}: differs from hvd.DistributedOptimizer by {case['max_abs_diff']}"
            assert case["same_on_all_ranks"], f"{where}: parameters differ from rank 0's"
            assert case["moved"], f"{where}: some parameter never changed: the test proves nothing"
            assert case["stats"]["steps"] == STEPS, where
            if name == "sgd_fp16":
                per_step = case["analytic_bytes"] // 2  # float16 on the wire
            elif name == "sgd_accumulate2":
                per_step = None  # two forwards: the union of two selections, checked below
            else:
                per_step = case["analytic_bytes"]
            if per_step is not None:
                assert case["payload_per_step"] == [per_step] * STEPS, where
            else:
                assert all(case["analytic_bytes"] <= b <= case["dense_bytes"] for b in case["payload_per_step"]), where
            assert case["stats"]["dense_bytes"] == case["dense_bytes"] * STEPS, where
            assert case["stats"]["payload_bytes"] == sum(case["payload_per_step"]), where
            assert case["analytic_bytes"] < case["dense_bytes"], where
        assert r["cases"]["sgd_momentum"]["buckets"] > 1 and r["cases"]["adam_one_bucket"]["buckets"] == 1
        assert r["divergence"] is not None and "conv2.weight" in r["divergence"], r["divergence"]
        assert r["tied"] == {"same_as_horovod": True, "uses_differ": True}, r["tied"]
        mismatch = r["payload_mismatch"]
        assert mismatch is not None and "differs across ranks" in mismatch and ".weight'" in mismatch, mismatch


def _worker_cmd(tmp_path):
    return [sys.executable, os.path.abspath(__file__), "--worker", str(tmp_path)]


def test_matches_horovod_under_horovodrun_gloo(tmp_path):
    gloo, _ = _horovod_or_skip()
    if not gloo:
        pytest.skip("this Horovod was built without Gloo (HOROVOD_WITH_GLOO=1 make horovod)")
    horovodrun = shutil.which("horovodrun", path=os.path.dirname(sys.executable) + os.pathsep
                              + os.environ.get("PATH", ""))
    assert horovodrun, "horovod.torch imports but its horovodrun launcher is not on PATH"
    _check(_launch([horovodrun, "-np", "2", "-H", "localhost:2", "--gloo",
                    "--network-interface", "lo"] + _worker_cmd(tmp_path), tmp_path))


def test_matches_horovod_under_mpirun(tmp_path):
    _, mpi = _horovod_or_skip()
    mpirun = shutil.which("mpirun")
    if not mpi or not mpirun:
        msg = ("Horovod was built without MPI" if not mpi else "mpirun is not on PATH") + \
              " (apt-get install -y openmpi-bin libopenmpi-dev, then make horovod)"
        print(f"SKIP: {msg}")
        pytest.skip(msg)
    cmd = [mpirun, "-np", "2", "--oversubscribe", "--bind-to", "none", "-x", "PYTHONPATH",
           "-x", "OMP_NUM_THREADS", "-x", "HOROVOD_CYCLE_TIME", "--mca", "btl", "self,tcp",
           "--mca", "btl_tcp_if_include", "lo"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.insert(1, "--allow-run-as-root")
    _check(_launch(cmd + _worker_cmd(tmp_path), tmp_path))


# approxdist-train --dist horovod, through launch/horovodrun.sh ---------------------------
TRAIN_FLAGS = ["--dataset", "digits", "--model", "cnn", "--epochs", "1", "--max-steps", "5",
               "--batch-size", "32", "--lr", "0.1", "--seed", "0", "--no-progress"]


def _horovodrun_train(out, hook, ratio, extra=()):
    gloo, _ = _horovod_or_skip()
    if not gloo:
        pytest.skip("this Horovod was built without Gloo (HOROVOD_WITH_GLOO=1 make horovod)")
    bindir = os.path.dirname(sys.executable)
    env = dict(_env(), HOROVODRUN=os.path.join(bindir, "horovodrun"), PYTHON=sys.executable, NIC="lo", NP="2")
    cmd = ["bash", os.path.join(ROOT, "launch", "horovodrun.sh"), *TRAIN_FLAGS, "--sample-ratio", str(ratio),
           "--comm-hook", hook, "--output-dir", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return _train_result(out)


def _train_result(out):
    import torch

    with open(os.path.join(out, "metrics.jsonl")) as f:
        epoch = [r for r in map(json.loads, f) if r.get("kind") == "epoch"][-1]
    ck = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    return epoch, ck["model"]


def test_train_app_under_horovodrun_equals_torchrun(tmp_path):
    """The same job three ways: Horovod with the sparse optimizer, Horovod's own dense
    optimizer, and torchrun with the sparse DDP hook. The reduction is lossless and, on
    2 ranks, averaging is exact (halving is), so the final weights are bitwise equal."""
    import torch

    hvd_sparse, w_sparse = _horovodrun_train(tmp_path / "hvd_sparse", "sparse", 0.5)
    hvd_dense, w_dense = _horovodrun_train(tmp_path / "hvd_dense", "allreduce", 0.5)
    env = {k: v for k, v in _env().items() if not k.startswith(("OMPI_", "PMI_", "HOROVOD_"))}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "approxdist.train", *TRAIN_FLAGS, "--sample-ratio", "0.5", "--comm-hook", "sparse",
                           # Horovod's weight layout: sampled products then sum in the same order
                           "--weight-layout", "contiguous", "--output-dir", str(tmp_path / "ddp")],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ddp, w_ddp = _train_result(tmp_path / "ddp")
    assert w_sparse.keys() == w_dense.keys() == w_ddp.keys()
    for key in w_sparse:
        assert torch.equal(w_sparse[key], w_dense[key]), f"{key}: sparse Horovod != dense Horovod"
        assert torch.equal(w_sparse[key], w_ddp[key]), f"{key}: Horovod != torchrun DDP"
    assert hvd_sparse["step"] == hvd_dense["step"] == 5 and hvd_sparse["world_size"] == 2
    # The sparse optimizer sends what the DDP hook sends, and less than the dense one.
    assert hvd_sparse["payload_bytes"] == ddp["payload_bytes"]
    assert hvd_sparse["dense_bytes"] == hvd_dense["payload_bytes"] == hvd_dense["dense_bytes"]
    assert 0.4 * hvd_sparse["dense_bytes"] < hvd_sparse["payload_bytes"] < 0.6 * hvd_sparse["dense_bytes"]
    assert hvd_sparse["top1"] == hvd_dense["top1"] == ddp["top1"]


def test_train_app_under_horovodrun_resumes_exactly(tmp_path):
    """Stop after 3 steps (mid-epoch), resume to 5 from the checkpoint: the same weights and
    byte counters as 5 steps without a stop."""
    import torch

    whole, w_whole = _horovodrun_train(tmp_path / "whole", "sparse", 0.5)
    out = tmp_path / "resumed"
    _horovodrun_train(out, "sparse", 0.5, ["--max-steps", "3"])
    resumed, w_resumed = _horovodrun_train(out, "sparse", 0.5, ["--max-steps", "5", "--resume", "auto"])
    assert resumed["step"] == whole["step"] == 5
    for key in w_whole:
        assert torch.equal(w_whole[key], w_resumed[key]), key
    assert resumed["payload_bytes_total"] == whole["payload_bytes_total"]
    assert resumed["dense_bytes_total"] == whole["dense_bytes_total"]


@pytest.mark.parametrize("flags, message", [
    (["--comm-hook", "powersgd"], "--comm-hook powersgd is not available with --dist horovod"),
    (["--weight-layout", "input_major"], "--weight-layout input_major is not available with --dist horovod"),
    (["--comm-hook", "sparse", "--agreement", "broadcast"], "--agreement broadcast"),
    (["--backend", "gloo"], "--backend"),
])
def test_train_bad_horovod_flags_fail_in_one_line(flags, message):
    proc = subprocess.run([sys.executable, "-m", "approxdist.train", "--dist", "horovod", *flags],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=_env())
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_train_without_horovod_says_how_to_install():
    proc = _run_without_horovod("""
        from approxdist.train.__main__ import cli
        sys.argv = ['approxdist-train', '--dist', 'horovod', '--comm-hook', 'sparse']
        cli()
    """)
    assert proc.returncode == 2
    assert "make horovod" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def _run_without_horovod(code):
    """Runs `code` in a fresh interpreter where `import horovod` fails."""
    prelude = "import sys; sys.modules['horovod'] = None; sys.modules['horovod.torch'] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=_env())


def test_import_never_needs_horovod():
    proc = _run_without_horovod("""
        import approxdist, approxdist.distributed
        mod = approxdist.horovod
        assert 'horovod' not in [m for m in sys.modules if sys.modules[m] is not None], 'imported horovod'
        print(mod.DistributedOptimizer.__name__)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "DistributedOptimizer"


def test_without_horovod_the_error_says_how_to_install():
    proc = _run_without_horovod("""
        import torch, approxdist
        opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
        try:
            approxdist.horovod.DistributedOptimizer(opt)
        except ImportError as exc:
            print(exc)
        else:
            raise SystemExit('no ImportError')
    """)
    assert proc.returncode == 0, proc.stderr
    assert "make horovod" in proc.stdout and "horovod.torch" in proc.stdout, proc.stdout



# kill -9 of the launcher: no Horovod worker may train on ---------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["horovodrun", "mpirun"])
def test_workers_exit_when_the_horovod_launcher_is_killed(tmp_path, launcher):
    """Horovod workers are not started by init_distributed (no PR_SET_PDEATHSIG of ours);
    horovodrun's and Open MPI's own supervision must take them down with the launcher."""
    import signal

    from procs import train_workers as _workers_of
    from procs import wait_for

    gloo, mpi = _horovod_or_skip()
    exe = shutil.which(launcher, path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if exe is None or not (gloo if launcher == "horovodrun" else mpi):
        pytest.skip(f"{launcher} or Horovod's {'Gloo' if launcher == 'horovodrun' else 'MPI'} build is missing")
    out = str(tmp_path / "run")
    if launcher == "horovodrun":
        cmd = [exe, "-np", "2", "-H", "localhost:2", "--gloo", "--network-interface", "lo"]
    else:
        cmd = [exe, "-np", "2", "--oversubscribe", "--bind-to", "none", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS",
               "--mca", "btl", "self,tcp", "--mca", "btl_tcp_if_include", "lo"]
        if os.geteuid() == 0:
            cmd.insert(1, "--allow-run-as-root")
    cmd += [sys.executable, "-m", "approxdist.train", "--dist", "horovod", "--dataset", "digits", "--model", "cnn",
            "--epochs", "1000", "--no-progress", "--sample-ratio", "0.5", "--comm-hook", "sparse", "--output-dir", out]
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    workers = []
    try:
        metrics = os.path.join(out, "metrics.jsonl")
        assert wait_for(lambda: os.path.exists(metrics) and os.path.getsize(metrics) > 0, 240, every=0.5), "no epoch finished"
        workers = _workers_of(out)
        assert len(workers) == 2, workers
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert wait_for(lambda: not _workers_of(out), 30, every=0.5), f"workers {_workers_of(out)} outlived {launcher}"
    finally:
        proc.kill()
        proc.wait()
        for pid in _workers_of(out):
            os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", required=True, help="directory for rank<N>.json")
    worker(parser.parse_args().worker)
