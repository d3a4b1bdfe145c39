"""The project's virtualenv interpreter as Bazel's Python toolchain.

Bazel's native py_binary/py_test run on the interpreter of the registered Python
toolchain. `venv_python` generates that toolchain with the absolute path of the
project's virtualenv interpreter: $CLUSTR_PYTHON when set (`make bazel-test` sets it),
else `.venv/bin/python` next to WORKSPACE. Third-party packages (TensorFlow, Keras, ...)
come from that virtualenv: `make venv` installs them from requirements.txt.
"""

_BUILD = """\
load("@bazel_tools//tools/python:toolchain.bzl", "py_runtime_pair")

py_runtime(
    name = "py3_runtime",
    interpreter_path = "{python}",
    python_version = "PY3",
    stub_shebang = "#!{python}",
)

py_runtime_pair(
    name = "runtime_pair",
    py3_runtime = ":py3_runtime",
)

toolchain(
    name = "toolchain",
    toolchain = ":runtime_pair",
    toolchain_type = "@bazel_tools//tools/python:toolchain_type",
)
"""

def _venv_python_impl(rctx):
    python = rctx.os.environ.get("CLUSTR_PYTHON", "")
    if not python:
        python = "%s/.venv/bin/python" % rctx.path(Label("//:WORKSPACE")).dirname
    if not python.startswith("/"):
        fail("CLUSTR_PYTHON must be an absolute path to a Python interpreter. Received: %s" % python)
    if not rctx.path(python).exists:
        fail(("No Python interpreter at %s. Create the project's virtualenv first (`make venv`), " +
              "or set CLUSTR_PYTHON to an interpreter that has requirements.txt installed.") % python)
    result = rctx.execute([python, "-c", "import sys; print(sys.version_info[0])"])
    if result.return_code != 0 or result.stdout.strip() != "3":
        fail("%s does not run as a Python 3 interpreter: %s" % (python, result.stderr))
    rctx.file("WORKSPACE", "workspace(name = \"%s\")\n" % rctx.name)
    rctx.file("BUILD.bazel", _BUILD.format(python = python))

venv_python = repository_rule(
    implementation = _venv_python_impl,
    environ = ["CLUSTR_PYTHON"],
    local = True,
)
