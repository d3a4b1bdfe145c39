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
way (`fail`) before it imports TensorFlow or writes anything. `--help` prints the flags and
exits with status 0.

`Heartbeat` keeps a long phase from being silent: while it runs, the phase's status is
printed again at least every 10 s. This module imports no TensorFlow.
"""

import logging
import os
import sys
import threading
import time

from absl import app
from absl import flags
from absl import logging as absl_logging


def program():
    """The command's name as the user typed it (`main.py`, `clustr-train`)."""
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "clustr"


def fail(message, status=2):
    """Exits with `<command>: error: <message>` on one line (status 2: a bad flag or input;
    1: something that cannot be had, such as data or a server)."""
    sys.stderr.write(f"{program()}: error: {' '.join(str(message).split())}\n")
    sys.exit(status)


def parse_flags(argv, rewrite=None, flag_values=None):
    """absl's flag parsing (of `flag_values`, default absl's FLAGS) with one error line and
    exit status 2 (absl's own: a FATAL banner and status 1). `rewrite(argv)` may first
    rewrite former spellings of flags."""
    argv = rewrite(argv) if rewrite else argv
    try:
        return (flags.FLAGS if flag_values is None else flag_values)(argv)
    except flags.Error as e:
        fail(str(e), 2)
    except SystemExit as e:  # absl's --help prints the usage, then exits with status 1
        if e.code == 1 and any(a.split("=")[0] in _HELP for a in argv[1:]):
            sys.exit(0)
        raise


_HELP = ("-?", "-h", "--help", "--helpshort", "--helpfull", "--helpxml")


def _not_tensorflow_info(record):
    """False for TensorFlow's own INFO records (e.g. one per checkpoint save: "Sharding
    callback duration"); warnings and errors, and the library's INFO lines, pass."""
    return record.levelno > logging.INFO or f"{os.sep}tensorflow{os.sep}" not in (record.pathname or "")


def start(main, define_flags, module_name, rewrite=None):
    """Defines the flags, makes them the command's `--help`, and runs `main` (absl) on the
    flags `parse_flags` parsed; TensorFlow's own INFO log lines are left out."""
    define_flags()
    for flag in flags.FLAGS.get_key_flags_for_module(module_name):  # listed by --help
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    absl_logging.get_absl_handler().addFilter(_not_tensorflow_info)
    app.run(main, flags_parser=lambda argv: parse_flags(argv, rewrite))


class Heartbeat:
    """Prints what a long phase is doing at least every `interval` seconds.

    The work reports its state with `status(text)` (e.g. which attack, at which radius,
    how many images are done) and prints its own lines with `say(line)`; a background
    thread prints `  ... <status> (<seconds> s)` whenever `interval` seconds passed without a
    line, so a phase that runs for minutes in one call is never silent.

        with cli.Heartbeat() as beat:
            beat.status("l_inf PGD eps 8/255: 0/1000 images")
            ...
            beat.say("[1/12] l_inf PGD eps 8/255: 41.0% robust")
    """

    def __init__(self, interval=10.0, stream=None):
        self.interval = interval
        self._stream = stream
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._status, self._since, self._last = None, time.time(), time.time()
        self._thread = None

    def status(self, text):
        with self._lock:
            if text != self._status:
                self._since = time.time()
            self._status = text

    def say(self, line):
        with self._lock:
            self._write(line)

    def _write(self, line):
        stream = self._stream or sys.stdout
        stream.write(line + "\n")
        stream.flush()
        self._last = time.time()

    def _beat(self):
        while not self._stop.wait(max(0.05, self.interval - (time.time() - self._last))):
            with self._lock:
                now = time.time()
                if self._status and now - self._last >= self.interval:
                    self._write(f"  ... {self._status} ({now - self._since:.0f} s)")

    def __enter__(self):
        self._last = time.time()
        self._thread = threading.Thread(target=self._beat, name="clustr-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False
