"""Measures the default run: `python training/main.py` with no flags (digits), and the same
run in bfloat16 (`--mixed_precision=bfloat16`).

Runs the training binary in a fresh process, as `make train` does, and records its wall
time (process start to exit, TensorFlow import included) and the test metrics it wrote.
The bfloat16 run is the evidence for README's "the default digits run reaches the same test
accuracy in bfloat16 as in float32" (within 1 point).

    python benchmarks/default_run.py [--update_readme]

Saves benchmarks/results/default_run.json and prints it as one JSON object on the last
line. With --update_readme, then rewrites README.md's results blocks (update_readme.py).
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT = os.path.join(ROOT, "benchmarks", "results", "default_run.json")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import machine  # noqa: E402


def _children_cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(flags=()):
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = os.path.join(tmp, "run")
        command = [sys.executable, os.path.join("training", "main.py"), *flags, f"--model_dir={run_dir}"]
        start, cpu = time.time(), _children_cpu()
        subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        wall, cpu = time.time() - start, _children_cpu() - cpu
        with open(os.path.join(run_dir, "metrics.json")) as fh:
            metrics = json.load(fh)
    return {
        "command": " ".join(["python training/main.py", *flags]),
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(cpu, 1),
        "clean_accuracy": metrics["clean_accuracy"],
        "nearest_center_accuracy": metrics["nearest_center_accuracy"],
        "agreement": metrics["agreement"],
        "num_test_examples": metrics["num_examples"],
        "epochs": metrics["epochs"],
        "machine": machine.describe("cpus", "processor", "python"),
        "date": time.strftime("%Y-%m-%d"),
    }


def main():
    result = measure()
    result["bfloat16"] = measure(["--mixed_precision=bfloat16"])
    result["bfloat16"]["within_1_point_of_float32"] = bool(
        result["bfloat16"]["clean_accuracy"] >= result["clean_accuracy"] - 0.01)
    machine.save(RESULT, result)
    if "--update_readme" in sys.argv[1:]:
        import update_readme  # pylint: disable=g-import-not-at-top

        update_readme.main()
    print(json.dumps(result))


if __name__ == "__main__":
    machine.exit_on_sigterm()  # a `kill` stops the training it runs too
    main()
