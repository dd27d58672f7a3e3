# `make test` and `make demo` create .venv when missing and install into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sonosynth-installed
DEMO_OUT ?= runs/demo
PIP := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: install test test-unit demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q --upgrade pip
	# torch first and alone, so that nothing after it pulls the multi-GB CUDA build.
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"
	touch $@

test: $(STAMP)
	$(PY) -m pytest tests

test-unit: $(STAMP)
	$(PY) -m pytest tests/unit

demo: $(STAMP)
	$(VENV)/bin/sonosynth pipeline configs/demo.yaml --out $(DEMO_OUT)

bench: $(STAMP)
	$(PY) bench/reader_throughput.py
	$(PY) bench/lora_train_throughput.py
	$(PY) bench/generate_throughput.py
	$(PY) bench/nightly_rerun.py

clean:
	rm -rf $(VENV) runs .pytest_cache
