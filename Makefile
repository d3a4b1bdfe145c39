# Two commands do all the set-up on a fresh machine:
#   make train   virtualenv + requirements, then python training/main.py (digits)
#   make test    virtualenv + requirements, then the test suite
# and, with Debian's Bazel 4.2.3 installed (docs/building.md: "Building and testing with Bazel"):
#   make bazel-test   virtualenv + requirements, then bazel test //... offline on that virtualenv
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
# Flags for training/main.py, e.g. make train ARGS="--dataset=cifar10 --data_dir=..."
ARGS ?=
# pytest-xdist: one worker process per core, at most 4 (each imports TensorFlow: about 1.5 GiB),
# each idle worker taking tests from a busy one. Most of a test's time is Python tracing and
# building graphs on one core: on 2 cores 2 workers halve the suite (541 s -> 276 s, 2026-12-03).
# PYTEST_PARALLEL= runs it in one process.
PYTEST_PARALLEL ?= -n auto --maxprocesses=4 --dist=worksteal

BAZEL ?= bazel
BAZEL_INSTALL := apt-get install -y --no-install-recommends bazel-bootstrap bazel-rules-java

.PHONY: train test venv clean bazel-install bazel-check bazel-test bazel-smoke bazel-clean wheel

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

train: $(STAMP)
	$(PY) training/main.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_PARALLEL) tests

clean:
	rm -rf $(VENV) .pytest_cache

# Bazel 4.2.3 (Debian's bazel-bootstrap) and Debian's rules_java, which WORKSPACE points at.
# Installing them (as root, about 15 s and 150 MB; .ci/run does it where bazel is missing):
bazel-install:
	apt-get update
	$(BAZEL_INSTALL)

bazel-check:
	@command -v $(BAZEL) >/dev/null 2>&1 || { \
	  echo "make bazel-test: no '$(BAZEL)' on PATH. Install Debian's Bazel 4.2.3 (about 150 MB), as root:"; \
	  echo "    make bazel-install   # apt-get update, then $(BAZEL_INSTALL)"; exit 1; } >&2
	@test -f /usr/share/bazel/rules/java/WORKSPACE || { \
	  echo "make bazel-test: /usr/share/bazel/rules/java is missing (WORKSPACE needs Debian's rules_java). As root:"; \
	  echo "    make bazel-install   # apt-get update, then $(BAZEL_INSTALL)"; exit 1; } >&2
	@$(BAZEL) --version 2>/dev/null | grep -Eq '^bazel (no_version|4\.)' || \
	  echo "make bazel-test: warning: '$(BAZEL)' is not Bazel 4.x; this WORKSPACE is made for Debian's 4.2.3 (see docs/building.md)." >&2

# The Python toolchain is this virtualenv's interpreter (bazel/python.bzl).
BAZEL_PYTHON := --repo_env=CLUSTR_PYTHON=$(abspath $(PY))
bazel-test: $(STAMP) bazel-check
	$(BAZEL) test $(BAZEL_PYTHON) //...

# A quick check of the Bazel set-up (CI runs all of bazel-test): every target built, and the
# quick tests that exercise the toolchain, the pytest runner and packaging.
bazel-smoke: $(STAMP) bazel-check
	$(BAZEL) build $(BAZEL_PYTHON) //...
	$(BAZEL) test $(BAZEL_PYTHON) //tests:test_packaging //tests:test_update_readme

bazel-clean:
	-command -v $(BAZEL) >/dev/null 2>&1 && $(BAZEL) clean --expunge
	rm -rf .bazel

# A wheel of the pip package (pyproject.toml) in dist/, built offline with the virtualenv's setuptools.
wheel: $(STAMP)
	$(PY) -m pip wheel --no-deps --no-build-isolation --wheel-dir dist .
