# Every target sets up what it needs from a fresh clone (idempotent), then runs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# The CPU wheel lies on this machine's disk; installing it first keeps pip from
# resolving torch to a multi-GB CUDA build when the package's own range is checked.
TORCH  := torch==2.13.0

.PHONY: install test test-all demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q -n 2 --dist worksteal --durations=15 -m "not sweep_all"

# Everything, with the 49 extra diffusers classes of the model sweep (~4 more minutes).
test-all: install
	$(PY) -m pytest -q -n 2 --dist worksteal --durations=15

demo: install
	$(VENV)/bin/mixcache demo

bench: install
	$(PY) tools/bench_backend.py

clean:
	rm -rf $(VENV) out .pytest_cache
