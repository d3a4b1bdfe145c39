"""PGD attacks through CleverHans, with the attack losses that expose gradient masking.

One small adapter over `cleverhans.tf2.attacks.projected_gradient_descent` (Madry et al.
PGD: random start, `rand_init=True`, the true labels passed). Three losses, each to be
maximised, computed from a ClusTR model's class logits (log soft-kNC scores):

- `official`: cross-entropy on the soft-kNC probabilities used as logits, as the official
  ClusTR evaluation attacks. The probabilities are bounded in [0, 1], so this loss is
  nearly flat and starves the attack of gradient: it is reported to expose the gap, not
  trusted on its own.
- `logits`: cross-entropy on the log-scores.
- `margin`: the best other class's log-score minus the true class's (the CW/DLR-style
  margin; positive means misclassified).

Robust accuracy at an eps is the per-example worst case over restarts (and, in the
evaluation, over every loss): an example counts as robust only if no run fooled it.

CleverHans traces its gradient function once per callable: create `model_fn` once per
model (`logits_function`) and reuse it; the loss functions here are module-level.

Reference:
    Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks",
    ICLR 2018; Carlini & Wagner, IEEE S&P 2017.
"""

import numpy as np
import tensorflow as tf
from cleverhans.tf2.attacks.projected_gradient_descent import projected_gradient_descent


def _official(labels, logits):
    probabilities = tf.nn.softmax(logits)
    return tf.nn.sparse_softmax_cross_entropy_with_logits(tf.cast(labels, tf.int64), probabilities)


def _cross_entropy(labels, logits):
    return tf.nn.sparse_softmax_cross_entropy_with_logits(tf.cast(labels, tf.int64), logits)


def _margin(labels, logits):
    labels = tf.cast(labels, tf.int64)
    true = tf.gather(logits, labels, axis=1, batch_dims=1)
    others = tf.where(
        tf.one_hot(labels, tf.shape(logits)[1], on_value=True, off_value=False),
        tf.fill(tf.shape(logits), tf.constant(-np.inf, logits.dtype)),
        logits,
    )
    return tf.reduce_max(others, axis=1) - true


LOSSES = {"official": _official, "logits": _cross_entropy, "margin": _margin}


def logits_function(model, neighbours=None):
    """`model_fn(images) -> class logits` for a model, in inference mode; reuse it.

    Args:
        model: a `ClusTRModel` (or any model returning class logits).
        neighbours: for a ClusTR model, L of the soft-kNC rule under attack (the official
            evaluation uses 20); default: the model's own.
    """
    layer = getattr(model, "cluster_centers", None)
    if neighbours is None or layer is None:
        return lambda images: model(images, training=False)
    return lambda images: layer.logits_from_distances(
        layer.squared_distances(model.embed(images, training=False)), neighbours
    )


def pgd(model_fn, images, labels, eps, step, iterations, norm=np.inf, loss="margin",
        restarts=1, seed=0):
    """Projected gradient descent with restarts; keeps each example's worst case.

    Args:
        model_fn: `images -> logits [B, C]`, created once (see `logits_function`).
        images: float tensor [B, H, W, C] in [0, 1].
        labels: int tensor [B], the true classes.
        eps: float >= 0, the radius of the `norm` ball.
        step: float > 0, the step size (<= eps for eps > 0).
        iterations: int >= 1.
        norm: `np.inf` or 2.
        loss: one of `LOSSES`.
        restarts: int >= 1, random starts.
        seed: int; restart r uses TensorFlow's global seed `seed + r`.

    Returns:
        `(adversarial, robust)`: float tensor [B, H, W, C], for each example an input that
        fooled the model if any restart found one (else the last restart's); bool numpy
        [B], whether the model still predicted the label after every restart.

    Raises:
        ValueError: for an unknown loss or norm, or a value out of range.
    """
    if loss not in LOSSES:
        raise ValueError(f"Unknown attack loss. Expected one of {', '.join(LOSSES)}. Received: {loss!r}")
    if norm not in (np.inf, 2):
        raise ValueError(f"`norm` must be np.inf or 2. Received: {norm!r}")
    if not eps >= 0:
        raise ValueError(f"`eps` must be >= 0. Received: {eps!r}")
    if not step > 0 or (eps > 0 and step > eps * (1 + 1e-6)):
        raise ValueError(f"`step` must be in (0, eps]. Received: step={step!r}, eps={eps!r}")
    if iterations < 1 or restarts < 1:
        raise ValueError(
            f"`iterations` and `restarts` must be >= 1. Received: {iterations!r}, {restarts!r}"
        )
    images = tf.convert_to_tensor(images, tf.float32)
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int64)
    correct = lambda x: tf.argmax(model_fn(x), axis=1) == labels  # noqa: E731
    robust = correct(images).numpy()
    if eps == 0:
        return images, robust
    worst = images
    for r in range(restarts):
        tf.random.set_seed(seed + r)
        adv = projected_gradient_descent(
            model_fn, images, eps, min(step, eps), iterations, norm, loss_fn=LOSSES[loss],
            clip_min=0.0, clip_max=1.0, y=labels, targeted=False, rand_init=True,
            sanity_checks=False,
        )
        fooled = ~correct(adv).numpy()
        newly = fooled & robust
        keep = tf.reshape(tf.constant(newly | (robust & (r == restarts - 1))), [-1, 1, 1, 1])
        worst = tf.where(keep, adv, worst)
        robust &= ~fooled
    return worst, robust
