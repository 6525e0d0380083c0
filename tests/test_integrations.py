"""approxdist inside other frameworks, each on 2 real gloo processes on the CPU:

- PyTorch Lightning: its DDPStrategy(ddp_comm_state=, ddp_comm_hook=) registers a hook only
  on CUDA, so on the CPU the sparse hook never runs (0 steps); SparseDDPStrategy registers
  it on any device, and SparseHookStats logs its stats (lightning_script.py).
- Hugging Face Accelerate: register() on the model accelerator.prepare() returned
  (accelerate_script.py, launched by torchrun as on a cluster).
- timm: a timm model converted by convert_model; the sparse hook equals DDP's all-reduce.

Each framework is optional: a test skips, with the reason, where it is not installed."""
import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")


def run_group(cmd, outdir, timeout=300):
    """Runs cmd in a session of its own (its launcher and every rank it starts), fails with
    its output on a non-zero status; kills whatever of the session is left, and asserts
    nothing was."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "PMI_", "MV2_", "PL_", "ACCELERATE_"))}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               PYTHONPATH=os.pathsep.join([REPO, TESTS, env.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(cmd, cwd=TESTS, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        # A launcher may return while a rank it started still tears down (Lightning's
        # does not wait for its children): give those a moment to exit on their own.
        deadline = time.monotonic() + 30
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        left = _group_alive(proc.pid)
        if left:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 0, out[-6000:]
    assert not left, "processes of the run were left behind"
    return out


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _equal(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# -- PyTorch Lightning ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lightning_runs(tmp_path_factory):
    pytest.importorskip("lightning", reason="PyTorch Lightning is not installed (pip install 'approxdist[lightning]')")
    outdir = str(tmp_path_factory.mktemp("lightning"))
    run_group([sys.executable, "lightning_script.py", outdir], outdir)
    return outdir, {fit: [torch.load(os.path.join(outdir, f"{fit}_rank{r}.pt"), weights_only=False) for r in (0, 1)]
                    for fit in ("sparse", "stock")}


def test_lightning_stock_ddp_strategy_leaves_the_hook_out_on_cpu(lightning_runs):
    """The bug SparseDDPStrategy works around: Lightning's DDPStrategy was given the hook and
    its state, trained, and the hook never ran (it registers hooks on CUDA only)."""
    _, runs = lightning_runs
    for r in runs["stock"]:
        assert r["global_step"] > 0 and not _equal(r["params"], r["init"])
        assert r["stats"]["steps"] == 0 and r["stats"]["payload_bytes"] == 0


def test_lightning_sparse_strategy_runs_the_hook_losslessly(lightning_runs):
    _, runs = lightning_runs
    for r in runs["sparse"]:
        steps = r["global_step"]
        assert steps > 0 and r["stats"]["steps"] == steps
        assert r["stats"]["payload_bytes"] == r["analytic"] * steps < r["stats"]["dense_bytes"] == r["dense"] * steps
        # Lossless: bit for bit what DDP's own all-reduce trained (the stock strategy's run,
        # whose hook never ran: the test above), on both ranks.
        assert _equal(r["params"], runs["stock"][0]["params"])
    assert _equal(runs["sparse"][0]["params"], runs["sparse"][1]["params"])
    assert not _equal(runs["sparse"][0]["params"], runs["sparse"][0]["init"]), "nothing was trained"


def test_lightning_callback_logs_the_hook_stats(lightning_runs):
    outdir, runs = lightning_runs
    final = runs["sparse"][0]["stats"]
    assert final["steps"] == runs["sparse"][0]["global_step"] > 0
    assert runs["sparse"][0]["logged"] == runs["sparse"][1]["logged"] == {
        f"sparse_hook/{k}": final[k] for k in ("steps", "payload_bytes", "dense_bytes", "ratio", "saved_bytes",
                                               "check_bytes")}
    with open(os.path.join(outdir, "sparse", "version_0", "metrics.csv")) as f:
        rows = [row for row in csv.DictReader(f) if row.get("sparse_hook/steps")]
    # every step logged once (every_n_steps=1; the epoch's end repeats nothing), cumulative:
    # step s has sent s steps' payload
    per_step = runs["sparse"][0]["analytic"]
    assert [int(row["sparse_hook/steps"]) for row in rows] == list(range(1, final["steps"] + 1))
    for row in rows:
        assert int(row["sparse_hook/payload_bytes"]) == per_step * int(row["sparse_hook/steps"])
    assert int(rows[-1]["sparse_hook/payload_bytes"]) == final["payload_bytes"]


def test_lightning_strategy_refuses_a_second_hook():
    pytest.importorskip("lightning", reason="PyTorch Lightning is not installed (pip install 'approxdist[lightning]')")
    import approxdist as ad
    from approxdist.integrations.lightning import SparseDDPStrategy, SparseHookStats

    with pytest.raises(ValueError, match="ddp_comm_hook: not with SparseDDPStrategy"):
        SparseDDPStrategy(ddp_comm_hook=ad.distributed.sparse_allreduce_hook)
    with pytest.raises(ValueError, match="compress: expected None or one of fp16, bf16"):
        SparseDDPStrategy(compress="int8")
    with pytest.raises(ValueError, match="every_n_steps: expected None or an integer >= 1"):
        SparseHookStats(every_n_steps=0)


# -- Hugging Face Accelerate ------------------------------------------------------------------

def test_accelerate_register_after_prepare(tmp_path):
    pytest.importorskip("accelerate", reason="Hugging Face Accelerate is not installed (pip install accelerate)")
    run_group([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "accelerate_script.py", str(tmp_path)], str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for r in ranks:
        assert r["wrapped"] == "DistributedDataParallel" and r["world"] == 2 and r["backend"] == "gloo"
        steps = r["stats"]["steps"]
        assert steps > 0 and r["stats"]["payload_bytes"] == r["analytic"] * steps < r["stats"]["dense_bytes"]
        assert _equal(r["sparse"], r["plain"]) and not _equal(r["sparse"], r["init"])
    assert _equal(ranks[0]["sparse"], ranks[1]["sparse"])


# -- timm -------------------------------------------------------------------------------------

@pytest.mark.slow  # 2 spawned ranks importing timm: ~5 s a model on a quiet machine, 12-17 s loaded
@pytest.mark.parametrize("name", ["timm_vit", "timm_resnet"])
def test_timm_model_converts_and_the_hook_equals_allreduce(name):
    pytest.importorskip("timm", reason="timm is not installed (pip install timm)")
    from hookcompare import assert_hook_equals_allreduce

    assert_hook_equals_allreduce(name, ratio=0.33, steps=2)


def test_lightning_missing_says_how_to_install(monkeypatch):
    for name in ("lightning", "lightning.pytorch", "lightning.pytorch.callbacks", "lightning.pytorch.strategies",
                 "pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.strategies"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    monkeypatch.delitem(sys.modules, "approxdist.integrations.lightning", raising=False)
    with pytest.raises(ImportError, match=r"needs PyTorch Lightning: pip install 'approxdist\[lightning\]'"):
        import approxdist.integrations.lightning  # noqa: F401
