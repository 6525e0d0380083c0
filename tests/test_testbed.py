"""The namespace testbed: scripts, lifetime, shaping, and a short DDP run across nodes.

Everything that builds namespaces skips (with the reason) where that is not possible:
not root, or no iproute2. Each test uses its own tag, so it never sees another testbed,
and checks that none of its namespaces outlive it.
"""
import inspect
import os
import shutil
import signal
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import approxdist.bench.testbed as testbed_mod
from approxdist.bench.testbed import Testbed, available, parse_rate, ring_allreduce_bytes

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "launch" / "testbed"
STATE_DIR = Path(os.environ.get("APPROXDIST_TESTBED_STATE_DIR", "/run/approxdist-testbed"))
CAN, WHY = available()
needs_netns = pytest.mark.skipif(not CAN, reason=f"cannot create network namespaces: {WHY}")


def _tag(name):
    return f"{name}{os.getpid() % 100000}"[:8]


def _netns_with_prefix(prefix):
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


# -- the scripts, anywhere ----------------------------------------------------------------
@pytest.mark.parametrize("script", ["setup.sh", "teardown.sh"])
def test_scripts_parse_and_lint(script):
    path = SCRIPTS / script
    assert os.access(path, os.X_OK), f"{script} must be executable"
    subprocess.run(["bash", "-n", str(path)], check=True)
    if shutil.which("shellcheck"):
        res = subprocess.run(["shellcheck", str(path)], capture_output=True, text=True)
        assert res.returncode == 0, res.stdout


@pytest.mark.parametrize("args, word", [(["-n", "1"], "NODES"), (["-r", "fast"], "RATE"),
                                        (["-t", "Bad!"], "TAG"), (["-l", "soon"], "LATENCY")])
def test_setup_rejects_bad_arguments_before_touching_anything(args, word):
    res = subprocess.run([str(SCRIPTS / "setup.sh"), *args], capture_output=True, text=True)
    assert res.returncode == 2 and word in res.stderr


def test_python_wrapper_validates_arguments():
    with pytest.raises(ValueError, match="nodes"):
        Testbed(1)
    with pytest.raises(ValueError, match="rate"):
        Testbed(2, "fast")
    with pytest.raises(ValueError, match="tag"):
        Testbed(2, tag="Not-OK")
    assert parse_rate("1gbit") == 1e9 and parse_rate("100mbit") == 1e8
    assert parse_rate("12.5mbps") == 1e8
    assert ring_allreduce_bytes(1000, 2) == 1000 and ring_allreduce_bytes(1000, 4) == 1500


# -- building and removing ----------------------------------------------------------------
@needs_netns
def test_setup_builds_shaped_nodes_and_teardown_removes_them():
    tag = _tag("life")
    with Testbed(3, "1gbit", tag=tag) as tb:
        assert sorted(tb.namespaces()) == sorted(
            [f"adtb-{tag}-hub"] + [f"adtb-{tag}-n{i}" for i in range(3)])
        assert (STATE_DIR / f"{tag}.netns").is_file()
        # Both ends of node 1's link carry a 1 Gbit/s tbf: egress of the node, egress of
        # the bridge port towards it (= the node's ingress).
        node = subprocess.run(["tc", "-n", tb.netns(1), "qdisc", "show", "dev", "eth0"],
                              capture_output=True, text=True).stdout
        hub = subprocess.run(["tc", "-n", f"adtb-{tag}-hub", "qdisc", "show", "dev", "v1"],
                             capture_output=True, text=True).stdout
        assert "tbf" in node and "rate 1Gbit" in node, node
        assert "tbf" in hub and "rate 1Gbit" in hub, hub
        addr = subprocess.run(tb.exec_args(2, ["ip", "-4", "-o", "addr", "show", "eth0"]),
                              capture_output=True, text=True).stdout
        assert "10.77.0.3/24" in addr
        # Nothing of the testbed is visible in the host's namespace.
        host = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
        assert "10.77.0." not in host
    assert tb.namespaces() == []
    assert not (STATE_DIR / f"{tag}.netns").exists()


def _burst_bytes(tc_line):
    """tbf's burst in bytes from `tc qdisc show` ("burst 98250b", "burst 96Kb")."""
    word = tc_line.split("burst ")[1].split()[0]
    for unit, mul in (("Kb", 1024), ("Mb", 1024 * 1024), ("b", 1)):
        if word.endswith(unit):
            return float(word[:-len(unit)]) * mul
    raise AssertionError(tc_line)


@needs_netns
def test_the_default_burst_holds_a_gso_segment():
    # A bucket under 64 KiB makes tbf split the veth's GSO segments, which at 500mbit
    # cost gloo a fifth of the link in retransmissions: every rate gets at least 96 KiB
    # (tc keeps it to within its clock's resolution), 1gbit keeps 1 ms of traffic.
    for rate, burst, want in (("500mbit", None, 98304), ("100mbit", None, 98304),
                              ("1gbit", None, 125000), ("100mbit", "16KB", 16384)):
        tag = _tag("burst")
        with Testbed(2, rate, burst=burst, tag=tag) as tb:
            assert tb.burst_bytes == want  # what the benchmarks record
            for ns, dev in ((tb.netns(0), "eth0"), (f"adtb-{tag}-hub", "v1")):
                line = subprocess.run(["tc", "-n", ns, "qdisc", "show", "dev", dev],
                                      capture_output=True, text=True).stdout
                assert abs(_burst_bytes(line) - want) < 0.01 * want, (rate, line)
        assert tb.namespaces() == []


@needs_netns
def test_links_are_shaped_in_both_directions():
    # 100 Mbit/s is 1/100 of what an unshaped veth carries here, so an upper bound
    # proves the shaping; the lower bound is loose because two cores are shared.
    tag = _tag("rate")
    with Testbed(2, "100mbit", tag=tag) as tb:
        up = tb.measure_tcp(0, 1, nbytes=3_000_000, port=29991)
        down = tb.measure_tcp(1, 0, nbytes=3_000_000, port=29992)
    assert tb.namespaces() == []
    for bps in (up, down):
        assert 0.5e8 < bps < 1.05e8, bps


@needs_netns
def test_teardown_runs_when_the_body_raises():
    tag = _tag("exc")
    with pytest.raises(RuntimeError, match="boom"):
        with Testbed(2, "1gbit", tag=tag) as tb:
            sleeper = tb.popen(1, ["sleep", "60"])
            raise RuntimeError("boom")
    assert sleeper.poll() is not None, "processes started in a node must be stopped"
    assert _netns_with_prefix(f"adtb-{tag}-") == []


@needs_netns
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_teardown_runs_on_ctrl_c_and_sigterm(sig, tmp_path):
    tag = _tag("sig" + str(int(sig)))
    # Ctrl-C as in a terminal: a test run started as a background job inherits SIGINT
    # ignored, and Python then installs no KeyboardInterrupt handler of its own.
    code = textwrap.dedent(f"""
        import signal, sys, time
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.path.insert(0, {str(ROOT)!r})
        from approxdist.bench.testbed import Testbed
        with Testbed(2, "100mbit", tag={tag!r}) as tb:
            tb.popen(0, ["sleep", "60"])
            print("up", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        assert len(_netns_with_prefix(f"adtb-{tag}-")) == 3
        proc.send_signal(sig)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            # killed without unwinding: take its testbed down here, then fail
            subprocess.run([str(SCRIPTS / "teardown.sh"), "-t", tag], capture_output=True)
    assert proc.returncode != 0
    assert _netns_with_prefix(f"adtb-{tag}-") == []


@needs_netns
def test_teardown_refuses_namespaces_it_did_not_create():
    tag = _tag("own")
    foreign = f"adtb-{tag}-n0"
    marker = STATE_DIR / f"{tag}.netns"
    subprocess.run(["ip", "netns", "add", foreign], check=True)
    try:
        # No record of a testbed with this tag: teardown leaves the namespace alone.
        res = subprocess.run([str(SCRIPTS / "teardown.sh"), "-t", tag], capture_output=True,
                             text=True)
        assert res.returncode == 0 and foreign in _netns_with_prefix(foreign)
        # setup will not adopt (nor later delete) a namespace it did not make.
        res = subprocess.run([str(SCRIPTS / "setup.sh"), "-t", tag], capture_output=True,
                             text=True)
        assert res.returncode == 2 and "not made by this setup" in res.stderr
        assert foreign in _netns_with_prefix(foreign) and not marker.exists()
        # A record naming something setup.sh never makes is ignored, not obeyed.
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        marker.write_text("# forged\nsomebody-elses-ns\nadtb-other-n0\n")
        res = subprocess.run([str(SCRIPTS / "teardown.sh"), "-t", tag], capture_output=True,
                             text=True)
        assert res.returncode == 1 and "skipped" in res.stderr
        assert foreign in _netns_with_prefix(foreign)
    finally:
        marker.unlink(missing_ok=True)
        subprocess.run(["ip", "netns", "delete", foreign])
    assert _netns_with_prefix(f"adtb-{tag}-") == []


# -- a short DDP run across two nodes -------------------------------------------------------
def _expected_tiny_payload(ratio):
    """Bytes of the sampled slices of the "tiny" model in approxdist.bench.comm, counted
    by hand: conv1 is kept dense (skip_first_conv), conv2 keeps k of its 16 input
    channels, the classifier k of its 32 features; every other parameter is dense."""
    from approxdist.functional import num_samples

    k_conv, k_fc = num_samples(16, ratio, 1), num_samples(32, ratio, 1)
    elems = (16 * 3 * 9 + 16) + (16 + 16)          # conv1 w, b; bn1
    elems += 32 * k_conv * 9 + 32 + (32 + 32)      # conv2 sampled w, b; bn2
    elems += 10 * k_fc + 10                        # fc sampled w, b
    return 4 * elems


@needs_netns
def test_ddp_steps_on_two_shaped_nodes_send_the_analytic_payload():
    from approxdist.bench.comm import run_on_testbed

    tag = _tag("ddp")
    plan = {"configs": [{"model": "tiny", "hook": "allreduce"},
                        {"model": "tiny", "hook": "sparse0.5", "seed": 5},
                        {"model": "tiny", "hook": "sparse0.5+step", "seed": 5},
                        {"model": "tiny", "hook": "sparse0.5+overlap", "seed": 5}],
            "batch": 8, "image_size": 16, "steps": 3, "warmup": 1, "repeats": 1, "seed": 0,
            "threads": 1}
    with Testbed(2, "1gbit", tag=tag) as tb:
        rows = run_on_testbed(tb, plan, port=29530, timeout=240)
    assert _netns_with_prefix(f"adtb-{tag}-") == []
    by = {(r["hook"], r["rank"]): r for r in rows}
    hooks = ("allreduce", "sparse0.5", "sparse0.5+step", "sparse0.5+overlap")
    assert set(by) == {(h, r) for h in hooks for r in (0, 1)}
    dense, sparse = by[("allreduce", 0)], by[("sparse0.5", 0)]
    # DDP keeps every rank's weights identical, with every hook; stepping inside the
    # hook, or in the next forward, gives the same weights as the step after backward.
    for hook in hooks:
        assert by[(hook, 0)]["param_digest"] == by[(hook, 1)]["param_digest"]
    assert by[("sparse0.5+step", 0)]["param_digest"] == sparse["param_digest"]
    assert by[("sparse0.5+overlap", 0)]["param_digest"] == sparse["param_digest"]
    # The sparse hook handed gloo exactly the analytic count, every step, on both ranks,
    # and its own accounting agrees.
    expected = _expected_tiny_payload(0.5)
    for rank, hook in ((0, "sparse0.5"), (1, "sparse0.5"), (0, "sparse0.5+step"),
                       (1, "sparse0.5+overlap")):
        r = by[(hook, rank)]
        assert r["analytic_bytes_all_steps"] == [expected] * plan["steps"]
        assert r["payload_bytes"] == expected
        assert r["stats_payload_bytes"] == expected
        # (one bucket: forward_overlap launches its first 30% during backward, the rest after)
        assert r["allreduce_calls_per_step"] == (2 if hook.endswith("+overlap") else 1)
        # Apart from the payload: the size check once per step, 16 bytes for each of the
        # tiny model's 2 sampled weights and 16 for their total.
        assert r["check_bytes"] == 16 * (2 + 1)
    assert expected < dense["payload_bytes"] == dense["dense_bytes"]
    # And the wire saw it: eth0 carried at least the payload, and less than for dense.
    assert sparse["wire_tx_bytes"] >= expected
    assert sparse["wire_tx_bytes"] < dense["wire_tx_bytes"]
    assert all(t > 0 for t in sparse["step_s"])
    assert len(by[("sparse0.5+overlap", 0)]["step_s"]) == plan["steps"]
    # Each node counted its TCP retransmissions (its own namespace's /proc/net/snmp).
    assert all(isinstance(r["tcp_retransmits"], int) and r["tcp_retransmits"] >= 0 for r in rows)


# -- the benchmark's bookkeeping, anywhere --------------------------------------------------
def test_hook_names_parse_and_bad_ones_name_the_argument():
    from approxdist.bench.comm import parse_hook

    def fields(s):
        return (s.name, s.kind, s.ratio, s.fp16, s.step_in_hook, s.overlap, s.loop, s.eager_fraction)

    assert fields(parse_hook("sparse0.33+fp16")) == ("sparse0.33+fp16", "sparse", 0.33, True, False, False,
                                                     "usual", None)
    assert fields(parse_hook("sparse0.33+fp16+step")) == ("sparse0.33+fp16+step", "sparse", 0.33, True, True,
                                                          False, "step", None)
    assert fields(parse_hook("sparse0.33+overlap")) == ("sparse0.33+overlap", "sparse", 0.33, False, True, True,
                                                        "overlap", None)
    assert parse_hook("sparse0.33+overlap0.3").eager_fraction == 0.3
    assert parse_hook("allreduce+step").kind == "allreduce"
    assert parse_hook("powersgd4").rank == 4
    assert parse_hook("sparse0.33").mode == "weight_grad"  # convert_model's distributed default
    fwd = parse_hook("sparse0.33-forward+fp16+overlap")
    assert (fwd.mode, fwd.ratio, fwd.fp16, fwd.loop) == ("forward", 0.33, True, "overlap")
    for bad in ("sparse0", "sparse1.5", "powersgd0", "topk", "sparse0.5+step+fp16", "+step",
                "sparse0.5+step+overlap", "+overlap", "allreduce+overlap+step",
                "sparse0.5+step0.3", "sparse0.5+overlap0", "sparse0.5+overlap1.5", "allreduce0.3",
                "sparse0.5+fp16-forward", "allreduce-forward", "sparse0.5-backward"):
        with pytest.raises(ValueError, match="hook"):
            parse_hook(bad)


def test_markdown_block_is_replaced_without_touching_other_sections(tmp_path):
    from approxdist.bench.comm import write_markdown_section

    md = tmp_path / "benchmarks.md"
    md.write_text("# Benchmarks\n\n## Compute\n\nkeep me\n\n## Kernels\n\nkeep me too\n")
    write_markdown_section(md, "first testbed table", "testbed")
    write_markdown_section(md, "loopback table", "loopback")
    write_markdown_section(md, "second testbed table", "testbed")
    text = md.read_text()
    assert text.count("## Communication") == 1
    assert "first testbed table" not in text and "second testbed table" in text
    assert "loopback table" in text
    assert text.startswith("# Benchmarks\n\n## Compute\n\nkeep me\n\n## Kernels\n\nkeep me too\n")


@pytest.mark.parametrize("hooks", [["allreduce", "sparse0.33"], ["allreduce", "powersgd1"]])
def test_testbed_markdown_describes_powersgd_only_when_it_ran(hooks, tmp_path):
    from approxdist.bench.comm import markdown_body

    plan = {"configs": [{"model": "resnet18", "hook": h, "bucket_mb": 5} for h in hooks], "batch": 16,
            "image_size": 32, "steps": 7, "warmup": 2, "repeats": 3}
    env = {"date": "2026-12-02 07:00 UTC", "commit": "abc1234", "torch": "2.14.1", "cpus": 2, "loadavg": [0.5]}
    links = {"2 nodes, 1gbit": {"link_bits_per_s": 9.5e8},  # a file from before the burst was kept
             "2 nodes, 100mbit": {"link_bits_per_s": 9.5e7, "burst_bytes": 98304}}
    saved = {"command": "approxdist-bench comm --testbed", "plan": plan, "links": links,
             "environment": dict(env, loadavg_end=[0.6])}
    body = markdown_body(saved, "| table |", [], tmp_path)
    assert "testbed, 2 nodes, 1gbit: 0.950 Gbit/s per link\n" in body
    assert "testbed, 2 nodes, 100mbit: 0.095 Gbit/s per link; tbf burst 96 KiB\n" in body
    if "powersgd1" in hooks:
        assert "PowerSGD runs in a single DDP bucket" in body and "the others use DDP buckets of 5 MB" in body
    else:
        assert "PowerSGD" not in body and "DDP buckets of 5 MB. `wire` is what" in body


def test_link_rate_comes_from_the_fastest_probe_and_keeps_the_median():
    from approxdist.bench.comm import probe_detail
    from approxdist.bench.testbed import link_rate

    # 2 nodes: a ring all-reduce sends the bytes once per link; 4 nodes: 1.5 times
    two = link_rate([0.30, 0.20, 0.25], 25_000_000, 2)
    assert two["fastest_s"] == 0.20 and two["median_s"] == 0.25
    assert two["link_bits_per_s"] == pytest.approx(8 * 25e6 / 0.20)
    assert two["median_bits_per_s"] == pytest.approx(8 * 25e6 / 0.25)
    assert two["seconds"] == [0.30, 0.20, 0.25]  # in the probe's order
    four = link_rate([0.5, 0.3, 0.4, 0.6], 25_000_000, 4)
    assert four["link_bits_per_s"] == pytest.approx(8 * 1.5 * 25e6 / 0.3)
    assert four["median_s"] == 0.5  # the upper median of an even count
    for bad in ([], [0.2, 0.0], [-1.0]):
        with pytest.raises(ValueError, match="seconds"):
            link_rate(bad, 25_000_000, 2)
    detail = probe_detail(two)
    assert "fastest of 3" in detail and "25 MB" in detail and "0.800 Gbit/s" in detail
    # a JSON file from before the fastest-of rule: its rate was the median, say nothing
    assert probe_detail({"bytes": 25_000_000, "seconds": [0.2], "median_s": 0.2,
                          "link_bits_per_s": 1e9}) == ""


def test_testbed_probe_needs_a_repetition(capsys):
    with pytest.raises(SystemExit):
        testbed_mod.main(["--iters", "0"])
    assert "--iters must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="iters"):
        Testbed(2, "1gbit").measure_allreduce(1000, iters=0)


def test_summary_speedup_and_physical_limit():
    from approxdist.bench.comm import summarize

    def row(hook, kind, step, payload):
        return {"rank": 0, "world_size": 2, "nodes": 2, "rate": "1gbit", "model": "m",
                "hook": hook, "kind": kind, "ratio": 1.0, "fp16": False, "step_s": [step] * 3,
                "step_in_hook": hook.endswith(("+step", "+overlap")),
                "compute_s": [0.1], "payload_bytes": payload, "dense_bytes": 1e8,
                "wire_tx_bytes": payload, "hook_body_s": 0.0, "link_bits_per_s": 1e9,
                "forward_s": [0.03], "optimizer_s": [0.02], "pack_s": 0.01, "unpack_s": 0.015}

    s = {x["hook"]: x for x in summarize([row("allreduce", "allreduce", 1.0, 1e8),
                                          row("sparse0.5", "sparse", 0.5, 5e7),
                                          row("allreduce+step", "allreduce", 0.8, 1e8),
                                          row("sparse0.5+step", "sparse", 0.45, 5e7),
                                          row("allreduce+overlap", "allreduce", 0.9, 1e8),
                                          row("sparse0.5+overlap", "sparse", 0.42, 5e7)])}
    assert s["allreduce"]["speedup"] == 1.0 and s["sparse0.5"]["speedup"] == 2.0
    # +step rows are compared with DDP's all-reduce in the same loop (also +step)
    assert s["allreduce+step"]["speedup"] == 1.0
    assert s["sparse0.5+step"]["speedup"] == pytest.approx(0.8 / 0.45)
    # whose optimizer step overlaps the transfer: the bound is forward + transfer
    assert s["sparse0.5+step"]["ddp_bound_s"] == pytest.approx(0.43)
    # +overlap rows against allreduce+overlap; the forward overlaps too: bound = limit
    assert s["sparse0.5+overlap"]["speedup"] == pytest.approx(0.9 / 0.42)
    assert s["sparse0.5+overlap"]["ddp_bound_s"] == pytest.approx(0.4)
    # 2 nodes: each sends the payload once; 5e7 bytes at 1 Gbit/s take 0.4 s.
    assert s["sparse0.5"]["allreduce_s"] == pytest.approx(0.4)
    assert s["sparse0.5"]["of_limit"] == pytest.approx(0.5 / 0.4)
    # under DDP the forward (0.03 s) and the optimizer step (0.02 s) cannot overlap it
    assert s["sparse0.5"]["ddp_bound_s"] == pytest.approx(0.45)
    assert s["sparse0.5"]["of_ddp_bound"] == pytest.approx(0.5 / 0.45)
    assert s["sparse0.5"]["pack_unpack_share"] == pytest.approx(0.025 / 0.5)


def test_retransmissions_are_summed_over_every_node_and_round():
    from approxdist.bench.comm import retransmit_line, summarize

    def row(hook, rank, repeat, retrans):
        r = {"rank": rank, "world_size": 2, "nodes": 2, "rate": "500mbit", "model": "m", "hook": hook,
             "kind": "sparse", "ratio": 0.5, "fp16": False, "step_s": [0.5], "repeat": repeat,
             "compute_s": [0.1], "payload_bytes": 5e7, "dense_bytes": 1e8, "hook_body_s": 0.0}
        if retrans is not None:
            r["tcp_retransmits"] = retrans
        return r

    rows = [row("sparse0.5", rank, rep, 3 * rank + rep) for rank in (0, 1) for rep in (0, 1)]
    rows += [row("sparse0.33", rank, rep, 0) for rank in (0, 1) for rep in (0, 1)]
    s = {x["hook"]: x for x in summarize(rows)}
    assert s["sparse0.5"]["tcp_retransmits"] == 0 + 1 + 3 + 4  # rank 1's too, not only rank 0's
    assert s["sparse0.33"]["tcp_retransmits"] == 0
    line = retransmit_line(list(s.values()))
    assert "8 in 1 of 2 rows, at most 8 (2 nodes 500mbit m sparse0.5)." in line
    clean = retransmit_line([s["sparse0.33"]])
    assert clean.endswith("none in all 1 rows: no link dropped a packet.")
    # loopback rows and JSON files from before the count: no sentence at all
    old = summarize([row("sparse0.5", 0, 0, None)])
    assert "tcp_retransmits" not in old[0] and retransmit_line(old) is None


def test_summary_pairs_the_rounds_for_the_speedup_range():
    from approxdist.bench.comm import format_table, summarize

    def row(hook, kind, repeat, steps):
        return {"rank": 0, "world_size": 2, "nodes": 2, "rate": "1gbit", "model": "m", "hook": hook,
                "kind": kind, "ratio": 1.0, "fp16": False, "step_s": steps, "repeat": repeat,
                "compute_s": [0.1], "payload_bytes": 5e7, "dense_bytes": 1e8, "wire_tx_bytes": 5e7,
                "hook_body_s": 0.0, "link_bits_per_s": 1e9, "forward_s": [0.03], "optimizer_s": [0.02]}

    # Round 1 is a slow spell for both: paired, the ratio stays 2 there; round 2 has no
    # baseline, so it gives no paired speedup.
    rows = [row("allreduce", "allreduce", 0, [1.0, 1.0, 1.2]), row("sparse0.5", "sparse", 0, [0.5, 0.5, 0.9]),
            row("allreduce", "allreduce", 1, [2.0, 2.0, 2.0]), row("sparse0.5", "sparse", 1, [1.0, 1.1, 0.9]),
            row("sparse0.5", "sparse", 2, [0.4, 0.4, 0.4])]
    s = {x["hook"]: x for x in summarize(rows)}
    assert s["sparse0.5"]["round_step_s"] == [[0, 0.5], [1, 1.0], [2, 0.4]]
    assert s["sparse0.5"]["speedup_rounds"] == [2.0, 2.0]
    assert s["allreduce"]["speedup_rounds"] == [1.0, 1.0]
    # the whole-run figure stays the ratio of the medians over every step
    assert s["sparse0.5"]["speedup"] == pytest.approx(statistics.median([1.0, 1.0, 1.2, 2.0, 2.0, 2.0])
                                                      / statistics.median([0.5, 0.5, 0.9, 1.0, 1.1, 0.9, 0.4, 0.4, 0.4]))
    table = format_table(list(s.values()), testbed=True)
    assert f"| {s['sparse0.5']['speedup']:.2f}x (2.00-2.00) |" in table
    assert "| allreduce | 1.600 | 1.00x |" in table  # the baseline's own row: no range
    one = summarize([row("allreduce", "allreduce", 0, [1.0]), row("sparse0.5", "sparse", 0, [0.5])])
    assert "| 2.00x |" in format_table(one, testbed=True)  # a single round: no range


def test_check_results_names_the_first_failing_node():
    from approxdist.bench.testbed import check_results

    ok = {"returncode": 0, "stdout": "", "stderr": ""}
    fine = [ok, ok]
    assert check_results(fine) is fine
    failed = [ok, {"returncode": 3, "stdout": "", "stderr": "x" * 5000 + "boom"},
              {"returncode": 1, "stdout": "", "stderr": "later"}]
    with pytest.raises(RuntimeError, match=r"^the probe failed on node 1 \(exit code 3\):") as err:
        check_results(failed, "the probe")
    assert str(err.value).endswith("boom") and len(str(err.value)) < 3100


def test_check_results_names_the_node_that_failed_first_not_one_we_stopped():
    from approxdist.bench.testbed import check_results

    ok = {"returncode": 0, "stdout": "", "stderr": ""}
    ours = {"returncode": -15, "stdout": "", "stderr": "terminated", "stopped": True, "failed_seq": None}
    late = {"returncode": 2, "stdout": "", "stderr": "second", "stopped": False, "failed_seq": 1}
    first = {"returncode": 7, "stdout": "", "stderr": "first", "stopped": False, "failed_seq": 0}
    with pytest.raises(RuntimeError, match=r"failed on node 2 \(exit code 7\)"):
        check_results([ours, late, first])
    with pytest.raises(RuntimeError, match=r"on node 1 was stopped by the testbed \(exit code -15"):
        check_results([ok, ours])


@needs_netns
def test_run_all_reports_the_first_failure_in_time():
    """Node 0 would run for a minute: the testbed stops it (-15) after node 1 exits 7,
    and it is node 1's failure that is reported, whatever order the exits are polled in."""
    from approxdist.bench.testbed import check_results

    code = "import os, sys, time; time.sleep(60) if os.environ['RANK'] == '0' else sys.exit(7)"
    with Testbed(2, "1gbit", tag=_tag("first")) as tb:
        res = tb.run_all(lambda i: [sys.executable, "-c", code], timeout=120)
    assert [r["returncode"] for r in res] == [-15, 7]
    assert res[0]["stopped"] and not res[1]["stopped"] and res[1]["failed_seq"] == 0
    with pytest.raises(RuntimeError, match=r"failed on node 1 \(exit code 7\)"):
        check_results(res)


@needs_netns
def test_run_on_fresh_testbed_returns_node_0s_output_and_names_a_failing_node():
    from approxdist.bench.testbed import run_on_fresh_testbed

    show = "import os; print(os.environ['RANK'], os.environ['MASTER_ADDR'])"
    assert run_on_fresh_testbed([sys.executable, "-c", show], port=29583) == "0 10.77.0.1\n"
    fail = "import os, sys; sys.exit(7 if os.environ['RANK'] == '1' else 0)"
    with pytest.raises(RuntimeError, match=r"failed on node 1 \(exit code 7\)"):
        run_on_fresh_testbed([sys.executable, "-c", fail], port=29584)
    # (a Testbed's default tag is p<pid>)
    assert not _netns_with_prefix(f"adtb-p{os.getpid() % 10_000_000}-"), "the testbed is still up"


def _frees_worker(rank, world):
    import gc
    import weakref

    import approxdist.bench.comm as comm
    from approxdist.bench.comm import hooks, worker

    made, alive = [], []
    real_make, real_run = hooks.make_model, worker.run_config

    def make(name):
        model = real_make(name)
        made.append(weakref.ref(model))
        return model

    def run(*args, **kwargs):
        alive.append(sum(ref() is not None for ref in made))
        return real_run(*args, **kwargs)

    hooks.make_model, worker.run_config = make, run
    plan = {"configs": [{"model": "tiny", "hook": h, "bucket_mb": 25}
                        for h in ("allreduce", "sparse0.5", "sparse0.5+overlap", "fp16")],
            "batch": 4, "image_size": 8, "steps": 2, "warmup": 1, "repeats": 2, "compute_steps": 0}
    gc.disable()  # no automatic collection to free them by chance: run_plan must
    try:
        comm.run_plan(plan)
    finally:
        gc.enable()
    return alive


def _share_worker(rank, world):
    import approxdist.bench.comm as comm

    shares = []
    for cfg in ({"model": "tiny", "hook": "sparse0.5+overlap0.4"},
                {"model": "tiny", "hook": "sparse0.5+overlap0.4", "eager_fraction": 0.6},
                {"model": "tiny", "hook": "sparse0.5+overlap"}):
        ddp, *_ = comm.build(cfg, seed=0)
        shares.append(ddp._approxdist_forward_overlap.eager_fraction)
    return shares


def test_a_hand_written_plan_gets_the_eager_share_its_hook_names():
    from approxdist.distributed.forward_overlap import EAGER_FRACTION
    from distharness import run_ranks

    # the hook's +overlapF, unless the config sets the share (as the command line does)
    assert run_ranks(_share_worker, 1) == [[0.4, 0.6, EAGER_FRACTION]]


def test_run_plan_frees_each_config_before_the_next():
    # DDP, its model and optimizer sit in reference cycles; left to the collector they
    # would be freed at some point of the next config's steps (docs/benchmarks.md).
    from distharness import run_ranks

    for alive in run_ranks(_frees_worker, 2):
        assert alive == [0] * 8, alive


def test_torchrun_args_pick_the_rendezvous_this_torch_can_do_across_namespaces(monkeypatch):
    tb = Testbed(3, "1gbit", tag="argsonly")  # never brought up: only its addresses are read
    from torch.distributed.elastic.rendezvous.api import RendezvousStoreInfo

    build_params = inspect.signature(RendezvousStoreInfo.build).parameters
    assert testbed_mod.c10d_uses_local_addr() == ("local_addr" in build_params)
    monkeypatch.setattr(testbed_mod, "c10d_uses_local_addr", lambda: True)
    args = tb.torchrun_args(1, port=29411)
    assert args[args.index("--rdzv-backend") + 1] == "c10d"
    assert args[args.index("--local-addr") + 1] == tb.address(1)
    assert args[args.index("--rdzv-conf") + 1] == "is_host=0"
    args0 = tb.torchrun_args(0)
    assert args0[args0.index("--rdzv-conf") + 1] == "is_host=1"
    monkeypatch.setattr(testbed_mod, "c10d_uses_local_addr", lambda: False)  # torch 2.4
    args = tb.torchrun_args(2, port=29411)
    assert args[args.index("--rdzv-backend") + 1] == "static"
    assert args[args.index("--master-addr") + 1] == tb.address(0)
    assert args[args.index("--master-port") + 1] == "29411"
    assert args[args.index("--node-rank") + 1] == "2" and "--local-addr" not in args


@needs_netns
@pytest.mark.parametrize("rendezvous", ["as chosen", "static"])
def test_torchrun_rendezvous_across_nodes_with_the_wrappers_arguments(tmp_path, monkeypatch, rendezvous):
    # All namespaces share one host name: c10d only works with --local-addr and is_host on
    # node 0 alone, and only where torch hands --local-addr on to the workers (not 2.4);
    # the static rendezvous, torch 2.4's path, is forced on this torch too so that both
    # are exercised.
    if rendezvous == "static":
        monkeypatch.setattr(testbed_mod, "c10d_uses_local_addr", lambda: False)
    script = tmp_path / "allreduce.py"
    script.write_text(textwrap.dedent("""
        import os, torch, torch.distributed as dist
        dist.init_process_group("gloo")
        t = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(t)
        print(dist.get_rank(), dist.get_world_size(), int(t.item()), flush=True)
        dist.destroy_process_group()
    """))
    os.chmod(tmp_path, 0o755)
    tag = _tag("trun")
    with Testbed(2, "1gbit", tag=tag) as tb:
        res = tb.run_all(
            lambda i: [sys.executable, "-m", "torch.distributed.run",
                       *tb.torchrun_args(i, port=29400), str(script)],
            env_of=lambda i: {**os.environ, "GLOO_SOCKET_IFNAME": "eth0"}, timeout=180)
    assert _netns_with_prefix(f"adtb-{tag}-") == []
    assert [r["returncode"] for r in res] == [0, 0], [r["stderr"][-1500:] for r in res]
    lines = sorted(line for r in res for line in r["stdout"].split("\n") if line.strip())
    assert lines == ["0 2 3", "1 2 3"]


def test_time_to_accuracy_bookkeeping():
    from approxdist.bench.comm.tta import summarize_tta, time_to_target, train_argv

    curve = [(10.0, 90.0), (20.0, 96.9), (30.0, 97.0), (40.0, 99.0)]
    assert time_to_target(curve, 97.0) == 30.0 and time_to_target(curve, 99.5) is None

    def row(hook, train_curve, launch_offset, final, payload, steps_at):
        return {"hook": hook, "train_curve": train_curve,
                "curve": [(t + launch_offset, a) for t, a in train_curve],
                "step_curve": [(s, a) for s, (_, a) in zip(steps_at, train_curve)],
                "wall_s": 45.0, "final_top1": final, "train_s": train_curve[-1][0], "steps": steps_at[-1],
                "payload_bytes_total": payload, "dense_bytes_total": 100}

    rows = [row("allreduce", curve, 10.0, 99.0, 100, [10, 20, 30, 40]),
            row("allreduce", [(8.0, 97.5)], 11.0, 97.5, 100, [8]),
            row("sparse0.5", [(5.0, 96.0), (7.6, 97.5)], 10.0, 97.5, 50, [10, 20]),
            # as approxdist-train reports PowerSGD: no payload count
            row("powersgd1", [(5.0, 80.0)], 10.0, 80.0, None, [10])]
    s = {x["hook"]: x for x in summarize_tta(rows, 97.0)}
    # medians over the runs that reached it: training clock (30, 8) -> 19, launch (40, 19) -> 29.5
    assert s["allreduce"]["train_time_to_target_s"] == 19.0 and s["allreduce"]["time_to_target_s"] == 29.5
    assert s["allreduce"]["steps_to_target"] == 19 and s["allreduce"]["train_s_per_step"] == 1.0
    # the speedup is on the training clock, not on the time from launch (which would say 29.5/17.6)
    assert s["sparse0.5"]["speedup"] == 2.5 and s["sparse0.5"]["payload_per_dense"] == 0.5
    assert s["powersgd1"]["reached"] == 0 and s["powersgd1"]["speedup"] is None
    assert s["powersgd1"]["payload_per_dense"] is None and s["powersgd1"]["train_time_to_target_s"] is None
    # rows saved before the training clock (the launch curve only) still summarise
    old = [{"hook": "allreduce", "curve": curve, "wall_s": 45.0, "final_top1": 99.0,
            "payload_bytes_total": 100, "dense_bytes_total": 100},
           {"hook": "sparse0.5", "curve": [(12.0, 97.5)], "wall_s": 20.0, "final_top1": 97.5,
            "payload_bytes_total": 50, "dense_bytes_total": 100}]
    o = {x["hook"]: x for x in summarize_tta(old, 97.0)}
    assert o["sparse0.5"]["speedup"] == 2.5 and o["sparse0.5"]["reached"] == 1
    assert o["sparse0.5"]["train_time_to_target_s"] is None
    argv = train_argv("sparse0.33", "/tmp/x", model="cnn", epochs=3, batch=8, seed=1, eval_every=4)
    assert argv[argv.index("--sample-ratio") + 1] == "0.33" and "--dataset" in argv
    assert argv[argv.index("--eval-every") + 1] == "4"
    assert "--width" not in argv
    both = train_argv("sparse0.33+fp16", "/tmp/x", model="cnn", epochs=1, batch=1, seed=0)
    assert both[both.index("--comm-hook") + 1] == "sparse-fp16"
    assert both[both.index("--sample-ratio") + 1] == "0.33"
    wide = train_argv("allreduce", "/tmp/x", model="cnn", epochs=1, batch=1, seed=0, width=128)
    assert wide[wide.index("--width") + 1] == "128"
    assert "--image-size" not in wide and "--lr" not in wide and "--sample-mode" not in wide
    assert "--bucket-cap-mb" not in wide
    small = train_argv("fp16", "/tmp/x", model="cnn", epochs=1, batch=1, seed=0, bucket_mb=1.0)
    assert small[small.index("--bucket-cap-mb") + 1] == "1.0"
    res = train_argv("sparse0.33-forward", "/tmp/x", model="resnet18", epochs=1, batch=1, seed=0,
                     image_size=32, lr=0.05)
    assert res[res.index("--image-size") + 1] == "32" and res[res.index("--lr") + 1] == "0.05"
    assert res[res.index("--sample-mode") + 1] == "forward"
    bud = train_argv("sparse-budget0.33+fp16", "/tmp/x", model="cnn", epochs=1, batch=1, seed=0)
    assert bud[bud.index("--budget") + 1] == "0.33" and bud[bud.index("--comm-hook") + 1] == "sparse-fp16"
    assert "--sample-ratio" not in bud
    with pytest.raises(ValueError, match="width"):
        train_argv("allreduce", "/tmp/x", model="cnn", epochs=1, batch=1, seed=0, width=0)
    with pytest.raises(ValueError, match="hook"):
        train_argv("topk", "/tmp/x", model="cnn", epochs=1, batch=1, seed=0)
    with pytest.raises(ValueError, match="eval_every"):
        train_argv("allreduce", "/tmp/x", model="cnn", epochs=1, batch=1, seed=0, eval_every=0)


def test_time_to_accuracy_curves_come_from_every_evaluation():
    from approxdist.bench.comm.tta import curves

    t0 = 1000.0
    recs = [{"kind": "eval", "step": 2, "top1": 50.0, "train_seconds": 0.4, "time": 1011.0},
            {"kind": "train", "step": 3, "time": 1011.2},  # no accuracy: not a point
            {"kind": "eval", "step": 4, "top1": 70.0, "train_seconds": 0.9, "time": 1011.5},
            {"kind": "epoch", "step": 5, "top1": 75.0, "train_seconds": 1.1, "time": 1011.8},
            {"kind": "eval", "step": 7, "top1": 97.0, "train_seconds": 1.6, "time": 1012.4}]
    c = curves(list(reversed(recs)), t0)  # in step order whatever the file order
    assert c["train_curve"] == [(0.4, 50.0), (0.9, 70.0), (1.1, 75.0), (1.6, 97.0)]
    assert c["step_curve"] == [(2, 50.0), (4, 70.0), (5, 75.0), (7, 97.0)]
    assert c["curve"] == [(11.0, 50.0), (pytest.approx(11.5), 70.0), (pytest.approx(11.8), 75.0),
                          (pytest.approx(12.4), 97.0)]


def test_time_to_accuracy_table_and_plot(tmp_path):
    from approxdist.bench.comm.tta import format_tta_table, plot_tta, summarize_tta

    rows = [{"hook": h, "train_curve": [(1.0, 90.0), (t, 97.5)], "curve": [(11.0, 90.0), (10 + t, 97.5)],
             "step_curve": [(5, 90.0), (10, 97.5)], "wall_s": 20.0, "final_top1": 97.5, "train_s": t,
             "steps": 10, "payload_bytes_total": 1, "dense_bytes_total": 2} for h, t in
            (("allreduce", 3.0), ("sparse0.33", 2.0))]
    table = format_tta_table(summarize_tta(rows, 97.0), 97.0)
    assert "| training s to 97% | speedup | steps to 97% |" in table
    assert "| sparse0.33 | 1/1 | 2.00 | 1.50x | 10 | 12.0 | 0.200 | 97.50 | 20.0 | 0.500 |" in table
    png = plot_tta(rows, 97.0, tmp_path / "tta.png", title="cnn on digits")
    assert png.stat().st_size > 1000


def test_time_to_accuracy_render_redoes_table_plot_and_markdown(tmp_path, capsys):
    import json

    from approxdist.bench.comm import main

    rows = [{"hook": h, "train_curve": [(1.0, 95.5), (t, 97.5)], "curve": [(11.0, 95.5), (10 + t, 97.5)],
             "step_curve": [(5, 95.5), (10, 97.5)], "wall_s": 20.0, "final_top1": 97.5, "train_s": t,
             "steps": 10, "payload_bytes_total": 1, "dense_bytes_total": 2} for h, t in
            (("allreduce", 3.0), ("sparse0.33", 2.0))]
    env = {"date": "2026-12-02 05:00 UTC", "commit": "abc1234", "cpus": 2, "loadavg": [0.5],
           "loadavg_end": [0.7]}
    saved = {"command": "approxdist-bench comm --testbed --time-to-accuracy --tta-model cnn "
                        "--tta-rate 1gbit --tta-eval-every 3 --target 97.5 --repeats 1",
             "environment": env, "link": {"link_bits_per_s": 9.5e8}, "rows": rows}  # no burst: old file
    old = tmp_path / "old.json"  # from before the plan was saved: read from the command
    old.write_text(json.dumps(saved))
    md = tmp_path / "benchmarks.md"
    md.write_text("# Benchmarks\n\n## Compute\n\nkeep me\n")
    assert main(["--render", str(old), "--plots", str(tmp_path), "--markdown", str(md)]) == 0
    text = md.read_text()
    assert "keep me" in text and "### Time to accuracy" in text
    assert "`approxdist-train --model cnn --dataset digits --epochs 6 --batch-size 32 " \
           "--eval-every 3` under torchrun on 2 testbed nodes at 1gbit" in text
    assert "(gloo all-reduce measured at 950 Mbit/s), 1 interleaved rounds" in text  # no burst
    assert "PowerSGD" not in text  # not among the hooks: not described
    # at the run's own target (97.5): the 95.5 points do not count
    assert "| sparse0.33 | 1/1 | 2.00 | 1.50x | 10 |" in text and "training s to 97.5%" in text
    assert (tmp_path / "comm_tta_accuracy_vs_time.png").stat().st_size > 1000
    assert "![comm_tta_accuracy_vs_time](comm_tta_accuracy_vs_time.png)" in text
    # another target on request, from a file with its plan; the block is replaced
    saved["plan"] = {"model": "cnn", "epochs": 2, "batch": 8, "rate": "100mbit", "eval_every": 2,
                     "repeats": 1, "target": 97.5, "burst": "16kb"}
    saved["link"]["burst_bytes"] = 16384
    new = tmp_path / "new.json"
    new.write_text(json.dumps(saved))
    capsys.readouterr()
    assert main(["--render", str(new), "--markdown", str(md), "--target", "95"]) == 0
    assert "| sparse0.33 | 1/1 | 1.00 | 1.00x | 5 |" in capsys.readouterr().out
    text = md.read_text()
    assert text.count("### Time to accuracy") == 1 and "training s to 95%" in text
    assert "--model cnn --dataset digits --epochs 2 --batch-size 8 --eval-every 2" in text
    assert "(gloo all-reduce measured at 950 Mbit/s; tbf burst 16 KiB), 1 interleaved" in text
    assert "training s to 97.5%" not in text and "![" not in text  # no --plots this time
    # a wider built-in model: its own block and plot beside the default one's
    saved["plan"]["width"] = 128
    new.write_text(json.dumps(saved))
    assert main(["--render", str(new), "--plots", str(tmp_path), "--markdown", str(md)]) == 0
    text = md.read_text()
    assert text.count("### Time to accuracy") == 2 and "### Time to accuracy, cnn width 128" in text
    assert "`approxdist-train --model cnn --width 128 --dataset digits" in text
    assert "training s to 95%" in text  # the default block is left as it was
    assert "![comm_tta_accuracy_vs_time_cnn128](comm_tta_accuracy_vs_time_cnn128.png)" in text
    assert (tmp_path / "comm_tta_accuracy_vs_time_cnn128.png").is_file()
    # a torchvision model on upscaled digits: its own block, with its flags
    saved["plan"].update(model="resnet18", width=None, image_size=32, lr=0.05)
    new.write_text(json.dumps(saved))
    assert main(["--render", str(new), "--plots", str(tmp_path), "--markdown", str(md)]) == 0
    text = md.read_text()
    assert text.count("### Time to accuracy") == 3 and "### Time to accuracy, resnet18" in text
    assert "`approxdist-train --model resnet18 --image-size 32 --lr 0.05 --dataset digits" in text
    assert (tmp_path / "comm_tta_accuracy_vs_time_resnet18.png").is_file()


def test_burst_sizes_read_like_tc():
    from approxdist.bench.testbed import default_burst_bytes, parse_size

    assert [parse_size(s) for s in ("65536", "64b", "96kb", "96K", "1mb", " 2m ")] == \
        [65536, 64, 98304, 98304, 1 << 20, 2 << 20]
    for bad in ("0", "-5", "16kbit", "1.5kb", "", "lots"):
        with pytest.raises(ValueError, match="burst must be a positive tc size"):
            parse_size(bad)
    with pytest.raises(ValueError, match="burst must be"):
        Testbed(2, "1gbit", burst="1.5kb")
    assert default_burst_bytes("100mbit") == 98304 and default_burst_bytes("1gbit") == 125000
    assert default_burst_bytes("10gbit") == 1_250_000
    assert Testbed(2, "none").burst_bytes is None


@pytest.mark.parametrize("argv, message", [
    (["--testbed", "--burst", "16kbit"], "--burst must be a positive tc size"),
    (["--burst", "16kb"], "--burst shapes the testbed's links: add --testbed"),
    (["--testbed", "--time-to-accuracy", "--burst", "0"], "--burst must be a positive tc size"),
    (["--testbed", "--rates", "1gbit,none", "--burst", "16kb"], "--burst: the 'none' rate leaves links"),
    (["--testbed", "--time-to-accuracy", "--tta-rate", "none", "--burst", "16kb"], "--burst: the 'none' rate"),
])
def test_burst_is_checked_before_anything_runs(argv, message, capsys):
    from approxdist.bench.comm import main

    with pytest.raises(SystemExit):
        main(argv + ["--models", "tiny"])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-5", "nan"])
def test_bucket_mb_must_be_positive(value, capsys):
    from approxdist.bench.comm import main

    with pytest.raises(SystemExit):
        main(["--bucket-mb", value, "--models", "tiny"])
    assert "--bucket-mb must be > 0" in capsys.readouterr().err


def test_warmup_must_not_be_negative(capsys):
    from approxdist.bench.comm import main

    with pytest.raises(SystemExit):
        main(["--warmup", "-1", "--models", "tiny"])
    assert "--warmup must be >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-2", "nan", "inf"])
def test_kernels_bench_divisor_must_be_a_world_size(value):
    from approxdist.bench.kernels import main

    with pytest.raises(ValueError, match="--divisor must be a finite number > 0"):
        main(["--divisor", value, "--ratios", "0.5"])


def test_a_run_leaves_the_markdown_to_the_render_step(tmp_path, capsys):
    from approxdist.bench.comm import main

    md = tmp_path / "benchmarks.md"
    with pytest.raises(SystemExit):
        main(["--models", "tiny", "--markdown", str(md)])
    assert "--markdown is written by the render step, not by a run" in capsys.readouterr().err
    assert not md.exists()


def test_a_plan_reads_and_writes_the_json_it_always_had():
    from approxdist.bench.comm import Plan, RunConfig

    # as a testbed run saved it (docs/comm_testbed.json, shortened)
    saved = {"configs": [{"model": "resnet18", "hook": h, "bucket_mb": 5.0} for h in ("allreduce", "sparse0.5")]
             + [{"model": "resnet18", "hook": "sparse0.33+overlap", "bucket_mb": 5.0, "eager_fraction": 0.3}],
             "batch": 16, "image_size": 32, "steps": 3, "warmup": 2, "repeats": 3, "seed": 0, "compute_steps": 2,
             "compute_repeats": 1, "verbose": True, "threads": 1}
    assert Plan.from_dict(saved).to_dict() == saved
    hand = {"configs": [{"model": "tiny", "hook": "sparse0.5+overlap0.4", "seed": 5, "note": "kept"}],
            "batch": 8, "image_size": 16, "steps": 3, "warmup": 1, "repeats": 1}
    plan = Plan.from_dict(hand)
    assert plan.configs[0] == RunConfig("tiny", "sparse0.5+overlap0.4", seed=5, extra={"note": "kept"})
    assert plan.configs[0].spec.eager_fraction == 0.4 and plan.threads is None
    assert plan.to_dict()["configs"] == hand["configs"]
