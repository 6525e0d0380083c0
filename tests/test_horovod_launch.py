"""launch/horovodrun.sh builds the horovodrun command line that approxdist-train expects.

The launcher itself is replaced by a script that prints its arguments, one per line, so
this checks what would run without Horovod installed."""
import os
import subprocess

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch", "horovodrun.sh")


def _run(tmp_path, args, **env):
    fake = tmp_path / "fake_horovodrun"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\necho "OMP=$OMP_NUM_THREADS"\n')
    fake.chmod(0o755)
    full = {k: v for k, v in os.environ.items() if k not in ("NP", "HOSTS", "CONTROLLER", "NIC", "OMP_NUM_THREADS")}
    full.update(HOROVODRUN=str(fake), PYTHON="python3", **env)
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=full, timeout=60)


def test_default_is_two_local_gloo_processes(tmp_path):
    proc = _run(tmp_path, ["--epochs", "1", "--sample-ratio", "0.5"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:-1] == [
        "-np", "2", "-H", "localhost:2", "--gloo", "python3", "-m", "approxdist.train",
        "--dist", "horovod", "--epochs", "1", "--sample-ratio", "0.5", "OMP=1"]


def test_hosts_controller_and_nic(tmp_path):
    proc = _run(tmp_path, ["--model", "resnet18"], NP="8", HOSTS="a:4,b:4", CONTROLLER="mpi", NIC="eth0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:9] == ["-np", "8", "-H", "a:4,b:4", "--mpi", "--network-interface",
                                            "eth0", "python3", "-m"]


@pytest.mark.parametrize("env, word", [({"CONTROLLER": "nccl"}, "CONTROLLER"), ({"NP": "0"}, "NP"),
                                       ({"NP": "two"}, "NP")])
def test_bad_settings_are_named(tmp_path, env, word):
    proc = _run(tmp_path, [], **env)
    assert proc.returncode == 2 and word in proc.stderr and proc.stdout == ""
