"""`evaluate_robustness`: the stages of an evaluation in order (the clean pass and the
certificate, the gradient attacks, the stronger and the gradient-free attacks, the
certified rule's attack), and the result they sum up to (robustness.json's numbers)."""

import numpy as np

from clustr_tf.robustness import attacks
from clustr_tf.robustness.evaluation import attack_stages
from clustr_tf.robustness.evaluation import certification
from clustr_tf.robustness.evaluation import planning


def _linf_worst_case(worst):
    """{l_inf eps key: worst-case accuracy} of the per-example worst cases {(norm, eps): bool [N]}."""
    return {planning.eps_key(e): float(worst[(norm, e)].mean()) for norm, e in sorted(worst) if norm == "inf"}


def evaluate_robustness(model, images, labels, config, progress=None, status=None):
    """Attacks and certifies a ClusTR model on (images, labels).

    Args:
        model: a `models.Classifier`: a `ClusTRModel` (certified: the nearest-center
            rule), or a `baselines.SoftmaxClassifier` (certified: its linear head).
        images: float array [N, H, W, C] in [0, 1].
        labels: int array [N].
        config: `EvalConfig`.
        progress: optional callable `progress(done, total, run)`, called after each attack
            run with the runs done, their total and the run's record (an entry of
            `attacks`).
        status: optional callable `status(text)`, told what is running: the clean pass,
            each attack run as it starts and after each of its batches (for a console
            that prints the current state while one run takes long: `cli.Heartbeat`).

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

    Raises:
        ValueError: if `square_eps` or `stronger_eps` is not a subset of `linf_eps`.
    """
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels).reshape(-1)
    runs = planning.plan(config)
    total = len(runs) + len(config.stronger_eps) + len(config.square_eps) + sum(r > 0 for r in config.radii)
    report = (lambda done, run: progress(done, total, run)) if progress else None
    model_fn = attacks.logits_function(model, config.neighbours)
    if status:
        status(f"clean pass on {len(labels)} images")
    clean = certification.clean_pass(model, images, labels, config)
    results, worst = attack_stages.gradient_attacks(model, model_fn, images, labels, clean["clean"], runs, config,
                                                    report, status)
    pgd_worst = _linf_worst_case(worst)  # before the stronger and gradient-free runs narrow it
    stronger = attack_stages.stronger_attack(model, model_fn, images, labels, results, worst, config, report, status)
    gradient_free = attack_stages.gradient_free_attack(model_fn, images, labels, clean["clean"], results, worst,
                                                       config, report, status)
    empirical, violations = attack_stages.certified_rule_attack(model, images, labels, clean, results, config, report,
                                                                status)
    certified_correct, radii = clean["certified_correct"], clean["radii"]
    return {
        "num_examples": len(labels),
        "clean_accuracy": float(clean["clean"].mean()),
        "nearest_center_accuracy": (float(certified_correct.mean()) if model.certified_rule == "nearest center"
                                    else None),
        "attacks": results,
        "robust_accuracy": _linf_worst_case(worst),
        "robust_accuracy_l2": {f"{e:g}": float(worst[("2", e)].mean()) for e in config.l2_eps},
        "lipschitz_bound": clean["lipschitz_bound"],
        **certification.certified_summary(radii, certified_correct, config.radii),
        "robust_accuracy_pgd": pgd_worst,
        "stronger_attack": stronger,
        "gradient_free": gradient_free,
        "empirical_l2_certified_rule": empirical,
        "certificate_violations": violations,
    }
