"""The wheel ships the kernel sources, so a `pip install` user gets the compiled kernels.

Without csrc/ inside the package the loader finds no sources and every pack/unpack takes
the pure-PyTorch path (about 15x slower on resnet50). This builds the wheel as a user
would, installs it outside the checkout and asks the installed package for its backend.
"""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What the build reads; a copy keeps build/ and *.egg-info out of the checkout.
BUILD_INPUTS = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "approxdist", "csrc")


@pytest.mark.slow
def test_wheel_ships_kernel_sources_and_builds_them(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)

    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    str(src), "-w", str(wheels)], check=True)
    (wheel,) = wheels.glob("approxdist-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("pack.cpp", "pack_plan.h", "pack_cuda.cu", "pack_kernel.cuh"):
        assert f"approxdist/kernels/csrc/{f}" in names

    # Installed into a directory of its own (torch comes from this interpreter's
    # environment), run from outside the checkout, with an empty kernels cache; the C++ CPU
    # build only (a GPU would add minutes of nvcc for the same question).
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    str(wheel)], check=True)
    env = dict(os.environ, PYTHONPATH=str(target), APPROXDIST_CACHE_DIR=str(tmp_path / "cache"),
               CUDA_VISIBLE_DEVICES="")
    env.pop("APPROXDIST_KERNELS", None)
    code = ("import approxdist, approxdist.kernels as k; "
            "print(approxdist.__file__); print(k.loader.sources_dir()); print(k.backend())")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr
    module_file, sources, backend = run.stdout.strip().splitlines()[-3:]
    assert Path(module_file).resolve().is_relative_to(target.resolve()), module_file
    assert Path(sources) == target.resolve() / "approxdist" / "kernels" / "csrc"
    assert backend == "cpp", run.stderr
