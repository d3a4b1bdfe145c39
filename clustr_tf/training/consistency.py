"""The ClusTR+QTRADES consistency term and its one-step perturbation, per example.

Two forms (`config.CONSISTENCY_FORMS`): "official", the paper's term as the official code
computes it (a cross-entropy between the clean soft-kNC probabilities and a softmax of the
raw scores S of the perturbed input: bounded), and "kl", a TRADES-style KL between soft-kNC
probabilities (not the paper's, unbounded). `objectives.ClusTR` adds it with its weight.

Reference:
    Alfarra et al., "Rethinking Clustering for Robustness", BMVC 2021 (ClusTR+QTRADES);
    Zhang et al., "Theoretically Principled Trade-off between Robustness and Accuracy",
    ICML 2019 (TRADES).
"""

import tensorflow as tf

from clustr_tf import config

CONSISTENCY_FORMS = config.CONSISTENCY_FORMS


def kl_divergence(logits_p, logits_q):
    """Per-example KL(p || q) between the softmax distributions of two logit tensors."""
    log_p = tf.nn.log_softmax(tf.cast(logits_p, tf.float32))
    log_q = tf.nn.log_softmax(tf.cast(logits_q, tf.float32))
    return tf.reduce_sum(tf.exp(log_p) * (log_p - log_q), axis=-1)


def official(probabilities, scores):
    """The official ClusTR+QTRADES term per example: -sum_c p_c log softmax(S)_c.

    A cross-entropy between the clean soft-kNC probabilities `p` and a softmax of the RAW
    scores `S` (in [0, K]) of the perturbed input, not of log S. It is at least
    log(1 + (C - 1) e^-K) (0.80 nats for C = 10, K = 2) and at most K + log C (4.3): bounded,
    unlike a KL between soft-kNC probabilities (about 100 nats when a class leaves the L
    nearest clusters), and lowered by moving the perturbed input towards the centers of
    the clean prediction.

    Args:
        probabilities: float [B, C], p.
        scores: float [B, C], S of the perturbed input.

    Returns:
        float32 [B].
    """
    log_q = tf.nn.log_softmax(tf.cast(scores, tf.float32))
    return -tf.reduce_sum(tf.cast(probabilities, tf.float32) * log_q, axis=-1)


def term_output(model, images, form, training):
    """What the consistency term of `form` compares: S (official) or logits (kl)."""
    if form == "official":
        layer = model.cluster_centers
        return layer.scores_from_distances(layer.squared_distances(model.embed(images, training=training)))
    return model(images, training=training)


def term(form, clean_logits, output):
    if form == "official":
        return official(tf.nn.softmax(clean_logits), output)
    return kl_divergence(clean_logits, output)


def perturbation(model, images, target, form, eps, step, seed):
    """The QTRADES adversarial input: one random-start signed step on the consistency term.

    Starts from `images + uniform(-eps, eps)` (clipped to [0, 1]), takes one step of size
    `step` along the sign of the gradient, with respect to x, of the term of `form` between
    the constant `target` and the model at x, and projects back into the l_inf ball of
    radius `eps` and [0, 1]:

    - "official": `official(p, S(x))`, p = softmax(target), S over the model's
      training L;
    - "kl": KL(p || p(x)).

    The model runs in inference mode (the official code runs its attack in training
    mode: batch statistics, and it updates the moving ones), and the result is a constant
    (`stop_gradient`): the attack's gradient never reaches the weights (the official code
    adds the attack's weight gradients to the training step; not copied).

    Args:
        model: a `ClusTRModel`.
        images: float tensor [B, H, W, C] in [0, 1].
        target: float tensor [B, C], the clean logits (log-scores), held constant.
        form: one of `CONSISTENCY_FORMS`.
        eps: float, l_inf radius.
        step: float, step size.
        seed: int tensor [2], for the random start.

    Returns:
        float tensor [B, H, W, C], the perturbed images.
    """
    if form not in CONSISTENCY_FORMS:
        raise ValueError(f"`form` must be one of {', '.join(CONSISTENCY_FORMS)}. Received: {form!r}")
    images = tf.stop_gradient(images)
    target = tf.stop_gradient(target)
    start = images + tf.random.stateless_uniform(tf.shape(images), seed, -eps, eps, images.dtype)
    start = tf.clip_by_value(start, 0.0, 1.0)
    with tf.GradientTape() as tape:
        tape.watch(start)
        value = tf.reduce_sum(term(form, target, term_output(model, start, form, False)))
    grad = tape.gradient(value, start)
    adv = start + step * tf.sign(grad)
    adv = tf.clip_by_value(tf.clip_by_value(adv, images - eps, images + eps), 0.0, 1.0)
    return tf.stop_gradient(adv)


def qtrades_perturbation(model, images, eps, step, seed):
    """The "kl" form's input: `perturbation` on KL(p(images) || p(x)), the
    clean logits taken in inference mode."""
    return perturbation(model, images, model(images, training=False), "kl", eps, step, seed)
