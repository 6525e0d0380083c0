"""From the ranks' rows to one summary row per (nodes, link, model, hook): medians, the
speedup over DDP's all-reduce in the same loop, and the physical limits of a step.

Reads rows of every version of the JSON files (older ones lack some fields), so a
re-render of an old run gives what it gave.
"""
from __future__ import annotations

import statistics

from .specs import parse_hook

__all__ = ["summarize", "ring_bytes"]


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
             "step_in_hook": spec.step_in_hook, "loop": spec.loop,
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
            s["allreduce_s"] = (8 * ring_bytes(s["payload_bytes"], nodes) / s["link_bits_per_s"])
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


def ring_bytes(nbytes: float, world: int) -> float:
    """Bytes each rank sends in a ring all-reduce of nbytes over world ranks."""
    return 2.0 * (world - 1) / world * nbytes
