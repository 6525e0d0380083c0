"""One process's share of a plan: real DDP steps, timed and counted, and the two ways the
ranks are started (2 local gloo ranks on loopback, or one rank per testbed node).

Every figure is a median of real DDP steps (real model, real backward, SGD step) on
random images: the hooks' cost does not depend on the data. Payload bytes are counted at
`torch.distributed.all_reduce` (what the hooks hand to gloo), checked against the
analytic count for the sparse hook, and on the testbed also read from the node's eth0
byte counter (what really went over the wire, headers included).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .hooks import POWERSGD_START_ITER, OverlapGroup, analytic_payload_bytes, build, dense_payload_bytes
from .specs import HookSpec, Plan, RunConfig

__all__ = ["run_config", "run_plan", "worker_main", "free_port", "run_loopback", "run_on_testbed"]


class AllReduceCounter:
    """Counts the bytes handed to torch.distributed.all_reduce (it still does the work):
    gradient payloads (floating point) in `nbytes`, the hook's integer size and index
    checks apart in `check_nbytes` (`calls` counts the payload collectives)."""

    def __init__(self):
        self.nbytes = 0
        self.check_nbytes = 0
        self.calls = 0
        self._orig = None

    def __enter__(self):
        import torch.distributed as dist

        self._orig = orig = dist.all_reduce

        def counting_all_reduce(tensor, *args, **kwargs):
            if tensor.is_floating_point():
                self.nbytes += tensor.numel() * tensor.element_size()
                self.calls += 1
            else:
                self.check_nbytes += tensor.numel() * tensor.element_size()
            return orig(tensor, *args, **kwargs)

        dist.all_reduce = counting_all_reduce
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        dist.all_reduce = self._orig


def tx_bytes(ifname: str) -> int | None:
    """Bytes this network namespace has sent on ifname (None where it has none)."""
    try:
        with open("/proc/net/dev") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name.strip() == ifname:
                    return int(rest.split()[8])
    except OSError:
        pass
    return None


def tcp_retransmits() -> int | None:
    """TCP segments this network namespace has retransmitted so far (/proc/net/snmp's
    RetransSegs; None where it cannot be read). On the testbed a clean link has none:
    tbf drops what overflows its queue, and TCP then resends it and slows down."""
    try:
        with open("/proc/net/snmp") as f:
            tcp = [line.split() for line in f if line.startswith("Tcp:")]
        return int(dict(zip(tcp[0][1:], tcp[1][1:]))["RetransSegs"])
    except (OSError, IndexError, KeyError, ValueError):
        return None


def run_config(cfg: RunConfig, spec: HookSpec, plan: Plan, seed: int, measure_compute: bool,
               groups: OverlapGroup | None = None) -> dict:
    """Time plan.steps DDP steps of one (model, hook) after plan.warmup untimed ones;
    this rank's row (the JSON files' row format)."""
    import torch
    import torch.distributed as dist

    import approxdist as ad

    rank, world = dist.get_rank(), dist.get_world_size()
    ddp, state, timer, opt = build(cfg, spec, seed, groups)
    model = ddp.module
    crit = torch.nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    size = plan.image_size
    x = torch.randn(plan.batch, 3, size, size, generator=g)
    y = torch.randint(0, 10, (plan.batch,), generator=g)
    ifname = os.environ.get("GLOO_SOCKET_IFNAME", "")

    phases = [0.0, 0.0]  # forward, optimizer: of the last step

    def step():
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = crit(ddp(x), y)
        phases[0] = time.perf_counter() - t0
        loss.backward()
        t1 = time.perf_counter()
        opt.step()  # with +step: only what no bucket stepped (nothing after a reduction)
        phases[1] = time.perf_counter() - t1
        return loss

    warmup = max(plan.warmup, POWERSGD_START_ITER if spec.kind == "powersgd" else 0)
    for _ in range(warmup):
        step()
    if spec.overlap:
        # the last warm-up step's transfer, which would otherwise fall into the counters
        ad.distributed.finish_steps(ddp)
        dist.barrier()
    stats0 = dict(state.stats) if state is not None else None
    timer.seconds = 0.0
    tx0 = tx_bytes(ifname) if ifname and ifname != "lo" else None
    retrans0 = tcp_retransmits() if tx0 is not None else None
    times, analytic, hook_body, pack, unpack = [], [], [], [], []
    counters = (lambda: (timer.seconds, state.pack_seconds, state.unpack_seconds)) \
        if spec.kind == "sparse" else (lambda: (timer.seconds, 0.0, 0.0))
    overlap = spec.overlap
    with AllReduceCounter() as counter:
        # +overlap: a step's transfer runs on into the next step's forward. Time from one
        # step's start to the next (the last one to the end of its transfer and step),
        # without barriers in between.
        start = None
        for _ in range(plan.steps):
            if not overlap:
                dist.barrier()
            c0 = counters()
            t0 = time.perf_counter()
            if overlap and start is not None:
                times.append(t0 - start)
            start = t0
            loss = step()
            if not overlap:
                times.append(time.perf_counter() - t0)
            c1 = counters()  # DDP waited for every bucket's future (unpack included)
            hook_body.append(c1[0] - c0[0])
            pack.append(c1[1] - c0[1])
            unpack.append(c1[2] - c0[2])
            analytic.append(analytic_payload_bytes(model, spec.fp16) if spec.kind == "sparse" else None)
        if overlap:
            ad.distributed.finish_steps(ddp)
            times.append(time.perf_counter() - start)
    tx1 = tx_bytes(ifname) if tx0 is not None else None
    retrans1 = tcp_retransmits() if retrans0 is not None else None
    # Taken before the local-only steps below, which let the replicas drift apart.
    digest = float(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double().sum())
    compute, forward, optim = [], [], []
    # Compute alone (same model and hook, DDP's sync switched off): the other half of the
    # physical limit. It does not depend on the link, so later repeats skip it.
    for _ in range(plan.compute_steps if measure_compute else 0):
        dist.barrier()
        t0 = time.perf_counter()
        with ddp.no_sync():
            step()
        compute.append(time.perf_counter() - t0)
        forward.append(phases[0])
        optim.append(phases[1])
    steps = plan.steps
    dense = dense_payload_bytes(model)
    if spec.kind == "allreduce":
        payload = dense  # the built-in all-reduce never reaches Python: its bucket is the model
    else:
        payload = counter.nbytes / steps
    out = {
        "model": cfg.model, "hook": spec.name, "kind": spec.kind,
        "step_in_hook": spec.step_in_hook, "loop": spec.loop,
        "ratio": spec.ratio, "fp16": spec.fp16, "rank": rank, "world_size": world,
        "step_s": times, "compute_s": compute, "forward_s": forward, "optimizer_s": optim,
        "loss": float(loss.detach()),
        "payload_bytes": payload, "dense_bytes": dense, "check_bytes": counter.check_nbytes / steps,
        "allreduce_calls_per_step": counter.calls / steps,
        # Per step, like step_s; the row's figure is their median, as for the step time.
        "hook_body_steps_s": hook_body, "hook_body_s": statistics.median(hook_body),
        "wire_tx_bytes": None if tx1 is None else (tx1 - tx0) / steps,
        # this node's, over all the timed steps (the overlap's last transfer included)
        "tcp_retransmits": None if retrans1 is None else retrans1 - retrans0,
        "param_digest": digest,
    }
    if spec.kind == "sparse":
        out["analytic_bytes"] = analytic[-1]
        out["analytic_bytes_all_steps"] = analytic
        after = dict(state.stats)
        if "payload_bytes" in after and "steps" in after:
            nsteps = after["steps"] - stats0.get("steps", 0)
            out["stats_payload_bytes"] = ((after["payload_bytes"] - stats0.get("payload_bytes", 0))
                                          / max(1, nsteps))
            out["stats"] = {k: v for k, v in after.items() if isinstance(v, (int, float))}
            out["pack_steps_s"], out["unpack_steps_s"] = pack, unpack
            out["pack_s"] = statistics.median(pack)
            out["unpack_s"] = statistics.median(unpack)
            out["pack_unpack_s"] = statistics.median(a + b for a, b in zip(pack, unpack))
    return out


def run_plan(plan) -> list[dict]:
    """Run every (model, hook) of the plan (a Plan or its dict), interleaved, plan.repeats
    times.

    Expects an initialised gloo process group; returns this rank's rows.
    """
    import torch

    plan = Plan.from_dict(plan)
    torch.set_num_threads(max(1, plan.threads or 1))
    groups = OverlapGroup()
    rows = []
    for rep in range(plan.repeats):
        for j, cfg in enumerate(plan.configs):
            seed = plan.seed + j if cfg.seed is None else cfg.seed  # a config may pin its own
            # The previous config's DDP, model and optimizer sit in reference cycles: free
            # them now, not in a collection during this config's timed steps.
            gc.collect()
            row = run_config(cfg, cfg.spec, plan, seed=seed, measure_compute=rep < plan.compute_repeats,
                             groups=groups)
            row["repeat"] = rep
            row.update({k: v for k, v in cfg.to_dict().items() if k not in row})
            rows.append(row)
            if plan.verbose and row["rank"] == 0:
                print(f"[rep {rep}] {cfg.model:>9} {cfg.hook:<13} "
                      f"step {statistics.median(row['step_s']):.3f} s  "
                      f"payload {row['payload_bytes'] / 1e6:.2f} MB", file=sys.stderr, flush=True)
    return rows


def worker_main(argv: list[str]) -> int:
    """One rank of a plan; ranks find each other through env:// (RANK, MASTER_ADDR, ...)."""
    p = argparse.ArgumentParser(prog="approxdist-bench comm _worker")
    p.add_argument("--plan", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    import datetime

    import torch.distributed as dist

    from approxdist.distributed import shutdown_distributed

    plan = Plan.from_dict(json.loads(Path(a.plan).read_text()))
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=10))
    done = False
    try:
        rows = run_plan(plan)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, rows)
        if dist.get_rank() == 0:
            Path(a.out).write_text(json.dumps([r for rs in gathered for r in rs]))
        done = True
    finally:
        shutdown_distributed(wait=done)
    return 0


def _spawned(rank: int, world: int, port: int, plan_path: str, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")
    worker_main(["--plan", plan_path, "--out", out_path])


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a local rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_plan(tmp: str, plan) -> tuple[str, str]:
    plan_path, out_path = os.path.join(tmp, "plan.json"), os.path.join(tmp, "out.json")
    Path(plan_path).write_text(json.dumps(Plan.from_dict(plan).to_dict()))
    return plan_path, out_path


def run_loopback(plan, world: int = 2) -> list[dict]:
    """Run a plan on `world` local gloo ranks over loopback; every rank's rows."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="adcomm-") as tmp:
        plan_path, out_path = _write_plan(tmp, plan)
        mp.spawn(_spawned, args=(world, free_port(), plan_path, out_path), nprocs=world)
        return json.loads(Path(out_path).read_text())


def run_on_testbed(tb, plan, *, port: int = 29510, timeout: float = 3600) -> list[dict]:
    """Run a plan with one rank in every node of an open Testbed; every rank's rows."""
    from ..testbed import check_results

    plan = Plan.from_dict(plan)
    with tempfile.TemporaryDirectory(prefix="adcomm-") as tmp:
        os.chmod(tmp, 0o755)
        plan_path, out_path = _write_plan(tmp, plan)
        argv = [sys.executable, "-m", "approxdist.bench.comm", "_worker",
                "--plan", plan_path, "--out", out_path]
        res = tb.run_all(lambda i: argv, env_of=lambda i: tb.env(i, port=port), timeout=timeout)
        if plan.verbose:
            sys.stderr.write(res[0]["stderr"])
        check_results(res, "a benchmark rank")
        return json.loads(Path(out_path).read_text())
