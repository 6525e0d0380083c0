# The two commands a newcomer needs: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
TORCH   ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo demo-single lint test test-slow test-experiments bench horovod clean

install: $(STAMP)

# Re-runs only when the packaging files or the kernel sources change; the kernels build is
# cached (a machine without a compiler falls back to the pure-PyTorch path with one warning).
$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -c "import torch, torchvision" 2>/dev/null || $(VPY) -m pip install -q $(TORCH)
	# --no-build-isolation builds with the venv's own setuptools and wheel, which not every
	# torch brings along (torch 2.4.1 does not: "invalid command 'bdist_wheel'"); reading
	# pyproject.toml and an editable install need setuptools >= 64 (Python 3.9's venv has 58).
	$(VPY) -c "import sys, setuptools, wheel; sys.exit(int(setuptools.__version__.split('.')[0]) < 64)" \
		2>/dev/null || $(VPY) -m pip install -q "setuptools>=64" wheel
	$(VPY) -m pip install -q --no-build-isolation -e ".[dev]"
	$(VPY) -c "import approxdist.kernels as k; print('approxdist kernels backend:', k.build())"
	touch $(STAMP)

# The main job on its built-in default: 2 processes, digits CNN, sparse hook.
demo: install
	$(VENV)/bin/torchrun --standalone --nproc-per-node 2 -m approxdist.train.demo

# Single process: exact vs approximate layers side by side (no torch.distributed).
demo-single: install
	$(VPY) -m approxdist.demo

# Lint first (pyflakes and import order, configured in pyproject.toml): seconds, and a
# broken import fails here before the suite's ten minutes.
lint: install
	$(VPY) -m ruff check .

test: lint
	$(VPY) -m pytest -q tests

test-slow: install
	$(VPY) -m pytest -q -m slow tests

# The tests of the diagnostic tools in experiments/ (not the product; same pytest.ini markers).
test-experiments: install
	$(VPY) -m pytest -q experiments/tests

# Horovod 0.28.1 built against the venv's torch (about 5 minutes; the wheel is cached in
# ~/.cache/approxdist/horovod, so later runs and clean clones take seconds). Needs Open MPI
# for mpirun support: apt-get install -y openmpi-bin libopenmpi-dev. See docs/horovod.md.
horovod: install
	PYTHON=$(VPY) tools/build_horovod.sh

bench: install
	$(VENV)/bin/approxdist-bench compute

clean:
	rm -rf $(VENV) build *.egg-info
