"""experiments/tools/step_faults.py: two gloo ranks on loopback, faults and CPU per step as JSON lines."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "experiments", "tools", "step_faults.py")


def _run(*args, env=None):
    run_env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   **(env or {}))
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env=run_env)


def test_one_line_per_hook_with_per_step_figures():
    proc = _run("--model", "tiny", "--hooks", "sparse0.5+overlap,fp16", "--steps", "3", "--batch", "4",
                "--image-size", "8", env={"MALLOC_MMAP_THRESHOLD_": "4294967296"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["hook"] for r in lines] == ["sparse0.5+overlap", "fp16"]  # rank 0 only
    for r in lines:
        assert r["model"] == "tiny" and r["steps"] == 3 and r["glibc_keeps_memory"] is True
        assert r["minor_faults_per_step"] >= 0 and r["major_faults_per_step"] >= 0
        assert r["user_ms_per_step"] + r["sys_ms_per_step"] > 0 and r["wall_ms_per_step"] > 0


def test_bad_arguments_name_the_flag():
    for args, msg in ((["--hooks", "sparse2"], "hook must be"), (["--model", "nope"], "model must be"),
                      (["--steps", "0"], "--steps must be >= 1")):
        proc = _run(*args)
        assert proc.returncode == 2 and msg in proc.stderr, proc.stderr
