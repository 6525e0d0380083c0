"""Processes the tests start and look for: alive, killed, waited on, found by command line."""
import os
import signal
import time
from pathlib import Path


def alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"  # a zombie has exited (its new parent may not have reaped it yet)


def kill(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for(cond, seconds, every=0.05):
    """Whether cond() became true within `seconds` (polled every `every` s)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(every)
    return cond()


def train_workers(tag):
    """{pid: RANK (None where unset)} of the `python [-u] -m approxdist.train` processes whose
    command line holds `tag`; not their launchers (torchrun, horovodrun, mpirun), whose
    command lines hold the same words further on."""
    found = {}
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
            env = Path(f"/proc/{d}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        head = cmd[1:4]
        if b"approxdist.train" in head and head[head.index(b"approxdist.train") - 1] == b"-m" and tag.encode() in cmd:
            rank = next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)
            found[int(d)] = rank
    return found
