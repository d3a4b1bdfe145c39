"""Measures the default run: `python training/main.py` with no flags (digits).

Runs the training binary in a fresh process, as `make train` does, and records its wall
time (process start to exit, TensorFlow import included) and the test metrics it wrote.

    python benchmarks/default_run.py [--update_readme]

Saves benchmarks/results/default_run.json and prints it as one JSON object on the last
line. With --update_readme, rewrites the results block of README.md from that file.
"""

import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT = os.path.join(ROOT, "benchmarks", "results", "default_run.json")
MARKER = "<!-- default-run-results -->"


def measure():
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = os.path.join(tmp, "run")
        command = [sys.executable, os.path.join("training", "main.py"), f"--model_dir={run_dir}"]
        start = time.time()
        subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        wall = time.time() - start
        with open(os.path.join(run_dir, "metrics.json")) as fh:
            metrics = json.load(fh)
    return {
        "command": "python training/main.py",
        "wall_seconds": round(wall, 1),
        "clean_accuracy": metrics["clean_accuracy"],
        "nearest_center_accuracy": metrics["nearest_center_accuracy"],
        "agreement": metrics["agreement"],
        "num_test_examples": metrics["num_examples"],
        "epochs": metrics["epochs"],
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
        },
        "date": time.strftime("%Y-%m-%d"),
    }


def readme_block(result):
    return "\n".join(
        [
            MARKER,
            "| command | wall time | test accuracy (soft kNC) | test accuracy (nearest center) |",
            "|---|---|---|---|",
            f"| `{result['command']}` | {result['wall_seconds']:.0f} s on {result['machine']['cpus']} "
            f"CPU cores | {100 * result['clean_accuracy']:.1f}% | "
            f"{100 * result['nearest_center_accuracy']:.1f}% |",
            "<!-- end default-run-results -->",
        ]
    )


def update_readme(result):
    path = os.path.join(ROOT, "README.md")
    with open(path) as fh:
        text = fh.read()
    start = text.index(MARKER)
    end_marker = "<!-- end default-run-results -->"
    end = text.index(end_marker, start) + len(end_marker) if end_marker in text else start + len(MARKER)
    with open(path, "w") as fh:
        fh.write(text[:start] + readme_block(result) + text[end:])


def main():
    result = measure()
    os.makedirs(os.path.dirname(RESULT), exist_ok=True)
    with open(RESULT, "w") as fh:
        json.dump(result, fh, indent=2)
    if "--update_readme" in sys.argv[1:]:
        update_readme(result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
