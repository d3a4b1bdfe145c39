"""PGD attacks through CleverHans, with the attack losses that expose gradient masking.

One small adapter over `cleverhans.tf2.attacks.projected_gradient_descent` (Madry et al.
PGD: random start, `rand_init=True`, the true labels passed). Three losses, each to be
maximised, computed from a ClusTR model's class logits (log soft-kNC scores):

- `official`: cross-entropy with the RAW soft-kNC scores S as logits (S = exp(log-scores),
  in [0, K]), exactly the loss the official ClusTR evaluation attacks (the one behind the
  74.04% claim). softmax(S) is nearly flat, so this loss starves the attack of gradient: it
  is reported to expose the gap, not trusted on its own. A softmax classifier's raw scores
  are its logits, so for it `official` is `logits` (`loss_function`).
- `logits`: cross-entropy on the log-scores.
- `margin`: the best other class's log-score minus the true class's (the CW/DLR-style
  margin; positive means misclassified).

Robust accuracy at an eps is the per-example worst case over restarts (and, in the
evaluation, over every loss): an example counts as robust only if no run fooled it.

The certificate speaks about a different decision, the model's certified rule (ClusTR's
nearest center, a baseline's linear head): `certified_rule_logits_function` gives scores
whose argmax is that rule, to attack (l2, `margin`) as the empirical check of the
certificate.

CleverHans traces its gradient function once per callable: create `model_fn` once per
model (`logits_function`) and reuse it; the loss functions here are module-level.

Reference:
    Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks",
    ICLR 2018; Carlini & Wagner, IEEE S&P 2017.
"""

import collections
import hashlib
import warnings

import numpy as np
import tensorflow as tf
from cleverhans.tf2.attacks.projected_gradient_descent import projected_gradient_descent

from clustr_tf.core import models


def _official(labels, logits):
    # logits are log S; exp gives S itself (0, to float rounding, for a class with no
    # cluster among the L nearest, whose logit sits 100 below the weakest selected one).
    scores = tf.exp(logits)
    return tf.nn.sparse_softmax_cross_entropy_with_logits(tf.cast(labels, tf.int64), scores)


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


def loss_function(name, model):
    """The attack loss `name` for `model`, a function `(labels, logits) -> [B]`.

    For a model whose logits are log-scores (`model.logits_are_log_scores`: ClusTR) this is
    `LOSSES[name]`. A softmax classifier's logits are its raw scores, so the official loss,
    cross-entropy with the raw scores as logits, is plain cross-entropy there.
    """
    if name not in LOSSES:
        raise ValueError(f"Unknown attack loss. Expected one of {', '.join(LOSSES)}. Received: {name!r}")
    if name == "official" and not (isinstance(model, models.Classifier) and model.logits_are_log_scores):
        return _cross_entropy
    return LOSSES[name]


def logits_function(model, neighbours=None):
    """`model_fn(images) -> class logits` for a model, in inference mode; reuse it.

    Args:
        model: a `models.Classifier` (its `class_logits`), or any Keras model returning
            class logits.
        neighbours: for a ClusTR model, L of the soft-kNC rule under attack (the official
            evaluation uses 20); default: the model's own.
    """
    if not isinstance(model, models.Classifier):  # any other Keras model returning logits
        return lambda images: model(images, training=False)
    return lambda images: model.class_logits(images, neighbours)


def certified_rule_logits_function(model):
    """`model_fn(images) -> per-class scores` of the model's CERTIFIED rule; reuse it.

    The certificate (`model.certify_features`, `evaluation.clean_pass`) speaks about the
    certified rule, which for ClusTR is not the soft-kNC rule the other attacks target: the
    soft-kNC class can change inside a certified radius without contradicting anything. To
    check the certificate empirically, attack this function (l2 PGD, `margin` loss): its
    argmax is exactly the certified decision.

    - `ClusTRModel` (nearest center): the score of class c is
      `-min over its K centers j of ||f(x) - mu_j||^2`, so the argmax is the class of the
      nearest center (ties go to the lowest center index, as `certify.feature_radius`).
    - `baselines.SoftmaxClassifier` (linear head): the head's logits.

    Args:
        model: a `models.Classifier` whose `certified_rule` is "nearest center" (with
            `cluster_centers`) or "linear head".

    Returns:
        A callable `images [B, H, W, C] float32 -> scores [B, num_classes] float32`, in
        inference mode.

    Raises:
        ValueError: for a model without a certified rule this function knows.
    """
    rule = model.certified_rule if isinstance(model, models.Classifier) else None
    if rule == "nearest center":
        layer = model.cluster_centers
        num_classes, per_class = layer.num_classes, layer.clusters_per_class

        def nearest_center_scores(images):
            distances = tf.cast(layer.squared_distances(model.embed(images, training=False)), tf.float32)
            return -tf.reduce_min(tf.reshape(distances, [-1, num_classes, per_class]), axis=-1)

        return nearest_center_scores
    if rule == "linear head":
        return lambda images: tf.cast(model.class_logits(images), tf.float32)
    raise ValueError(
        "`model` must be a models.Classifier with a certified rule (\"nearest center\" or \"linear head\"). "
        f"Received: {type(model).__name__} with certified_rule={rule!r}"
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
        loss: one of `LOSSES`, or a function `(labels, logits) -> [B]` to maximise (e.g.
            from `loss_function`).
        restarts: int >= 1, random starts.
        seed: int; restart r uses TensorFlow's global seed `seed + r`.

    Returns:
        `(adversarial, robust)`: float tensor [B, H, W, C], for each example an input that
        fooled the model if any restart found one (else the last restart's); bool numpy
        [B], whether the model still predicted the label after every restart.

    Raises:
        ValueError: for an unknown loss or norm, or a value out of range.
    """
    if not callable(loss) and loss not in LOSSES:
        raise ValueError(f"Unknown attack loss. Expected one of {', '.join(LOSSES)}. Received: {loss!r}")
    loss_fn = loss if callable(loss) else LOSSES[loss]
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
    robust = (tf.argmax(model_fn(images), axis=1) == labels).numpy()
    if eps == 0:
        return images, robust
    worst = images.numpy()
    for r in range(restarts):
        # Restarts only attack the examples no earlier restart fooled (the worst case is
        # the same); the subset is padded to a power of two so the gradient function
        # traces for a few batch sizes only.
        index = np.flatnonzero(robust)
        if not len(index):
            break
        padded = np.resize(index, 1 << int(np.ceil(np.log2(len(index)))))
        tf.random.set_seed(seed + r)
        x, y = tf.gather(images, padded), tf.gather(labels, padded)
        adv = projected_gradient_descent(
            model_fn, x, eps, min(step, eps), iterations, norm, loss_fn=loss_fn,
            clip_min=0.0, clip_max=1.0, y=y, targeted=False, rand_init=True,
            sanity_checks=False,
        )
        fooled = (tf.argmax(model_fn(adv), axis=1) != y).numpy()[: len(index)]
        adv = adv.numpy()[: len(index)]
        keep = fooled | (r == restarts - 1)
        worst[index[keep]] = adv[keep]
        robust[index[fooled]] = False
    return tf.constant(worst), robust


def square(model_fn, images, labels, eps, queries=5000, norm=np.inf, seed=0, batch_size=256):
    """The Square attack (gradient-free, random search) from IBM's adversarial-robustness-toolbox.

    It only queries the model's outputs (the margin of the log-scores), so gradient
    masking cannot stop it: an evaluation where it beats PGD is not to be trusted.

    Args:
        model_fn: `images -> logits [B, C]` (see `logits_function`).
        images: float array [B, H, W, C] in [0, 1].
        labels: int array [B], the true classes.
        eps: float >= 0, the radius of the `norm` ball.
        queries: int >= 1, the query budget per example (AutoAttack uses 5000); an example
            stops being queried once fooled.
        norm: `np.inf` or 2.
        seed: int, seeds numpy's global generator, which the toolbox draws from.
        batch_size: examples per model call.

    Returns:
        `(adversarial, robust)` as `pgd` returns them.

    Reference:
        Andriushchenko et al., "Square Attack: a query-efficient black-box adversarial
        attack via random search", ECCV 2020.
    """
    if norm not in (np.inf, 2):
        raise ValueError(f"`norm` must be np.inf or 2. Received: {norm!r}")
    if not eps >= 0:
        raise ValueError(f"`eps` must be >= 0. Received: {eps!r}")
    if queries < 1:
        raise ValueError(f"`queries` must be >= 1. Received: {queries!r}")
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    fn = tf.function(model_fn, reduce_retracing=True)
    # The toolbox re-predicts every input at every iteration, also those it has fooled
    # already and those it did not change; remembering the logits of recent inputs (by a
    # digest of their bytes) leaves the model only the new candidates to score.
    cache = collections.OrderedDict()
    limit = 8 * len(labels) + 1024

    def predict(x):
        x = np.ascontiguousarray(x, np.float32)
        keys = [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in x]
        missing = [i for i, k in enumerate(keys) if k not in cache]
        for start in range(0, len(missing), batch_size):
            index = missing[start : start + batch_size]
            for i, row in zip(index, fn(tf.constant(x[index])).numpy()):
                cache[keys[i]] = row
        out = np.stack([cache[k] for k in keys]) if keys else np.zeros((0, 0), np.float32)
        for k in keys:
            cache.move_to_end(k)
        while len(cache) > limit:
            cache.popitem(last=False)
        return out

    robust = predict(images).argmax(1) == labels if len(labels) else np.zeros(0, bool)
    if eps == 0 or not robust.any():
        return tf.constant(images), robust
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "PyTorch not found" from an unrelated module
        from art.attacks.evasion import SquareAttack
        from art.estimators.classification import BlackBoxClassifierNeuralNetwork
    num_classes = int(predict(images[:1]).shape[1])
    classifier = BlackBoxClassifierNeuralNetwork(
        predict, input_shape=images.shape[1:], nb_classes=num_classes, clip_values=(0.0, 1.0),
        channels_first=False,
    )
    attack = SquareAttack(classifier, norm=norm, eps=float(eps), max_iter=int(queries),
                          nb_restarts=1, batch_size=batch_size, verbose=False)
    index = np.flatnonzero(robust)
    np.random.seed(seed)
    adv = attack.generate(images[index], y=np.eye(num_classes)[labels[index]])
    # Keep the inputs exactly inside the ball and the box; the toolbox's l2 step can divide
    # 0 by 0 on small images, and a NaN perturbation is no perturbation.
    delta = np.nan_to_num(adv - images[index], nan=0.0, posinf=0.0, neginf=0.0)
    if norm == np.inf:
        delta = np.clip(delta, -eps, eps)
    else:
        flat = np.sqrt((delta.reshape(len(index), -1) ** 2).sum(1)).reshape(-1, 1, 1, 1)
        delta = delta * np.minimum(1.0, eps / np.maximum(flat, 1e-12))
    adv = np.clip(images[index] + delta, 0.0, 1.0)
    worst = images.copy()
    worst[index] = adv
    robust[index] = predict(adv).argmax(1) == labels[index]
    return tf.constant(worst), robust
