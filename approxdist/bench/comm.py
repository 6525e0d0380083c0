"""`approxdist-bench comm`: what the sparse all-reduce hook saves, next to what users would
use instead (DDP's all-reduce, fp16 compression, PowerSGD).

Two modes:
- loopback (default): 2 gloo ranks on this machine (torch.multiprocessing); payload bytes
  per step of the sparse hook vs dense vs fp16, and the hook's share of the step time.
  The link is loopback, so the times say little about slow networks; the bytes are exact.
- `--testbed`: the same DDP steps on a namespace testbed (approxdist.bench.testbed) with
  tbf-shaped links, 2 and 4 nodes at 1gbit and 100mbit, every hook interleaved with the
  others and repeated, so a slow spell of the machine does not favour one; JSON, PNG
  plots and a table in docs/benchmarks.md.

Every figure is a median of real DDP steps (real model, real backward, SGD step) on random
32 px images: the hooks' cost does not depend on the data. Payload bytes are counted at
`torch.distributed.all_reduce` (what the hooks hand to gloo), checked against the
analytic count for the sparse hook, and on the testbed also read from the node's eth0
byte counter (what really went over the wire, headers included).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main", "parse_hook", "analytic_payload_bytes", "run_plan"]

# PowerSGD's hook issues its second all-reduce from a .then() callback; on gloo that
# crashes once DDP has more than one bucket, so it runs with one bucket (documented).
SINGLE_BUCKET_MB = 10_000
DEFAULT_BUCKET_MB = 25
POWERSGD_START_ITER = 2  # the smallest start PyTorch allows with error feedback


# -- hooks ---------------------------------------------------------------------------------
def parse_hook(name: str) -> dict:
    """"allreduce", "fp16", "powersgdR", "sparseX" or "sparseX+fp16", each optionally with
    "+step" (the optimizer steps inside the hook, bucket by bucket) or "+overlap" (the
    next forward overlaps the transfer and steps each bucket; "+overlapF": with eager
    fraction F, else --eager-fraction's) -> a spec dict."""
    m = re.search(r"\+(step|overlap)(\d*\.?\d+)?$", name)
    loop = m.group(1) if m else "usual"
    base = name[:m.start()] if m else name
    spec = _parse_base_hook(base, name)
    fraction = float(m.group(2)) if m and m.group(2) else None
    if fraction is not None and (loop != "overlap" or not 0 < fraction <= 1):
        raise ValueError(f"hook: an eager fraction F in (0, 1] follows +overlap only, got {name!r}")
    spec.update(name=name, step_in_hook=loop != "usual", overlap=loop == "overlap", loop=loop,
                eager_fraction=fraction)
    return spec


def _parse_base_hook(name: str, full: str) -> dict:
    if name in ("allreduce", "fp16"):
        return {"name": name, "kind": name, "ratio": 1.0, "fp16": name == "fp16"}
    m = re.fullmatch(r"powersgd(\d+)", name)
    if m and int(m.group(1)) >= 1:
        return {"name": name, "kind": "powersgd", "rank": int(m.group(1)), "ratio": 1.0,
                "fp16": False}
    m = re.fullmatch(r"sparse(\d*\.?\d+)(\+fp16)?", name)
    if m and 0.0 < float(m.group(1)) <= 1.0:
        return {"name": name, "kind": "sparse", "ratio": float(m.group(1)),
                "fp16": bool(m.group(2))}
    raise ValueError(f"hook must be allreduce, fp16, powersgdR, sparseX or sparseX+fp16 "
                     f"(0 < X <= 1), each optionally followed by +step, +overlap or +overlapF, got {full!r}")


def _timed(hook, box: list):
    """Sum into box[0] the time spent in the hook's body: its own cost on the critical
    path (casting, packing, launching), the wait for the network excluded."""
    from approxdist.distributed.forward_overlap import payload_of

    def timed(fn):
        def timed_fn(state, bucket):
            t0 = time.perf_counter()
            out = fn(state, bucket)
            box[0] += time.perf_counter() - t0
            return out
        return timed_fn

    timed_hook = timed(hook)
    payload = payload_of(hook)
    if payload is not None:  # forward_overlap may launch the payload in two collectives
        timed_hook.payload = timed(payload)
    return timed_hook


_GROUP = []


def _overlap_group():
    """One extra process group per worker, made by the first +overlap config (every rank
    runs the same configs in the same order, so they create it together)."""
    import torch.distributed as dist

    if not _GROUP:
        _GROUP.append(dist.new_group())
    return _GROUP[0]


def _install_hook(ddp, spec: dict, box: list, optimizer, eager_fraction=None):
    """Register the hook spec names on ddp; returns the sparse hook's state, else None.

    "+step" wraps the hook in approxdist's optimizer_wrapper: `optimizer` steps each
    bucket's parameters in the hook's callback (DDP's all-reduce then runs as torch's
    Python allreduce_hook, the built-in C++ one takes no wrapper). "+overlap" wraps it in
    forward_overlap: the next forward steps each bucket as it needs it."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    import approxdist as ad
    from approxdist.distributed.forward_overlap import EAGER_FRACTION

    def wrap(hook):
        if spec["overlap"]:
            return ad.distributed.forward_overlap(ddp, hook, optimizer, eager_fraction=eager_fraction
                                                  or EAGER_FRACTION)
        return ad.distributed.optimizer_wrapper(hook, optimizer) if spec["step_in_hook"] else hook

    # +overlap: the hooks' collectives get a group of their own, so DDP's buffer
    # broadcast at the start of the forward does not queue behind the transfer.
    group = _overlap_group() if spec["overlap"] else None
    kind = spec["kind"]
    if kind == "allreduce":
        if spec["step_in_hook"]:
            ddp.register_comm_hook(group or dist.group.WORLD, wrap(_timed(default_hooks.allreduce_hook, box)))
        return None  # else DDP's built-in C++ all-reduce: what users get without a hook
    if kind == "fp16":
        ddp.register_comm_hook(group or dist.group.WORLD, wrap(_timed(default_hooks.fp16_compress_hook, box)))
        return None
    if kind == "powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=group, matrix_approximation_rank=spec["rank"],
            start_powerSGD_iter=POWERSGD_START_ITER, use_error_feedback=True, warm_start=True)
        ddp.register_comm_hook(state, wrap(_timed(powerSGD_hook.powerSGD_hook, box)))
        return None

    state = ad.distributed.SparseAllReduceState(group)
    hook = ad.distributed.sparse_allreduce_hook
    if spec["fp16"]:
        # PyTorch's wrapper casts the bucket to fp16 and hands it to the sparse hook,
        # which packs from bucket.buffer(), so the sampled slices travel in fp16.
        hook = default_hooks.fp16_compress_wrapper(hook)
    ddp.register_comm_hook(state, wrap(_timed(hook, box)))
    return state


def analytic_payload_bytes(model, fp16: bool = False) -> int:
    """Bytes a lossless sparse all-reduce must send per step: the sampled input-channel
    slices of every sampled weight plus every other trainable parameter; no indices."""
    total = 0
    for mod in model.modules():
        idx = getattr(mod, "last_indices", None)
        for pname, p in mod.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if pname == "weight" and idx is not None:
                n = p.numel() // p.shape[1] * len(idx)
            else:
                n = p.numel()
            total += n * (2 if fp16 else p.element_size())
    return total


def dense_payload_bytes(model, fp16: bool = False) -> int:
    return sum(p.numel() * (2 if fp16 else p.element_size())
               for p in model.parameters() if p.requires_grad)


# -- one process's share of a plan --------------------------------------------------------
class _AllReduceCounter:
    """Counts the bytes handed to torch.distributed.all_reduce (it still does the work)."""

    def __init__(self):
        self.nbytes = 0
        self.calls = 0
        self._orig = None

    def __enter__(self):
        import torch.distributed as dist

        self._orig = orig = dist.all_reduce

        def counting_all_reduce(tensor, *args, **kwargs):
            self.nbytes += tensor.numel() * tensor.element_size()
            self.calls += 1
            return orig(tensor, *args, **kwargs)

        dist.all_reduce = counting_all_reduce
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        dist.all_reduce = self._orig


def _tx_bytes(ifname: str) -> int | None:
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


def _tcp_retransmits() -> int | None:
    """TCP segments this network namespace has retransmitted so far (/proc/net/snmp's
    RetransSegs; None where it cannot be read). On the testbed a clean link has none:
    tbf drops what overflows its queue, and TCP then resends it and slows down."""
    try:
        with open("/proc/net/snmp") as f:
            tcp = [line.split() for line in f if line.startswith("Tcp:")]
        return int(dict(zip(tcp[0][1:], tcp[1][1:]))["RetransSegs"])
    except (OSError, IndexError, KeyError, ValueError):
        return None


def make_model(name: str):
    """A torchvision classifier with 10 classes, or "tiny" (two convs and a linear layer,
    for tests: its steps take milliseconds, its layers still get sampled)."""
    import torch.nn as nn
    import torchvision

    if name == "tiny":
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    builder = getattr(torchvision.models, name, None)
    if builder is None or not callable(builder):
        raise ValueError(f"model must be 'tiny' or a torchvision.models name, got {name!r}")
    return builder(num_classes=10)


def _build(cfg: dict, spec: dict, seed: int):
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(seed)
    model = make_model(cfg["model"])
    if spec["kind"] == "sparse":
        import approxdist as ad

        model = ad.convert_model(model, spec["ratio"], distributed=True)
    bucket = SINGLE_BUCKET_MB if spec["kind"] == "powersgd" else cfg.get("bucket_mb", DEFAULT_BUCKET_MB)
    ddp = DDP(model, bucket_cap_mb=bucket)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
    box = [0.0]
    # the command line puts the effective share in cfg; a plan written by hand may only
    # name it in the hook (+overlapF)
    state = _install_hook(ddp, spec, box, opt, cfg.get("eager_fraction") or spec["eager_fraction"])
    return ddp, state, box, opt


def _run_config(cfg: dict, spec: dict, plan: dict, seed: int, measure_compute: bool) -> dict:
    import torch
    import torch.distributed as dist

    import approxdist as ad

    rank, world = dist.get_rank(), dist.get_world_size()
    ddp, state, box, opt = _build(cfg, spec, seed)
    model = ddp.module
    crit = torch.nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    size = plan["image_size"]
    x = torch.randn(plan["batch"], 3, size, size, generator=g)
    y = torch.randint(0, 10, (plan["batch"],), generator=g)
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

    warmup = max(plan["warmup"], POWERSGD_START_ITER if spec["kind"] == "powersgd" else 0)
    for _ in range(warmup):
        step()
    if spec["overlap"]:
        # the last warm-up step's transfer, which would otherwise fall into the counters
        ad.distributed.finish_steps(ddp)
        dist.barrier()
    stats0 = dict(state.stats) if state is not None else None
    box[0] = 0.0
    tx0 = _tx_bytes(ifname) if ifname and ifname != "lo" else None
    retrans0 = _tcp_retransmits() if tx0 is not None else None
    times, analytic, hook_body, pack, unpack = [], [], [], [], []
    counters = (lambda: (box[0], state.pack_seconds, state.unpack_seconds)) \
        if spec["kind"] == "sparse" else (lambda: (box[0], 0.0, 0.0))
    overlap = spec["overlap"]
    with _AllReduceCounter() as counter:
        # +overlap: a step's transfer runs on into the next step's forward. Time from one
        # step's start to the next (the last one to the end of its transfer and step),
        # without barriers in between.
        start = None
        for _ in range(plan["steps"]):
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
            analytic.append(analytic_payload_bytes(model, spec["fp16"])
                            if spec["kind"] == "sparse" else None)
        if overlap:
            ad.distributed.finish_steps(ddp)
            times.append(time.perf_counter() - start)
    tx1 = _tx_bytes(ifname) if tx0 is not None else None
    retrans1 = _tcp_retransmits() if retrans0 is not None else None
    # Taken before the local-only steps below, which let the replicas drift apart.
    digest = float(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double().sum())
    compute, forward, optim = [], [], []
    # Compute alone (same model and hook, DDP's sync switched off): the other half of the
    # physical limit. It does not depend on the link, so later repeats skip it.
    for _ in range(plan.get("compute_steps", 2) if measure_compute else 0):
        dist.barrier()
        t0 = time.perf_counter()
        with ddp.no_sync():
            step()
        compute.append(time.perf_counter() - t0)
        forward.append(phases[0])
        optim.append(phases[1])
    steps = plan["steps"]
    dense = dense_payload_bytes(model)
    if spec["kind"] == "allreduce":
        payload = dense  # the built-in all-reduce never reaches Python: its bucket is the model
    else:
        payload = counter.nbytes / steps
    out = {
        "model": cfg["model"], "hook": spec["name"], "kind": spec["kind"],
        "step_in_hook": spec["step_in_hook"], "loop": spec["loop"],
        "ratio": spec["ratio"], "fp16": spec["fp16"], "rank": rank, "world_size": world,
        "step_s": times, "compute_s": compute, "forward_s": forward, "optimizer_s": optim,
        "loss": float(loss.detach()),
        "payload_bytes": payload, "dense_bytes": dense,
        "allreduce_calls_per_step": counter.calls / steps,
        # Per step, like step_s; the row's figure is their median, as for the step time.
        "hook_body_steps_s": hook_body, "hook_body_s": statistics.median(hook_body),
        "wire_tx_bytes": None if tx1 is None else (tx1 - tx0) / steps,
        # this node's, over all the timed steps (the overlap's last transfer included)
        "tcp_retransmits": None if retrans1 is None else retrans1 - retrans0,
        "param_digest": digest,
    }
    if spec["kind"] == "sparse":
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


def run_plan(plan: dict) -> list[dict]:
    """Run every (model, hook) of the plan, interleaved, plan["repeats"] times.

    Expects an initialised gloo process group; returns this rank's rows.
    """
    import torch

    torch.set_num_threads(max(1, plan.get("threads") or 1))
    rows = []
    for rep in range(plan["repeats"]):
        for j, cfg in enumerate(plan["configs"]):
            spec = parse_hook(cfg["hook"])
            seed = cfg.get("seed", plan.get("seed", 0) + j)  # a config may pin its own
            # The previous config's DDP, model and optimizer sit in reference cycles: free
            # them now, not in a collection during this config's timed steps.
            gc.collect()
            row = _run_config(cfg, spec, plan, seed=seed,
                              measure_compute=rep < plan.get("compute_repeats", 1))
            row["repeat"] = rep
            row.update({k: v for k, v in cfg.items() if k not in row})
            rows.append(row)
            if plan.get("verbose") and row["rank"] == 0:
                print(f"[rep {rep}] {cfg['model']:>9} {cfg['hook']:<13} "
                      f"step {statistics.median(row['step_s']):.3f} s  "
                      f"payload {row['payload_bytes'] / 1e6:.2f} MB", file=sys.stderr, flush=True)
    return rows


def _worker_main(argv: list[str]) -> int:
    """One rank of a plan; ranks find each other through env:// (RANK, MASTER_ADDR, ...)."""
    p = argparse.ArgumentParser(prog="approxdist-bench comm _worker")
    p.add_argument("--plan", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    import datetime

    import torch.distributed as dist

    plan = json.loads(Path(a.plan).read_text())
    from ..distributed import shutdown_distributed

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
    _worker_main(["--plan", plan_path, "--out", out_path])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_loopback(plan: dict, world: int = 2) -> list[dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="adcomm-") as tmp:
        plan_path, out_path = os.path.join(tmp, "plan.json"), os.path.join(tmp, "out.json")
        Path(plan_path).write_text(json.dumps(plan))
        mp.spawn(_spawned, args=(world, _free_port(), plan_path, out_path), nprocs=world)
        return json.loads(Path(out_path).read_text())


def run_on_testbed(tb, plan: dict, *, port: int = 29510, timeout: float = 3600) -> list[dict]:
    """Run a plan with one rank in every node of an open Testbed."""
    from .testbed import check_results

    with tempfile.TemporaryDirectory(prefix="adcomm-") as tmp:
        os.chmod(tmp, 0o755)
        plan_path, out_path = os.path.join(tmp, "plan.json"), os.path.join(tmp, "out.json")
        Path(plan_path).write_text(json.dumps(plan))
        argv = [sys.executable, "-m", "approxdist.bench.comm", "_worker",
                "--plan", plan_path, "--out", out_path]
        res = tb.run_all(lambda i: argv, env_of=lambda i: tb.env(i, port=port), timeout=timeout)
        if plan.get("verbose"):
            sys.stderr.write(res[0]["stderr"])
        check_results(res, "a benchmark rank")
        return json.loads(Path(out_path).read_text())


# -- summaries ----------------------------------------------------------------------------
def summarize(rows: list[dict]) -> list[dict]:
    """Median over every timed step of every repeat, rank 0's clock (all ranks wait on the
    same collective, so their step times agree to within the barrier's skew).

    The rounds interleave the hooks, so each round also gives a paired speedup (the
    baseline's median step in that round over the row's): `speedup_rounds`, in round
    order. Their spread says how far a slow spell of the machine moved the ratio."""
    groups: dict[tuple, list[dict]] = {}
    retransmits: dict[tuple, list[int]] = {}  # every node's, not only rank 0's
    for r in rows:
        key = (r.get("nodes", r["world_size"]), r.get("rate", "loopback"), r["model"], r["hook"])
        if r["rank"] == 0:
            groups.setdefault(key, []).append(r)
        if r.get("tcp_retransmits") is not None:
            retransmits.setdefault(key, []).append(r["tcp_retransmits"])
    out = []
    for (nodes, rate, model, hook), rs in groups.items():
        steps = [t for r in rs for t in r["step_s"]]
        rounds = sorted((r.get("repeat", i), statistics.median(r["step_s"])) for i, r in enumerate(rs))
        compute = [t for r in rs for t in r["compute_s"]] or [float("nan")]
        spec = parse_hook(hook)  # the loop from the name: rows of older runs lack it
        s = {"nodes": nodes, "rate": rate, "model": model, "hook": hook, "kind": rs[0]["kind"],
             "step_in_hook": spec["step_in_hook"], "loop": spec["loop"],
             "ratio": rs[0]["ratio"], "fp16": rs[0]["fp16"], "repeats": len(rs),
             "step_s": statistics.median(steps), "compute_s": statistics.median(compute),
             "payload_bytes": statistics.median(r["payload_bytes"] for r in rs),
             "dense_bytes": rs[0]["dense_bytes"],
             "round_step_s": [[rep, t] for rep, t in rounds]}
        wire = [r["wire_tx_bytes"] for r in rs if r.get("wire_tx_bytes") is not None]
        s["wire_tx_bytes"] = statistics.median(wire) if wire else None
        if (nodes, rate, model, hook) in retransmits:  # all nodes, all rounds
            s["tcp_retransmits"] = sum(retransmits[(nodes, rate, model, hook)])
        if "analytic_bytes" in rs[0]:
            s["analytic_bytes"] = rs[0]["analytic_bytes"]
        if rs[0].get("link_bits_per_s"):
            s["link_bits_per_s"] = rs[0]["link_bits_per_s"]
            s["allreduce_s"] = (8 * _ring_bytes(s["payload_bytes"], nodes) / s["link_bits_per_s"])
            s["limit_s"] = max(s["compute_s"], s["allreduce_s"])
            s["of_limit"] = s["step_s"] / s["limit_s"]
            fwd = [t for r in rs for t in r.get("forward_s", [])]
            opt = [t for r in rs for t in r.get("optimizer_s", [])]
            if fwd and opt:
                # DDP reduces gradients during backward only: the forward before it and
                # the optimizer step after it cannot overlap the transfer (the step can
                # with +step, where it runs in the hook's callbacks; both can with
                # +overlap, where the bound is the limit).
                s["forward_s"] = statistics.median(fwd)
                s["optimizer_s"] = statistics.median(opt)
                tail = 0.0 if s["step_in_hook"] else s["optimizer_s"]
                head = 0.0 if s["loop"] == "overlap" else s["forward_s"]
                s["ddp_bound_s"] = max(s["compute_s"], head + s["allreduce_s"] + tail)
                s["of_ddp_bound"] = s["step_s"] / s["ddp_bound_s"]
        s["comm_share"] = max(0.0, 1.0 - s["compute_s"] / s["step_s"])
        # The hook's own work per step: its body (cast/pack/launch) plus, for the sparse
        # hook, the scatter-back that runs in its callback.
        s["hook_s"] = statistics.median(r["hook_body_s"] + r.get("unpack_s", 0.0) for r in rs)
        s["hook_share"] = s["hook_s"] / s["step_s"]
        if all("pack_s" in r for r in rs):  # the sparse hook's pack (with the division) + unpack
            s["pack_s"] = statistics.median(r["pack_s"] for r in rs)
            s["unpack_s"] = statistics.median(r["unpack_s"] for r in rs)
            s["pack_unpack_s"] = statistics.median(r.get("pack_unpack_s", r["pack_s"] + r["unpack_s"])
                                                   for r in rs)
            s["pack_unpack_share"] = s["pack_unpack_s"] / s["step_s"]
        out.append(s)
    # Against DDP's all-reduce in the same loop: "allreduce" for the usual step after
    # backward, "allreduce+step" for the rows that step inside the hook, "allreduce+overlap"
    # for those that overlap the next forward.
    base = {(s["nodes"], s["rate"], s["model"], s["loop"]): s for s in out
            if s["kind"] == "allreduce"}
    for s in out:
        b = base.get((s["nodes"], s["rate"], s["model"], s["loop"]))
        s["speedup"] = b["step_s"] / s["step_s"] if b else None
        b_rounds = dict(map(tuple, b["round_step_s"])) if b else {}
        s["speedup_rounds"] = [b_rounds[rep] / t for rep, t in s["round_step_s"] if rep in b_rounds]
    return out


def _ring_bytes(nbytes: float, world: int) -> float:
    return 2.0 * (world - 1) / world * nbytes


def _speedup_cell(s: dict) -> str:
    """The speedup cell: 2.51x, followed by the range of the paired per-round speedups
    when there are several rounds, as in 2.51x (2.40-2.63)."""
    if not s.get("speedup"):
        return "-"
    rounds = s.get("speedup_rounds") or []
    if len(rounds) < 2 or s["kind"] == "allreduce":  # (the baseline: 1 in every round)
        return f"{s['speedup']:.2f}x"
    return f"{s['speedup']:.2f}x ({min(rounds):.2f}-{max(rounds):.2f})"


def format_table(summary: list[dict], testbed: bool) -> str:
    head = ["nodes", "link", "model", "hook", "step s", "speedup", "payload MB/step", "of dense"]
    if testbed:
        head += ["wire MB/step", "compute s", "all-reduce s at link", "step / limit", "step / DDP bound"]
    else:
        head += ["compute s", "hook s", "hook share", "pack+unpack share"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        cells = [str(s["nodes"]), s["rate"], s["model"], s["hook"], f"{s['step_s']:.3f}",
                 _speedup_cell(s),
                 f"{s['payload_bytes'] / 1e6:.2f}", f"{s['payload_bytes'] / s['dense_bytes']:.3f}"]
        if testbed:
            cells += [f"{s['wire_tx_bytes'] / 1e6:.2f}" if s.get("wire_tx_bytes") else "-",
                      f"{s['compute_s']:.3f}", f"{s['allreduce_s']:.3f}", f"{s['of_limit']:.2f}",
                      f"{s['of_ddp_bound']:.2f}" if "of_ddp_bound" in s else "-"]
        else:
            hook = s["kind"] != "allreduce" or s.get("step_in_hook")
            cells += [f"{s['compute_s']:.3f}", f"{s['hook_s']:.4f}" if hook else "(C++)",
                      f"{s['hook_share']:.1%}" if hook else "-",
                      f"{s['pack_unpack_share']:.1%}" if "pack_unpack_share" in s else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def retransmit_line(summary: list[dict]) -> str | None:
    """A sentence on the TCP segments the nodes retransmitted during the timed steps
    (None for runs that did not count them: loopback, or JSON files from before)."""
    counted = [s for s in summary if s.get("tcp_retransmits") is not None]
    if not counted:
        return None
    lead = "TCP segments retransmitted during the timed steps (every node, every round): "
    lossy = [s for s in counted if s["tcp_retransmits"] > 0]
    if not lossy:
        return lead + f"none in all {len(counted)} rows: no link dropped a packet."
    worst = max(lossy, key=lambda s: s["tcp_retransmits"])
    return (lead + f"{sum(s['tcp_retransmits'] for s in lossy)} in {len(lossy)} of {len(counted)} "
            f"rows, at most {worst['tcp_retransmits']} ({worst['nodes']} nodes {worst['rate']} "
            f"{worst['model']} {worst['hook']}). tbf drops what overflows its queue, and a lost "
            "packet stalls its TCP stream until the resend, so rows with many also time that.")


def plot(summary: list[dict], outdir: Path, prefix: str = "comm") -> list[Path]:
    """Step time vs bytes per step, and speedup vs sample ratio per link rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir.mkdir(parents=True, exist_ok=True)
    paths = []
    setups = sorted({(s["nodes"], s["rate"]) for s in summary}, key=lambda t: (t[1], t[0]))
    models = sorted({s["model"] for s in summary})
    markers = {"allreduce": "s", "fp16": "D", "powersgd": "^", "sparse": "o"}
    fig, axes = plt.subplots(len(models), len(setups), squeeze=False,
                             figsize=(4.2 * len(setups), 3.6 * len(models)))
    for mi, model in enumerate(models):
        for si, (nodes, rate) in enumerate(setups):
            ax = axes[mi][si]
            if not any(s["model"] == model and (s["nodes"], s["rate"]) == (nodes, rate)
                       for s in summary):
                ax.set_visible(False)  # this model was not run on this setup
                continue
            for s in summary:
                if s["model"] != model or (s["nodes"], s["rate"]) != (nodes, rate):
                    continue
                ax.scatter(s["payload_bytes"] / 1e6, s["step_s"], marker=markers[s["kind"]],
                           color="C3" if s["kind"] == "sparse" else "C0")
                ax.annotate(s["hook"], (s["payload_bytes"] / 1e6, s["step_s"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
            link = next((s["link_bits_per_s"] for s in summary if s["model"] == model
                         and (s["nodes"], s["rate"]) == (nodes, rate) and s.get("link_bits_per_s")),
                        None)
            if link:
                # The physical limit of a step: the payload's all-reduce at the measured
                # link rate, or compute alone, whichever is longer.
                dense = max(s["dense_bytes"] for s in summary if s["model"] == model)
                comp = min(s["compute_s"] for s in summary if s["model"] == model
                           and (s["nodes"], s["rate"]) == (nodes, rate))
                xs = [dense * i / 50 for i in range(51)]
                ax.plot([x / 1e6 for x in xs],
                        [max(comp, 8 * _ring_bytes(x, nodes) / link) for x in xs],
                        ls="--", color="grey", lw=1,
                        label="max(fastest compute, payload at link rate)")
                ax.legend(fontsize=7, loc="lower right")
            ax.set_title(f"{model}, {nodes} nodes, {rate}", fontsize=9)
            ax.set_xlabel("payload MB / step")
            ax.set_ylabel("median step s")
            ax.set_ylim(bottom=0)
            ax.set_xlim(left=0)
    fig.tight_layout()
    p = outdir / f"{prefix}_step_vs_bytes.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    fig, axes = plt.subplots(1, len(models), squeeze=False, figsize=(5 * len(models), 3.8))
    for mi, model in enumerate(models):
        ax = axes[0][mi]
        for ci, (nodes, rate) in enumerate(setups):
            pts = sorted((s["ratio"], s["speedup"]) for s in summary
                         if s["model"] == model and (s["nodes"], s["rate"]) == (nodes, rate)
                         and s["kind"] == "sparse" and not s["fp16"] and s.get("speedup"))
            if pts:
                ax.plot(*zip(*pts), "o-", color=f"C{ci}", label=f"sparse, {nodes} nodes {rate}")
            for s in summary:
                if (s["model"] == model and (s["nodes"], s["rate"]) == (nodes, rate)
                        and s["kind"] == "fp16" and s.get("speedup")):
                    ax.axhline(s["speedup"], color=f"C{ci}", ls=":", lw=1)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(f"{model}: speedup over all-reduce (dotted: fp16)", fontsize=9)
        ax.set_xlabel("sample_ratio")
        ax.set_ylabel("speedup")
        ax.legend(fontsize=7)
    fig.tight_layout()
    p = outdir / f"{prefix}_speedup_vs_ratio.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


def write_markdown_section(path: Path, body: str, mode: str,
                           title: str = "## Communication") -> None:
    """Replace this mode's block of the Communication section of docs/benchmarks.md (and
    nothing else: other sections belong to other benchmarks)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.splitlines()
    begin, end_mark = f"<!-- approxdist-bench comm: {mode} -->", f"<!-- end {mode} -->"
    block = [begin, *body.rstrip().splitlines(), end_mark]
    start = next((i for i, line in enumerate(lines) if line.strip() == title), None)
    if start is None:
        if lines and lines[-1].strip():
            lines.append("")
        lines += [title, ""]
        start = len(lines) - 2
    stop = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")),
                len(lines))
    section = lines[start:stop]
    if begin in section and end_mark in section:
        b, e = section.index(begin), section.index(end_mark)
        section = section[:b] + block + section[e + 1:]
    else:
        while section and not section[-1].strip():
            section.pop()
        section += ["", *block, ""]
    lines = lines[:start] + section + lines[stop:]
    path.write_text("\n".join(lines).rstrip() + "\n")


# -- command line -------------------------------------------------------------------------
LOOPBACK_HOOKS = ["allreduce", "fp16", "sparse1", "sparse0.5", "sparse0.33", "sparse0.25"]
TESTBED_HOOKS = ["allreduce", "fp16", "powersgd1", "powersgd4", "sparse0.5", "sparse0.33",
                 "sparse0.25", "sparse0.5+fp16", "sparse0.33+fp16"]


def _csv(s: str) -> list[str]:
    return [x for x in s.split(",") if x]


def _environment(a) -> dict:
    """Date, versions, commit and load of this run, and the CPU reference (approxdist-bench
    cpu) unless the parsed options `a` say --no-cpu-reference."""
    import platform

    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).resolve().parent).stdout.strip()
    except OSError:
        commit = ""
    env = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
           "python": platform.python_version(), "cpus": os.cpu_count(), "commit": commit,
           "loadavg": list(os.getloadavg())}
    if a.cpu_reference:
        from .cpu_reference import describe, measure

        env["cpu_reference"] = measure()
        if not a.quiet:
            print(describe(env["cpu_reference"]), file=sys.stderr, flush=True)
    return env


def _cpu_reference_end(a, env: dict) -> None:
    """The CPU reference again once the run is over: this host's speed moves within
    minutes, so the two bracket the run."""
    if a.cpu_reference:
        from .cpu_reference import describe, measure

        try:
            env["cpu_reference_end"] = measure()
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:  # the run's figures stand
            print(f"approxdist-bench comm: the CPU reference after the run failed ({e}); "
                  "the run's figures are kept without it", file=sys.stderr, flush=True)
            return
        if not a.quiet:
            print(describe(env["cpu_reference_end"]) + " (after the run)", file=sys.stderr, flush=True)


def _cpu_reference_lines(env: dict) -> list[str]:
    """The markdown paragraph stating the run's CPU reference; none for a run without one
    (older JSON files render as they did)."""
    if not env.get("cpu_reference"):
        return []
    from .cpu_reference import describe

    end = env.get("cpu_reference_end")
    after = "" if not end else (f" (after it: {end['alone_ms']:.1f} ms alone, "
                                f"{end['all_cores_ms']:.1f} ms on all cores)")
    return [describe(env["cpu_reference"]) + ", taken before the run" + after + ": compare "
            "times of different days only beside it.", ""]


def _parser() -> argparse.ArgumentParser:
    from approxdist.distributed.forward_overlap import EAGER_FRACTION

    p = argparse.ArgumentParser(prog="approxdist-bench comm", description=__doc__.split("\n\n")[0])
    p.add_argument("--testbed", action="store_true", help="run on the namespace testbed")
    p.add_argument("--models", default="resnet18,resnet50")
    p.add_argument("--hooks", default=None,
                   help=f"default loopback: {','.join(LOOPBACK_HOOKS)}; "
                        f"testbed: {','.join(TESTBED_HOOKS)}; any name + '+step': the "
                        f"optimizer steps inside the hook, bucket by bucket "
                        f"(approxdist.distributed.optimizer_wrapper); + '+overlap': the next "
                        f"forward overlaps the transfer (approxdist.distributed.forward_overlap), "
                        f"'+overlapF' with eager fraction F (e.g. sparse0.33+overlap0.3)")
    p.add_argument("--nodes", default="2,4", help="testbed node counts")
    p.add_argument("--rates", default="1gbit,100mbit", help="testbed link rates")
    p.add_argument("--burst", default=None,
                   help="tbf bucket of every testbed link, a tc size like 16kb (default: 1 ms at "
                        "the rate, at least 96 KiB; messages under it pass unshaped)")
    p.add_argument("--batch", type=int, default=16, help="per rank")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps per run: DDP rebuilds its buckets after the first, the "
                        "second touches the rebuilt buffers (PowerSGD always gets 2)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds over all hooks")
    p.add_argument("--bucket-mb", type=float, default=DEFAULT_BUCKET_MB,
                   help="DDP bucket_cap_mb of every hook but PowerSGD (one bucket) (default: %(default)s)")
    p.add_argument("--eager-fraction", type=float, default=EAGER_FRACTION,
                   help="+overlap without F: share of the bucket elements launched as DDP hands them over, the "
                        "rest first-layers-first after backward (forward_overlap; default: %(default)s)")
    p.add_argument("--json", default=None, help="write raw rows and the summary here "
                   "(rewritten after every testbed, so a cut-short run keeps what it measured)")
    p.add_argument("--plots", default=None, help="directory for the PNG plots")
    p.add_argument("--markdown", default=None,
                   help="replace this mode's block in the '## Communication' section of this file")
    g = p.add_argument_group("time to accuracy (--testbed --time-to-accuracy)")
    g.add_argument("--time-to-accuracy", action="store_true",
                   help="instead of step times: approxdist-train on digits until --target")
    g.add_argument("--target", type=float, default=None,
                   help="test top-1 %% to reach (default: 97; with --render: the run's)")
    g.add_argument("--tta-hooks", default="allreduce,fp16,powersgd1,sparse0.5,sparse0.33")
    g.add_argument("--tta-model", default="cnn")
    g.add_argument("--tta-width", type=int, default=None,
                   help="the built-in model's size (approxdist-train --width; default: its own)")
    g.add_argument("--tta-epochs", type=int, default=6)
    g.add_argument("--tta-batch", type=int, default=32, help="per rank")
    g.add_argument("--tta-rate", default="100mbit")
    g.add_argument("--tta-eval-every", type=int, default=None,
                   help="evaluate every N steps (approxdist-train --eval-every; default: 2)")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="measure nothing: redo the table, plots and markdown from a --json file "
                        "(of either mode; a time-to-accuracy file at --target if given)")
    p.add_argument("--no-cpu-reference", dest="cpu_reference", action="store_false",
                   help="skip timing the CPU reference workload before the run, which the "
                        "JSON and markdown record (approxdist-bench cpu; about 15 s)")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_worker"]:
        return _worker_main(argv[1:])
    p = _parser()
    a = p.parse_args(argv)
    if a.render:
        return _render(a)
    if a.burst is not None:
        if not a.testbed:
            p.error("--burst shapes the testbed's links: add --testbed")
        if "none" in ([a.tta_rate] if a.time_to_accuracy else _csv(a.rates)):
            p.error("--burst: the 'none' rate leaves links unshaped, without a burst; drop one of them")
        from .testbed import parse_size

        try:
            parse_size(a.burst)
        except ValueError as e:
            p.error(f"--{e}")
    if a.time_to_accuracy:
        if not a.testbed:
            p.error("--time-to-accuracy runs on the testbed: add --testbed")
        return _main_tta(a, argv)
    for name in ("batch", "image_size", "steps", "repeats"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.warmup < 0:
        p.error(f"--warmup must be >= 0, got {a.warmup}")
    hooks = _csv(a.hooks) if a.hooks else (TESTBED_HOOKS if a.testbed else LOOPBACK_HOOKS)
    for h in hooks:
        try:
            parse_hook(h)
        except ValueError as e:
            p.error(str(e))
    models = _csv(a.models)
    for m in models:
        try:
            make_model(m)
        except ValueError as e:
            p.error(str(e))
    if not a.bucket_mb > 0:
        p.error(f"--bucket-mb must be > 0, got {a.bucket_mb}")
    if not 0 < a.eager_fraction <= 1:
        p.error(f"--eager-fraction must be in (0, 1], got {a.eager_fraction}")
    configs = [{"model": m, "hook": h, "bucket_mb": a.bucket_mb} for m in models for h in hooks]
    for cfg in configs:
        spec = parse_hook(cfg["hook"])
        if spec["overlap"]:
            cfg["eager_fraction"] = spec["eager_fraction"] or a.eager_fraction
    plan = {"configs": configs, "batch": a.batch, "image_size": a.image_size,
            "steps": a.steps, "warmup": a.warmup, "repeats": a.repeats, "seed": 0,
            "compute_steps": 2, "compute_repeats": 1, "verbose": not a.quiet}
    command = "approxdist-bench comm " + " ".join(argv)
    env = _environment(a)
    rows: list[dict] = []
    links: dict = {}

    def save():
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            if "cpu_reference_end" not in env:  # the load the run left, not the reference's
                env["loadavg_end"] = list(os.getloadavg())
            Path(a.json).write_text(json.dumps(
                {"command": command, "environment": env, "plan": plan, "links": links,
                 "summary": summarize(rows), "rows": rows}, indent=1))

    if not a.testbed:
        plan["threads"] = max(1, (os.cpu_count() or 2) // 2)
        rows = run_loopback(plan, world=2)
    else:
        from .testbed import Testbed, available

        ok, why = available()
        if not ok:
            print(f"approxdist-bench comm --testbed: {why}", file=sys.stderr)
            return 2
        for rate in _csv(a.rates):
            for nodes in (int(n) for n in _csv(a.nodes)):
                plan["threads"] = max(1, (os.cpu_count() or 2) // nodes)
                with Testbed(nodes, rate, burst=a.burst) as tb:
                    link = tb.measure_allreduce(25_000_000 if rate != "none" else 100_000_000)
                    link["burst_bytes"] = tb.burst_bytes
                    links[f"{nodes} nodes, {rate}"] = link
                    if not a.quiet:
                        print(f"testbed {nodes} nodes {rate}: gloo all-reduce carries "
                              f"{link['link_bits_per_s'] / 1e9:.3f} Gbit/s per link",
                              file=sys.stderr, flush=True)
                    for r in run_on_testbed(tb, plan):
                        r.update(nodes=nodes, rate=rate, link_bits_per_s=link["link_bits_per_s"])
                        rows.append(r)
                save()
    env["loadavg_end"] = list(os.getloadavg())
    _cpu_reference_end(a, env)
    summary = summarize(rows)
    table = _with_retransmits(format_table(summary, a.testbed), summary)
    print(table)
    save()
    mode = "testbed" if a.testbed else "loopback"
    pngs = plot(summary, Path(a.plots), f"comm_{mode}") if a.plots else []
    if a.markdown:
        body = _markdown_body(command, plan, table, pngs, a.testbed, links, env,
                              Path(a.markdown).parent, load_end=env["loadavg_end"][0])
        write_markdown_section(Path(a.markdown), body, mode)
    return 0


def _main_tta(a, argv) -> int:
    from .comm_tta import TTA_HOOKS, run_tta
    from .testbed import Testbed, available

    plan = _tta_plan_of(a)
    eval_every, target = plan["eval_every"], plan["target"]
    if eval_every < 1:
        raise ValueError(f"--tta-eval-every must be >= 1, got {eval_every}")
    if a.tta_width is not None and a.tta_width < 1:
        raise ValueError(f"--tta-width must be >= 1, got {a.tta_width}")
    hooks = _csv(a.tta_hooks)
    for h in hooks:
        if h not in TTA_HOOKS:
            raise ValueError(f"--tta-hooks: each must be one of {', '.join(TTA_HOOKS)}, got {h!r}")
    ok, why = available()
    if not ok:
        print(f"approxdist-bench comm --testbed: {why}", file=sys.stderr)
        return 2
    command = "approxdist-bench comm " + " ".join(argv)
    env = _environment(a)
    with Testbed(2, a.tta_rate, burst=a.burst) as tb:
        link = tb.measure_allreduce(5_000_000)
        link["burst_bytes"] = tb.burst_bytes
        rows = run_tta(tb, hooks, repeats=a.repeats, model=a.tta_model, epochs=a.tta_epochs,
                       batch=a.tta_batch, eval_every=eval_every, width=a.tta_width,
                       verbose=not a.quiet)
    env["loadavg_end"] = list(os.getloadavg())
    _cpu_reference_end(a, env)
    saved = {"command": command, "environment": env, "plan": plan, "link": link, "rows": rows}
    if a.json:  # the raw rows first: a failure below must not lose the measurements
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(saved, indent=1))
    saved["summary"] = _tta_outputs(saved, target, a.plots, a.markdown)
    if a.json:
        Path(a.json).write_text(json.dumps(saved, indent=1))
    return 0


def _tta_plan_of(a) -> dict:
    """The settings of a time-to-accuracy run, from its parsed options (defaults resolved)."""
    from .comm_tta import EVAL_EVERY, TTA_TARGET

    return {"model": a.tta_model, "width": a.tta_width, "epochs": a.tta_epochs,
            "batch": a.tta_batch, "rate": a.tta_rate,
            "eval_every": EVAL_EVERY if a.tta_eval_every is None else a.tta_eval_every,
            "repeats": a.repeats, "target": TTA_TARGET if a.target is None else a.target}


def _tta_plan(saved: dict) -> dict:
    """A time-to-accuracy run's settings: its saved plan, or, for a file from before the
    plan was saved, its command read with this parser (the defaults of that time)."""
    if "plan" in saved:
        return saved["plan"]
    return _tta_plan_of(_parser().parse_known_args(shlex.split(saved["command"])[2:])[0])


def _tta_outputs(saved: dict, target: float, plots, markdown) -> list[dict]:
    """Print a time-to-accuracy run's table; its plot into `plots` and its markdown block
    into `markdown` when given. Returns the summary at `target`. A run of a built-in model
    at another --tta-width gets its own plot and block, beside the default one's."""
    from .comm_tta import format_tta_table, plot_tta, summarize_tta

    plan, env, link, command = _tta_plan(saved), saved["environment"], saved["link"], saved["command"]
    width = plan.get("width")
    name = plan["model"] if width is None else f"{plan['model']} width {width}"
    suffix = "" if width is None else f"-{plan['model']}{width}"
    summary = summarize_tta(saved["rows"], target)
    table = format_tta_table(summary, target)
    print(table)
    png = plot_tta(saved["rows"], target,
                   Path(plots) / f"comm_tta_accuracy_vs_time{suffix.replace('-', '_')}.png",
                   title=f"{name} on digits, 2 nodes at {plan['rate']}") if plots else None
    if markdown:
        docdir = Path(markdown).parent
        load_end = env.get("loadavg_end", [float("nan")])[0]
        flag = "" if width is None else f" --width {width}"
        lines = [
            "### Time to accuracy" + ("" if width is None else f", {name}"), "",
            f"Command: `{command}` ({env['date']}, commit {env['commit']}, {env['cpus']} CPUs, "
            f"load average {env['loadavg'][0]:.1f} at the start, "
            f"{load_end:.1f} at the end)", "", *_cpu_reference_lines(env),
            f"`approxdist-train --model {plan['model']}{flag} --dataset digits --epochs {plan['epochs']} "
            f"--batch-size {plan['batch']} --eval-every {plan['eval_every']}` under torchrun on 2 testbed "
            f"nodes at {plan['rate']} (gloo all-reduce measured at "
            f"{link['link_bits_per_s'] / 1e6:.0f} Mbit/s{_burst_detail(link)}), {plan['repeats']} interleaved rounds. "
            f"`training s to {target:g}%` is approxdist-train's training clock (the steps "
            "with their transfers, without the evaluations and checkpoints) at the first "
            f"evaluation (every {plan['eval_every']} steps and at each epoch's end) whose test top-1 "
            f"reaches {target:g}%, median over the runs that reached it; `speedup` compares "
            "it with DDP's all-reduce. `s from launch` also counts process start, dataset "
            "load, rendezvous and the evaluations, alike for every hook."
            + (" PowerSGD: rank 1, 2 warm-up steps of plain all-reduce."
               if any(s["hook"].startswith("powersgd") for s in summary) else ""), "",
            table, ""]
        if png:
            lines.append(f"![{png.stem}]({os.path.relpath(png, docdir)})")
        write_markdown_section(Path(markdown), "\n".join(lines), "time-to-accuracy" + suffix)
    return summary


def _render(a) -> int:
    saved = json.loads(Path(a.render).read_text())
    if "link" in saved and "links" not in saved:  # a time-to-accuracy run
        _tta_outputs(saved, _tta_plan(saved)["target"] if a.target is None else a.target,
                     a.plots, a.markdown)
        return 0
    testbed = bool(saved["links"]) or "--testbed" in saved["command"].split()
    summary = summarize(saved["rows"])
    table = _with_retransmits(format_table(summary, testbed), summary)
    print(table)
    mode = "testbed" if testbed else "loopback"
    pngs = plot(summary, Path(a.plots), f"comm_{mode}") if a.plots else []
    if a.markdown:
        env = saved.get("environment") or {"date": "?", "commit": "?", "torch": "?",
                                            "cpus": "?", "loadavg": [float("nan")]}
        body = _markdown_body(saved["command"], saved["plan"], table, pngs, testbed,
                              saved["links"], env, Path(a.markdown).parent,
                              load_end=env.get("loadavg_end", [float("nan")])[0])
        write_markdown_section(Path(a.markdown), body, mode)
    return 0


def _with_retransmits(table: str, summary: list[dict]) -> str:
    line = retransmit_line(summary)
    return table if line is None else f"{table}\n\n{line}"


def _burst_detail(link: dict) -> str:
    """The links' tbf burst, for runs that recorded it (messages under it pass unshaped)."""
    burst = link.get("burst_bytes")
    return "" if burst is None else f"; tbf burst {burst / 1024:g} KiB"


def _probe_detail(link: dict) -> str:
    """How a link rate was read: the fastest of the probe's all-reduces (testbed.link_rate);
    older JSON files took the median, and say nothing more."""
    if "fastest_s" not in link:
        return ""
    return (f" (the fastest of {len(link['seconds'])} all-reduces of "
            f"{link['bytes'] / 1e6:g} MB; their median "
            f"{link['median_bits_per_s'] / 1e9:.3f} Gbit/s)")


def _markdown_body(command, plan, table, pngs, testbed, links, env, docdir,
                   load_end=None) -> str:
    where = ("the namespace testbed" if testbed else "loopback, 2 gloo ranks")
    bucket_mb = plan["configs"][0].get("bucket_mb", DEFAULT_BUCKET_MB) if plan.get("configs") else DEFAULT_BUCKET_MB
    lines = [f"### {'Testbed' if testbed else 'Loopback'}", "",
             f"Command: `{command}` ({where}; {env['date']}, commit {env['commit']}, "
             f"torch {env['torch']}, {env['cpus']} CPUs, load average "
             f"{env['loadavg'][0]:.1f} at the start, "
             f"{os.getloadavg()[0] if load_end is None else load_end:.1f} at the end; the "
             "machine is shared, so the load says how much to trust the times)", ""]
    lines += _cpu_reference_lines(env)
    common = (f"Real DDP steps of torchvision models (10 classes), batch {plan['batch']} per "
              f"rank at {plan['image_size']} px, random data; {plan['steps']} timed steps "
              f"after {plan['warmup']} warm-up step(s), {plan['repeats']} interleaved rounds "
              "over all hooks; medians. `payload` is what the hook hands to "
              "`torch.distributed.all_reduce` per step (DDP's built-in all-reduce: every "
              "gradient); `of dense` divides by the fp32 gradient bytes.")
    if testbed:
        powersgd = any(c["hook"].startswith("powersgd") for c in plan.get("configs", []))
        lines += [
            "Links: `launch/testbed/` (a network namespace per node behind a bridge, tbf on "
            "both veth ends of every link; no added latency, netem is unavailable). " + common,
            ("PowerSGD runs in a single DDP bucket (PyTorch's PowerSGD hook issues its second "
             "all-reduce from a callback, which crashes gloo with several buckets), "
             "start_powerSGD_iter=2, error feedback and warm start on; the others use DDP "
             f"buckets of {bucket_mb:g} MB. " if powersgd else f"DDP buckets of {bucket_mb:g} MB. ")
            + "`wire` is what the node's eth0 sent per step (headers included). "
            "`all-reduce s at link` = payload x 2(n-1)/n over the measured gloo rate below; "
            "`step / limit` = step time over max(compute alone, that). `step / DDP bound` = "
            "step time over max(compute alone, forward + all-reduce at link + optimizer step): "
            "DDP reduces during backward only, so the forward and the optimizer step (timed "
            "within the compute-alone steps) cannot overlap the transfer.", ""]
        for k, v in links.items():
            lines.append(f"- gloo all-reduce rate measured on the testbed, {k}: "
                         f"{v['link_bits_per_s'] / 1e9:.3f} Gbit/s per link" + _probe_detail(v)
                         + _burst_detail(v))
        lines.append("")
    else:
        lines += [common + " The link is loopback: the bytes are exact, the step times are "
                  "not those of a slow network. `hook s` is the hook's own work per step "
                  "(its body: cast/pack/launch, plus the sparse hook's scatter-back).", ""]
    lines += [table, ""]
    for p in pngs:
        rel = os.path.relpath(p, docdir)
        lines.append(f"![{p.stem}]({rel})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
