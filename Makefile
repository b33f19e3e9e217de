# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel first, so nothing later pulls a CUDA build of torch.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m llmkit demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/decode.py
	$(PY) bench/pretrain.py
	$(PY) bench/data.py --mb 50 --peer-mb 2
	$(PY) bench/tokenizer.py
	$(PY) bench/adapt.py
	$(PY) bench/eval.py --n 40
	$(PY) bench/serve.py

clean:
	rm -rf $(VENV) build *.egg-info
