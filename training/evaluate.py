"""Evaluates a ClusTR run's robustness: PGD with every attack loss, worst cases,
certified accuracy, gradient-masking checks, a CSV of every attack and plots.

    python training/evaluate.py --model_dir=RUN [--num_examples=1000] [--eps=2,8,16,25.5]

Writes RUN/robustness.json, RUN/attacks.csv and RUN/robustness_*.png. eps and step are in
1/255 units (l_inf); --l2_eps and --radii in pixel units. The attacks run on the subset;
the certificate (one forward pass) on the whole test split too. --radii and --l2_eps
default to `auto` (`clustr_tf.evaluation.auto_radii`): the Lipschitz-network radii for a
backbone that is Lipschitz by construction, today's defaults otherwise.
"""

import csv
import dataclasses
import os
import sys
import time

from absl import flags
from absl import logging


def define_flags(flag_values=flags.FLAGS):
    flags.DEFINE_string("model_dir", None, "The run directory to evaluate (holds model.keras).",
                        flag_values=flag_values)
    flags.DEFINE_integer("num_examples", 1000, "Test examples to attack: a fixed seeded random subset (all if "
                         "fewer).", flag_values=flag_values)
    flags.DEFINE_integer("batch_size", 256, "Attack batch size.", flag_values=flag_values)
    flags.DEFINE_string("eps", "2,8,16,25.5", "l_inf radii, in 1/255 units.", flag_values=flag_values)
    flags.DEFINE_string("l2_eps", "auto", "l2 radii, in pixel units (e.g. 0.25,0.5); empty: none; `auto`: the "
                        "non-zero --radii of `auto` for a backbone Lipschitz by construction, else 0.5.",
                        flag_values=flag_values)
    flags.DEFINE_float("step", 2.0, "l_inf PGD step, in 1/255 units (l2 runs step eps/4).", flag_values=flag_values)
    flags.DEFINE_integer("iterations", 20, "PGD iterations.", flag_values=flag_values)
    flags.DEFINE_integer("restarts", 10, "PGD random restarts.", flag_values=flag_values)
    flags.DEFINE_string("losses", "official,logits,margin", "Attack losses.", flag_values=flag_values)
    flags.DEFINE_string("radii", "auto", "l2 radii (pixel units) for certified accuracy; at each one > 0 the "
                        "certified rule is attacked too (l2 PGD, margin loss). `auto`: for a backbone Lipschitz by "
                        "construction 0 and 0.25,0.5,1 on digits, 36/255,72/255,108/255 on other datasets; "
                        "else 0,0.05,0.1,0.25,0.5.", flag_values=flag_values)
    flags.DEFINE_string("square_eps", "8", "l_inf eps (1/255 units, among --eps) at which the "
                        "gradient-free Square attack joins the worst case; empty: none (its masking check is "
                        "'not run' and does not pass).",
                        flag_values=flag_values)
    flags.DEFINE_integer("square_queries", 5000, "Square attack queries per example.", flag_values=flag_values)
    flags.DEFINE_string("stronger_eps", "8", "l_inf eps (1/255 units, among --eps) at which the strongest "
                        "loss is rerun with --stronger_factor x the iterations; empty: none (its masking check "
                        "is 'not run' and does not pass).",
                        flag_values=flag_values)
    flags.DEFINE_integer("stronger_factor", 5, "Iteration multiplier of the stronger run.", flag_values=flag_values)
    flags.DEFINE_boolean("unbounded_check", True, "Attack at eps 255/255 (the whole box): accuracy must "
                         "fall to chance.", flag_values=flag_values)
    flags.DEFINE_integer("seed", 0, "Random seed.", flag_values=flag_values)
    flags.DEFINE_string("precision", "float32", "What the evaluation (clean pass, attacks, certificate) computes "
                        "in: float32 whatever the run trained in, or `trained`: the run's --mixed_precision "
                        "(low-precision gradients can mask an attack: compare with float32 before trusting it).",
                        flag_values=flag_values)


class EvalError(ValueError):
    """A bad flag or run directory; the message names it and what was received."""


def _floats(name, text):
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise EvalError(f"--{name} must be comma-separated numbers{' or auto' if name in _AUTO else ''}. "
                        f"Received: {text!r}") from None
    if any(not v >= 0 for v in values):
        raise EvalError(f"--{name} values must be >= 0. Received: {text!r}")
    return values


# The flags that take `auto` (resolved by `resolve_auto` once the model is loaded).
_AUTO = ("radii", "l2_eps")


def _auto(f, name):
    return getattr(f, name).strip().lower() == "auto"


def config_from_flags(f):
    """The `EvalConfig` of the flags; a flag at `auto` keeps EvalConfig's default here
    (`resolve_auto` replaces it once the model is loaded). EvalError for a bad flag."""
    from clustr_tf import config as config_lib  # no TensorFlow: the flags are checked before it loads

    if not f.model_dir:
        raise EvalError("--model_dir is required (a run directory of training/main.py).")
    if not os.path.isdir(f.model_dir):
        raise EvalError(f"--model_dir is not a directory. Received: {f.model_dir}")
    for name in ("num_examples", "batch_size", "iterations", "restarts", "square_queries", "stronger_factor"):
        if getattr(f, name) < 1:
            raise EvalError(f"--{name} must be >= 1. Received: {getattr(f, name)}")
    eps = _floats("eps", f.eps)
    if any(e > 255 for e in eps):
        raise EvalError(f"--eps values must be at most 255 (1/255 units). Received: {f.eps!r}")
    if not 0 < f.step <= 255:
        raise EvalError(f"--step must be in (0, 255] (1/255 units). Received: {f.step}")
    losses = tuple(v.strip() for v in f.losses.split(",") if v.strip())
    unknown = [v for v in losses if v not in config_lib.ATTACK_LOSSES]
    if unknown or not losses:
        raise EvalError(f"--losses must name some of {', '.join(config_lib.ATTACK_LOSSES)}. Received: {f.losses!r}")
    subsets = {}
    for name in ("square_eps", "stronger_eps"):
        values = _floats(name, getattr(f, name))
        missing = [v for v in values if v not in eps]
        if missing:
            raise EvalError(f"--{name} values must be among --eps ({f.eps}). Received: {getattr(f, name)!r}")
        subsets[name] = tuple(v / 255 for v in values)
    if f.precision not in ("float32", "trained"):
        raise EvalError(f"--precision must be float32 or trained. Received: {f.precision!r}")
    explicit = {name: _floats(name, getattr(f, name)) for name in _AUTO if not _auto(f, name)}
    from clustr_tf import evaluation  # TensorFlow loads here, once every flag is checked

    return evaluation.EvalConfig(
        square_eps=subsets["square_eps"],
        square_queries=f.square_queries,
        stronger_eps=subsets["stronger_eps"],
        stronger_factor=f.stronger_factor,
        unbounded_check=f.unbounded_check,
        linf_eps=tuple(e / 255 for e in eps),
        **explicit,
        step=f.step / 255,
        iterations=f.iterations,
        restarts=f.restarts,
        losses=losses,
        batch_size=f.batch_size,
        seed=f.seed,
    )


def resolve_auto(f, config, model, dataset):
    """Replaces the `auto` flags of `config` by `evaluation.auto_radii`'s choice.

    Returns:
        `(config, choice)`: the config, and what robustness.json's config records beside
        its radii and l2 eps: each flag's text, the backbone's bound by construction (or
        None) and why those radii.
    """
    from clustr_tf import evaluation

    auto = evaluation.auto_radii(model.backbone, dataset)
    config = dataclasses.replace(config, **{name: auto[name] for name in _AUTO if _auto(f, name)})
    choice = {"flags": {name: getattr(f, name) for name in _AUTO}, "construction_bound": auto["construction_bound"],
              "basis": auto["basis"] if any(_auto(f, name) for name in _AUTO) else "explicit flags"}
    return config, choice


def load_run(model_dir):
    """The run's model and configuration (`models.load_run`); EvalError when they cannot be used."""
    from clustr_tf import models

    try:
        model, run_config = models.load_run(model_dir)
    except models.ModelFileError as e:
        raise EvalError(str(e)) from None
    try:
        model.check_usable()
    except ValueError as e:
        raise EvalError(f"The model in {model_dir} cannot be evaluated: {e}.") from None
    return model, run_config


def _plots(result, model, images, labels, model_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(5, 3.5))
    shown = [a for a in result["attacks"] if a["norm"] == "inf" and a["eps"] < 1.0 and a.get("scope") == "all"]
    for loss in sorted({a["loss"] for a in shown}):
        runs = sorted((a["eps"], a["accuracy"]) for a in shown if a["loss"] == loss)
        ax.plot([e * 255 for e, _ in runs], [a for _, a in runs], marker="o", label=loss)
    worst = sorted((float(k.split("/")[0]), v) for k, v in result["robust_accuracy"].items()
                   if float(k.split("/")[0]) < 255)
    ax.plot([e for e, _ in worst], [v for _, v in worst], "k--", marker="s", label="worst case")
    ax.set(xlabel="l_inf eps (1/255)", ylabel="accuracy", ylim=(0, 1), title="Robust accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(model_dir, "robustness_attacks.png"), dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, label, style in (("certified_accuracy", "certified (attacked subset)", "o-"),
                              ("certified_accuracy_test_split", "certified (whole test split)", "s--"),
                              ("empirical_l2_certified_rule", "l2 PGD on the certified rule", "^:")):
        points = sorted((float(k), v) for k, v in result.get(key, {}).items())
        if points:
            ax.plot([r for r, _ in points], [v for _, v in points], style, label=label)
    ax.set(xlabel="l2 radius", ylabel="accuracy", ylim=(0, 1), title="Certified and empirical l2 accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(model_dir, "robustness_certified.png"), dpi=120)
    plt.close(fig)

    features = model.embed(images[:1000], training=False).numpy()
    mean = features.mean(0)
    _, _, vt = np.linalg.svd(features - mean, full_matrices=False)
    proj = (features - mean) @ vt[:2].T
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.scatter(proj[:, 0], proj[:, 1], c=labels[:1000], cmap="tab10", s=4, alpha=0.6)
    prototypes = model.prototypes()
    if prototypes is not None:
        centers, classes = prototypes
        cproj = (centers - mean) @ vt[:2].T
        ax.scatter(cproj[:, 0], cproj[:, 1], c=classes, cmap="tab10", marker="X", s=120, edgecolors="k")
    ax.set(title="Test features (PCA) and centers (X)" if prototypes is not None else "Test features (PCA)")
    fig.tight_layout()
    fig.savefig(os.path.join(model_dir, "robustness_features.png"), dpi=120)
    plt.close(fig)


def run(f):
    config = config_from_flags(f)
    model, run_config = load_run(f.model_dir)
    from clustr_tf import cli

    with cli.Heartbeat() as beat:  # a line at least every 10 s, also inside one long attack
        return _evaluate(f, config, model, run_config, beat)


def _evaluate(f, config, model, run_config, beat):

    import keras
    import numpy as np

    from clustr_tf import data
    from clustr_tf import evaluation
    from clustr_tf import precision

    trained = precision.of(model)
    computed = trained if f.precision == "trained" else "float32"
    precision.set_precision(model, computed)
    keras.utils.set_random_seed(f.seed)
    dataset = run_config.get("dataset", "digits")
    config, radii_choice = resolve_auto(f, config, model, dataset)
    images, labels = data.load_arrays(dataset, "test", data_dir=run_config.get("data_dir"))
    # Certification is one forward pass: the whole split, before the attacks' subset.
    beat.say(f"Certifying the {len(labels)} test images at l2 radii {', '.join(f'{r:g}' for r in config.radii)}")
    beat.status(f"certifying the {len(labels)} test images")
    split = evaluation.certify_split(model, images, labels, config.radii, config.batch_size)
    # Test splits are often ordered by class: attack a seeded random subset, never the
    # first examples (which could all be of one class).
    if f.num_examples < len(labels):
        keep = np.sort(np.random.default_rng(f.seed).permutation(len(labels))[: f.num_examples])
        images, labels = images[keep], labels[keep]
    neighbours = model.evaluation_neighbours(run_config.get("eval_L"))
    num_classes = model.num_classes
    config = dataclasses.replace(config, neighbours=neighbours)
    clock = {"last": time.time()}

    def progress(done, total, run):
        """One labelled line per attack run: which attack, at which radius, what it found."""
        now = time.time()
        beat.say(f"[{done}/{total}] {evaluation.describe(run['norm'], run['eps'], run['loss'], run['scope'])}: "
                 f"{100 * run['accuracy']:.1f}% robust ({run['iterations']} "
                 f"{'queries' if run['loss'] == 'square' else 'steps'}, {now - clock['last']:.0f} s)")
        clock["last"] = now

    beat.say(f"Attacking {len(labels)} test images ({dataset}): {len(evaluation.plan(config))} PGD runs, then the "
             "stronger, gradient-free and certified-rule runs")
    result = evaluation.evaluate_robustness(model, images, labels, config, progress=progress, status=beat.status)
    beat.status(None)
    checks = evaluation.masking_checks(result, num_classes)
    for name, check in checks.items():
        if evaluation.check_outcome(check) == "FAILED":
            logging.warning("Gradient-masking check %s FAILED: %s", name, check["detail"])
        elif not check["passed"]:
            logging.info("Gradient-masking check %s %s", name, check["detail"])
    violated = {k: v for k, v in result["certificate_violations"].items() if v}
    if violated:
        logging.error("CERTIFICATE VIOLATED: l2 PGD broke examples certified at these radii (radius: count) %s; "
                      "the certified radii of this model are not to be trusted (a bug or an unsound Lipschitz "
                      "bound %g).", violated, result["lipschitz_bound"])
    result = {"split": "test", "dataset": dataset, "method": run_config.get("method", "clustr"),
              "neighbours": neighbours, "trained_precision": trained, "precision": computed, **result,
              "certified_accuracy_test_split": split["certified_accuracy"],
              "clean_accuracy_test_split": split["clean_accuracy"],
              "certified_test_examples": split["num_examples"],
              "median_certified_radius_test_split": split["median_certified_radius"],
              "masking_checks": checks,
              "config": {**dataclasses.asdict(config), "radii_choice": radii_choice}}
    from clustr_tf import checks

    checks.write_json(os.path.join(f.model_dir, "robustness.json"), result)
    with open(os.path.join(f.model_dir, "attacks.csv"), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["norm", "eps", "loss", "iterations", "restarts", "accuracy", "scope"])
        writer.writeheader()
        writer.writerows(result["attacks"])
    beat.status("writing robustness.json, attacks.csv and the plots")
    _plots(result, model, images, np.asarray(labels), f.model_dir)
    beat.status(None)
    beat.say(summary(result))
    return result


def summary(result):
    """The short table evaluate.py ends with."""
    from clustr_tf import evaluation

    rows = [("clean accuracy (attacked images)", f"{100 * result['clean_accuracy']:.1f}%")]
    rows += [(f"robust accuracy, l_inf {eps} (worst case)", f"{100 * acc:.1f}%")
             for eps, acc in result["robust_accuracy"].items()]
    rows += [(f"robust accuracy, l2 {eps}", f"{100 * acc:.1f}%") for eps, acc in result["robust_accuracy_l2"].items()]
    rows += [(f"certified accuracy, l2 {r} ({result['certified_test_examples']} test images)", f"{100 * acc:.1f}%")
             for r, acc in result["certified_accuracy_test_split"].items()]
    violations = sum(result["certificate_violations"].values())
    rows += [("certificate violations", str(violations)),
             ("gradient-masking checks", evaluation.checks_summary(result["masking_checks"]))]
    width = max(len(name) for name, _ in rows)
    return "\n".join([f"Results ({result['dataset']}, {result['num_examples']} attacked images; robustness.json):"]
                     + [f"  {name.ljust(width)}  {value}" for name, value in rows])


def main(argv, flag_values=flags.FLAGS):
    from clustr_tf import cli

    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}", 2)
    try:
        run(flag_values)
    except EvalError as e:
        cli.fail(e, 2)


def console_main():
    """The `clustr-evaluate` command of the pip package (pyproject.toml)."""
    os.environ["CLUSTR_TF_DEFER_IMPORTS"] = "1"  # flags parsed and checked before TensorFlow loads
    from clustr_tf import cli

    cli.start(main, define_flags, __name__)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    console_main()
