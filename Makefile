# The two README commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON3 ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo replicate curate-demo test test-fast bench clean

$(STAMP): requirements.txt setup.py
	test -x $(PY) || $(PYTHON3) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) tools/run_demo.py --config config/demo.json --out checkpoints/demo

replicate: setup
	$(PY) tools/run_demo.py --config config/replicate.json --out checkpoints/replicate --train 16000

curate-demo: setup
	$(PY) tools/run_curate_demo.py --config config/demo.json --out checkpoints/curate_demo

test: setup
	$(PY) -m pytest -q -ra tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf checkpoints/demo checkpoints/replicate checkpoints/curate_demo
