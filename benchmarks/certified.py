"""Certified ClusTR against the Lipschitz-margin linear head, under one CPU budget.

    python benchmarks/certified.py [--datasets=digits,cifar10] [--cifar_data_dir=PATH]
        [--digits_cpu_minutes=4] [--cifar_cpu_minutes=30] [--stages=4]

For each dataset, trains two models on the same 1-Lipschitz-by-construction backbone
(`--backbone=lipschitz`: AOL convolutions, MaxMin, space-to-depth; mean subtraction only,
so its bound is exactly 1), the same data, optimizer (Adam, constant `--lr`) and CPU budget
of the training process (`training/main.py --cpu_budget_minutes`: contention from other
processes does not count against a method):

    certified_clustr        --certified_margin=EPS: the magnet loss with every other-class
                            squared distance reduced by 2 EPS L ||mu_own - mu_j|| (K=2,
                            neighbourhood batches, the cluster refresh every epoch);
                            certified rule: the nearest center
    lipschitz_margin_xent   --method=cross_entropy --certified_margin=EPS: a linear head,
                            cross-entropy on the logits z_j + EPS L ||w_j - w_y|| (the
                            standard Lipschitz-margin baseline); certified rule: the head

The budget is split into `--stages` equal parts: the run resumes from its checkpoint for each
part, and after each one the whole test split is certified (one forward pass; float64
certificate), which gives the curve of certified accuracy against training CPU time. The
final model is then evaluated by `training/evaluate.py` with its `auto` radii (digits 0.25,
0.5, 1.0; CIFAR-10 36/255, 72/255, 108/255): certified accuracy on the whole test split
and, on `--num_examples` test images, l2 PGD (margin loss, restarts) against the soft-kNC
rule and against the certified rule, whose per-example comparison with the certificate is
the `certified_below_empirical` check (a certified example the attack breaks is a
violation). Everything resumes: run the command again after an interruption.

Saves benchmarks/results/certified.json and prints it as one JSON object last.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import machine  # noqa: E402

DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "certified.json")
SHARED_CIFAR = os.path.join(os.path.dirname(ROOT), "shared", "data", "cifar10-jpeg.tar.gz")
METHODS = {
    "certified_clustr": [],
    "lipschitz_margin_xent": ["--method=cross_entropy"],
}
# Per dataset: the training radius, evaluation settings, and the anchors from the literature.
DATASETS = {
    "digits": {"margin": 0.5, "lr": 1e-3, "width": 1.0, "num_examples": 360, "restarts": 5, "losses": "margin,logits",
               "batch_size": 240},
    "cifar10": {"margin": 36 / 255, "lr": 1e-4, "width": 1.0, "num_examples": 200, "restarts": 2, "losses": "margin",
                "batch_size": 240},
}
ANCHORS = {
    "cifar10": [
        {"method": "GloRo 6C2F (Leino et al., ICML 2021)", "clean": 0.77, "certified_36": 0.584},
        {"method": "AOL-Large (Prach & Lampert, ECCV 2022)", "clean": 0.716, "certified_36": 0.640},
        {"method": "SLL X-Large (Araujo et al., ICLR 2023)", "clean": 0.733, "certified_36": 0.658},
        {"method": "AOL, 2 A100-hours, 1.6M parameters (Prach et al., CVPR 2024)", "clean": 0.685,
         "certified_36": 0.556},
        {"method": "CPL, 2 A100-hours, 1.6M parameters (Prach et al., CVPR 2024)", "clean": 0.717,
         "certified_36": 0.582},
    ],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="digits,cifar10")
    p.add_argument("--cifar_data_dir", default=SHARED_CIFAR if os.path.exists(SHARED_CIFAR) else None,
                   help="CIFAR-10 for training/main.py --data_dir. Default: ../shared/data/cifar10-jpeg.tar.gz "
                        "when it exists, else TFDS.")
    p.add_argument("--digits_cpu_minutes", type=float, default=4.0)
    p.add_argument("--cifar_cpu_minutes", type=float, default=30.0)
    p.add_argument("--stages", type=int, default=4, help="Equal parts of the budget (points of the curve).")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--runs_dir", default=os.path.join(ROOT, "runs", "certified"))
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--fresh", action="store_true", help="Delete the runs first.")
    args = p.parse_args(argv)
    args.datasets = [d for d in args.datasets.split(",") if d]
    args.methods = [m for m in args.methods.split(",") if m]
    for name, known in (("datasets", DATASETS), ("methods", METHODS)):
        unknown = [v for v in getattr(args, name) if v not in known]
        if unknown:
            p.error(f"--{name}: unknown {unknown}; expected some of {', '.join(known)}")
    if args.stages < 1:
        p.error(f"--stages must be >= 1. Received: {args.stages}")
    return args


def _python(script, argv):
    return [sys.executable, os.path.join(ROOT, script), *argv]


def _budget(args, dataset):
    return args.digits_cpu_minutes if dataset == "digits" else args.cifar_cpu_minutes


def _data_argv(args, dataset):
    if dataset == "cifar10" and args.cifar_data_dir:
        return [f"--data_dir={args.cifar_data_dir}"]
    return []


def train_stage(args, dataset, method, stage):
    """Trains `method` until its cumulative CPU budget of `stage` (1-based) parts."""
    s = DATASETS[dataset]
    run_dir = os.path.join(args.runs_dir, f"{dataset}-{method}")
    minutes = _budget(args, dataset) * stage / args.stages
    argv = [f"--dataset={dataset}", *_data_argv(args, dataset), "--backbone=lipschitz",
            f"--width_multiplier={s['width']}", f"--certified_margin={s['margin']}", f"--lr={s['lr']}",
            "--lr_milestones=none", "--epochs=100000", f"--cpu_budget_minutes={minutes}", f"--model_dir={run_dir}",
            *(["--batch_size=%d" % s["batch_size"]] if method != "certified_clustr" else []), *METHODS[method]]
    start = time.time()
    subprocess.run(_python("training/main.py", argv), cwd=ROOT, check=True)
    with open(os.path.join(run_dir, "metrics.json")) as fh:
        metrics = json.load(fh)
    return run_dir, metrics, time.time() - start, argv


_TEST = {}


def certify_run(run_dir, dataset, args):
    """Certified accuracy of the run's model.keras on the whole test split."""
    import keras

    import clustr_tf  # noqa: F401,PLC0415  (registers the layers)
    from clustr_tf import data
    from clustr_tf import evaluation

    model = keras.saving.load_model(os.path.join(run_dir, "model.keras"))
    if dataset not in _TEST:
        _TEST[dataset] = data.load_arrays(dataset, "test", **({"data_dir": args.cifar_data_dir}
                                                               if dataset == "cifar10" and args.cifar_data_dir else {}))
    images, labels = _TEST[dataset]
    radii = evaluation.auto_radii(model.backbone, dataset)["radii"]
    return evaluation.certify_split(model, images, labels, radii)


def evaluate_run(run_dir, dataset):
    s = DATASETS[dataset]
    argv = [f"--model_dir={run_dir}", f"--num_examples={s['num_examples']}", "--eps=", "--square_eps=",
            "--stronger_eps=", "--nounbounded_check", f"--restarts={s['restarts']}", f"--losses={s['losses']}"]
    subprocess.run(_python("training/evaluate.py", argv), cwd=ROOT, check=True)
    with open(os.path.join(run_dir, "robustness.json")) as fh:
        return json.load(fh), argv


def main(argv=None):
    args = parse_args(argv)
    previous = {}
    if os.path.exists(args.out):
        with open(args.out) as fh:
            previous = json.load(fh)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine.describe("cpu", "cpus"),
              "settings": {"stages": args.stages, "digits_cpu_minutes": args.digits_cpu_minutes,
                           "cifar_cpu_minutes": args.cifar_cpu_minutes, "datasets": DATASETS,
                           "cifar_data_dir": os.path.basename(args.cifar_data_dir or "") or "TFDS"},
              "anchors": ANCHORS, "runs": dict(previous.get("runs", {}))}
    done = []
    for dataset in args.datasets:
        for method in args.methods:
            key = f"{dataset}/{method}"
            done.append(key)
            run_dir = os.path.join(args.runs_dir, f"{dataset}-{method}")
            if args.fresh:
                shutil.rmtree(run_dir, ignore_errors=True)
            curve, wall = [], 0.0
            for stage in range(1, args.stages + 1):
                run_dir, metrics, seconds, train_argv = train_stage(args, dataset, method, stage)
                wall += seconds
                cert = certify_run(run_dir, dataset, args)
                curve.append({"train_cpu_minutes": round(metrics["train_cpu_seconds"] / 60, 2),
                              "epochs": metrics["epochs_trained"], "clean_accuracy": metrics["clean_accuracy"],
                              "certified_rule_accuracy": cert["clean_accuracy"],
                              "certified_accuracy": cert["certified_accuracy"]})
                print(json.dumps({key: curve[-1]}), flush=True)
            robustness, eval_argv = evaluate_run(run_dir, dataset)
            checks = robustness["masking_checks"]
            result["runs"][key] = {
                "command": "python training/main.py " + " ".join(a for a in train_argv if not a.startswith(
                    ("--cpu_budget", "--model_dir", "--epochs"))) + f" --cpu_budget_minutes={_budget(args, dataset)}",
                "evaluate_command": "python training/evaluate.py " + " ".join(eval_argv[1:]),
                "train_cpu_minutes": curve[-1]["train_cpu_minutes"], "epochs": curve[-1]["epochs"],
                "clean_accuracy": robustness["clean_accuracy_test_split"],
                "soft_knc_clean_accuracy": metrics["clean_accuracy"] if method == "certified_clustr" else None,
                "certified_accuracy": robustness["certified_accuracy_test_split"],
                "certified_test_examples": robustness["certified_test_examples"],
                "attacked_examples": robustness["num_examples"],
                "certified_accuracy_attacked_subset": robustness["certified_accuracy"],
                "empirical_l2_certified_rule": robustness["empirical_l2_certified_rule"],
                "empirical_l2_soft_knc": robustness.get("robust_accuracy_l2"),
                "certificate_violations": robustness["certificate_violations"],
                "certified_below_empirical": checks["certified_below_empirical"],
                "lipschitz_bound": robustness["lipschitz_bound"],
                "budget_cpu_minutes": _budget(args, dataset), "stages": args.stages,
                "curve": curve, "wall_minutes": round(wall / 60, 1), "date": result["date"],
            }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if os.path.exists(args.out):  # another process (another dataset or method) may have written meanwhile
        with open(args.out) as fh:
            result["runs"] = {**json.load(fh).get("runs", {}), **{k: result["runs"][k] for k in done}}
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
        fh.write("\n")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
