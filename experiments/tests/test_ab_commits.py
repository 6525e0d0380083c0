"""experiments/tools/ab_commits.py: times the exact model and the sampled ones of two commits side by
side, the base commit's package imported under its own name."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "experiments", "tools", "ab_commits.py")


def _run(*args):
    return subprocess.run([sys.executable, TOOL, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_the_run_times_three_models_against_a_base_commit(tmp_path):
    out = tmp_path / "ab.json"
    r = _run("--base", "HEAD", "--reps", "1", "--batch", "2", "--ratio", "0.33", "--json", str(out))
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert result["base"] == "HEAD" and result["ratio"] == 0.33 and result["batch"] == 2
    assert set(result["ms"]) == {"exact", "base", "this"}
    for times in result["ms"].values():
        assert 0 < times["forward_ms"] < times["step_ms"]
    assert r.stdout.count("forward+backward") == 3


def test_bad_flags_are_named():
    for args, flag in ((["--base", "no-such-rev"], "--base"), (["--base", "HEAD", "--ratio", "0"], "--ratio"),
                       (["--base", "HEAD", "--reps", "0"], "--reps")):
        r = _run(*args)
        assert r.returncode == 2 and flag in r.stderr, r.stderr
