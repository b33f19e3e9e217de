# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install bench compat clean

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

# The training tests under another torch release, e.g. the GPU machine's 2.11 before a GPU run:
# `make compat TORCH=2.11.0` (a throwaway venv; PyPI's x86-64 torch is a CUDA build, about 5 GB).
TORCH ?= 2.11.0
COMPAT := /tmp/llmkit-torch-$(TORCH)
compat:
	test -x $(COMPAT)/bin/python || $(PYTHON) -m venv $(COMPAT)
	$(COMPAT)/bin/pip install -q torch==$(TORCH) pytest transformers tensorboard $$($(PYTHON) -c "import re, tomllib; \
	  d = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
	  print(' '.join(x for x in d if re.split('[<>=!~ ]', x)[0] != 'torch'))")
	PYTHONPATH=$(CURDIR) TORCH_EXTENSIONS_DIR=$(COMPAT)/ext $(COMPAT)/bin/python -m pytest -q -p no:logging tests/train

clean:
	rm -rf $(VENV) build *.egg-info
