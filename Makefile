# The two commands a newcomer needs: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
TORCH   ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test test-slow bench clean

install: $(STAMP)

$(STAMP): setup.py
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip setuptools wheel
	$(VPY) -c "import torch, torchvision" 2>/dev/null || $(VPY) -m pip install -q $(TORCH)
	$(VPY) -m pip install -q --no-build-isolation -e ".[dev]"
	touch $(STAMP)

demo: install
	$(VPY) -m approxdist.demo

test: install
	$(VPY) -m pytest -q tests

test-slow: install
	$(VPY) -m pytest -q -m slow tests

bench: install
	$(VENV)/bin/approxdist-bench compute

clean:
	rm -rf $(VENV) build *.egg-info
