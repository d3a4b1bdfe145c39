"""The attack stages of an evaluation: PGD with every loss at every eps, the stronger PGD
on the survivors and the gradient-free Square attack (each narrowing the per-example worst
case), and l2 PGD against the certified rule (the certificate's empirical check).

Each stage appends its runs to the evaluation's `results` list (dicts with norm, eps,
loss, iterations, restarts, accuracy and scope) and returns what it found. `progress(done,
run)` hears of each finished run; `status(text)` of each run as it starts and after each of
its batches (`describe` words a run).
"""

import numpy as np

from clustr_tf.robustness import attacks
from clustr_tf.robustness.evaluation import planning


def describe(norm, eps, loss, scope="all"):
    """A run in words: `l_inf PGD (margin loss) eps 8/255 on the survivors`."""
    radius = f"{eps * 255:g}/255" if norm == "inf" else f"{eps:g}"
    attack = "Square" if loss == "square" else f"PGD ({loss} loss)"
    target = {"certified_rule": " on the certified rule", "survivors": " on the survivors"}.get(scope, "")
    return f"l{'_inf' if norm == 'inf' else '2'} {attack} eps {radius}{target}"


def _pgd(model, model_fn, images, labels, subset, run, config, status=None, scope="all"):
    """bool [N]: whether each example of `subset` survived the PGD `run` (False elsewhere)."""
    norm, eps, loss, iterations, step = run
    robust = np.zeros(len(labels), bool)
    index = np.flatnonzero(subset)
    for i in range(0, len(index), config.batch_size):
        if status:
            status(f"{describe(norm, eps, loss, scope)}: {i}/{len(index)} images attacked")
        b = index[i: i + config.batch_size]
        _, robust[b] = attacks.pgd(
            model_fn, images[b], labels[b], eps, min(step, eps) if eps > 0 else step, iterations,
            norm=np.inf if norm == "inf" else 2, loss=attacks.loss_function(loss, model),
            restarts=config.restarts, seed=config.seed,
        )
    return robust


def _record(results, progress, norm, eps, loss, iterations, restarts, accuracy, scope):
    """Appends one run's result dict to `results` and reports the runs done to `progress`."""
    results.append({"norm": norm, "eps": float(eps), "loss": loss, "iterations": iterations,
                    "restarts": restarts, "accuracy": accuracy, "scope": scope})
    if progress:
        progress(len(results), results[-1])


def gradient_attacks(model, model_fn, images, labels, clean, runs, config, progress=None, status=None):
    """Every PGD run of `runs` on the clean-correct examples.

    Returns:
        `(results, worst)`: one result dict per run (norm, eps, loss, iterations, restarts,
        accuracy, scope "all"), and {(norm, eps): bool [N]} the per-example worst case.
    """
    results, worst = [], {}
    for run in runs:
        norm, eps, loss, iterations, _ = run
        robust = _pgd(model, model_fn, images, labels, clean, run, config, status)
        worst[(norm, eps)] = worst.get((norm, eps), clean.copy()) & robust
        _record(results, progress, norm, eps, loss, iterations, config.restarts, float(robust.mean()), "all")
    return results, worst


def stronger_attack(model, model_fn, images, labels, results, worst, config, progress=None, status=None):
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
        worst[key] &= _pgd(model, model_fn, images, labels, before, ("inf", eps, loss, iterations, config.step), config,
                           status, "survivors")
        stronger[planning.eps_key(eps)] = {"loss": loss, "iterations": iterations, "restarts": config.restarts,
                                           "accuracy_before": float(before.mean()),
                                           "accuracy_after": float(worst[key].mean())}
        _record(results, progress, "inf", eps, loss, iterations, config.restarts, float(worst[key].mean()),
                "survivors")
    return stronger


def gradient_free_attack(model_fn, images, labels, clean, results, worst, config, progress=None, status=None):
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
        if status:
            status(f"{describe('inf', eps, 'square')}: {len(index)} images, {config.square_queries} queries each")
        if len(index):
            _, robust[index] = attacks.square(model_fn, images[index], labels[index], eps,
                                              queries=config.square_queries, seed=config.seed,
                                              batch_size=config.batch_size)
        gradient_worst = worst[key].copy()
        worst[key] &= robust
        gradient_free[planning.eps_key(eps)] = {
            "attack": "square", "queries": config.square_queries,
            "accuracy": float(robust.mean()),
            "gradient_worst_case": float(gradient_worst.mean()),
            "worst_case_with_square": float(worst[key].mean()),
            "broken_only_by_square": float((gradient_worst & ~robust).mean()),
        }
        _record(results, progress, "inf", eps, "square", config.square_queries, 1, float(robust.mean()), "all")
    return gradient_free


def certified_rule_attack(model, images, labels, clean, results, config, progress=None, status=None):
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
        clean: the dict of `certification.clean_pass`.
        results: list of run dicts, appended to.
        config: `EvalConfig`.
        progress: optional callable `progress(runs done, run)`.
        status: optional callable `status(text)`, told what runs.

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
        robust = _pgd(model, model_fn, images, labels, correct, ("2", r, "margin", config.iterations, r / 4), config,
                      status, "certified_rule")
        key = str(r)
        empirical[key] = float(robust.mean()) if len(labels) else 0.0
        violations[key] = int(np.sum(correct & (radii > r) & ~robust))
        _record(results, progress, "2", r, "margin", config.iterations, config.restarts, empirical[key],
                "certified_rule")
    return empirical, violations
