"""What a run records about the machine it ran on: date, versions, commit, load, and the
CPU reference workload before and after it (`approxdist-bench cpu`).

The host's speed moves within minutes, so the reference brackets the run: times of
different days compare only beside it.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["environment", "cpu_reference_end"]


def environment(cpu_reference: bool = True, quiet: bool = False) -> dict:
    """Date, versions, commit and load of this run, and the CPU reference unless
    `cpu_reference` is False (--no-cpu-reference)."""
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).resolve().parent).stdout.strip()
    except OSError:
        commit = ""
    env = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
           "python": platform.python_version(), "cpus": os.cpu_count(), "commit": commit,
           "loadavg": list(os.getloadavg())}
    if cpu_reference:
        from .. import cpu_reference as ref

        env["cpu_reference"] = ref.measure()
        if not quiet:
            print(ref.describe(env["cpu_reference"]), file=sys.stderr, flush=True)
    return env


def cpu_reference_end(env: dict, quiet: bool = False) -> None:
    """The CPU reference again once the run is over, into env (for a run that took one
    before); a failure here keeps the run's figures, without it."""
    if not env.get("cpu_reference"):
        return
    from .. import cpu_reference as ref

    try:
        env["cpu_reference_end"] = ref.measure()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:  # the run's figures stand
        print(f"approxdist-bench comm: the CPU reference after the run failed ({e}); "
              "the run's figures are kept without it", file=sys.stderr, flush=True)
        return
    if not quiet:
        print(ref.describe(env["cpu_reference_end"]) + " (after the run)", file=sys.stderr, flush=True)
