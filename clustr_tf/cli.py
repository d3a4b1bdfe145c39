"""How the binaries start when installed with pip: the console commands `clustr-train`,
`clustr-evaluate` and `clustr-export` (pyproject.toml) call

    cli.start(main, define_flags, __name__)

which defines the binary's flags, lists them under `--help` as the command's own, and runs
`main` with absl. (Run as scripts, `python training/main.py` and the others put the
repository root on `sys.path` first and do the same in their `__main__` block.)
"""

import sys

from absl import app
from absl import flags


def start(main, define_flags, module_name, flags_parser=None):
    """Defines the flags, makes them the command's `--help`, and runs `main` (absl; with
    `flags_parser(argv)` in place of absl's parser when given)."""
    define_flags()
    for flag in flags.FLAGS.get_key_flags_for_module(module_name):  # listed by --help
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    app.run(main, **({"flags_parser": flags_parser} if flags_parser else {}))
