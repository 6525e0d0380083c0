"""experiments/tools/testbed_targets.py: issue #6's 2-node 1gbit resnet18 targets, run by run, from
`approxdist-bench comm` JSON files (made up here: it reads, it runs nothing)."""
import importlib.util
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "experiments", "tools", "testbed_targets.py")


def _module():
    spec = importlib.util.spec_from_file_location("testbed_targets", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(hook, step, of_limit=1.3, payload=None, analytic=None, nodes=2, rate="1gbit", model="resnet18"):
    row = {"nodes": nodes, "rate": rate, "model": model, "hook": hook, "step_s": step, "of_limit": of_limit,
           "kind": "sparse" if hook.startswith("sparse") else hook.split("+")[0]}
    if payload is not None:
        row.update(payload_bytes=payload, analytic_bytes=analytic)
    return row


def _run_data(s33=0.17, overlap=0.14, overlap_limit=1.14, s05=0.24, f16=0.25, analytic=100, ref=61.0,
              ref_end=None):
    env = {"date": "2026-12-02 14:03 UTC", "commit": "abc1234",
           "cpu_reference": {"alone_ms": ref} if ref else None}
    if ref_end:
        env["cpu_reference_end"] = {"alone_ms": ref_end}
    return {"environment": env,
            "plan": {"configs": [{"model": "resnet18", "hook": h, "bucket_mb": 5.0}
                                 for h in ("allreduce", "sparse0.33", "powersgd1")]
                     + [{"model": "resnet18", "hook": "powersgd1", "bucket_mb": 1024}]},
            "summary": [_row("allreduce", 0.44, 1.18), _row("sparse0.33", s33, 1.40, 100, analytic),
                        _row("sparse0.33+overlap", overlap, overlap_limit, 100, analytic),
                        _row("sparse0.5", s05, 1.3, 150, 150), _row("fp16", f16),
                        _row("sparse0.33", 0.05, 1.0, 7, 7, nodes=4),  # other rows do not count
                        _row("allreduce", 9.9, model="resnet50")]}


def test_verdicts_read_the_run_and_check_every_target():
    mod = _module()
    v = mod.verdicts(_run_data())
    assert v["date"] == "2026-12-02 14:03 UTC" and v["commit"] == "abc1234" and v["cpu_reference_ms"] == 61.0
    assert v["bucket_mb"] == 5.0  # PowerSGD's single bucket is not the run's bucket size
    assert abs(v["sparse033_x"] - 0.44 / 0.17) < 1e-12 and abs(v["overlap_x"] - 0.44 / 0.14) < 1e-12
    assert v["overlap_of_limit"] == 1.14 and v["bytes_at_minimum"] is True
    assert v["sparse05_plain_s"] == 0.24 and v["fp16_plain_s"] == 0.25 and "sparse05_overlap_s" not in v
    text = mod.table([("a.json", v)])
    row = text.splitlines()[2]
    assert row.split("|")[2].strip() == "61.0"  # no reference after this run
    assert "| yes / yes |" in row and "| 1.40 / 1.14 | yes |" in row and row.endswith("| yes | yes |")
    assert "sparse 0.33 >= 2.5x plain in 1, with the overlap in 1 of 1; within 15% of its limit" in text
    assert "in 1;" in text and "in 1 of 1." in text


def test_a_run_that_misses_the_targets_says_no():
    mod = _module()
    v = mod.verdicts(_run_data(s33=0.19, overlap=0.16, overlap_limit=1.16, s05=0.26, analytic=99, ref=None))
    row = mod.table([("b.json", v)]).splitlines()[2]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "-"  # no CPU reference in this run
    assert cells[6:9] == ["no / yes", "1.40 / 1.16", "no"]
    assert cells[10:] == ["no", "no"]  # sparse 0.5 slower than fp16; payload above the minimum


def test_the_reference_after_the_run_sits_beside_the_one_before():
    mod = _module()
    v = mod.verdicts(_run_data(ref=61.0, ref_end=48.25))
    assert v["cpu_reference_end_ms"] == 48.25
    text = mod.table([("c.json", v)])
    assert "| CPU ref ms (before / after) |" in text.splitlines()[0]
    assert text.splitlines()[2].split("|")[2].strip() == "61.0 / 48.2"


def test_a_run_without_the_rows_is_skipped(tmp_path):
    mod = _module()
    assert mod.verdicts({"summary": [_row("allreduce", 0.44)]}) is None
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(_run_data()))
    bad.write_text(json.dumps({"summary": []}))
    r = subprocess.run([sys.executable, TOOL, str(bad), str(good)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "(good.json)" in r.stdout and f"skipped {bad}" in r.stderr
    r = subprocess.run([sys.executable, TOOL, str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and not r.stdout
    r = subprocess.run([sys.executable, TOOL, str(tmp_path / "missing.json")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "files: cannot read" in r.stderr


def test_every_saved_testbed_run_reads_and_sends_the_analytic_payload():
    """The JSON files in docs/ and experiments/runs/ as the bench wrote them: the format the tool reads has not
    drifted, and every saved run's sparse rows sent exactly their analytic bytes."""
    import glob

    mod = _module()
    files = sorted(glob.glob(os.path.join(REPO, "docs", "comm_testbed*.json"))
                   + glob.glob(os.path.join(REPO, "experiments", "runs", "comm_testbed*.json")))
    assert files
    read = 0
    for f in files:
        with open(f) as fh:
            v = mod.verdicts(json.load(fh))
        if v is None:  # runs without the 2-node 1gbit resnet18 rows (4-node ones)
            continue
        read += 1
        assert v["bytes_at_minimum"] is True, f
        assert v["allreduce_s"] > v["sparse033_s"] > 0, f
        assert v["date"] and v["commit"], f
    assert read >= 10
