"""How the binaries start: `training/main.py`, `training/evaluate.py`,
`export/export_model.py` and `export/client.py`, run as scripts or as the console commands
`clustr-train`, `clustr-evaluate`, `clustr-export` and `clustr-client` (pyproject.toml).

Each entry point sets CLUSTR_TF_DEFER_IMPORTS=1 before it imports the library (so
`import clustr_tf` loads no TensorFlow: see `clustr_tf/__init__.py`), then calls

    cli.start(main, define_flags, __name__)

which defines the binary's flags, lists them under `--help` as the command's own, parses
them with `parse_flags` and runs `main` with absl. A flag that does not parse is one line,
`<command>: error: <what was wrong and what was received, with the nearest flag name for a
typo>`, and exit status 2, before TensorFlow is imported; `main` checks the values the same
way (`fail`) before it imports TensorFlow or writes anything. This module imports no
TensorFlow.
"""

import os
import sys

from absl import app
from absl import flags


def program():
    """The command's name as the user typed it (`main.py`, `clustr-train`)."""
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "clustr"


def fail(message, status=2):
    """Exits with `<command>: error: <message>` on one line (status 2: a bad flag or input;
    1: something that cannot be had, such as data or a server)."""
    sys.stderr.write(f"{program()}: error: {' '.join(str(message).split())}\n")
    sys.exit(status)


def parse_flags(argv, rewrite=None):
    """absl's flag parsing with one error line and exit status 2 (absl's own: a FATAL
    banner and status 1). `rewrite(argv)` may first rewrite former spellings of flags."""
    argv = rewrite(argv) if rewrite else argv
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(str(e), 2)


def start(main, define_flags, module_name, rewrite=None):
    """Defines the flags, makes them the command's `--help`, and runs `main` (absl) on the
    flags `parse_flags` parsed."""
    define_flags()
    for flag in flags.FLAGS.get_key_flags_for_module(module_name):  # listed by --help
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    app.run(main, flags_parser=lambda argv: parse_flags(argv, rewrite))
