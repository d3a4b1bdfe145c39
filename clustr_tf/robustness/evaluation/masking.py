"""Gradient-masking checks: what a robustness result must show before its accuracies are
believed (accuracy falls with eps, the attack losses agree, an unbounded attack breaks
everything, more iterations and a gradient-free attack break nothing more, and the
certificate is below what the attack leaves standing)."""

import numpy as np

from clustr_tf.robustness import attacks
from clustr_tf.robustness.evaluation import planning


def _fmt(values):
    return "{" + ", ".join(f"{k}: {v:.4f}" for k, v in values.items()) + "}"


def masking_checks(result, num_classes):
    """Checks for gradient masking; each entry has `passed`, `ran` and `detail`. A check
    whose attacks were not made (`ran` False, the detail starts "not run:") does not pass:
    nothing is skipped silently, and a report can still tell "not run" from "failed".

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
        {check name: {"passed": bool, "ran": bool, "detail": str}}.
    """
    checks = {}
    worst = result["robust_accuracy"]
    eps = sorted(worst, key=lambda k: float(k.split("/")[0]))
    # Monotonicity compares the same set of PGD runs at every eps (the stronger and the
    # gradient-free runs are made at some eps only).
    same = result.get("robust_accuracy_pgd", worst)
    order = sorted(same, key=lambda k: float(k.split("/")[0]))
    rising = [(a, b) for a, b in zip(order, order[1:]) if same[b] > same[a] + 1e-9]
    checks["monotone_in_eps"] = _check(
        len(order) >= 2, not rising, f"PGD worst-case accuracy by eps: {_fmt({k: same[k] for k in order})}",
        "fewer than 2 l_inf eps were attacked")
    by_eps = {}
    for a in result["attacks"]:
        if a["norm"] == "inf" and a.get("scope", "all") == "all" and a["loss"] in attacks.LOSSES:
            by_eps.setdefault(planning.eps_key(a["eps"]), {})[a["loss"]] = a["accuracy"]
    spread = {k: max(v.values()) - min(v.values()) for k, v in by_eps.items() if len(v) >= 2}
    checks["losses_agree"] = _check(
        bool(spread), all(s <= 0.05 for s in spread.values()),
        f"largest difference between attack losses by eps: {_fmt(spread)}",
        "no l_inf eps was attacked with 2 or more losses")
    big = [k for k in eps if float(k.split("/")[0]) >= 255]
    checks["unbounded_eps_breaks_all"] = _check(
        bool(big), bool(big) and worst[big[-1]] <= 1.0 / num_classes + 1e-9,
        big and f"accuracy at eps {big[-1]}: {worst[big[-1]]:.4f} (chance {1.0 / num_classes:.4f})",
        "no l_inf eps of 255/255 was attacked")
    stronger = result.get("stronger_attack", {})
    drops = {k: v["accuracy_before"] - v["accuracy_after"] for k, v in stronger.items()}
    checks["stronger_attack_converged"] = _check(
        bool(stronger), all(d <= 0.01 for d in drops.values()),
        ", ".join(f"at {k}: {v['loss']} with {v['iterations']} iterations lowered the worst case "
                  f"{v['accuracy_before']:.4f} -> {v['accuracy_after']:.4f}" for k, v in stronger.items()),
        "no stronger attack was made")
    free = result.get("gradient_free", {})
    checks["gradient_free_no_better"] = _check(
        bool(free), all(v["broken_only_by_square"] <= 0.02 for v in free.values()),
        ", ".join(f"at {k}: Square {v['accuracy']:.4f} vs gradient worst case {v['gradient_worst_case']:.4f};"
                  f" broken only by Square {v['broken_only_by_square']:.4f}" for k, v in free.items()),
        "no gradient-free attack was made")
    gaps = {k: v.get("official", np.nan) - worst[k] for k, v in by_eps.items() if "official" in v}
    checks["official_gap"] = _check(
        bool(gaps), all(g <= 0.05 for g in gaps.values()),
        f"official-loss accuracy minus worst case, by eps: {_fmt(gaps)}", "the official loss was not attacked (l_inf)")
    checks["certified_below_empirical"] = _certified_below_empirical(result)
    return checks


def _certified_below_empirical(result):
    empirical = result.get("empirical_l2_certified_rule") or {}
    violations = result.get("certificate_violations") or {}
    certified = result.get("certified_accuracy") or {}
    keys = sorted((k for k in empirical if k in certified), key=float)
    if not keys:
        return _check(False, False, "", "no l2 radius > 0 was both certified and attacked under the certified rule")
    above = [k for k in keys if certified[k] > empirical[k] + 1e-12]
    broken = {k: violations.get(k) for k in keys if violations.get(k) != 0}
    detail = "; ".join(f"at {k}: certified {certified[k]:.4f} vs empirical {empirical[k]:.4f}, "
                       f"violations {violations.get(k, 'not counted')}" for k in keys)
    if above or broken:
        detail = ("CERTIFICATE VIOLATED (a bug or an unsound Lipschitz bound): "
                  f"certified above empirical at {above or 'no radius'}, "
                  f"certified examples broken {broken or 'none'}; " + detail)
    return _check(True, not above and not broken, detail, "")


def _check(ran, passed, detail, why_not_run):
    """One check's entry: a check that was not run does not pass, and its detail says why."""
    if not ran:
        return {"passed": False, "ran": False, "detail": "not run: " + why_not_run}
    return {"passed": bool(passed), "ran": True, "detail": detail}


def check_outcome(check):
    """'passed', 'FAILED' or 'not run' (an entry read back from an older robustness.json has no
    `ran`: its detail says "not run")."""
    if check["passed"]:
        return "passed"
    ran = check.get("ran", not check["detail"].startswith("not run"))
    return "FAILED" if ran else "not run"


def checks_summary(checks):
    """One line: 'all 7 passed', or the failed checks, then the ones not run."""
    by = {}
    for name, check in checks.items():
        by.setdefault(check_outcome(check), []).append(name)
    if not by.get("FAILED") and not by.get("not run"):
        return f"all {len(checks)} passed"
    parts = [f"FAILED: {', '.join(by['FAILED'])}"] if by.get("FAILED") else []
    parts += [f"{len(by.get('passed', []))} passed"]
    if by.get("not run"):
        parts.append(f"not run (their attacks were not asked for): {', '.join(by['not run'])}")
    return "; ".join(parts)
