"""approxdist-bench cpu: the machine's speed recorded beside a benchmark's times."""
import os
import statistics

import pytest


def test_measure_times_the_workload_alone_and_on_every_core():
    from approxdist.bench.cpu_reference import WORKLOAD, measure

    ref = measure(reps=2)
    cores = len(os.sched_getaffinity(0))
    assert ref["workload"] == WORKLOAD and ref["reps"] == 2 and ref["cores"] == cores
    assert len(ref["per_core_ms"]) == cores
    assert all(t > 0 for t in ref["per_core_ms"]) and ref["alone_ms"] > 0
    assert ref["all_cores_ms"] == pytest.approx(statistics.median(ref["per_core_ms"]))
    assert ref["slowdown"] == pytest.approx(ref["all_cores_ms"] / ref["alone_ms"])


@pytest.mark.parametrize("reps", [0, -1, 1.5, "3", True])
def test_measure_names_a_bad_reps(reps):
    from approxdist.bench.cpu_reference import measure

    with pytest.raises(ValueError, match="reps must be an integer >= 1"):
        measure(reps=reps)


def test_a_worker_that_never_gets_ready_is_stopped_not_waited_for():
    import sys
    import time

    from approxdist.bench.cpu_reference import _run_together

    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="not ready within 1 s"):
        _run_together([None], 1, 1.0, cmd=[sys.executable, "-c", "import time; time.sleep(60)"])
    assert time.monotonic() - t0 < 30
    with pytest.raises(RuntimeError, match=r"failed \(exit code 3\)"):
        _run_together([None], 1, 10.0, cmd=[sys.executable, "-c", "import sys; sys.exit(3)"])


def test_the_command_rejects_a_bad_reps(capsys):
    from approxdist.bench.cpu_reference import main

    with pytest.raises(SystemExit):
        main(["--reps", "0"])
    assert "--reps must be >= 1, got 0" in capsys.readouterr().err


def test_the_command_prints_and_writes_the_figures(tmp_path, capsys):
    import json

    from approxdist.bench.__main__ import cli

    out = tmp_path / "cpu.json"
    assert cli(["cpu", "--reps", "1", "--json", str(out)]) == 0
    ref = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert f"{ref['alone_ms']:.1f} ms alone, {ref['all_cores_ms']:.1f} ms with one copy on each " \
           f"of the {ref['cores']} cores ({ref['slowdown']:.2f}x)" in printed


def _env(**extra):
    return {"date": "2026-12-02 07:00 UTC", "commit": "abc1234", "torch": "2.14.1", "cpus": 2,
            "loadavg": [0.5], **extra}


def test_comm_markdown_states_the_reference_when_the_run_took_one(tmp_path):
    from approxdist.bench.comm import markdown_body

    plan = {"configs": [{"model": "resnet18", "hook": "allreduce", "bucket_mb": 5}], "batch": 16,
            "image_size": 32, "steps": 7, "warmup": 2, "repeats": 3}
    ref = {"workload": "w", "reps": 10, "cores": 2, "alone_ms": 101.04, "all_cores_ms": 120.06,
           "per_core_ms": [119.0, 121.12], "slowdown": 120.06 / 101.04}
    links = {"2 nodes, 1gbit": {"link_bits_per_s": 9.5e8}}
    def body_of(env):
        saved = {"command": "approxdist-bench comm --testbed", "plan": plan, "links": links,
                 "environment": dict(env, loadavg_end=[0.6])}
        return markdown_body(saved, "| table |", [], tmp_path)

    body = body_of(_env(cpu_reference=ref))
    assert ("CPU reference (w; `approxdist-bench cpu`): 101.0 ms alone, 120.1 ms with one copy on "
            "each of the 2 cores (1.19x), taken before the run: compare times of different days "
            "only beside it.") in body
    end = dict(ref, alone_ms=80.44, all_cores_ms=95.0)
    both = body_of(_env(cpu_reference=ref, cpu_reference_end=end))
    assert ("(1.19x), taken before the run (after it: 80.4 ms alone, 95.0 ms on all cores): "
            "compare times of different days only beside it.") in both
    # a JSON file from before the reference (docs/comm_testbed.json) renders as it did
    old = body_of(_env())
    assert "CPU reference" not in old
    assert old == body.replace(body[body.index("CPU reference"):body.index("\n\n", body.index("CPU reference")) + 2], "")


def test_comm_takes_the_reference_unless_told_not_to():
    from approxdist.bench.comm import parser

    assert parser().parse_args([]).cpu_reference is True
    assert parser().parse_args(["--no-cpu-reference"]).cpu_reference is False


def test_time_to_accuracy_markdown_states_the_reference_too(tmp_path):
    import json

    from approxdist.bench.comm import main

    rows = [{"hook": h, "train_curve": [(1.0, 95.5), (t, 97.5)], "curve": [(11.0, 95.5), (10 + t, 97.5)],
             "step_curve": [(5, 95.5), (10, 97.5)], "wall_s": 20.0, "final_top1": 97.5, "train_s": t,
             "steps": 10, "payload_bytes_total": 1, "dense_bytes_total": 2}
            for h, t in (("allreduce", 3.0), ("sparse0.33", 2.0))]
    ref = {"workload": "w", "reps": 10, "cores": 2, "alone_ms": 90.0, "all_cores_ms": 99.0,
           "per_core_ms": [98.0, 100.0], "slowdown": 1.1}
    plan = {"model": "cnn", "epochs": 2, "batch": 8, "rate": "100mbit", "eval_every": 2,
            "repeats": 1, "target": 97.0}
    md = tmp_path / "benchmarks.md"
    for env, stated in ((_env(cpu_reference=ref), True), (_env(), False)):
        saved = tmp_path / "tta.json"
        saved.write_text(json.dumps({"command": "approxdist-bench comm --testbed --time-to-accuracy",
                                     "environment": env, "plan": plan,
                                     "link": {"link_bits_per_s": 9e7}, "rows": rows}))
        md.write_text("# Benchmarks\n")
        assert main(["--render", str(saved), "--markdown", str(md)]) == 0
        text = md.read_text()
        assert ("CPU reference (w; `approxdist-bench cpu`): 90.0 ms alone, 99.0 ms with one copy "
                "on each of the 2 cores (1.10x)" in text) is stated
        assert "`approxdist-train --model cnn --dataset digits --epochs 2" in text


def test_a_comm_run_takes_the_reference_before_and_after_it(tmp_path, monkeypatch):
    # A real loopback run (2 gloo ranks, the tiny model); only the reference workload is
    # replaced by two known figures, so the test checks which one lands where.
    import json

    from approxdist.bench import cpu_reference
    from approxdist.bench.comm import main

    taken = []

    def fake_measure(reps=10, timeout=300.0):
        taken.append(len(taken))
        ms = (70.0, 55.0)[len(taken) - 1]
        return {"workload": "w", "reps": reps, "cores": 2, "alone_ms": ms, "all_cores_ms": ms + 10,
                "per_core_ms": [ms + 10, ms + 10], "slowdown": (ms + 10) / ms}

    monkeypatch.setattr(cpu_reference, "measure", fake_measure)
    out, md = tmp_path / "run.json", tmp_path / "benchmarks.md"
    assert main(["--models", "tiny", "--hooks", "allreduce,sparse0.5", "--steps", "1", "--repeats", "1",
                 "--warmup", "1", "--json", str(out), "--quiet"]) == 0
    assert not md.exists()  # a run writes no markdown: the render step does
    assert main(["--render", str(out), "--markdown", str(md)]) == 0
    env = json.loads(out.read_text())["environment"]
    assert taken == [0, 1]
    assert env["cpu_reference"]["alone_ms"] == 70.0 and env["cpu_reference_end"]["alone_ms"] == 55.0
    assert len(env["loadavg_end"]) == 3
    assert ("70.0 ms alone, 80.0 ms with one copy on each of the 2 cores (1.14x), taken before the "
            "run (after it: 55.0 ms alone, 65.0 ms on all cores)") in md.read_text()


def test_a_failing_reference_after_the_run_keeps_the_run(tmp_path, monkeypatch, capsys):
    import json

    from approxdist.bench import cpu_reference
    from approxdist.bench.comm import main

    calls = []

    def flaky_measure(reps=10, timeout=300.0):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the CPU reference worker was not ready within 300 s")
        return {"workload": "w", "reps": reps, "cores": 2, "alone_ms": 70.0, "all_cores_ms": 80.0,
                "per_core_ms": [80.0, 80.0], "slowdown": 80.0 / 70.0}

    monkeypatch.setattr(cpu_reference, "measure", flaky_measure)
    out = tmp_path / "run.json"
    assert main(["--models", "tiny", "--hooks", "allreduce", "--steps", "1", "--repeats", "1",
                 "--warmup", "1", "--json", str(out), "--quiet"]) == 0
    saved = json.loads(out.read_text())
    assert "cpu_reference_end" not in saved["environment"] and saved["summary"][0]["hook"] == "allreduce"
    assert "the CPU reference after the run failed (the CPU reference worker was not ready" in \
        capsys.readouterr().err
