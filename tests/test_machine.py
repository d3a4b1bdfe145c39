"""benchmarks/machine.py: a benchmark stopped by SIGTERM stops the training it started."""

import glob
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

from absl.testing import absltest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")

# A benchmark in miniature: waits on a child process, as certified.py waits on training/main.py.
_PARENT = textwrap.dedent("""
    import subprocess, sys
    sys.path.insert(0, sys.argv[1])
    import machine
    if sys.argv[3] == "1":
        machine.exit_on_sigterm()
    subprocess.run(["sh", "-c", "echo $$ > " + sys.argv[2] + "; exec sleep 60"])
""")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class ExitOnSigtermTest(absltest.TestCase):
    def _stop_parent(self, tmp, handled):
        pid_file = os.path.join(tmp, "child.pid")
        parent = subprocess.Popen([sys.executable, "-c", _PARENT, BENCHMARKS, pid_file, "1" if handled else "0"])
        deadline = time.time() + 30
        while not (os.path.exists(pid_file) and open(pid_file).read().strip()):
            self.assertLess(time.time(), deadline, "the child never started")
            time.sleep(0.05)
        child = int(open(pid_file).read())
        parent.send_signal(signal.SIGTERM)
        return parent.wait(timeout=30), child

    def test_sigterm_ends_the_child_it_waits_on(self):
        with tempfile.TemporaryDirectory() as tmp:
            status, child = self._stop_parent(tmp, handled=True)
        self.assertEqual(status, 128 + signal.SIGTERM)
        deadline = time.time() + 10
        while _alive(child) and time.time() < deadline:
            time.sleep(0.05)
        self.assertFalse(_alive(child), "the child outlived the benchmark that started it")

    def test_without_it_the_child_outlives_the_benchmark(self):
        # What the helper is for: SIGTERM's default action leaves the child running.
        with tempfile.TemporaryDirectory() as tmp:
            status, child = self._stop_parent(tmp, handled=False)
            try:
                self.assertEqual(status, -signal.SIGTERM)
                self.assertTrue(_alive(child))
            finally:
                os.kill(child, signal.SIGKILL)

    def test_every_benchmark_that_starts_a_process_calls_it(self):
        for path in glob.glob(os.path.join(BENCHMARKS, "*.py")):
            if os.path.basename(path) == "update_readme.py":  # it starts only a flag-reading program
                continue
            source = open(path).read()
            if re.search(r"subprocess\.(run|Popen|call|check_call)\(", source) and "training/" in source:
                self.assertIn("machine.exit_on_sigterm()", source, os.path.basename(path))


if __name__ == "__main__":
    absltest.main()
