"""The two forms of the QTRADES consistency term on digits, from a barely trained ClusTR model.

    python benchmarks/consistency_forms.py [--start_epochs=3] [--epochs=25] [--seeds=0,1,2]

trains ClusTR on the embedded digits for `--start_epochs` (`training/main.py` defaults
otherwise: Adam 1e-4, K=2), then fine-tunes it with `--consistency_lambda=8` for `--epochs`
under each form of the term, for each seed:

    official   the paper's: cross-entropy between the clean soft-kNC probabilities and
               softmax(S(x')), S the raw scores (bounded)
    kl         TRADES-style KL(p(x) || p(x')) between soft-kNC probabilities (unbounded)

and saves the clean test accuracy of the start and of every fine-tuned run (with each
command and its CPU seconds) to benchmarks/results/consistency_forms.json; the last line of
output is that JSON. Runs live in `--runs_dir` (default runs/consistency_forms); a finished
run (metrics.json) is not trained again.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import machine  # noqa: E402
FORMS = ("official", "kl")


def _train(argv, run):
    command = [*argv, f"--model_dir={run}"]
    if not os.path.exists(os.path.join(ROOT, run, "metrics.json")):
        subprocess.run([sys.executable, os.path.join(ROOT, "training", "main.py"), *command], cwd=ROOT, check=True)
    with open(os.path.join(ROOT, run, "metrics.json")) as fh:
        metrics = json.load(fh)
    return {"command": "python training/main.py " + " ".join(command), "clean_accuracy": metrics["clean_accuracy"],
            "nearest_center_accuracy": metrics["nearest_center_accuracy"],
            "train_cpu_seconds": metrics["train_cpu_seconds"]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--start_epochs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--runs_dir", default=os.path.join("runs", "consistency_forms"))
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "consistency_forms.json"))
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    start_run = os.path.join(args.runs_dir, f"clustr_{args.start_epochs}_epochs")
    start = _train([f"--epochs={args.start_epochs}"], start_run)
    runs = {form: [] for form in FORMS}
    for form in FORMS:
        for seed in seeds:
            runs[form].append({"seed": seed, **_train(
                ["--consistency_lambda=8", f"--consistency={form}", f"--seed={seed}", f"--epochs={args.epochs}",
                 f"--init_checkpoint={start_run}"], os.path.join(args.runs_dir, f"{form}_seed{seed}"))})
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "dataset": "digits",
        "start_epochs": args.start_epochs,
        "epochs": args.epochs,
        "start": start,
        "runs": runs,
        "clean_accuracy": {form: [r["clean_accuracy"] for r in runs[form]] for form in FORMS},
        "machine": machine.describe("cpus", "processor"),
        "command": f"python benchmarks/consistency_forms.py --start_epochs={args.start_epochs} --epochs={args.epochs} "
                   f"--seeds={args.seeds}",
    }
    machine.save(args.out, result)
    print(json.dumps(result))


if __name__ == "__main__":
    machine.exit_on_sigterm()  # a `kill` stops the training it runs too
    main()
