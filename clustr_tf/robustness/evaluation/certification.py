"""The clean pass and the certificate: one backbone pass gives the clean decisions (the
logits the attacks see) and the certified l2 radius of the model's certified rule, over
`lipschitz.model_bound` of the backbone; `certify_split` certifies a whole split."""

import numpy as np

from clustr_tf.core import certify
from clustr_tf.nets import lipschitz


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


def certified_summary(radius, correct, radii):
    """`certified_accuracy` (radius key as `certify.certified_accuracy` -> fraction of the
    N examples correct with radius > r) and `median_certified_radius` (0 for a wrong
    example; 0 for N = 0) of certified radii float64 [N] and correctness bool [N]."""
    return {
        "certified_accuracy": certify.certified_accuracy(radius, correct, radii),
        "median_certified_radius": float(np.median(np.where(correct, radius, 0.0))) if len(correct) else 0.0,
    }


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
        **certified_summary(radius, correct, radii),
        "lipschitz_bound": bound,
    }
