"""A bounded real run: ResNet-18 (reduced width) with ClusTR on CIFAR-10, on the CPU.

    python benchmarks/cifar10_cpu_run.py --data_dir=PATH/cifar10-jpeg.tar.gz

runs

    python training/main.py --dataset=cifar10 --data_dir=PATH --width_multiplier=0.25 \
        --epochs=8 --lr=1e-3 --model_dir=runs/cifar10-resnet18-w025

(about 20 minutes on 2 CPU cores: 19.6 min measured), and saves benchmarks/results/cifar10_cpu_run.json with
the command, wall time, peak resident memory, per-epoch test accuracies and the final
metrics; the last line printed is that JSON. `--collect` records a run that was already
started with the same command under `/usr/bin/time -v` (pass its stderr as --time_log).
"""

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT = os.path.join(ROOT, "benchmarks", "results", "cifar10_cpu_run.json")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import machine  # noqa: E402


def _command(args):
    return [
        sys.executable, os.path.join("training", "main.py"), "--dataset=cifar10",
        f"--data_dir={args.data_dir}", f"--width_multiplier={args.width_multiplier}",
        f"--epochs={args.epochs}", f"--lr={args.lr}", f"--model_dir={args.model_dir}",
    ]


def _from_time_log(path):
    """Wall seconds and peak RSS (MiB) from `/usr/bin/time -v` output."""
    wall = rss = None
    with open(path, errors="replace") as fh:
        for line in fh:
            line = line.strip()
            if line.startswith("Elapsed (wall clock) time"):
                parts = [float(p) for p in line.rsplit(" ", 1)[1].split(":")]
                wall = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
            elif line.startswith("Maximum resident set size"):
                rss = int(line.rsplit(" ", 1)[1]) / 1024
    return wall, rss


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_dir", default=os.path.join(ROOT, "..", "shared", "data", "cifar10-jpeg.tar.gz"))
    parser.add_argument("--width_multiplier", type=float, default=0.25)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--model_dir", default=os.path.join("runs", "cifar10-resnet18-w025"))
    parser.add_argument("--collect", action="store_true", help="record a finished run")
    parser.add_argument("--time_log", help="its /usr/bin/time -v output")
    args = parser.parse_args()
    command = _command(args)
    if args.collect:
        wall, rss = _from_time_log(args.time_log)
    else:
        start = time.time()
        subprocess.run(command, cwd=ROOT, check=True)
        wall = time.time() - start
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    run_dir = os.path.join(ROOT, args.model_dir)
    with open(os.path.join(run_dir, "metrics.json")) as fh:
        metrics = json.load(fh)
    with open(os.path.join(run_dir, "training_log.csv")) as fh:
        epochs = [
            {k: float(r[k]) for k in ("epoch", "val_accuracy", "val_nearest_center_accuracy", "magnet_loss", "seconds")}
            for r in csv.DictReader(fh)
        ]
    result = {
        "command": "python " + " ".join(command[1:]),
        "data": "CIFAR-10 re-encoded as JPEG (cifar10-jpeg.tar.gz), not the original binary release",
        "wall_seconds": round(wall, 1),
        "peak_rss_mib": round(rss, 1) if rss else None,
        "clean_accuracy": metrics["clean_accuracy"],
        "nearest_center_accuracy": metrics["nearest_center_accuracy"],
        "agreement": metrics["agreement"],
        "num_test_examples": metrics["num_examples"],
        "epochs": epochs,
        "machine": machine.describe("cpus", "python"),
        "date": time.strftime("%Y-%m-%d"),
    }
    machine.save(RESULT, result)
    print(json.dumps(result))


if __name__ == "__main__":
    machine.exit_on_sigterm()  # a `kill` stops the training it runs too
    main()
