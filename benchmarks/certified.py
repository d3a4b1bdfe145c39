"""Certified ClusTR against the Lipschitz-margin linear head: one recipe, one CPU budget, one sweep.

    python benchmarks/certified.py [--datasets=digits,cifar10] [--phases=sweep,final[,serving_rule]]
        [--cifar_data_dir=PATH] [--methods=certified_clustr,lipschitz_margin_xent]

For each dataset, trains two models on the same 1-Lipschitz-by-construction backbone
(`--backbone=lipschitz`: AOL convolutions, MaxMin, space-to-depth; mean subtraction only,
so its bound is exactly 1), the same data (crop + flip on CIFAR-10), batch size, optimizer
(Adam, `--lr_schedule=cosine`: the rate falls to 0 at the end of the CPU budget), precision
(bfloat16 on CIFAR-10, where benchmarks/lipschitz_step.py measured it faster on this CPU and
XLA slower; evaluation and the certificate in float32/float64) and CPU
budget of the training process (`training/main.py --cpu_budget_minutes`: contention from
other processes does not count against a method):

    certified_clustr        --certified_margin=R: certified ClusTR, K=2 trainable centers per
                            class, cross-entropy on the certificate's logits / T; certified
                            rule: the nearest center
    lipschitz_margin_xent   --method=cross_entropy --certified_margin=R: a linear head,
                            cross-entropy on the logits z_j + R L ||w_j - w_y|| over T (the
                            standard Lipschitz-margin baseline); certified rule: the head

Phase `sweep`: each method trains once per setting of its dataset's grid (the same size
for both methods: the training radius R at 1x and 2x the evaluation radius, two
temperatures T and, on CIFAR-10, three learning rates; `SWEEPS`), with `--holdout_examples`
training examples held out, and the setting with the best certified accuracy at the
evaluation radius on those held-out examples (never the test split) is chosen. Phase `final`: the chosen setting trains on the whole training
set; its budget is split into `stages` parts (the run resumes from its checkpoint for each,
`--lr_horizon_cpu_minutes` keeps one schedule over the whole budget) and after each part
the whole test split is certified (float64 certificate): the curve of certified accuracy
against training CPU time. The final model is then evaluated by `training/evaluate.py`
with its `auto` radii (digits 0.25, 0.5, 1.0; CIFAR-10 36/255, 72/255, 108/255): certified
accuracy on the whole test split and, on `num_examples` test images, l2 PGD (margin loss,
restarts) against the soft-kNC rule and against the certified rule, whose per-example
comparison with the certificate is the `certified_below_empirical` check (a certified
example the attack breaks is a violation). Where a dataset sets `seeds` (digits: 3), the
same command then trains and is evaluated again with `--seed=1`, `--seed=2`, ...: the
row's numbers are seed 0's (what its command gives), and `seeds` and the `*_mean` keys hold
every seed's and their mean, the measure of seed noise the comparison is read against.

Certified ClusTR's final phase also measures its serving rule (`runs[...]["serving_rule"]`):
the test accuracy of the soft-kNC rule (`model.predict`, `serving_default`) with the variance
the model holds and with 2 sigma^2 = T, beside the nearest center that the certificate
certifies, and how often each agrees with it. Phase `serving_rule` alone measures it again
on the final runs' folders (e.g. of runs trained before it was measured).

Datasets: `digits` (3 CPU-min per run, 3 points of the curve), `cifar10` (60 CPU-min per
final run in one part, 6 per sweep run) and `cifar10_long` (240 CPU-min, the setting chosen
by cifar10's sweep, 4 points of the curve). Everything resumes: run the same command again after an interruption.

Saves benchmarks/results/certified.json (runs[dataset/method], sweeps[dataset/method]) and
prints it as one JSON object last.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import machine  # noqa: E402
from clustr_tf import checks  # noqa: E402  (no TensorFlow)

DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "certified.json")
SHARED_CIFAR = os.path.join(os.path.dirname(ROOT), "shared", "data", "cifar10-jpeg.tar.gz")
METHODS = {
    "certified_clustr": [],
    "lipschitz_margin_xent": ["--method=cross_entropy"],
}
# Per dataset: evaluation radius, recipe and budgets, evaluation settings.
DATASETS = {
    "digits": {"data": "digits", "radius": 0.5, "lr": 1e-3, "batch_size": 240, "cpu_minutes": 3.0, "stages": 3, "seeds": 3,
               "sweep_cpu_minutes": 3.0, "holdout_examples": 300, "num_examples": 360, "restarts": 5,
               "losses": "margin,logits"},
    "cifar10": {"data": "cifar10", "radius": 36 / 255, "lr": 1e-3, "batch_size": 240, "cpu_minutes": 60.0,
                "stages": 1, "sweep_cpu_minutes": 6.0, "holdout_examples": 5000, "num_examples": 200, "restarts": 2,
                "losses": "margin", "precision": "bfloat16"},
    "cifar10_long": {"data": "cifar10", "radius": 36 / 255, "lr": 1e-3, "batch_size": 240, "cpu_minutes": 240.0,
                     "stages": 4, "sweep_from": "cifar10", "num_examples": 200, "restarts": 2, "losses": "margin",
                     "precision": "bfloat16"},
}
# The sweep, per dataset: the same number of settings per method; R as a multiple of the
# evaluation radius, T, and a factor of the dataset's learning rate. On CIFAR-10 a first grid
# (R 1x/2x, T and T/4 at the full rate, and the rate / 10) chose the rate / 10 for both methods
# by 4-5 points, so R and T were only explored at a rate that lost: the grid is now centred on
# the rate / 10, with R 2x, T x4 and the rate x3 and /3 around it.
_DIGITS_SWEEP = {
    "certified_clustr": [{"radius_x": 1, "temperature": 0.25, "lr_x": 1}, {"radius_x": 2, "temperature": 0.25, "lr_x": 1},
                         {"radius_x": 1, "temperature": 0.0625, "lr_x": 1},
                         {"radius_x": 1, "temperature": 0.25, "lr_x": 0.1}],
    "lipschitz_margin_xent": [{"radius_x": 1, "temperature": 1.0, "lr_x": 1}, {"radius_x": 2, "temperature": 1.0, "lr_x": 1},
                              {"radius_x": 1, "temperature": 0.25, "lr_x": 1},
                              {"radius_x": 1, "temperature": 1.0, "lr_x": 0.1}],
}


def _around(temperature, lr_x):
    return [{"radius_x": 1, "temperature": temperature, "lr_x": lr_x},
            {"radius_x": 2, "temperature": temperature, "lr_x": lr_x},
            {"radius_x": 1, "temperature": 4 * temperature, "lr_x": lr_x},
            {"radius_x": 1, "temperature": temperature, "lr_x": round(3 * lr_x, 6)},
            {"radius_x": 1, "temperature": temperature, "lr_x": round(lr_x / 3, 6)}]


SWEEPS = {
    "digits": _DIGITS_SWEEP,
    "cifar10": {"certified_clustr": _around(0.25, 0.1), "lipschitz_margin_xent": _around(1.0, 0.1)},
}


def setting_tag(setting):
    """A run folder's name for a sweep setting, e.g. `R1-T0.25-lr0.1`: a folder resumes only
    the setting it was started with."""
    return f"R{setting['radius_x']:g}-T{setting['temperature']:g}-lr{setting['lr_x']:.3g}"


ANCHORS = {
    "cifar10": [
        {"method": "GloRo 6C2F (Leino et al., ICML 2021)", "budget": "GPU, the paper's full schedule",
         "clean": 0.77, "certified_36": 0.584},
        {"method": "AOL-Large (Prach & Lampert, ECCV 2022)", "budget": "GPU, the paper's full schedule",
         "clean": 0.716, "certified_36": 0.640},
        {"method": "SLL X-Large (Araujo et al., ICLR 2023)", "budget": "GPU, the paper's full schedule",
         "clean": 0.733, "certified_36": 0.658},
        {"method": "AOL, 1.6M parameters (Prach et al., CVPR 2024)", "budget": "2 A100-hours", "clean": 0.685,
         "certified_36": 0.556},
        {"method": "CPL, 1.6M parameters (Prach et al., CVPR 2024)", "budget": "2 A100-hours", "clean": 0.717,
         "certified_36": 0.582},
    ],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="digits,cifar10")
    p.add_argument("--phases", default="sweep,final")
    p.add_argument("--cifar_data_dir", default=SHARED_CIFAR if os.path.exists(SHARED_CIFAR) else None,
                   help="CIFAR-10 for training/main.py --data_dir. Default: ../shared/data/cifar10-jpeg.tar.gz "
                        "when it exists, else TFDS.")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--runs_dir", default=os.path.join(ROOT, "runs", "certified"))
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--fresh", action="store_true", help="Delete the runs first.")
    args = p.parse_args(argv)
    args.datasets = [d for d in args.datasets.split(",") if d]
    args.methods = [m for m in args.methods.split(",") if m]
    args.phases = [m for m in args.phases.split(",") if m]
    for name, known in (("datasets", DATASETS), ("methods", METHODS), ("phases", ("sweep", "final", "serving_rule"))):
        unknown = [v for v in getattr(args, name) if v not in known]
        if unknown:
            p.error(f"--{name}: unknown {unknown}; expected some of {', '.join(known)}")
    return args


def _python(script, argv):
    return [sys.executable, os.path.join(ROOT, script), *argv]


def _data_argv(args, dataset):
    if DATASETS[dataset]["data"] == "cifar10" and args.cifar_data_dir:
        return [f"--data_dir={args.cifar_data_dir}"]
    return []


def _lr(s, setting):
    """The dataset's learning rate times the setting's factor, to 6 digits (0.0003, not 0.00030000000000000003)."""
    return float(f"{s['lr'] * setting['lr_x']:.6g}")


def train_argv(args, dataset, method, setting, minutes, holdout=0):
    """training/main.py's flags for `method` with a sweep `setting`, trained `minutes`
    (without --model_dir and the budget flags)."""
    s = DATASETS[dataset]
    return [f"--dataset={s['data']}", *_data_argv(args, dataset), "--backbone=lipschitz",
            f"--certified_margin={s['radius'] * setting['radius_x']!r}", f"--temperature={setting['temperature']!r}",
            f"--lr={_lr(s, setting)!r}", "--lr_schedule=cosine", f"--batch_size={s['batch_size']}",
            "--epochs=100000", *([f"--holdout_examples={holdout}"] if holdout else []),
            *([f"--mixed_precision={s['precision']}"] if s.get("precision") else []), *METHODS[method]]


def train(argv, run_dir, minutes, horizon):
    """Trains until `minutes` CPU minutes (cumulative; the schedule ends at `horizon`)."""
    start = time.time()
    subprocess.run(_python("training/main.py", [*argv, f"--cpu_budget_minutes={minutes!r}",
                                                 f"--lr_horizon_cpu_minutes={horizon!r}", f"--model_dir={run_dir}"]),
                   cwd=ROOT, check=True)
    with open(os.path.join(run_dir, "metrics.json")) as fh:
        return json.load(fh), time.time() - start


_ARRAYS = {}


def _arrays(args, dataset, split):
    name = DATASETS[dataset]["data"]
    if (name, split) not in _ARRAYS:
        from clustr_tf import data

        _ARRAYS[name, split] = data.load_arrays(name, split, **({"data_dir": args.cifar_data_dir}
                                                                 if name == "cifar10" and args.cifar_data_dir else {}))
    return _ARRAYS[name, split]


def certify_run(run_dir, images, labels, radii):
    """Certified accuracy of the run's model.keras on `images`, computed in float32 as
    training/evaluate.py computes it (a model trained in bfloat16 is loaded in bfloat16:
    its certificate is stated for the float32 network)."""
    from clustr_tf import evaluation
    from clustr_tf import models
    from clustr_tf import precision

    model = models.load_model(os.path.join(run_dir, "model.keras"))
    precision.set_precision(model, "float32")
    return evaluation.certify_split(model, images, labels, radii)


def serving_rule(run_dir, images, labels, temperature, batch_size=500):
    """Test accuracy of a certified ClusTR run's soft-kNC rule (what `model.predict` and
    `serving_default` decide) with the variance the model holds and with 2 sigma^2 = T
    (`CertifiedClusTR`'s rule since 2026-12-04), beside the nearest center (the certified
    decision), and how often each soft-kNC rule agrees with it; float32, as evaluate.py."""
    import tensorflow as tf

    from clustr_tf import models
    from clustr_tf import precision

    model = models.load_model(os.path.join(run_dir, "model.keras"))
    precision.set_precision(model, "float32")
    with open(os.path.join(run_dir, "config.json")) as fh:
        neighbours = json.load(fh).get("eval_L")
    neighbours = model.evaluation_neighbours(neighbours)
    layer, labels = model.cluster_centers, np.asarray(labels)
    features = tf.constant(np.concatenate([model.embed(tf.constant(images[i:i + batch_size])).numpy()
                                           for i in range(0, len(labels), batch_size)]))
    result = {"neighbours": neighbours, "test_examples": len(labels)}
    for name, variance in (("held_variance", float(layer.variance.numpy())), ("temperature", temperature / 2.0)):
        layer.variance.assign(variance)
        soft, nearest = (np.asarray(d) for d in model.decisions_from_features(features, neighbours))
        result["nearest_center_accuracy"] = round(float(np.mean(nearest == labels)), 4)
        result[name] = {"variance": round(variance, 6), "accuracy": round(float(np.mean(soft == labels)), 4),
                        "agreement_with_nearest_center": round(float(np.mean(soft == nearest)), 4)}
    return result


def evaluate_run(run_dir, dataset):
    s = DATASETS[dataset]
    argv = [f"--model_dir={run_dir}", f"--num_examples={s['num_examples']}", "--eps=", "--square_eps=",
            "--stronger_eps=", "--nounbounded_check", f"--restarts={s['restarts']}", f"--losses={s['losses']}"]
    subprocess.run(_python("training/evaluate.py", argv), cwd=ROOT, check=True)
    with open(os.path.join(run_dir, "robustness.json")) as fh:
        return json.load(fh), argv


def sweep(args, dataset, method):
    """Trains every setting of the method's grid with held-out examples; returns the records
    and the chosen setting (best certified accuracy at the evaluation radius on them)."""
    s = DATASETS[dataset]
    from clustr_tf import data

    images, labels = _arrays(args, dataset, "train")
    _, held = data.split_holdout(labels, s["holdout_examples"])
    records = []
    for setting in SWEEPS[dataset][method]:
        run_dir = os.path.join(args.runs_dir, f"sweep-{dataset}-{method}-{setting_tag(setting)}")
        argv = train_argv(args, dataset, method, setting, s["sweep_cpu_minutes"], s["holdout_examples"])
        metrics, _ = train(argv, run_dir, s["sweep_cpu_minutes"], s["sweep_cpu_minutes"])
        cert = certify_run(run_dir, images[held], labels[held], (s["radius"],))
        records.append({**setting, "holdout_clean_accuracy": cert["clean_accuracy"],
                        "holdout_certified_accuracy": cert["certified_accuracy"][str(s["radius"])],
                        "train_cpu_minutes": round(metrics["train_cpu_seconds"] / 60, 2),
                        "epochs": metrics["epochs_trained"],
                        "command": "python training/main.py " + " ".join(argv) +
                                   f" --cpu_budget_minutes={s['sweep_cpu_minutes']}"})
        print(json.dumps({f"sweep {dataset}/{method}": records[-1]}), flush=True)
    best = max(range(len(records)), key=lambda i: records[i]["holdout_certified_accuracy"])
    return {"settings": records, "chosen": best, "budget_cpu_minutes": s["sweep_cpu_minutes"],
            "holdout_examples": s["holdout_examples"]}


def final_run_dir(args, dataset, method, setting):
    """The folder of a method's final run (its parts resume there)."""
    return os.path.join(args.runs_dir, f"{dataset}-{method}-{setting_tag(setting)}")


def final(args, dataset, method, setting):
    s = DATASETS[dataset]
    run_dir = final_run_dir(args, dataset, method, setting)
    argv = train_argv(args, dataset, method, setting, s["cpu_minutes"])
    images, labels = _arrays(args, dataset, "test")
    # Each point of the curve is kept in the run folder when it is measured, so a rerun
    # after an interruption (or after the end) keeps the points of the parts already trained.
    curve_path = os.path.join(run_dir, "curve.json")
    saved = []
    if os.path.exists(curve_path):
        with open(curve_path) as fh:
            saved = json.load(fh)
    curve, wall = [], 0.0
    for stage in range(1, s["stages"] + 1):
        metrics, seconds = train(argv, run_dir, s["cpu_minutes"] * stage / s["stages"], s["cpu_minutes"])
        wall += seconds
        if stage <= len(saved):
            curve.append(saved[stage - 1])
        else:
            cert = certify_run(run_dir, images, labels, (s["radius"],))
            curve.append({"train_cpu_minutes": round(metrics["train_cpu_seconds"] / 60, 2),
                          "epochs": metrics["epochs_trained"], "clean_accuracy": cert["clean_accuracy"],
                          "certified_accuracy": cert["certified_accuracy"][str(s["radius"])]})
            checks.write_json(curve_path, curve)
        print(json.dumps({f"{dataset}/{method}": curve[-1]}), flush=True)
    robustness, eval_argv = evaluate_run(run_dir, dataset)
    seeds = [_seed_record(0, curve[-1]["train_cpu_minutes"], robustness)]
    for seed in range(1, s.get("seeds", 1)):
        # The same command with --seed: one part, no curve; its certificate and attacks as seed 0's.
        seed_dir = f"{run_dir}-seed{seed}"
        metrics_s, seconds = train([*argv, f"--seed={seed}"], seed_dir, s["cpu_minutes"], s["cpu_minutes"])
        wall += seconds
        seeds.append(_seed_record(seed, round(metrics_s["train_cpu_seconds"] / 60, 2), evaluate_run(seed_dir, dataset)[0]))
        print(json.dumps({f"{dataset}/{method} seed {seed}": seeds[-1]}), flush=True)
    return {
        "command": "python training/main.py " + " ".join(argv) + f" --cpu_budget_minutes={s['cpu_minutes']}",
        "evaluate_command": "python training/evaluate.py --model_dir=RUN " + " ".join(eval_argv[1:]),
        "setting": setting, "train_cpu_minutes": curve[-1]["train_cpu_minutes"], "epochs": curve[-1]["epochs"],
        "clean_accuracy": robustness["clean_accuracy_test_split"],
        "soft_knc_clean_accuracy": metrics["clean_accuracy"] if method == "certified_clustr" else None,
        # The soft-kNC rule that accuracy is of (runs before 2026-12-04 have no such key: their
        # variance was the moving average of the squared distance to the own center).
        "soft_knc_rule": "2 sigma^2 = T" if method == "certified_clustr" else None,
        "certified_accuracy": robustness["certified_accuracy_test_split"],
        "certified_test_examples": robustness["certified_test_examples"],
        "attacked_examples": robustness["num_examples"],
        "certified_accuracy_attacked_subset": robustness["certified_accuracy"],
        "empirical_l2_certified_rule": robustness["empirical_l2_certified_rule"],
        "empirical_l2_soft_knc": robustness.get("robust_accuracy_l2"),
        "certificate_violations": robustness["certificate_violations"],
        "certified_below_empirical": robustness["masking_checks"]["certified_below_empirical"],
        "lipschitz_bound": robustness["lipschitz_bound"],
        "budget_cpu_minutes": s["cpu_minutes"], "stages": s["stages"],
        "seeds": seeds,
        "certified_accuracy_mean": {k: round(float(np.mean([x["certified_accuracy"][k] for x in seeds])), 4)
                                    for k in seeds[0]["certified_accuracy"]},
        "clean_accuracy_mean": round(float(np.mean([x["clean_accuracy"] for x in seeds])), 4),
        "curve": curve, "wall_minutes": round(wall / 60, 1), "date": time.strftime("%Y-%m-%d"),
        **({"serving_rule": serving_rule(run_dir, images, labels, setting["temperature"])}
           if method == "certified_clustr" else {}),
    }


def _seed_record(seed, minutes, robustness):
    return {"seed": seed, "train_cpu_minutes": minutes, "clean_accuracy": robustness["clean_accuracy_test_split"],
            "certified_accuracy": robustness["certified_accuracy_test_split"],
            "certificate_violations": sum(robustness["certificate_violations"].values())}


def _with_serving_rule(args, dataset, key):
    """certified.json's record of `key` with its `serving_rule` measured on the run folder."""
    runs = json.load(open(args.out)).get("runs", {}) if os.path.exists(args.out) else {}
    if key not in runs:
        raise SystemExit(f"certified.py: no final run of {key} in {args.out}: run --phases=final first")
    run_dir = final_run_dir(args, dataset, "certified_clustr", runs[key]["setting"])
    if not os.path.exists(os.path.join(run_dir, "model.keras")):
        raise SystemExit(f"certified.py: --phases=serving_rule needs the model of {key}: no {run_dir}/model.keras "
                         "(pass the --runs_dir its final phase trained in, or run --phases=final)")
    images, labels = _arrays(args, dataset, "test")
    rule = serving_rule(run_dir, images, labels, runs[key]["setting"]["temperature"])
    print(json.dumps({f"{key} serving rule": rule}), flush=True)
    return {**runs[key], "serving_rule": rule}


def _save(args, update):
    """Merges `update` ({"runs": {...}, "sweeps": {...}}) into the results file (other
    processes may have written other keys meanwhile), atomically."""
    result = {}
    if os.path.exists(args.out):
        with open(args.out) as fh:
            result = json.load(fh)
    result.update({"date": time.strftime("%Y-%m-%d"), "machine": machine.describe("cpu", "cpus"),
                   "settings": {"datasets": DATASETS, "sweeps": SWEEPS,
                                "cifar_data_dir": os.path.basename(args.cifar_data_dir or "") or "TFDS"},
                   "anchors": ANCHORS})
    for key in ("runs", "sweeps"):
        result[key] = {**result.get(key, {}), **update.get(key, {})}
    # Runs of the former recipe (no sweep setting) are not what their commands train any more.
    result["runs"] = {k: v for k, v in result["runs"].items() if "setting" in v}
    machine.save(args.out, result)
    return result


def main(argv=None):
    args = parse_args(argv)
    if args.fresh:
        shutil.rmtree(args.runs_dir, ignore_errors=True)
    result = {}
    for dataset in args.datasets:
        for method in args.methods:
            key = f"{dataset}/{method}"
            source = f"{DATASETS[dataset].get('sweep_from', dataset)}/{method}"
            if "sweep" in args.phases and "sweep_from" not in DATASETS[dataset]:
                result = _save(args, {"sweeps": {key: sweep(args, dataset, method)}})
            if "final" in args.phases:
                if not os.path.exists(args.out) or source not in json.load(open(args.out)).get("sweeps", {}):
                    raise SystemExit(f"certified.py: no sweep of {source} in {args.out}: run --phases=sweep first")
                chosen = json.load(open(args.out))["sweeps"][source]
                setting = {k: chosen["settings"][chosen["chosen"]][k] for k in ("radius_x", "temperature", "lr_x")}
                result = _save(args, {"runs": {key: final(args, dataset, method, setting)}})
            if "serving_rule" in args.phases and "final" not in args.phases and method == "certified_clustr":
                result = _save(args, {"runs": {key: _with_serving_rule(args, dataset, key)}})
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    machine.exit_on_sigterm()  # a `kill` stops the training it runs too
    main()
