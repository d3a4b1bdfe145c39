"""What an evaluation runs: its `EvalConfig`, the radii to certify and attack
(`auto_radii` for a backbone), and the PGD runs in order (`plan`)."""

import dataclasses

import keras

from clustr_tf.nets import lipschitz

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


def eps_key(eps):
    """An l_inf eps in pixel units -> its key in results, in 1/255 units ("8/255")."""
    return f"{eps * 255:g}/255"


def plan(config):
    """The PGD runs of an evaluation, in order: `(norm, eps, loss, iterations, step)`.

    Every loss at every l_inf eps (step `config.step`), every loss at every l2 eps (step
    eps / 4: the l_inf step in pixels would move an l2 attack too little), and, unless an
    eps of 1 or more is asked already, the unbounded check (eps 1.0, margin, step 0.1).

    Raises:
        ValueError: if `square_eps` or `stronger_eps` is not a subset of `linf_eps`.
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
    if isinstance(backbone, keras.Model):
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
