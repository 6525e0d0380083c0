"""A real Slurm cluster on the namespace testbed, for tests/test_slurm.py.

`with SlurmCluster(tb, workdir) as cluster:` turns a running `Testbed` into a cluster:
one `munged` (its own key, socket and state under `workdir`), `slurmctld` in the testbed's
hub namespace (the "login node", address CTL_ADDR on the hub's bridge) and one
`slurmd -N nI` in every node's namespace at that node's address, all configured by a
slurm.conf written under `workdir` (nothing is written outside it). It waits until every
node is idle and, on exit (also after a failure), cancels the jobs, stops every daemon it
started and kills whatever is left in the testbed's namespaces; the caller removes
`workdir` and the testbed.

Choices this container (gVisor, no systemd, no cgroup hierarchy inside a network
namespace) forces, and which a real cluster would make differently:
- ProctrackType=proctrack/linuxproc: jobs are tracked through the process tree in /proc,
  not cgroups, so `scancel` reaches every descendant of a step (what the scancel test
  checks); TaskPlugin=task/affinity with TaskPluginParam=Cores: tasks are bound to their
  CPUs by sched_setaffinity, as on most clusters (task/cgroup needs cgroups). No accounting
  (slurmdbd, sacct): a job's end is read from `scontrol show job` while slurmctld
  remembers it (MinJobAge).
- The daemons enter the node's network namespace with nsenter, not `ip netns exec`, which
  remounts /sys: slurmd 22.05 initialises its cgroup plugin whatever the other plugins
  are, and refuses to start without /sys/fs/cgroup.
- Every namespace shares the machine's host name, so each daemon runs in UTS and mount
  namespaces of its own: host name n0, n1 (ctl for slurmctld) and an /etc/hosts bound over
  the machine's that names the cluster, written as Debian's installer writes it (the
  node's own name is 127.0.1.1). torchrun's c10d rendezvous and `init_distributed` find
  the first node by name, as on real clusters, and gloo must be told its interface
  (GLOO_SOCKET_IFNAME, the scripts' NIC), as on such clusters.
- SlurmdParameters=config_overrides: both nodes declare the machine's CPUs (they share them).
- Everything runs as root (SlurmUser=root); jobs are submitted by root.
- The hub namespace gets CTL_ADDR on its bridge for slurmctld and the client commands
  (sbatch, scontrol, scancel run there, like on a login node); the testbed's teardown
  removes it with the namespace.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

CTL_ADDR = "10.77.0.254"
CTL_NAME = "ctl"
TOOLS = ("nsenter", "unshare", "munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo", "srun")


def available() -> tuple[bool, str]:
    """(True, "") where a cluster can be built (after approxdist.bench.testbed.available)."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return False, (f"{', '.join(missing)} not installed (Debian: apt-get install -y slurm-wlm munge; "
                       "nsenter and unshare come with util-linux)")
    return True, ""


class SlurmCluster:
    __test__ = False

    def __init__(self, tb, workdir, *, cpus: int | None = None, kill_wait: int = 5):
        self.tb = tb
        self.dir = Path(workdir)
        self.cpus = cpus or os.cpu_count() or 1
        self.kill_wait = kill_wait
        self.nodes = [f"n{i}" for i in range(tb.nodes)]
        self.hub = f"adtb-{tb.tag}-hub"  # launch/testbed/setup.sh's name for the bridge's namespace
        self.conf = self.dir / "etc" / "slurm.conf"
        self.munge_socket = self.dir / "munge" / "munge.socket"
        self._daemons: list[tuple[str, subprocess.Popen]] = []

    # -- lifetime ------------------------------------------------------------------------
    def __enter__(self) -> "SlurmCluster":
        try:
            self._write_files()
            self._start_munged()
            ip = subprocess.run(["ip", "-n", self.hub, "addr", "add", f"{CTL_ADDR}/24",
                                 "dev", "br0"], capture_output=True, text=True)
            if ip.returncode != 0:
                raise RuntimeError(f"could not give the hub {CTL_ADDR}: {ip.stderr.strip()}")
            self._start("slurmctld", self.hub, CTL_NAME,
                        ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            for i, node in enumerate(self.nodes):
                self._start(f"slurmd {node}", self.tb.netns(i), node,
                            ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
            self.wait_idle()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the daemons (slurmd first, so no step outlives them, then the controller and
        munged), then remove the hosts files; the testbed's teardown removes the hub's address."""
        if self._daemons:
            # Jobs first, as a real cluster would end them, so their steps stop cleanly.
            self.run(["scancel", "--full", "--user", "root"], check=False, timeout=30)
        for name, proc in reversed(self._daemons):
            _stop(proc)
        self._daemons = []
        # Whatever outlived its daemon (a slurmstepd detaches from slurmd's process group)
        # lives in a namespace of this testbed, so it is ours to end.
        for _ in range(2):
            for pid in self.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)

    def pids(self) -> list[int]:
        """Every process in the testbed's namespaces (nodes and hub), by `ip netns pids`."""
        return [p for ns in [self.hub, *(self.tb.netns(i) for i in range(self.tb.nodes))]
                for p in _netns_pids(ns)]

    def node_pids(self, i: int) -> list[int]:
        """Every process in node i's namespace: its slurmd and whatever the jobs started."""
        return _netns_pids(self.tb.netns(i))

    def is_daemon(self, pid: int) -> bool:
        """pid is one of the daemons this cluster started (nsenter, unshare and sh exec
        into the daemon, so the pid stays that of the daemon)."""
        return any(p.pid == pid for _, p in self._daemons)

    def alive(self) -> list[str]:
        return [name for name, p in self._daemons if p.poll() is None]

    # -- commands --------------------------------------------------------------------------
    def env(self, extra: dict | None = None) -> dict:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "SRUN_", "SBATCH_", "OMPI_", "PMI_"))}
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME",
                  "NCCL_SOCKET_IFNAME"):
            env.pop(k, None)
        env["SLURM_CONF"] = str(self.conf)
        env.update(extra or {})
        return env

    def run(self, argv, *, env: dict | None = None, timeout: float = 60.0, check: bool = True,
            cwd=None) -> subprocess.CompletedProcess:
        """A Slurm client command on the login node (the hub)."""
        proc = subprocess.run(["ip", "netns", "exec", self.hub, *map(str, argv)],
                              env=env or self.env(), capture_output=True, text=True, timeout=timeout,
                              cwd=cwd)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, argv))} failed ({proc.returncode}): "
                               f"{proc.stderr.strip()}{self._logs_tail()}")
        return proc

    def sbatch(self, argv, *, env: dict | None = None, cwd=None) -> str:
        out = self.run(["sbatch", "--parsable", *argv], env=env, cwd=cwd).stdout.strip()
        m = re.match(r"(\d+)", out)
        if not m:
            raise RuntimeError(f"sbatch printed no job id: {out!r}")
        return m.group(1)

    def job(self, job_id: str) -> dict:
        """`scontrol show job -o`'s fields (JobState, ExitCode, ...)."""
        out = self.run(["scontrol", "show", "job", "-o", job_id]).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait_job(self, job_id: str, *, timeout: float = 300.0, states=None) -> dict:
        """Poll until the job reaches one of `states` (default: any final state)."""
        final = states or {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                           "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in final:
                return info
            if time.monotonic() > deadline:
                self.run(["scancel", job_id], check=False)  # so that it holds no node for the next job
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s"
                                   f"{self._logs_tail()}")
            time.sleep(0.5)

    def wait_idle(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        states = ""
        while time.monotonic() < deadline:
            dead = [name for name, p in self._daemons if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited at start{self._logs_tail()}")
            proc = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False)
            states = proc.stdout.strip()
            got = dict(line.split() for line in states.splitlines() if len(line.split()) == 2)
            if proc.returncode == 0 and all(got.get(n) == "idle" for n in self.nodes):
                return
            time.sleep(0.5)
        raise RuntimeError(f"nodes not idle after {timeout:.0f} s: {states!r}{self._logs_tail()}")

    # -- internals -------------------------------------------------------------------------
    def _write_files(self) -> None:
        for sub in ("etc", "munge", "state", "spool", "log"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir / "munge", 0o700)
        key = self.dir / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        # As Debian's installer writes /etc/hosts: a node's own name is 127.0.1.1 there, the
        # others' names their addresses. A program that takes its address from the host
        # name (gloo without GLOO_SOCKET_IFNAME) then fails across nodes, as on such clusters.
        for name in [CTL_NAME, *self.nodes]:
            lines = ["127.0.0.1 localhost", f"127.0.1.1 {name}"]
            lines += [f"{addr} {other}" for other, addr in self._addresses().items() if other != name]
            self._hosts(name).write_text("\n".join(lines) + "\n")
        for node in self.nodes:
            (self.dir / "spool" / node).mkdir()
        d = self.dir
        node_lines = "".join(
            f"NodeName={node} NodeAddr={self.tb.address(i)} NodeHostname={node} CPUs={self.cpus} "
            f"RealMemory=1000 State=UNKNOWN\n" for i, node in enumerate(self.nodes))
        self.conf.write_text(f"""\
# written by tests/slurmcluster.py
ClusterName=adtb{self.tb.tag}
SlurmctldHost={CTL_NAME}({CTL_ADDR})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/spool/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
TaskPluginParam=Cores
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SlurmdParameters=config_overrides
ReturnToService=2
KillWait={self.kill_wait}
MinJobAge=600
InactiveLimit=0
{node_lines}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        (self.dir / "etc" / "cgroup.conf").write_text(
            "# slurmd 22.05 loads its cgroup plugin whatever the other plugins are; no plugin\n"
            "# here uses it (proctrack/linuxproc, task/affinity)\nCgroupPlugin=autodetect\n")

    def _addresses(self) -> dict:
        return {CTL_NAME: CTL_ADDR, **{node: self.tb.address(i) for i, node in enumerate(self.nodes)}}

    def _hosts(self, name: str) -> Path:
        return self.dir / "etc" / f"hosts-{name}"

    def _start_munged(self) -> None:
        m = self.dir / "munge"
        proc = subprocess.Popen(
            ["munged", "-F", "-f", f"--socket={self.munge_socket}", f"--key-file={m / 'munge.key'}",
             f"--pid-file={m / 'munged.pid'}", f"--log-file={self.dir / 'log' / 'munged.log'}",
             f"--seed-file={m / 'munged.seed'}"],
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "log" / "munged.err", "w"),
            start_new_session=True)
        self._daemons.append(("munged", proc))
        deadline = time.monotonic() + 20
        while not self.munge_socket.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start{self._logs_tail()}")
            time.sleep(0.1)

    def _start(self, name: str, netns: str, hostname: str, argv: list[str]) -> None:
        """argv in netns, in UTS and mount namespaces of its own: host name `hostname`,
        /etc/hosts naming the cluster. nsenter, not `ip netns exec`: that one remounts /sys,
        which hides /sys/fs/cgroup, and slurmd 22.05 refuses to start without it."""
        log = open(self.dir / "log" / f"{name.replace(' ', '-')}.err", "w")
        proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{netns}", "unshare", "--uts", "--mount", "sh", "-c",
             'hostname "$0" && mount --bind "$1" /etc/hosts && shift && exec "$@"',
             hostname, str(self._hosts(hostname)), *argv],
            env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._daemons.append((name, proc))

    def _logs_tail(self) -> str:
        parts = []
        for f in sorted((self.dir / "log").glob("*")):
            text = f.read_text(errors="replace").strip()
            if text:
                parts.append(f"--- {f.name}:\n" + "\n".join(text.splitlines()[-15:]))
        return ("\n" + "\n".join(parts)) if parts else ""


def _netns_pids(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the daemon's process group, SIGKILL it after `grace` seconds."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything left in the group (slurmstepd)
    except ProcessLookupError:
        pass
    proc.wait()


if __name__ == "__main__":  # a manual check: build, show the nodes, tear down
    import sys
    import tempfile

    from approxdist.bench.testbed import Testbed

    with tempfile.TemporaryDirectory(prefix="slurmcl-") as tmp, Testbed(2, "1gbit", tag="slm") as tb:
        with SlurmCluster(tb, tmp) as cl:
            print(cl.run(["sinfo", "-N"]).stdout)
            if sys.argv[1:]:
                print(cl.run(sys.argv[1:], check=False))
