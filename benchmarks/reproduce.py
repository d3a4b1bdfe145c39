"""The paper's comparison, every method under one training budget, on CIFAR-10 or digits.

    python benchmarks/reproduce.py [--dataset=cifar10] [--data_dir=PATH] [--width_multiplier=0.25]
    python benchmarks/reproduce.py --dataset=digits          # minutes: the whole story, small

trains each method on the same backbone, data, batch size (240) and optimizer (Adam,
constant rate), evaluates each with `training/evaluate.py` (PGD with the official, logits
and margin losses at 2, 8, 16 and 25.5 /255 and l2 0.5, 20 iterations, 10 restarts, the
per-example worst case; Square at 8/255 with `--square_queries`; 5x the iterations at
8/255; eps 255/255; the certificate) on `--num_examples` test images, and writes
benchmarks/results/reproduce.json (reproduce_digits.json for digits); its last line of
output is that JSON.

Methods (`--methods`, all by default):

    cross_entropy      a linear head, cross-entropy
    clustr             ClusTR (magnet loss, K=2, m=12, d=20) from scratch
    clustr_from_ce     ClusTR from the cross-entropy model (its backbone; clusters refreshed
                       on it before the first step), at the recipe's Adam 1e-4
    clustr_qtrades     ClusTR+QTRADES as the paper trains it: the official consistency term
                       (lambda 8, eps 8/255, step 10/255) from the cross-entropy model, Adam 1e-4
    clustr_qtrades_kl  ClusTR+QTRADES with a TRADES-style KL term (not the paper's):
                       CIFAR-10 from a half-trained ClusTR model (this table's earlier
                       ClusTR+QTRADES row), digits from the cross-entropy model
    pgd_at             Madry et al.: cross-entropy on PGD-7 inputs (eps 8/255, step 2/255)

The budget. On CIFAR-10 every method gets what 60 CPU-minutes of its training process
bought on the reference machine (the 2-core AMD EPYC of 2026-11-25, where the first table
was measured), as a fixed number of epochs, so that rows measured on different machines
compare: cross-entropy 20 epochs, ClusTR 17, PGD-7 14 of 70 steps; a method that starts
from another model counts that model's training: the cross-entropy model at half the
budget (its first 10 epochs, kept as its own run) plus 8 epochs of ClusTR or 4 of QTRADES
(what 30 CPU-minutes bought each), the KL variant 8 epochs of ClusTR plus 4 of QTRADES.
`--budget_minutes=B` instead gives every method B CPU-minutes on this machine
(`training/main.py --cpu_budget_minutes`, half of it to each of two stages). On digits the
methods follow the recipe's structure at the binary's defaults (40 epochs; the fine-tuned
methods 25 epochs from the 40-epoch cross-entropy model).

Every step resumes: a finished training (metrics.json) or evaluation (robustness.json made by
the same command) is skipped, a killed training continues from its checkpoint, and a stage
that continues another (cross-entropy's second half) starts from a copy of that run. Run it
again after an interruption. `--only=train|evaluate|collect` runs one stage; `--methods` a
subset. A method whose runs are not in `--runs_dir` keeps its row from the result file,
with the date and machine it was measured on.
"""

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import machine  # noqa: E402
RESULTS = os.path.join(ROOT, "benchmarks", "results")
# What a row records of the machine it was measured on (machine.describe).
MACHINE = ("cpus", "processor", "cpu_model")
METHODS = ("cross_entropy", "clustr", "clustr_from_ce", "clustr_qtrades", "clustr_qtrades_kl", "pgd_at")
LABELS = {
    "cross_entropy": "cross-entropy",
    "clustr": "ClusTR, from scratch",
    "clustr_from_ce": "ClusTR, from the cross-entropy model",
    "clustr_qtrades": "ClusTR+QTRADES, the paper's term, from the cross-entropy model",
    "clustr_qtrades_kl": "ClusTR+QTRADES, KL term (not the paper's)",
    "pgd_at": "PGD-AT (Madry)",
}
# Where each fine-tuned method starts, by dataset (the table's "from" column).
STARTS = {
    "cifar10": {"clustr_from_ce": "cross-entropy, 10 epochs", "clustr_qtrades": "cross-entropy, 10 epochs",
                "clustr_qtrades_kl": "ClusTR, 8 epochs"},
    "digits": {"clustr_from_ce": "cross-entropy, 40 epochs", "clustr_qtrades": "cross-entropy, 40 epochs",
               "clustr_qtrades_kl": "cross-entropy, 40 epochs"},
}
# PGD-7 epochs count 70 steps (a third of a pass): a full epoch costs about 13 CPU-minutes on
# the reference machine (8 forward-backward passes a batch), too coarse for a budget checked
# at epoch ends.
PGD_AT_EPOCH_STEPS = 70
QTRADES = ["--consistency_lambda=8", "--consistency_eps=8", "--consistency_step=10"]

# One training run: `init` starts it from another stage's model (--init_checkpoint),
# `continues` from a copy of another stage's run directory (the same training, longer).
# `epochs`: the fixed budget; `share`: its part of --budget_minutes in CPU-budget mode.
Stage = collections.namedtuple("Stage", "run argv epochs share init continues", defaults=(None, None))


def _stages(args):
    """{method: [Stage, ...]} for `args.dataset`, in training order."""
    if args.dataset == "cifar10":
        common = ["--dataset=cifar10", f"--data_dir={args.data_dir}", "--backbone=resnet18",
                  f"--width_multiplier={args.width_multiplier}", "--lr=1e-3", "--lr_milestones=none",
                  f"--seed={args.seed}"]
        finetune = [a if a != "--lr=1e-3" else "--lr=1e-4" for a in common]  # the recipe's Adam 1e-4
        ce_half = Stage("cross_entropy_half", common + ["--method=cross_entropy"], 10, 0.5)
        kl_start = Stage("clustr_kl_stage1", common + ["--method=clustr"], 8, 0.5)
        return {
            "cross_entropy": [ce_half, Stage("cross_entropy", ce_half.argv, 20, 1.0, continues=ce_half)],
            "clustr": [Stage("clustr", common + ["--method=clustr"], 17, 1.0)],
            "clustr_from_ce": [ce_half, Stage("clustr_from_ce", finetune + ["--method=clustr"], 8, 0.5,
                                              init=ce_half)],
            "clustr_qtrades": [ce_half, Stage("clustr_qtrades", finetune + ["--method=clustr", *QTRADES], 4, 0.5,
                                              init=ce_half)],
            "clustr_qtrades_kl": [kl_start, Stage("clustr_qtrades_kl", finetune + [
                "--method=clustr", *QTRADES, "--consistency=kl"], 4, 0.5, init=kl_start)],
            "pgd_at": [Stage("pgd_at", common + ["--method=pgd_at", "--pgd_eps=8", "--pgd_step=2",
                                                 "--pgd_iterations=7", f"--steps_per_epoch={PGD_AT_EPOCH_STEPS}"],
                             14, 1.0)],
        }
    common = ["--dataset=digits", "--lr=1e-4", "--lr_milestones=none", f"--seed={args.seed}"]
    ce = Stage("cross_entropy", common + ["--method=cross_entropy"], 40, 1.0)
    return {
        "cross_entropy": [ce],
        "clustr": [Stage("clustr", common + ["--method=clustr"], 40, 1.0)],
        "clustr_from_ce": [ce, Stage("clustr_from_ce", common + ["--method=clustr"], 25, 1.0, init=ce)],
        "clustr_qtrades": [ce, Stage("clustr_qtrades", common + ["--method=clustr", *QTRADES], 25, 1.0, init=ce)],
        "clustr_qtrades_kl": [ce, Stage("clustr_qtrades_kl", common + ["--method=clustr", *QTRADES,
                                                                        "--consistency=kl"], 25, 1.0, init=ce)],
        "pgd_at": [Stage("pgd_at", common + ["--method=pgd_at", "--pgd_eps=8", "--pgd_step=2",
                                             "--pgd_iterations=7"], 40, 1.0)],
    }


def _run_dir(args, stage):
    return os.path.join(args.runs_dir, stage.run)


def _train_argv(args, stage):
    """The training/main.py flags of a stage."""
    argv = list(stage.argv)
    if args.budget_minutes is None:
        argv.append(f"--epochs={stage.epochs}")
    else:
        argv += ["--epochs=1000", f"--cpu_budget_minutes={args.budget_minutes * stage.share:g}"]
    if stage.init is not None:
        argv.append(f"--init_checkpoint={_run_dir(args, stage.init)}")
    return argv + [f"--model_dir={_run_dir(args, stage)}"]


def _eval_argv(run, args):
    return [f"--model_dir={run}", f"--num_examples={args.num_examples}", f"--square_queries={args.square_queries}",
            f"--seed={args.seed}"]


def _python(script, argv):
    return [sys.executable, os.path.join(ROOT, script), *argv]


def _shown(script, argv):
    return " ".join(["python", script, *argv])


# What a run directory holds once finished or evaluated; a continued run starts without them.
_FINISHED = ("metrics.json", "model.keras", "robustness.json", "robustness.command", "robustness.seconds",
             "attacks.csv")


def train(method, args):
    for stage in _stages(args)[method]:
        run = os.path.join(ROOT, _run_dir(args, stage))
        if os.path.exists(os.path.join(run, "metrics.json")):
            print(f"[reproduce] {method}: {stage.run} already trained", flush=True)
            continue
        if stage.continues is not None and not os.path.exists(run):
            source = os.path.join(ROOT, _run_dir(args, stage.continues))
            shutil.copytree(source, run, ignore=shutil.ignore_patterns(*_FINISHED, "*.png"))
            print(f"[reproduce] {method}: {stage.run} continues a copy of {stage.continues}", flush=True)
        argv = _train_argv(args, stage)
        print(f"[reproduce] {method}: {_shown('training/main.py', argv)}", flush=True)
        subprocess.run(_python("training/main.py", argv), cwd=ROOT, check=True)


def evaluate(method, args):
    run = _run_dir(args, _stages(args)[method][-1])
    argv = _eval_argv(run, args)
    done = os.path.join(ROOT, run, "robustness.command")
    if os.path.exists(done) and open(done).read() == " ".join(argv):
        print(f"[reproduce] {method}: {run} already evaluated", flush=True)
        return
    print(f"[reproduce] {method}: {_shown('training/evaluate.py', argv)}", flush=True)
    start = time.time()
    subprocess.run(_python("training/evaluate.py", argv), cwd=ROOT, check=True)
    with open(os.path.join(ROOT, run, "robustness.seconds"), "w") as fh:
        fh.write(f"{time.time() - start:.1f}")
    with open(done, "w") as fh:
        fh.write(" ".join(argv))


def _row(method, args):
    """The result row of a method whose runs are in --runs_dir, or None."""
    stages = _stages(args)[method]
    run = _run_dir(args, stages[-1])
    path = os.path.join(ROOT, run, "robustness.json")
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        r = json.load(fh)
    train_rows = []
    for stage in stages:
        with open(os.path.join(ROOT, _run_dir(args, stage), "metrics.json")) as fh:
            m = json.load(fh)
        epochs, per_epoch = m.get("epochs_trained"), m.get("steps_per_epoch")
        train_rows.append({
            "command": _shown("training/main.py", _train_argv(args, stage)),
            "epochs_trained": epochs,
            "steps": epochs * per_epoch if epochs is not None and per_epoch else None,
            "train_time_seconds": m.get("train_time_seconds"),
            "train_cpu_seconds": m.get("train_cpu_seconds"),
            "clean_accuracy": m.get("clean_accuracy"),
        })
    # A continued stage's counters include the stage it continues: count each step once.
    for i, stage in enumerate(stages):
        if stage.continues is not None:
            before = train_rows[[s.run for s in stages].index(stage.continues.run)]
            row = train_rows[i]
            for key in ("epochs_trained", "steps", "train_time_seconds", "train_cpu_seconds"):
                if row[key] is not None and before[key] is not None:
                    row[key] = round(row[key] - before[key], 2)
    seconds_path = os.path.join(ROOT, run, "robustness.seconds")
    return {
        "label": LABELS[method],
        "start": STARTS[args.dataset].get(method, "scratch"),
        "clean_accuracy": r["clean_accuracy"],
        "robust_accuracy_8_255": r["robust_accuracy"].get("8/255"),
        "robust_accuracy": r["robust_accuracy"],
        "robust_accuracy_l2": r.get("robust_accuracy_l2"),
        "per_loss": {f"{a['eps'] * 255:g}/255 {a['loss']}": a["accuracy"] for a in r["attacks"]
                     if a["norm"] == "inf" and a.get("scope", "all") == "all"},
        "official_loss_8_255": next((a["accuracy"] for a in r["attacks"] if a["loss"] == "official"
                                     and abs(a["eps"] * 255 - 8) < 1e-6), None),
        "certified_accuracy": r["certified_accuracy"],
        "certified_rule": "nearest center" if r.get("nearest_center_accuracy") is not None else "linear head",
        "lipschitz_bound": r["lipschitz_bound"],
        "median_certified_radius": r["median_certified_radius"],
        "masking_checks": {k: v["passed"] for k, v in r["masking_checks"].items()},
        "masking_details": {k: v["detail"] for k, v in r["masking_checks"].items()},
        "num_examples": r["num_examples"],
        "train": train_rows,
        "evaluate_command": _shown("training/evaluate.py", _eval_argv(run, args)),
        "evaluate_seconds": float(open(seconds_path).read()) if os.path.exists(seconds_path) else None,
        "measured": {"date": time.strftime("%Y-%m-%d"), "machine": machine.describe(*MACHINE)},
    }


def collect(args, out):
    previous = {}
    if os.path.exists(out):
        with open(out) as fh:
            previous = json.load(fh).get("methods", {})
    methods = {}
    for method in METHODS:
        row = _row(method, args)
        if row is None and method in previous:
            row = previous[method]  # measured earlier; its `measured` says when and where
        if row is not None:
            methods[method] = row
    cifar = args.dataset == "cifar10"
    budget = ("epochs that 60 CPU-minutes of training bought per method on the reference machine (2-core AMD "
              "EPYC, 2026-11-25); a model fine-tuned from another counts that model's epochs"
              if args.budget_minutes is None and cifar else
              f"{args.budget_minutes:g} CPU-minutes of training per method on the measuring machine"
              if args.budget_minutes is not None else
              "the binary's 40 epochs; fine-tuned methods 25 epochs from the 40-epoch cross-entropy model")
    data = (args.data_dir if not cifar else
            "CIFAR-10 re-encoded as JPEG (cifar10-jpeg.tar.gz), not the original binary release"
            if "jpeg" in args.data_dir.lower() else args.data_dir)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "dataset": args.dataset,
        "data": data if cifar else "the embedded 8x8 digits (1,437 training, 360 test images)",
        "settings": {"budget": budget, "backbone": "resnet18" if cifar else "convnet",
                     "width_multiplier": args.width_multiplier if cifar else None,
                     "optimizer": ("Adam, lr 1e-3, constant; the methods fine-tuned from another model 1e-4, as "
                                   "the recipe" if cifar else "Adam, lr 1e-4, constant"),
                     "batch_size": 240, "num_examples": args.num_examples, "square_queries": args.square_queries,
                     "seed": args.seed},
        "machine": machine.describe(*MACHINE),
        "command": "python benchmarks/reproduce.py " + " ".join(
            f"--{k}={v}" for k, v in sorted(vars(args).items())
            if k not in ("only", "methods", "out") and v is not None),
        "methods": methods,
    }
    machine.save(out, result)
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", choices=["cifar10", "digits"], default="cifar10")
    parser.add_argument("--data_dir", default=os.path.join("..", "shared", "data", "cifar10-jpeg.tar.gz"),
                        help="CIFAR-10 (a TFDS data_dir, or a folder / .tar.gz); relative paths are from the "
                        "repository root, where the commands run")
    parser.add_argument("--budget_minutes", type=float, default=None,
                        help="CPU-minutes of training per method on this machine, instead of the reference "
                        "epochs (2 cores give about 2 CPU-minutes per minute)")
    parser.add_argument("--width_multiplier", type=float, default=0.25)
    parser.add_argument("--num_examples", type=int, default=None, help="default: 1000 (CIFAR-10), 360 (digits)")
    parser.add_argument("--square_queries", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs_dir", default=None, help="default: runs/reproduce (runs/reproduce_digits)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--only", choices=["train", "evaluate", "collect"])
    parser.add_argument("--out", default=None,
                        help="the result file (default benchmarks/results/reproduce.json, reproduce_digits.json)")
    args = parser.parse_args()
    digits = args.dataset == "digits"
    if args.num_examples is None:
        args.num_examples = 360 if digits else 1000
    if args.runs_dir is None:
        args.runs_dir = os.path.join("runs", "reproduce_digits" if digits else "reproduce")
    if digits:
        args.data_dir = None
    if args.budget_minutes is not None and not args.budget_minutes > 0:
        sys.exit(f"reproduce.py: error: --budget_minutes must be > 0. Received: {args.budget_minutes}")
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        sys.exit(f"reproduce.py: error: --methods must name some of {', '.join(METHODS)}. Received: {args.methods}")
    for method in methods:
        if args.only in (None, "train"):
            train(method, args)
        if args.only in (None, "evaluate"):
            evaluate(method, args)
    out = args.out or os.path.join(RESULTS, "reproduce_digits.json" if digits else "reproduce.json")
    print(json.dumps(collect(args, out)))


if __name__ == "__main__":
    machine.exit_on_sigterm()  # a `kill` stops the training it runs too
    main()
