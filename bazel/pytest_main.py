"""Runs pytest files as one Bazel test: `pytest_main.py FILE... [PYTEST ARGS]`.

The `pytest_test` macro (defs.bzl) makes every tests/test_*.py a py_test whose main is this
file. It runs in the test's runfiles tree, where pytest.ini marks the root (so imports and
paths resolve as in the repository), and keeps every write inside Bazel's $TEST_TMPDIR:
HOME and the caches of Keras and matplotlib point there. It writes the JUnit XML Bazel asks
for, maps `bazel test --test_filter=EXPR` to `pytest -k EXPR`, and lists skipped tests with
their reasons in the test log.
"""

import os
import sys

import pytest


def main(argv):
    tmp = os.environ.get("TEST_TMPDIR")
    if tmp:
        home = os.path.join(tmp, "home")
        os.makedirs(home, exist_ok=True)
        os.environ["HOME"] = home
        os.environ["MPLCONFIGDIR"] = os.path.join(tmp, "matplotlib")
        os.environ["KERAS_HOME"] = os.path.join(tmp, "keras")
        os.environ["XDG_CACHE_HOME"] = os.path.join(tmp, "cache")
    args = list(argv) + ["-p", "no:cacheprovider", "-rs"]
    if os.environ.get("XML_OUTPUT_FILE"):
        args.append("--junitxml=" + os.environ["XML_OUTPUT_FILE"])
    if os.environ.get("TESTBRIDGE_TEST_ONLY"):
        args += ["-k", os.environ["TESTBRIDGE_TEST_ONLY"]]
    return pytest.main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
