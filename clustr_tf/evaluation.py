"""Robustness evaluation: attacks at every eps, worst cases, certificates, masking checks.

`evaluate_robustness` runs PGD with each attack loss at each eps (l_inf, and l2 if asked),
takes the per-example worst case over every run at an eps, certifies the nearest-center
decision with `certify` and `lipschitz`, and `masking_checks` tests the results for the
signs of gradient masking that misled readers of the original ClusTR evaluation.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from clustr_tf import attacks
from clustr_tf import certify
from clustr_tf import lipschitz


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What to run. eps values are in pixel units ([0, 1] images); `neighbours` is L of
    the soft-kNC rule under attack (default: the model's)."""

    linf_eps: tuple = (2 / 255, 8 / 255, 16 / 255, 25.5 / 255)
    l2_eps: tuple = ()
    step: float = 2 / 255
    iterations: int = 20
    restarts: int = 10
    losses: tuple = ("official", "logits", "margin")
    radii: tuple = (0.0, 0.05, 0.1, 0.25, 0.5)
    batch_size: int = 256
    neighbours: int | None = None
    seed: int = 0


def _eps_key(eps):
    return f"{eps * 255:g}/255"


def evaluate_robustness(model, images, labels, config, progress=None):
    """Attacks and certifies a ClusTR model on (images, labels).

    Args:
        model: a `ClusTRModel`.
        images: float array [N, H, W, C] in [0, 1].
        labels: int array [N].
        config: `EvalConfig`.
        progress: optional callable `progress(done, total)`.

    Returns:
        A dict with `num_examples`, `clean_accuracy`, `nearest_center_accuracy`,
        `attacks` (list of {norm, eps, loss, iterations, restarts, accuracy}),
        `robust_accuracy` (l_inf eps key -> worst-case accuracy), `robust_accuracy_l2`,
        `certified_accuracy` (radius -> fraction), `lipschitz_bound`.
    """
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels).reshape(-1)
    model_fn = attacks.logits_function(model, config.neighbours)
    n = len(labels)
    batches = [slice(i, min(i + config.batch_size, n)) for i in range(0, n, config.batch_size)]
    layer = model.cluster_centers

    # One backbone pass gives both rules' clean decisions (the same logits model_fn gives).
    features = np.concatenate([model.embed(images[b], training=False).numpy() for b in batches])
    logits = layer.logits_from_distances(
        layer.squared_distances(features), config.neighbours
    ).numpy()
    clean = logits.argmax(1) == labels
    radius_f, classes, _ = certify.feature_radius(
        features.astype(np.float64), layer.centers.numpy().astype(np.float64), layer.clusters_per_class
    )
    bound = lipschitz.model_bound(model.backbone)
    radii = certify.certified_radius(radius_f.numpy(), bound)
    nearest_correct = classes.numpy() == labels

    runs = [("inf", e, loss) for e in config.linf_eps for loss in config.losses]
    runs += [("2", e, loss) for e in config.l2_eps for loss in config.losses]
    worst = {}
    results = []
    for done, (norm, eps, loss) in enumerate(runs):
        robust = np.zeros(n, bool)
        for b in batches:
            _, r = attacks.pgd(
                model_fn, images[b], labels[b], eps, min(config.step, eps) if eps > 0 else config.step,
                config.iterations, norm=np.inf if norm == "inf" else 2, loss=loss,
                restarts=config.restarts, seed=config.seed,
            )
            robust[b] = r
        robust &= clean
        key = (norm, eps)
        worst[key] = worst.get(key, clean.copy()) & robust
        results.append({"norm": norm, "eps": float(eps), "loss": loss, "iterations": config.iterations,
                        "restarts": config.restarts, "accuracy": float(robust.mean())})
        if progress:
            progress(done + 1, len(runs))
    return {
        "num_examples": n,
        "clean_accuracy": float(clean.mean()),
        "nearest_center_accuracy": float(nearest_correct.mean()),
        "attacks": results,
        "robust_accuracy": {_eps_key(e): float(worst[("inf", e)].mean()) for e in config.linf_eps},
        "robust_accuracy_l2": {f"{e:g}": float(worst[("2", e)].mean()) for e in config.l2_eps},
        "lipschitz_bound": bound,
        "certified_accuracy": certify.certified_accuracy(radii, nearest_correct, config.radii),
        "median_certified_radius": float(np.median(np.where(nearest_correct, radii, 0.0))) if n else 0.0,
    }


def masking_checks(result, num_classes):
    """Checks for gradient masking; each entry has `passed` and `detail`.

    - accuracy does not rise with eps (worst case, l_inf);
    - the attack losses agree within 5 points at every eps;
    - at the largest eps of at least 1.0 (l_inf) accuracy is at most chance, when run;
    - `official_gap`: how much higher the official loss's accuracy is than the worst case
      (reported; a large gap is what misled the paper's readers).
    """
    checks = {}
    worst = result["robust_accuracy"]
    eps = sorted(worst, key=lambda k: float(k.split("/")[0]))
    values = [worst[k] for k in eps]
    rising = [(a, b) for a, b in zip(eps, eps[1:]) if worst[b] > worst[a] + 1e-9]
    checks["monotone_in_eps"] = {
        "passed": not rising,
        "detail": f"worst-case accuracy by eps: {dict(zip(eps, values))}",
    }
    by_eps = {}
    for a in result["attacks"]:
        if a["norm"] == "inf":
            by_eps.setdefault(_eps_key(a["eps"]), {})[a["loss"]] = a["accuracy"]
    spread = {k: max(v.values()) - min(v.values()) for k, v in by_eps.items()}
    checks["losses_agree"] = {
        "passed": all(s <= 0.05 for s in spread.values()),
        "detail": f"largest difference between attack losses by eps: {spread}",
    }
    big = [k for k in eps if float(k.split("/")[0]) >= 255]
    if big:
        checks["unbounded_eps_breaks_all"] = {
            "passed": worst[big[-1]] <= 1.0 / num_classes + 1e-9,
            "detail": f"accuracy at eps {big[-1]}: {worst[big[-1]]} (chance {1.0 / num_classes:.3f})",
        }
    gaps = {k: v.get("official", np.nan) - worst[k] for k, v in by_eps.items() if "official" in v}
    checks["official_gap"] = {
        "passed": all(g <= 0.05 for g in gaps.values()),
        "detail": f"official-loss accuracy minus worst case, by eps: {gaps}",
    }
    return checks
