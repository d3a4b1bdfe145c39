"""The full robustness evaluation of a run, recorded for docs/evaluation.md.

    python benchmarks/robustness_eval.py --name=digits
    python benchmarks/robustness_eval.py --name=cifar10 --model_dir=runs/cifar10-resnet18-w025

`--name=digits` trains the default run (`python training/main.py`, the embedded digits)
into `runs/digits-default` unless it already holds a model; any other name evaluates an
existing `--model_dir` (for CIFAR-10, the run `benchmarks/cifar10_cpu_run.py` makes). Then
it runs

    python training/evaluate.py --model_dir=RUN [EXTRA FLAGS]

at the default, full settings (l_inf PGD at 2, 8, 16, 25.5 /255 and l2 at 0.5, step 2/255,
20 iterations, 10 restarts, the official, logits and margin losses; Square with 5000
queries and 5x the iterations at 8/255; eps 255/255) unless `--evaluate_flags` changes
them, and saves benchmarks/results/robustness_NAME.json: the command, its wall time and
the evaluation's results. The last line printed is that JSON.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import machine  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", default="digits", help="names the result file robustness_NAME.json")
    parser.add_argument("--model_dir", default=None, help="the run (default for digits: runs/digits-default)")
    parser.add_argument("--evaluate_flags", default="", help="extra flags for training/evaluate.py")
    args = parser.parse_args()
    model_dir = args.model_dir or os.path.join("runs", f"{args.name}-default")
    run_dir = os.path.join(ROOT, model_dir)
    train_command = None
    if not os.path.exists(os.path.join(run_dir, "model.keras")):
        if args.name != "digits":
            sys.exit(f"robustness_eval.py: error: no model.keras in --model_dir. Received: {model_dir}")
        train = [sys.executable, os.path.join("training", "main.py"), f"--model_dir={model_dir}"]
        subprocess.run(train, cwd=ROOT, check=True)
        train_command = "python " + " ".join(train[1:])
    command = [sys.executable, os.path.join("training", "evaluate.py"), f"--model_dir={model_dir}",
               *shlex.split(args.evaluate_flags)]
    start = time.time()
    subprocess.run(command, cwd=ROOT, check=True)
    wall = time.time() - start
    with open(os.path.join(run_dir, "robustness.json")) as fh:
        evaluation = json.load(fh)
    with open(os.path.join(run_dir, "config.json")) as fh:
        run_config = json.load(fh)
    result = {
        "name": args.name,
        "date": time.strftime("%Y-%m-%d"),
        "run": {k: run_config.get(k) for k in ("dataset", "backbone", "width_multiplier", "epochs", "k", "L",
                                                 "eval_L", "consistency_lambda", "consistency", "xent_lambda")},
        "train_command": train_command,
        "command": "python " + " ".join(command[1:]),
        "wall_seconds": wall,
        "machine": machine.describe("cpus", "processor"),
        **{k: evaluation[k] for k in ("dataset", "num_examples", "neighbours", "clean_accuracy",
                                      "nearest_center_accuracy", "robust_accuracy", "robust_accuracy_pgd",
                                      "robust_accuracy_l2", "attacks", "stronger_attack", "gradient_free",
                                      "lipschitz_bound", "certified_accuracy", "median_certified_radius",
                                      "masking_checks")},
    }
    machine.save(os.path.join(ROOT, "benchmarks", "results", f"robustness_{args.name}.json"), result)
    print(json.dumps(result))


if __name__ == "__main__":
    machine.exit_on_sigterm()  # a `kill` stops the training it runs too
    main()
