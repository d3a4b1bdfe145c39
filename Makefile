# Two commands do all the set-up on a fresh machine:
#   make train   virtualenv + requirements, then python training/main.py (digits)
#   make test    virtualenv + requirements, then the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
# Flags for training/main.py, e.g. make train ARGS="--dataset=cifar10 --data_dir=..."
ARGS ?=

.PHONY: train test venv clean

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

train: $(STAMP)
	$(PY) training/main.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) .pytest_cache
