"""A multi-node testbed on one machine, from Python.

Users pick approxdist to save time on slow links between nodes, and one machine has no
slow links; launch/testbed/setup.sh makes them: every node is a network namespace with
its own address behind a tbf-shaped veth. `Testbed` wraps those scripts so that the
teardown always runs (normal exit, exception, Ctrl-C, SIGTERM) and so that starting a
rank inside a node gets the details right that are easy to get wrong: GLOO_SOCKET_IFNAME,
`--local-addr` (all namespaces share one host name) and `is_host` for the c10d rendezvous
(the static rendezvous on torch 2.4, whose c10d rendezvous cannot work across namespaces).

`approxdist-bench testbed` builds a testbed, measures what a link really carries (a TCP
stream and a gloo all-reduce) and removes it again.

This module imports only the standard library at the top so that it can be run as a
plain script inside a namespace (`python testbed.py _allreduce-worker ...`) without
importing the rest of the package.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

__all__ = ["Testbed", "available", "parse_rate", "ring_allreduce_bytes"]

SUBNET = "10.77.0"
IFNAME = "eth0"
PREFIX = "adtb"


def _scripts_dir() -> Path:
    env = os.environ.get("APPROXDIST_TESTBED_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "launch" / "testbed"


NEEDS_ROOT = ("needs root: the testbed creates network namespaces (ip netns), veth links and a bridge, "
              "and shapes the links with tc; run it as root")


def available() -> tuple[bool, str]:
    """(True, "") where namespaces can be made here, else (False, why): tests skip on it."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False, NEEDS_ROOT
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"iproute2's `{tool}` is not installed"
    if not (_scripts_dir() / "setup.sh").is_file():
        return False, f"launch/testbed/setup.sh not found under {_scripts_dir()}"
    return True, ""


def c10d_uses_local_addr() -> bool:
    """Whether this torch's c10d rendezvous gives the workers torchrun's --local-addr of
    rank 0 as MASTER_ADDR (RendezvousStoreInfo.build takes it; not in torch 2.4, which
    gives them rank 0's host name). Imports torch: call it from a parent process only."""
    import inspect

    try:
        from torch.distributed.elastic.rendezvous.api import RendezvousStoreInfo

        return "local_addr" in inspect.signature(RendezvousStoreInfo.build).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return False


def parse_rate(rate: str) -> float:
    """tc's rate syntax ("1gbit", "100mbit", "12.5mbps") to bits per second."""
    import re

    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([kmg]?)(bit|bps)", str(rate).strip().lower())
    if not m:
        raise ValueError(f"rate must look like '1gbit' or '100mbit', got {rate!r}")
    value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]
    return value * (8 if m.group(3) == "bps" else 1)


DEFAULT_BURST_FLOOR = 96 * 1024  # a 64 KiB GSO segment with room to spare (setup.sh)


def parse_size(size: str) -> int:
    """tc's size syntax ("96kb", "128k", "1mb", "65536") to bytes (k and m are 1024-based,
    as in tc); the burst of a testbed link."""
    import re

    m = re.fullmatch(r"([0-9]+)(b|kb|k|mb|m)?", str(size).strip().lower())
    if not m or int(m.group(1)) == 0:
        raise ValueError(f"burst must be a positive tc size like '96kb', '128k' or '65536', got {size!r}")
    return int(m.group(1)) * {None: 1, "b": 1, "kb": 1024, "k": 1024, "mb": 1 << 20, "m": 1 << 20}[m.group(2)]


def default_burst_bytes(rate: str) -> int:
    """setup.sh's default tbf burst at `rate`: 1 ms of traffic, at least 96 KiB."""
    return max(int(parse_rate(rate)) // 8 // 1000, DEFAULT_BURST_FLOOR)


def ring_allreduce_bytes(nbytes: int, world_size: int) -> float:
    """Bytes each node sends (and receives) in a bandwidth-optimal all-reduce.

    Reduce-scatter then all-gather moves 2 (n-1)/n of the buffer over every link in each
    direction; gloo's ring and halving-doubling algorithms both reach it, so payload over
    link rate times this factor is the physical limit a hook can approach.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    return 2.0 * (world_size - 1) / world_size * nbytes


class Testbed:
    """`with Testbed(nodes=2, rate="1gbit") as tb:` builds the testbed and always removes it.

    rate: tc rate of every link in each direction, or "none" for unshaped veths (on two
    cores gloo tops out near 3 Gbit/s unshaped, so keep shaped rates well below that).
    burst: tbf bucket; default 1 ms at `rate` and at least 96 KiB, a whole GSO segment
    (messages below it pass unshaped; see launch/testbed/setup.sh).
    tag: names the namespaces adtb-TAG-*, so two testbeds (a test and a benchmark) coexist.
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, nodes: int = 2, rate: str = "1gbit", *, burst: str | None = None,
                 latency: str = "20ms", tag: str | None = None, verbose: bool = False):
        if not isinstance(nodes, int) or not 2 <= nodes <= 200:
            raise ValueError(f"nodes must be an int in 2..200, got {nodes!r}")
        if rate != "none":
            parse_rate(rate)
        if burst is not None:
            parse_size(burst)
        self.nodes = nodes
        self.rate = rate
        self.burst = None if burst is None else str(burst).strip().lower()
        self.latency = latency
        self.tag = tag if tag is not None else f"p{os.getpid() % 10_000_000}"
        if not (1 <= len(self.tag) <= 8 and self.tag.isalnum() and self.tag == self.tag.lower()):
            raise ValueError(f"tag must match [a-z0-9]{{1,8}}, got {self.tag!r}")
        self.verbose = verbose
        self._procs: list[subprocess.Popen] = []
        self._up = False
        self._old_handlers: dict[int, object] = {}

    # -- names and addresses ---------------------------------------------------------
    @property
    def rate_bps(self) -> float | None:
        return None if self.rate == "none" else parse_rate(self.rate)

    @property
    def burst_bytes(self) -> int | None:
        """The tbf bucket of every link in bytes (None when unshaped)."""
        if self.rate == "none":
            return None
        return parse_size(self.burst) if self.burst else default_burst_bytes(self.rate)

    def netns(self, i: int) -> str:
        self._check_node(i)
        return f"{PREFIX}-{self.tag}-n{i}"

    def address(self, i: int) -> str:
        self._check_node(i)
        return f"{SUBNET}.{i + 1}"

    def namespaces(self) -> list[str]:
        """This testbed's namespaces that exist right now (the test checks none remain)."""
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        mine = f"{PREFIX}-{self.tag}-"
        return [line.split()[0] for line in out.splitlines() if line.startswith(mine)]

    def _check_node(self, i: int) -> None:
        if not isinstance(i, int) or not 0 <= i < self.nodes:
            raise ValueError(f"node must be in 0..{self.nodes - 1}, got {i!r}")

    # -- lifetime ----------------------------------------------------------------------
    def __enter__(self) -> "Testbed":
        ok, why = available()
        if not ok:
            raise RuntimeError(f"cannot build a testbed here: {why}")
        self._trap_signals()
        try:
            cmd = [str(_scripts_dir() / "setup.sh"), "-n", str(self.nodes), "-r", self.rate,
                   "-l", self.latency, "-t", self.tag]
            if self.burst:
                cmd += ["-b", self.burst]
            self._up = True  # from here teardown runs, even if setup fails halfway
            res = subprocess.run(cmd, capture_output=True, text=True)
            if self.verbose:
                sys.stderr.write(res.stdout)
            if res.returncode != 0:
                raise RuntimeError(f"setup.sh failed ({res.returncode}): {res.stderr.strip()}")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close(raising=exc[0] is None)

    def close(self, raising: bool = False) -> None:
        """Stop every process started in the nodes, then run teardown.sh."""
        try:
            self.stop_all()
            if self._up:
                res = subprocess.run([str(_scripts_dir() / "teardown.sh"), "-t", self.tag],
                                     capture_output=True, text=True)
                self._up = False
                if res.returncode != 0 and raising:
                    raise RuntimeError(f"teardown.sh failed: {res.stderr.strip()}")
        finally:
            self._restore_signals()

    def _trap_signals(self) -> None:
        # SIGTERM/SIGHUP would kill Python without unwinding `with`; turn them into an
        # exception so __exit__ (and so teardown) still runs.
        if threading.current_thread() is not threading.main_thread():
            return

        def interrupt(signum, frame):
            raise KeyboardInterrupt(f"signal {signum}")

        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, interrupt)

    def _restore_signals(self) -> None:
        while self._old_handlers:
            sig, handler = self._old_handlers.popitem()
            signal.signal(sig, handler)

    # -- running things in nodes -------------------------------------------------------
    def exec_args(self, i: int, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns(i), *map(str, argv)]

    def env(self, i: int, base: dict | None = None, *, port: int = 29500) -> dict:
        """Environment for rank i of a one-process-per-node job with env:// rendezvous."""
        env = dict(os.environ if base is None else base)
        env.update(GLOO_SOCKET_IFNAME=IFNAME, MASTER_ADDR=self.address(0), MASTER_PORT=str(port),
                   RANK=str(i), WORLD_SIZE=str(self.nodes), LOCAL_RANK="0",
                   LOCAL_WORLD_SIZE="1")
        return env

    def torchrun_args(self, i: int, *, nproc_per_node: int = 1, port: int = 29400) -> list[str]:
        """torchrun options for node i; torchrun itself must run inside node i.

        Every namespace reports the same host name, so without --local-addr the agents
        advertise an address the others cannot tell apart, and without is_host=1 on
        exactly one node each agent tries to host the c10d store. torch 2.4's c10d
        rendezvous ignores --local-addr when it tells the workers where rank 0's store is
        (MASTER_ADDR is node 0's host name, which every node resolves to itself), so
        there the nodes meet through the static rendezvous at node 0's address instead.
        """
        args = ["--nnodes", str(self.nodes), "--nproc-per-node", str(nproc_per_node),
                "--node-rank", str(i)]
        if not c10d_uses_local_addr():
            return args + ["--rdzv-backend", "static", "--master-addr", self.address(0),
                           "--master-port", str(port)]
        return args + ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"{self.address(0)}:{port}",
                       "--rdzv-id", f"adtb-{self.tag}",
                       "--rdzv-conf", f"is_host={1 if i == 0 else 0}", "--local-addr", self.address(i)]

    def popen(self, i: int, argv: list[str], *, env: dict | None = None,
              **kwargs) -> subprocess.Popen:
        """Start argv inside node i; it is stopped (with its children) when the testbed closes."""
        if not self._up:
            raise RuntimeError("the testbed is not up; use it inside `with Testbed(...)`")
        env = dict(os.environ if env is None else env)
        env.setdefault("GLOO_SOCKET_IFNAME", IFNAME)
        proc = subprocess.Popen(self.exec_args(i, argv), env=env, start_new_session=True,
                                **kwargs)
        self._procs.append(proc)
        return proc

    def run_all(self, argv_of, *, env_of=None, timeout: float = 600.0) -> list[dict]:
        """Run argv_of(i) in every node i at once and wait; stop the rest if one fails.

        Returns per node {"returncode", "stdout", "stderr", "stopped", "failed_seq"}.
        stopped: the process was still running when a failure elsewhere (or the timeout)
        made us stop it, so its exit code is our SIGTERM, not its own. failed_seq: the order
        in which failures of their own were seen (0 first), None for the others; a node
        that fails first may be polled after one that our teardown killed, so the report
        reads this order, not the node numbers. Output goes through files, not pipes, so a
        chatty rank cannot block on a full pipe while we wait on another.
        """
        with tempfile.TemporaryDirectory(prefix="adtb-") as tmp:
            procs, files = [], []
            for i in range(self.nodes):
                out = open(os.path.join(tmp, f"{i}.out"), "w+")
                err = open(os.path.join(tmp, f"{i}.err"), "w+")
                files.append((out, err))
                env = env_of(i) if env_of is not None else self.env(i)
                procs.append(self.popen(i, argv_of(i), env=env, stdout=out, stderr=err))
            deadline = time.monotonic() + timeout
            stopped, seen = None, []  # seen: nodes in the order their own failure was polled

            def note_failures():
                for i, p in enumerate(procs):
                    if p.poll() not in (None, 0) and i not in seen and not (stopped and i in stopped):
                        seen.append(i)

            while any(p.poll() is None for p in procs):
                note_failures()
                if stopped is None and (seen or time.monotonic() > deadline):
                    stopped = {i for i, p in enumerate(procs) if p.poll() is None}
                    self.stop_all()
                time.sleep(0.05)
            note_failures()
            results = []
            for i, (p, (out, err)) in enumerate(zip(procs, files)):
                out.seek(0)
                err.seek(0)
                ours = bool(stopped) and i in stopped and p.returncode in (-signal.SIGTERM, -signal.SIGKILL)
                results.append({"returncode": p.returncode, "stdout": out.read(), "stderr": err.read(),
                                "stopped": ours, "failed_seq": seen.index(i) if i in seen and not ours else None})
                out.close()
                err.close()
            self._procs = [p for p in self._procs if p not in procs]
            return results

    def run_checked(self, argv_of, *, env_of=None, timeout: float = 600.0,
                    what: str = "a process") -> list[dict]:
        """run_all, then check_results."""
        return check_results(self.run_all(argv_of, env_of=env_of, timeout=timeout), what)

    def stop_all(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL, the process groups this testbed started (and only those)."""
        live = [p for p in self._procs if p.poll() is None]
        for p in live:
            _signal_group(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in live:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(p.pid, signal.SIGKILL)
                p.wait()
        self._procs = []

    # -- measurements ------------------------------------------------------------------
    def measure_tcp(self, src: int = 0, dst: int = 1, nbytes: int = 25_000_000,
                    port: int = 29999) -> float:
        """Bits per second of one TCP stream src -> dst (through both shaped veth ends)."""
        server = self.popen(dst, [sys.executable, "-c", _TCP_SINK, str(port)],
                            stdout=subprocess.PIPE, text=True)
        client = self.popen(src, [sys.executable, "-c", _TCP_SOURCE, self.address(dst),
                                  str(port), str(nbytes)], stdout=subprocess.PIPE, text=True)
        out, _ = client.communicate(timeout=300)
        server.wait(timeout=30)
        if client.returncode != 0:
            raise RuntimeError(f"TCP probe failed with exit code {client.returncode}")
        return 8.0 * nbytes / float(out.strip())

    def measure_allreduce(self, nbytes: int = 25_000_000, iters: int = 5,
                          port: int = 29500) -> dict:
        """A gloo all-reduce of nbytes float32 across all nodes, iters times (after a
        warm-up): link_rate of the seconds."""
        if iters < 1:
            raise ValueError(f"iters must be >= 1, got {iters!r}")
        script = str(Path(__file__).resolve())
        res = self.run_checked(lambda i: [sys.executable, script, "_allreduce-worker",
                                          "--numel", str(nbytes // 4), "--iters", str(iters)],
                               env_of=lambda i: self.env(i, port=port), timeout=300,
                               what="the all-reduce probe")
        seconds = json.loads(res[0]["stdout"].strip().splitlines()[-1])["seconds"]
        return link_rate(seconds, nbytes, self.nodes)


def link_rate(seconds: list[float], nbytes: int, nodes: int) -> dict:
    """What a link carries, from the seconds of repeated all-reduces of nbytes on `nodes`.

    link_bits_per_s comes from the fastest repetition: the link's rate is a ceiling, and
    the machine's other work (the previous configuration's processes still exiting,
    another tenant) only slows a repetition down, so the median understates it (a probe
    read 0.79 Gbit/s on a 1gbit link whose other repetitions ran at 0.95). The median is
    kept, as median_s and median_bits_per_s."""
    if not seconds or min(seconds) <= 0:
        raise ValueError(f"seconds must be positive and not empty, got {seconds!r}")
    ordered = sorted(seconds)
    med = ordered[len(ordered) // 2]
    moved = 8.0 * ring_allreduce_bytes(nbytes, nodes)
    return {"bytes": nbytes, "seconds": list(seconds), "fastest_s": ordered[0], "median_s": med,
            "link_bits_per_s": moved / ordered[0], "median_bits_per_s": moved / med}


def run_on_fresh_testbed(argv: list[str], *, nodes: int = 2, rate: str = "1gbit",
                         port: int = 29500, timeout: float = 600.0, what: str = "a rank") -> str:
    """Bring a testbed up, run argv as the one rank of every node (env:// rendezvous at
    node 0, see Testbed.env), take the testbed down again; node 0's stdout. A failed
    node raises RuntimeError (check_results; `what` names the program there)."""
    with Testbed(nodes, rate) as tb:
        res = tb.run_checked(lambda i: argv, env_of=lambda i: tb.env(i, port=port),
                             timeout=timeout, what=what)
    return res[0]["stdout"]


def check_results(results: list[dict], what: str = "a process") -> list[dict]:
    """results of Testbed.run_all, unless a node failed: then RuntimeError with the exit
    code and the end of the stderr of the node that failed first (in time, `failed_seq`;
    not a node our teardown stopped afterwards), `what` naming what ran there. When every
    failure is a stop of ours (the timeout), the first such node is reported as stopped."""
    failed = [(r.get("failed_seq") if r.get("failed_seq") is not None else len(results) + i, i)
              for i, r in enumerate(results) if r["returncode"] != 0 and not r.get("stopped")]
    if failed:
        i = min(failed)[1]
        r = results[i]
        raise RuntimeError(f"{what} failed on node {i} (exit code {r['returncode']}):\n{r['stderr'][-3000:]}")
    for i, r in enumerate(results):
        if r["returncode"] != 0:
            raise RuntimeError(f"{what} on node {i} was stopped by the testbed (exit code {r['returncode']}: "
                               f"the timeout ran out):\n{r['stderr'][-3000:]}")
    return results


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # start_new_session=True made pid the group id
    except (ProcessLookupError, PermissionError):
        pass


# Probes run with `python -c` inside a namespace: stdlib only, start in milliseconds.
_TCP_SINK = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(1); s.settimeout(60)
c, _ = s.accept(); buf = bytearray(1 << 20)
while c.recv_into(buf): pass
c.sendall(b"k"); c.close()
"""
_TCP_SOURCE = r"""
import socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for _ in range(200):
    try:
        c = socket.create_connection((host, port), timeout=60); break
    except OSError:
        time.sleep(0.05)
else:
    sys.exit("sink never answered")
chunk = b"\0" * (1 << 20); left = n; t0 = time.perf_counter()
while left > 0:
    sent = c.send(chunk[: min(left, len(chunk))]); left -= sent
c.shutdown(socket.SHUT_WR); c.recv(1)
print(time.perf_counter() - t0)
"""


def _allreduce_worker(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="testbed.py _allreduce-worker")
    p.add_argument("--numel", type=int, required=True)
    p.add_argument("--iters", type=int, default=3)
    a = p.parse_args(argv)
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    x = torch.ones(a.numel)
    dist.all_reduce(x)  # warm-up: connections are made lazily
    seconds = []
    for _ in range(a.iters):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(x)
        seconds.append(time.perf_counter() - t0)
    if dist.get_rank() == 0:
        print(json.dumps({"seconds": seconds}))
    dist.destroy_process_group()
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_allreduce-worker"]:
        return _allreduce_worker(argv[1:])
    p = argparse.ArgumentParser(
        prog="approxdist-bench testbed",
        description="Build a namespace testbed, measure what its links carry, remove it. Needs root and "
                    "iproute2 (ip netns, tc): it refuses up front, in one line, without them.")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--rate", default="1gbit", help="tc rate per link and direction, or none")
    p.add_argument("--burst", default=None)
    p.add_argument("--mb", type=float, default=25.0, help="megabytes per probe transfer")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--json", default=None, help="also write the figures to this file")
    a = p.parse_args(argv)
    if a.nodes < 2:
        p.error("--nodes must be >= 2")
    if a.iters < 1:
        p.error(f"--iters must be >= 1, got {a.iters}")
    ok, why = available()
    if not ok:
        print(f"approxdist-bench testbed: {why}", file=sys.stderr)
        return 2
    nbytes = int(a.mb * 1e6)
    with Testbed(a.nodes, a.rate, burst=a.burst, verbose=True) as tb:
        tcp = tb.measure_tcp(0, 1, nbytes)
        ar = tb.measure_allreduce(nbytes, a.iters)
    report = {"nodes": a.nodes, "rate": a.rate, "rate_bps": tb.rate_bps, "bytes": nbytes,
              "tcp_bits_per_s": tcp, "allreduce": ar}
    print(f"TCP node0->node1: {tcp / 1e9:.3f} Gbit/s"
          + (f" ({tcp / tb.rate_bps:.0%} of {a.rate})" if tb.rate_bps else ""))
    print(f"gloo all-reduce of {nbytes / 1e6:.1f} MB on {a.nodes} nodes: fastest "
          f"{ar['fastest_s']:.3f} s = {ar['link_bits_per_s'] / 1e9:.3f} Gbit/s per link "
          f"(median {ar['median_s']:.3f} s = {ar['median_bits_per_s'] / 1e9:.3f} Gbit/s)")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
