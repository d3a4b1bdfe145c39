"""The binaries (`training/main.py`, `training/evaluate.py`, `export/export_model.py`) run in
the test's own process.

`run(script, *args)` does what `python script args` does (the binary's flags defined on a
fresh `FlagValues`, parsed by `cli.parse_flags` into one error line and status 2, then its
`main`), without the 5-10 s a new Python takes to import TensorFlow, and returns what
`subprocess.run(..., capture_output=True, text=True)` would: `returncode` (0, or the status of
the SystemExit), `stdout`, and `stderr` (what the binary wrote there, then its log lines).
A test that needs a real process (a signal, a missing package, the console entry points)
starts one itself.
"""

import contextlib
import importlib.util
import io
import logging
import os
import subprocess
import sys
from unittest import mock

from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = "training/main.py"
EVALUATE = "training/evaluate.py"
EXPORT = "export/export_model.py"
_MODULES = {}


def load(script):
    """The binary `script` (a path under the repository root) as a module, loaded once."""
    if script not in _MODULES:
        name = os.path.splitext(os.path.basename(script))[0]
        spec = importlib.util.spec_from_file_location(f"{name}_binary", os.path.join(ROOT, script))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MODULES[script] = module
    return _MODULES[script]


def parse(script, *args):
    """`args` parsed by the binary's flags on a fresh FlagValues, as the binary parses them;
    returns (the arguments left, the FlagValues). A bad flag exits (SystemExit 2)."""
    from clustr_tf import cli

    binary = load(script)
    flag_values = flags.FlagValues()
    binary.define_flags(flag_values)
    rewrite = binary.legacy_argv if script == MAIN else None
    return cli.parse_flags([os.path.basename(script), *args], rewrite, flag_values), flag_values


def run(script, *args):
    """Runs the binary on `args` in this process; a `subprocess.CompletedProcess`."""
    # ART's first import (the Square attack's) runs logging.config.dictConfig, which closes the
    # stream of every logging handler there is unless it is the sys.stderr of the moment: under
    # the redirection below that would close absl's handler's stream (pytest's capture).
    import art  # noqa: F401

    name = os.path.basename(script)
    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(message)s"))
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.INFO)
    logging.getLogger().addHandler(handler)
    status = 0
    try:
        with mock.patch.object(sys, "argv", [name, *args]), contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            try:
                load(script).main(*parse(script, *args))
            except SystemExit as e:
                status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        logging.getLogger().removeHandler(handler)
        absl_logger.setLevel(level)
    return subprocess.CompletedProcess([name, *args], status, out.getvalue(), err.getvalue())
