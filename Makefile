# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# The CPU wheel of torch is pinned and installed first: plain PyPI's torch==2.13.0 is the multi-GB CUDA
# build. torch==2.13.0+cpu comes from what pip is already given (a local mirror, find-links), else
# from TORCH_INDEX, PyTorch's CPU index (where PyTorch has no +cpu wheel, e.g. macOS: plain 2.13.0).
VENV ?= .venv
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
PY := $(VENV)/bin/python
STAMP := $(VENV)/.storm-installed

.PHONY: install test test-slow demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0+cpu 2>/dev/null \
		|| $(PY) -m pip install -q torch==2.13.0 --extra-index-url $(TORCH_INDEX)
	$(PY) -m pip install -q -e '.[dev,web]'
	# lmms-eval's own API for the plugin's tests, without its dependencies (they would replace torch)
	-$(PY) -m pip install -q --no-deps lmms-eval==0.7.3 loguru
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

demo: $(STAMP)
	$(VENV)/bin/storm-vlm demo --output runs/demo

bench: $(STAMP)
	$(PY) benchmarks/scan.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
