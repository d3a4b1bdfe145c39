"""Robustness evaluation: attacks at every eps, worst cases, certificates, masking checks.

`evaluate_robustness` runs six stages, each a function of its own: `plan` (the PGD runs),
`clean_pass` (clean decisions and the certificate), `gradient_attacks`, `stronger_attack`
and `gradient_free_attack` (each narrowing the per-example worst case), and
`certified_rule_attack` (the certificate's empirical check), then sums them up.
It runs PGD with each attack loss at each eps (l_inf, and l2 if asked),
takes the per-example worst case over every run at an eps, certifies the nearest-center
decision with `certify` and `lipschitz`, attacks that certified decision at every
certified radius (an example certified at r that l2 PGD breaks at r is a violation: a bug
or an unsound bound), and `masking_checks` tests the results for the signs of gradient
masking that misled readers of the original ClusTR evaluation.

Certification is one forward pass: `certify_split` certifies a whole split (the attacks
run on a subset). `auto_radii` picks the radii to certify and attack for a backbone.
"""

import dataclasses

import numpy as np

from clustr_tf import attacks
from clustr_tf import certify
from clustr_tf import lipschitz

# Today's radii for a backbone whose Lipschitz bound is composed from trained weights (the
# certificate certifies little there), and the l2 eps of its attacks.
DEFAULT_RADII = (0.0, 0.05, 0.1, 0.25, 0.5)
DEFAULT_L2_EPS = (0.5,)
# For a backbone that is Lipschitz by construction: the l2 radii of the Lipschitz-network
# literature (36/255, 72/255, 108/255 on CIFAR-10: GloRo, AOL, SLL, LiResNet), and 0.25,
# 0.5, 1.0 on the 8x8 digits.
LIPSCHITZ_RADII = {"digits": (0.25, 0.5, 1.0)}
LIPSCHITZ_RADII_OTHER = (36 / 255, 72 / 255, 108 / 255)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What to run. eps values are in pixel units ([0, 1] images); `step` is the l_inf
    step (l2 runs step eps / 4); `neighbours` is L of the soft-kNC rule under attack
    (default: the model's). At every radius > 0 of `radii` the certified rule is attacked
    too (l2 PGD, margin loss, `iterations`, `restarts`, step radius / 4)."""

    linf_eps: tuple = (2 / 255, 8 / 255, 16 / 255, 25.5 / 255)
    l2_eps: tuple = DEFAULT_L2_EPS
    step: float = 2 / 255
    iterations: int = 20
    restarts: int = 10
    losses: tuple = ("official", "logits", "margin")
    radii: tuple = DEFAULT_RADII
    batch_size: int = 256
    neighbours: int | None = None
    seed: int = 0
    # The gradient-free Square attack joins the worst case at these l_inf eps (a subset of
    # linf_eps), with this query budget per example.
    square_eps: tuple = (8 / 255,)
    square_queries: int = 5000
    # At these l_inf eps (a subset of linf_eps), the strongest loss is run again with
    # `stronger_factor` x the iterations on the examples every attack left standing.
    stronger_eps: tuple = (8 / 255,)
    stronger_factor: int = 5
    # PGD at eps 1.0 (the whole [0, 1] box), margin loss, step 0.1: accuracy must fall to
    # at most chance, or the gradients are masked.
    unbounded_check: bool = True


def _eps_key(eps):
    return f"{eps * 255:g}/255"


def plan(config):
    """The PGD runs of an evaluation, in order: `(norm, eps, loss, iterations, step)`.

    Every loss at every l_inf eps (step `config.step`), every loss at every l2 eps (step
    eps / 4: the l_inf step in pixels would move an l2 attack too little), and, unless an
    eps of 1 or more is asked already, the unbounded check (eps 1.0, margin, step 0.1).
    """
    for name in ("square_eps", "stronger_eps"):
        extra = [e for e in getattr(config, name) if e not in config.linf_eps]
        if extra:
            raise ValueError(f"`{name}` must be a subset of `linf_eps`. Received: {extra} not in {config.linf_eps}")
    runs = [("inf", e, loss, config.iterations, config.step) for e in config.linf_eps for loss in config.losses]
    runs += [("2", e, loss, config.iterations, e / 4 if e > 0 else config.step)
             for e in config.l2_eps for loss in config.losses]
    if config.unbounded_check and not any(e >= 1.0 for e in config.linf_eps):
        runs.append(("inf", 1.0, "margin", config.iterations, 0.1))
    return runs


def _batches(n, batch_size):
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def _certificate(model, features, batch_size):
    """`(certified l2 radius in pixels float64 [N], certified class int64 [N], the
    backbone's Lipschitz bound)`: the feature radii, certified batch by batch (the float64
    certificate holds [batch, C*K, D] at once), over `lipschitz.model_bound`."""
    parts = [model.certify_features(features[b])[:2] for b in _batches(len(features), batch_size)]
    radius_f = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.float64)
    classes = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
    bound = lipschitz.model_bound(model.backbone)
    return certify.certified_radius(radius_f, bound), classes, bound


def clean_pass(model, images, labels, config):
    """One backbone pass: the clean decisions (the logits the attacks see) and the
    certificate of the model's certified rule (`models.Classifier`: the nearest center for
    ClusTR, the linear head for a baseline).

    Args:
        model: a `models.Classifier`.
        images: float32 array [N, H, W, C] in [0, 1].
        labels: int array [N].
        config: `EvalConfig` (its `batch_size` and `neighbours`).

    Returns:
        dict with `clean` (bool [N], correct), `certified_correct` (bool [N], the certified
        rule's class is the label), `radii` (float64 [N], certified l2 radii in pixels) and
        `lipschitz_bound`.
    """
    batches = _batches(len(labels), config.batch_size)
    features = np.concatenate([model.embed(images[b], training=False).numpy() for b in batches])
    logits = np.concatenate([model.logits_from_features(features[b], config.neighbours).numpy() for b in batches])
    radius, classes, bound = _certificate(model, features, config.batch_size)
    return {"clean": logits.argmax(1) == labels, "certified_correct": classes == labels,
            "radii": radius, "lipschitz_bound": bound}


def certify_split(model, images, labels, radii, batch_size=256):
    """Certifies a whole split: one backbone pass, no attack.

    The same certificate as `clean_pass` (certified rule, `lipschitz.model_bound` of the
    backbone), so on the same examples it gives the same certified accuracy.

    Args:
        model: a `models.Classifier`.
        images: float array [N, H, W, C] in [0, 1].
        labels: int array [N].
        radii: iterable of l2 radii (pixel units) r >= 0.
        batch_size: int >= 1, examples per backbone call and per certificate.

    Returns:
        dict with `num_examples` (N), `clean_accuracy` (of the certified rule),
        `certified_accuracy` (radius key as `certify.certified_accuracy` -> fraction of the
        N examples correct with radius > r), `median_certified_radius` (0 for a wrong
        example) and `lipschitz_bound`.

    Raises:
        ValueError: for a batch size < 1, or images and labels of different lengths.
    """
    if not batch_size >= 1:
        raise ValueError(f"`batch_size` must be >= 1. Received: {batch_size!r}")
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels).reshape(-1)
    if len(images) != len(labels):
        raise ValueError(f"`images` and `labels` must have the same length. Received: {len(images)} and {len(labels)}")
    features = [model.embed(images[b], training=False).numpy() for b in _batches(len(labels), batch_size)]
    features = np.concatenate(features) if features else np.zeros((0, 1), np.float32)
    radius, classes, bound = _certificate(model, features, batch_size)
    correct = classes == labels
    return {
        "num_examples": len(labels),
        "clean_accuracy": float(correct.mean()) if len(labels) else 0.0,
        "certified_accuracy": certify.certified_accuracy(radius, correct, radii),
        "median_certified_radius": float(np.median(np.where(correct, radius, 0.0))) if len(labels) else 0.0,
        "lipschitz_bound": bound,
    }


def auto_radii(backbone, dataset):
    """The radii to certify and to attack in l2 when the user asks for `auto`.

    A backbone that is Lipschitz by construction (`lipschitz.construction_bound` returns a
    bound) gets the radii of the Lipschitz-network literature (`LIPSCHITZ_RADII` for its
    dataset, else `LIPSCHITZ_RADII_OTHER`: 36/255, 72/255, 108/255); any other backbone
    today's defaults (`DEFAULT_RADII`, `DEFAULT_L2_EPS`).

    Args:
        backbone: the model's feature extractor (a Keras model).
        dataset: str, the run's dataset name (e.g. "digits", "cifar10").

    Returns:
        dict with `radii` (tuple, 0 first), `l2_eps` (tuple), `construction_bound` (float,
        or None when the backbone is not Lipschitz by construction) and `basis` (str, why).
    """
    bound, reason = None, None
    if getattr(backbone, "layers", None) is not None:
        try:
            bound = float(lipschitz.construction_bound(backbone))
        except ValueError as e:  # lipschitz.NotLipschitzByConstructionError and shape errors
            reason = str(e).split(". ")[0]
    else:
        reason = f"the backbone is a {type(backbone).__name__}, not a Keras model"
    if bound is None:
        return {"radii": DEFAULT_RADII, "l2_eps": DEFAULT_L2_EPS, "construction_bound": None,
                "basis": f"defaults: the backbone's bound is not exact by construction ({reason})"}
    nonzero = LIPSCHITZ_RADII.get(dataset, LIPSCHITZ_RADII_OTHER)
    return {"radii": (0.0, *nonzero), "l2_eps": tuple(nonzero), "construction_bound": bound,
            "basis": f"Lipschitz by construction (bound {bound:g}): the l2 radii of the Lipschitz-network "
                     f"literature for {dataset!r}"}


def _pgd(model, model_fn, images, labels, subset, run, config):
    """bool [N]: whether each example of `subset` survived the PGD `run` (False elsewhere)."""
    norm, eps, loss, iterations, step = run
    robust = np.zeros(len(labels), bool)
    index = np.flatnonzero(subset)
    for i in range(0, len(index), config.batch_size):
        b = index[i: i + config.batch_size]
        _, robust[b] = attacks.pgd(
            model_fn, images[b], labels[b], eps, min(step, eps) if eps > 0 else step, iterations,
            norm=np.inf if norm == "inf" else 2, loss=attacks.loss_function(loss, model),
            restarts=config.restarts, seed=config.seed,
        )
    return robust


def gradient_attacks(model, model_fn, images, labels, clean, runs, config, progress=None):
    """Every PGD run of `runs` on the clean-correct examples.

    Returns:
        `(results, worst)`: one result dict per run (norm, eps, loss, iterations, restarts,
        accuracy, scope "all"), and {(norm, eps): bool [N]} the per-example worst case.
    """
    results, worst = [], {}
    for run in runs:
        norm, eps, loss, iterations, _ = run
        robust = _pgd(model, model_fn, images, labels, clean, run, config)
        worst[(norm, eps)] = worst.get((norm, eps), clean.copy()) & robust
        results.append({"norm": norm, "eps": float(eps), "loss": loss, "iterations": iterations,
                        "restarts": config.restarts, "accuracy": float(robust.mean()), "scope": "all"})
        if progress:
            progress(len(results))
    return results, worst


def stronger_attack(model, model_fn, images, labels, results, worst, config, progress=None):
    """At each `stronger_eps`, the strongest loss again with `stronger_factor` x the
    iterations on the examples every run left standing (does 20 iterations converge?).
    Updates `worst` and appends the runs to `results` (scope "survivors").

    Returns:
        {eps key: the run's loss, iterations, restarts, worst case before and after}.
    """
    stronger = {}
    for eps in config.stronger_eps:
        key = ("inf", eps)
        per_loss = {a["loss"]: a["accuracy"] for a in results if a["norm"] == "inf" and a["eps"] == eps}
        loss = min(per_loss, key=lambda k: (per_loss[k], k != "margin"))
        iterations = config.iterations * config.stronger_factor
        before = worst[key].copy()
        worst[key] &= _pgd(model, model_fn, images, labels, before, ("inf", eps, loss, iterations, config.step), config)
        stronger[_eps_key(eps)] = {"loss": loss, "iterations": iterations, "restarts": config.restarts,
                                   "accuracy_before": float(before.mean()),
                                   "accuracy_after": float(worst[key].mean())}
        results.append({"norm": "inf", "eps": float(eps), "loss": loss, "iterations": iterations,
                        "restarts": config.restarts, "accuracy": float(worst[key].mean()), "scope": "survivors"})
        if progress:
            progress(len(results))
    return stronger


def gradient_free_attack(model_fn, images, labels, clean, results, worst, config, progress=None):
    """Square at each `square_eps` on every clean-correct example: its own accuracy is
    comparable with each PGD loss's, and what it alone breaks joins the worst case.
    Updates `worst` and appends the runs to `results`.

    Returns:
        {eps key: Square's accuracy, the gradient-only worst case, the worst case with
        Square, and the fraction only Square broke}.
    """
    gradient_free = {}
    for eps in config.square_eps:
        key = ("inf", eps)
        robust = np.zeros(len(labels), bool)
        index = np.flatnonzero(clean)
        if len(index):
            _, robust[index] = attacks.square(model_fn, images[index], labels[index], eps,
                                              queries=config.square_queries, seed=config.seed,
                                              batch_size=config.batch_size)
        gradient_worst = worst[key].copy()
        worst[key] &= robust
        gradient_free[_eps_key(eps)] = {
            "attack": "square", "queries": config.square_queries,
            "accuracy": float(robust.mean()),
            "gradient_worst_case": float(gradient_worst.mean()),
            "worst_case_with_square": float(worst[key].mean()),
            "broken_only_by_square": float((gradient_worst & ~robust).mean()),
        }
        results.append({"norm": "inf", "eps": float(eps), "loss": "square", "iterations": config.square_queries,
                        "restarts": 1, "accuracy": float(robust.mean()), "scope": "all"})
        if progress:
            progress(len(results))
    return gradient_free


def certified_rule_attack(model, images, labels, clean, results, config, progress=None):
    """The empirical check of the certificate: at every radius r > 0 of `config.radii`,
    l2 PGD (margin loss, `config.iterations`, `config.restarts`, step r / 4) against the
    certified rule (`attacks.certified_rule_logits_function`) on the examples whose
    certified rule is correct. Appends the runs to `results` (scope "certified_rule").

    An example certified at r (correct, radius > r) that the attack breaks at r is a
    violation of the certificate: a bug, or an unsound Lipschitz bound.

    Args:
        model: a `models.Classifier`.
        images: float32 array [N, H, W, C] in [0, 1].
        labels: int array [N].
        clean: the dict of `clean_pass`.
        results: list of run dicts, appended to.
        config: `EvalConfig`.
        progress: optional callable `progress(runs done)`.

    Returns:
        `(empirical, violations)`: {radius key: fraction of the N examples the certified
        rule still classifies correctly after the attack}, {radius key: number of examples
        certified at r that the attack broke}; radius keys as `certify.certified_accuracy`.
    """
    model_fn = attacks.certified_rule_logits_function(model)
    correct, radii = clean["certified_correct"], clean["radii"]
    empirical, violations = {}, {}
    for r in config.radii:
        if not r > 0:
            continue
        robust = _pgd(model, model_fn, images, labels, correct, ("2", r, "margin", config.iterations, r / 4), config)
        key = str(r)
        empirical[key] = float(robust.mean()) if len(labels) else 0.0
        violations[key] = int(np.sum(correct & (radii > r) & ~robust))
        results.append({"norm": "2", "eps": float(r), "loss": "margin", "iterations": config.iterations,
                        "restarts": config.restarts, "accuracy": empirical[key], "scope": "certified_rule"})
        if progress:
            progress(len(results))
    return empirical, violations


def evaluate_robustness(model, images, labels, config, progress=None):
    """Attacks and certifies a ClusTR model on (images, labels).

    Args:
        model: a `models.Classifier`: a `ClusTRModel` (certified: the nearest-center
            rule), or a `baselines.SoftmaxClassifier` (certified: its linear head).
        images: float array [N, H, W, C] in [0, 1].
        labels: int array [N].
        config: `EvalConfig`.
        progress: optional callable `progress(done, total)`.

    Returns:
        A dict with `num_examples`, `clean_accuracy`, `nearest_center_accuracy`,
        `attacks` (list of {norm, eps, loss, iterations, restarts, accuracy, scope}; loss
        `square` is the gradient-free attack, whose `iterations` are queries; scope
        `survivors` marks the stronger run, made only on the examples every other run
        left standing, whose accuracy is therefore the worst case after it; scope
        `certified_rule` the l2 runs against the certified rule),
        `robust_accuracy` (l_inf eps key -> worst-case accuracy over every run at that eps,
        including eps 255/255 when the unbounded check runs), `robust_accuracy_pgd` (the
        same over the PGD runs made at every eps), `robust_accuracy_l2`,
        `certified_accuracy` (radius -> fraction), `lipschitz_bound`, `stronger_attack`
        (eps key -> the stronger run's loss, iterations and the worst case before and
        after it), `gradient_free` (eps key -> Square's accuracy, the gradient-only worst
        case, the worst case with Square, and the fraction only Square broke),
        `empirical_l2_certified_rule` (radius key, for every radius > 0 of `radii` -> the
        certified rule's accuracy under l2 PGD at that radius) and `certificate_violations`
        (radius key -> examples certified at the radius that the attack broke: 0 unless
        the certificate is unsound).
    """
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels).reshape(-1)
    runs = plan(config)
    total = len(runs) + len(config.stronger_eps) + len(config.square_eps) + sum(r > 0 for r in config.radii)
    report = (lambda done: progress(done, total)) if progress else None
    model_fn = attacks.logits_function(model, config.neighbours)
    clean = clean_pass(model, images, labels, config)
    results, worst = gradient_attacks(model, model_fn, images, labels, clean["clean"], runs, config, report)
    pgd_worst = {_eps_key(e): float(worst[("inf", e)].mean()) for norm, e in sorted(worst) if norm == "inf"}
    stronger = stronger_attack(model, model_fn, images, labels, results, worst, config, report)
    gradient_free = gradient_free_attack(model_fn, images, labels, clean["clean"], results, worst, config, report)
    empirical, violations = certified_rule_attack(model, images, labels, clean, results, config, report)
    linf = sorted({e for norm, e in worst if norm == "inf"})
    certified_correct, radii = clean["certified_correct"], clean["radii"]
    return {
        "num_examples": len(labels),
        "clean_accuracy": float(clean["clean"].mean()),
        "nearest_center_accuracy": (float(certified_correct.mean()) if model.certified_rule == "nearest center"
                                    else None),
        "attacks": results,
        "robust_accuracy": {_eps_key(e): float(worst[("inf", e)].mean()) for e in linf},
        "robust_accuracy_l2": {f"{e:g}": float(worst[("2", e)].mean()) for e in config.l2_eps},
        "lipschitz_bound": clean["lipschitz_bound"],
        "certified_accuracy": certify.certified_accuracy(radii, certified_correct, config.radii),
        "median_certified_radius": float(np.median(np.where(certified_correct, radii, 0.0))) if len(labels) else 0.0,
        "robust_accuracy_pgd": pgd_worst,
        "stronger_attack": stronger,
        "gradient_free": gradient_free,
        "empirical_l2_certified_rule": empirical,
        "certificate_violations": violations,
    }


def _fmt(values):
    return "{" + ", ".join(f"{k}: {v:.4f}" for k, v in values.items()) + "}"


def masking_checks(result, num_classes):
    """Checks for gradient masking; each entry has `passed` and `detail`. A check that was
    not run fails (its detail says so): nothing is skipped silently.

    - accuracy does not rise with eps (worst case, l_inf);
    - the attack losses agree within 5 points at every eps;
    - at the largest eps of at least 1.0 (l_inf) accuracy is at most chance;
    - `stronger_attack_converged`: 5x the iterations lowered the worst case by at most 1 point;
    - `gradient_free_no_better`: the gradient-free attack broke at most 2 points' worth of
      examples that every gradient attack left standing (a stricter test than comparing
      its accuracy with the gradient worst case, which it implies);
    - `official_gap`: how much higher the official loss's accuracy is than the worst case
      (reported; a large gap is what misled the paper's readers);
    - `certified_below_empirical`: at every radius > 0 attacked under the certified rule,
      certified accuracy <= the certified rule's empirical l2 accuracy, and no example
      certified at the radius was broken (a violation is a bug or an unsound bound).

    Args:
        result: the dict of `evaluate_robustness` (or one read back from robustness.json).
        num_classes: int, C (chance is 1 / C).

    Returns:
        {check name: {"passed": bool, "detail": str}}.
    """
    checks = {}
    worst = result["robust_accuracy"]
    eps = sorted(worst, key=lambda k: float(k.split("/")[0]))
    # Monotonicity compares the same set of PGD runs at every eps (the stronger and the
    # gradient-free runs are made at some eps only).
    same = result.get("robust_accuracy_pgd", worst)
    order = sorted(same, key=lambda k: float(k.split("/")[0]))
    rising = [(a, b) for a, b in zip(order, order[1:]) if same[b] > same[a] + 1e-9]
    checks["monotone_in_eps"] = {
        "passed": not rising,
        "detail": f"PGD worst-case accuracy by eps: {_fmt({k: same[k] for k in order})}",
    }
    by_eps = {}
    for a in result["attacks"]:
        if a["norm"] == "inf" and a.get("scope", "all") == "all" and a["loss"] in attacks.LOSSES:
            by_eps.setdefault(_eps_key(a["eps"]), {})[a["loss"]] = a["accuracy"]
    spread = {k: max(v.values()) - min(v.values()) for k, v in by_eps.items()}
    checks["losses_agree"] = {
        "passed": all(s <= 0.05 for s in spread.values()),
        "detail": f"largest difference between attack losses by eps: {_fmt(spread)}",
    }
    big = [k for k in eps if float(k.split("/")[0]) >= 255]
    checks["unbounded_eps_breaks_all"] = {
        "passed": bool(big) and worst[big[-1]] <= 1.0 / num_classes + 1e-9,
        "detail": (f"accuracy at eps {big[-1]}: {worst[big[-1]]:.4f} (chance {1.0 / num_classes:.4f})" if big
                   else "not run: no l_inf eps of 255/255 was attacked"),
    }
    stronger = result.get("stronger_attack", {})
    drops = {k: v["accuracy_before"] - v["accuracy_after"] for k, v in stronger.items()}
    checks["stronger_attack_converged"] = {
        "passed": bool(stronger) and all(d <= 0.01 for d in drops.values()),
        "detail": (", ".join(f"at {k}: {v['loss']} with {v['iterations']} iterations lowered the worst case "
                             f"{v['accuracy_before']:.4f} -> {v['accuracy_after']:.4f}" for k, v in stronger.items())
                   or "not run: no stronger attack was made"),
    }
    free = result.get("gradient_free", {})
    checks["gradient_free_no_better"] = {
        "passed": bool(free) and all(v["broken_only_by_square"] <= 0.02 for v in free.values()),
        "detail": (", ".join(f"at {k}: Square {v['accuracy']:.4f} vs gradient worst case {v['gradient_worst_case']:.4f};"
                             f" broken only by Square {v['broken_only_by_square']:.4f}" for k, v in free.items())
                   or "not run: no gradient-free attack was made"),
    }
    gaps = {k: v.get("official", np.nan) - worst[k] for k, v in by_eps.items() if "official" in v}
    checks["official_gap"] = {
        "passed": all(g <= 0.05 for g in gaps.values()),
        "detail": f"official-loss accuracy minus worst case, by eps: {_fmt(gaps)}",
    }
    checks["certified_below_empirical"] = _certified_below_empirical(result)
    return checks


def _certified_below_empirical(result):
    empirical = result.get("empirical_l2_certified_rule") or {}
    violations = result.get("certificate_violations") or {}
    certified = result.get("certified_accuracy") or {}
    keys = sorted((k for k in empirical if k in certified), key=float)
    if not keys:
        return {"passed": False, "detail": "not run: no l2 radius > 0 was both certified and attacked under the "
                                           "certified rule"}
    above = [k for k in keys if certified[k] > empirical[k] + 1e-12]
    broken = {k: violations.get(k) for k in keys if violations.get(k) != 0}
    detail = "; ".join(f"at {k}: certified {certified[k]:.4f} vs empirical {empirical[k]:.4f}, "
                       f"violations {violations.get(k, 'not counted')}" for k in keys)
    if above or broken:
        detail = ("CERTIFICATE VIOLATED (a bug or an unsound Lipschitz bound): "
                  f"certified above empirical at {above or 'no radius'}, "
                  f"certified examples broken {broken or 'none'}; " + detail)
    return {"passed": not above and not broken, "detail": detail}
