"""One build step pyproject.toml cannot say: ship csrc/ inside the wheel.

The kernels are compiled on first use (approxdist/kernels/loader.py), from csrc/ of a
source checkout or, in an installed wheel, from the copy this step puts next to the
loader (approxdist/kernels/csrc). csrc/ itself stays at the repository top level; an
editable install reads it there, so nothing is copied in editable mode.
"""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

KERNEL_SOURCES = ("*.cpp", "*.h", "*.cu", "*.cuh")


class BuildPyWithKernelSources(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        src = Path(__file__).resolve().parent / "csrc"
        dst = Path(self.build_lib) / "approxdist" / "kernels" / "csrc"
        files = sorted(p for pattern in KERNEL_SOURCES for p in src.glob(pattern))
        if not any(p.name == "pack.cpp" for p in files):
            raise RuntimeError(f"kernel sources not found in {src} (an sdist without csrc/?)")
        dst.mkdir(parents=True, exist_ok=True)
        for path in files:
            shutil.copy2(path, dst / path.name)


setup(cmdclass={"build_py": BuildPyWithKernelSources})
