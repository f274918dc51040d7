# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# The CPU wheel of torch is pinned and installed first: an unpinned `torch` would pull a multi-GB CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.storm-installed

.PHONY: install test test-slow demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,web]'
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
