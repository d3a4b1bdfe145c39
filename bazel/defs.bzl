"""Python rules for this project's BUILD files, in one place.

Bazel 4.2.3 (Debian's, used here) has the Python rules built in; a current Bazel takes them
from rules_python. Every BUILD file loads them from here, so moving to rules_python is a
change to this file only (see docs/building.md, "Building and testing with Bazel"):

    load("@rules_python//python:defs.bzl", _py_binary = "py_binary", ...)
"""

def py_library(**attrs):
    native.py_library(**attrs)

def py_binary(**attrs):
    native.py_binary(python_version = "PY3", **attrs)

def py_test(**attrs):
    native.py_test(python_version = "PY3", **attrs)

def pytest_test(name, src = None, deps = [], data = [], args = [], **attrs):
    """A py_test that runs one pytest file, as `make test` runs it.

    Args:
      name: the target's name; the test file is `<name>.py` unless `src` is given.
      src: the pytest file.
      deps: libraries the test imports.
      data: files and binaries the test reads or runs (a py_binary brings its runfiles).
        pytest.ini and tests/conftest.py are added, and requirements.txt: the third-party packages come from the
        virtualenv, outside Bazel, so a test result is cached only as long as the
        requirements the virtualenv was made from are the same.
      args: more pytest arguments.
      **attrs: passed to py_test (size, timeout, tags, ...).
    """
    src = src or name + ".py"
    py_test(
        name = name,
        srcs = ["//bazel:pytest_main.py", src],
        main = "//bazel:pytest_main.py",
        args = ["$(rootpath %s)" % src] + args,
        deps = deps,
        data = data + [f for f in ("//:pytest.ini", "//:requirements.txt", "//tests:conftest.py") if f not in data],
        **attrs
    )
