"""Workers do not outlive their launcher; a rank that stops answering is named within the
collective timeout (issue 29, item 6). Real torchrun and real processes; every process a
test starts is killed in its finally, and the tests check that none is left."""
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from approxdist.distributed import CollectiveTimeoutError, collective_timeout
from approxdist.train.args import build_parser, validate
from distharness import free_port
from procs import alive as _alive
from procs import kill as _kill
from procs import train_workers
from procs import wait_for as _wait_for

SCRIPT = Path(__file__).with_name("watchdog_script.py")
ROOT = Path(__file__).resolve().parents[1]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")


def _env(**extra):
    return {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            **{k: str(v) for k, v in extra.items()}}


def _torchrun(tmp_path, go=None):
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    env = _env(MODE="wait", PID_DIR=pid_dir, GO=go or "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(SCRIPT)]
    agent = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return agent, pid_dir


def _workers(pid_dir):
    return [int(p.read_text()) for p in pid_dir.iterdir() if p.read_text()]


@linux_only
@pytest.mark.parametrize("when", ["training", "before_rendezvous"])
def test_workers_exit_when_torchrun_is_killed(tmp_path, when):
    go = tmp_path / "go"
    agent, pid_dir = _torchrun(tmp_path, go)
    workers = []
    try:
        assert _wait_for(lambda: len(list(pid_dir.iterdir())) == 2, 120), "workers did not start"
        time.sleep(0.2)
        workers = _workers(pid_dir)
        if when == "training":
            go.write_text("")
            time.sleep(3)  # past init_distributed and into the all-reduce loop
            assert all(_alive(p) for p in workers)
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        if when == "before_rendezvous":
            go.write_text("")  # the orphans reach init_distributed only now
        assert _wait_for(lambda: not any(_alive(p) for p in workers), 10), \
            f"workers {[p for p in workers if _alive(p)]} outlived torchrun"
    finally:
        agent.kill()
        agent.wait()
        _kill(workers)


def _ranks(tmp_path, timeout, stop_rank):
    port = free_port()
    return [subprocess.Popen([sys.executable, str(SCRIPT)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True,
                             env=_env(MODE="stop", TIMEOUT=timeout, STOP_RANK=stop_rank, RANK=r, WORLD_SIZE=2,
                                      LOCAL_RANK=r, MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
            for r in range(2)]


@pytest.mark.parametrize("stop_rank", [1, 0])  # rank 0 also hosts the rendezvous store
def test_a_stopped_rank_is_named_within_the_timeout(tmp_path, stop_rank):
    timeout = 6
    procs = _ranks(tmp_path, timeout, stop_rank)
    live = procs[1 - stop_rank]
    try:
        out, _ = live.communicate(timeout=180)
        assert live.returncode == 3, out[-2000:]
        elapsed = float(out.split("ELAPSED ")[1].split()[0])
        assert timeout - 1 <= elapsed <= timeout + 10, out[-2000:]
        assert f"CollectiveTimeoutError: rank {1 - stop_rank}:" in out
        assert f"rank(s) {stop_rank} did not respond" in out, out[-2000:]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert not any(_alive(p.pid) for p in procs)


def test_timeout_validation(monkeypatch):
    monkeypatch.delenv("APPROXDIST_COLLECTIVE_TIMEOUT_S", raising=False)
    assert collective_timeout() == 1800.0 and collective_timeout(2.5) == 2.5
    monkeypatch.setenv("APPROXDIST_COLLECTIVE_TIMEOUT_S", "7")
    assert collective_timeout() == 7.0
    for bad in (0, -1, float("nan"), float("inf"), True, "5"):
        with pytest.raises(ValueError, match="timeout"):
            collective_timeout(bad)
    monkeypatch.setenv("APPROXDIST_COLLECTIVE_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="APPROXDIST_COLLECTIVE_TIMEOUT_S"):
        collective_timeout()
    monkeypatch.delenv("APPROXDIST_COLLECTIVE_TIMEOUT_S")
    for bad in ("0", "nan", "inf"):
        with pytest.raises(ValueError, match="--timeout"):
            validate(build_parser().parse_args(["--dataset", "fake", "--timeout", bad]))
    assert issubclass(CollectiveTimeoutError, RuntimeError)


@linux_only
@pytest.mark.slow
def test_train_timeout_names_a_stopped_rank(tmp_path):
    """approxdist-train --timeout end to end: torchrun, 2 ranks, the sparse hook; rank 1 is
    SIGSTOPped mid-training and rank 0 fails within the timeout naming it."""
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "--max-restarts", "0", "-m", "approxdist.train", "--no-progress",
           "--dataset", "digits", "--model", "cnn", "--epochs", "1000", "--comm-hook", "sparse",
           "--sample-ratio", "0.5", "--timeout", "8", "--output-dir", out]
    agent = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    workers = {}
    try:
        metrics = Path(out) / "metrics.jsonl"
        assert _wait_for(lambda: metrics.exists() and metrics.stat().st_size > 0, 240), "no epoch finished"
        workers = {rank: pid for pid, rank in train_workers(out).items()}
        assert sorted(workers) == [0, 1], workers
        os.kill(workers[1], signal.SIGSTOP)
        stopped = time.monotonic()
        text, _ = agent.communicate(timeout=240)
        assert agent.returncode != 0, text[-3000:]
        assert "CollectiveTimeoutError" in text and "rank(s) 1 did not respond" in text, text[-3000:]
        assert "rank 0: a collective failed (collective timeout 8 s" in text, text[-3000:]  # --timeout reached it
        assert time.monotonic() - stopped < 120
    finally:
        for pid in workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        agent.kill()
        agent.communicate()
        _kill(workers.values())
