"""Certified training: objectives whose zero loss certifies their decision at an l2 radius.

On a backbone f that is L-Lipschitz by construction (`--backbone=lipschitz`, L = 1), a
feature displacement of norm at most r L is the worst an input perturbation of l2 norm r
can do. Each objective here is a cross-entropy over "certificate logits": the class
scores at that worst case, so a zero loss in the limit certifies the decision at r.

- `CertifiedClusTR`: certified ClusTR, a nearest-prototype head whose centers are
  trainable weights. For features z, i the nearest center of the label y:

      logit_y = -||z - mu_i||^2
      logit_c = max over centers k of class c of (-||z - mu_k||^2 + 2 r L ||mu_i - mu_k||)

  and the loss is cross-entropy(y, logits / T). logit_y > logit_c for every c is exactly
  the certificate of `certify.feature_radius` at radius r for the nearest center i.
- the Lipschitz-margin linear head (`CrossEntropy(certified_margin=r)` in
  `objectives`): cross-entropy on z_j + r L ||w_j - w_y|| (`margin_logits`), over T.

Reference:
    Tsuzuku et al., "Lipschitz-Margin Training", NeurIPS 2018; Leino et al., "Globally-
    Robust Neural Networks", ICML 2021; Prach et al., "1-Lipschitz Layers Compared",
    CVPR 2024 (the offset cross-entropy with a temperature); Saralajew et al., "Fast
    Adversarial Robustness Certification of Nearest Prototype Classifiers", NeurIPS 2020.
"""

import keras
import numpy as np
import tensorflow as tf

from clustr_tf import checks
from clustr_tf import config
from clustr_tf.core import baselines
from clustr_tf.core import models
from clustr_tf.core import ops
from clustr_tf.core.interfaces import Objective
from clustr_tf.core.interfaces import Result
from clustr_tf.nets import lipschitz


class CertifiedMargin:
    """The certified-margin setting an objective shares: `certified_margin` (an l2 radius in
    pixels, 0: off), the exact Lipschitz bound of the backbone it is trained on, and the
    temperature of the cross-entropy."""

    def _init_margin(self, certified_margin, temperature=1.0):
        self.certified_margin = checks.l2_radius("certified_margin", certified_margin)
        if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature > 0
                and np.isfinite(temperature)):
            raise ValueError(f"`temperature` must be a finite number > 0. Received: {temperature!r}")
        self.temperature = float(temperature)

    def feature_margin(self, model):
        """The certified margin in feature units: `certified_margin` times the backbone's
        bound by construction (`lipschitz.construction_bound`), which raises
        `lipschitz.NotLipschitzByConstructionError` for a backbone without one. (Read when
        the step is traced, not at every step.)"""
        if not self.certified_margin:
            return 0.0
        return self.certified_margin * lipschitz.construction_bound(model.backbone)

    def check_model(self, model):
        """Raises for a model of another class, or one this objective cannot
        certify-train (no exact bound)."""
        Objective.check_model(self, model)
        self.feature_margin(model)


def margin_logits(logits, labels, kernel, feature_margin):
    """Lipschitz-margin logits: z_j + r ||w_j - w_y|| for j != y (z_y unchanged), r the
    margin in feature units; the worst logits a feature displacement of norm r can give."""
    kernel = tf.cast(kernel, tf.float32)  # [D, C]
    columns = tf.transpose(kernel)
    gaps = ops.pairwise_distances(columns, columns)  # [C, C]
    own = tf.gather(gaps, labels)  # [B, C]: ||w_y - w_j||
    other = tf.one_hot(labels, tf.shape(logits)[-1], on_value=0.0, off_value=1.0)
    return logits + float(feature_margin) * own * other


def certificate_logits(squared_distances, centers, labels, clusters_per_class, feature_margin):
    """Certified ClusTR's class logits at the worst case of a feature displacement.

    Args:
        squared_distances: float [B, C*K], ||z - mu_j||^2.
        centers: float [C*K, D]; center j belongs to class j // K.
        labels: int [B].
        clusters_per_class: K.
        feature_margin: r L, the displacement's norm in feature units (0: plain logits).

    Returns:
        `(logits [B, C], own [B])`: logit_y = -||z - mu_i||^2 with i the nearest center of
        the label, logit_c = max over c's centers k of -||z - mu_k||^2 + 2 r L ||mu_i - mu_k||;
        `own` is ||z - mu_i||^2.
    """
    labels = tf.cast(labels, tf.int64)
    k = clusters_per_class
    grouped = tf.reshape(squared_distances, [tf.shape(squared_distances)[0], -1, k])  # [B, C, K]
    num_classes = tf.shape(grouped)[1]
    own_group = tf.gather(grouped, labels, axis=1, batch_dims=1)  # [B, K]
    nearest = labels * k + tf.argmin(own_group, axis=-1)  # [B]: i
    own = tf.reduce_min(own_group, axis=-1)
    scores = -squared_distances
    if feature_margin:
        # ||mu_i - mu_k|| for every center k; the gradient reaches the centers through it.
        separation = ops.pairwise_distances(tf.gather(centers, nearest), centers)  # [B, C*K]
        scores += 2.0 * float(feature_margin) * separation
    worst = tf.reduce_max(tf.reshape(scores, tf.shape(grouped)), axis=-1)  # [B, C]
    is_label = tf.one_hot(labels, num_classes, on_value=True, off_value=False)
    return tf.where(is_label, -own[:, tf.newaxis], worst), own


class PrototypeInit(keras.callbacks.Callback):
    """Puts certified ClusTR's centers on the data before the first step of a new run:
    center k of class c is the mean feature (inference mode) of `group` training examples
    of c drawn at random without replacement. Sets the soft-kNC variance to `variance`.

    Args:
        batches: the run's `baselines.BatchSource` (its images and labels).
        variance: sigma^2 of the soft-kNC rule (`CertifiedClusTR`: T / 2).
        group: examples averaged per center.
        seed: int.
    """

    def __init__(self, batches, variance, group=16, seed=0):
        super().__init__()
        self.batches, self.variance, self.group, self.seed = batches, float(variance), group, seed

    def on_train_begin(self, logs=None):
        layer = self.model.cluster_centers
        labels = np.asarray(self.batches.labels)
        rng = np.random.default_rng(self.seed)
        k, chosen = layer.clusters_per_class, []
        members_of = [np.flatnonzero(labels == c) for c in range(layer.num_classes)]
        if not all(len(m) for m in members_of):
            raise ValueError("Certified ClusTR starts each center on examples of its class: every class needs "
                             f"training examples. Received: none for classes "
                             f"{[c for c, m in enumerate(members_of) if not len(m)]}")
        size = min(self.group, max(1, min(len(m) for m in members_of) // k))
        for members in members_of:
            picks = rng.choice(members, size=size * k, replace=len(members) < size * k)
            chosen.append(picks.reshape(k, size))
        chosen = np.stack(chosen)  # [C, K, size]
        images = np.asarray(self.batches.images)[chosen.reshape(-1)]
        if images.dtype == np.uint8:
            images = images.astype(np.float32) / 255.0
        features = np.asarray(self.model.embed(tf.constant(images, tf.float32), training=False), np.float64)
        features = features.reshape(*chosen.shape, -1)  # [C, K, size, D]
        centers = features.mean(axis=2)  # [C, K, D]
        layer.centers.assign(centers.reshape(layer.num_clusters, -1).astype(np.float32))
        layer.variance.assign(self.variance)


class CertifiedClusTR(CertifiedMargin, Objective):
    """Certified ClusTR: a nearest-prototype head trained on its own certificate.

    A `models.ClusTRModel` with trainable centers (K per class) on a Lipschitz-by-
    construction backbone, trained with cross-entropy over `certificate_logits` / T on
    shuffled batches. The centers start on the data (`PrototypeInit`).

    The soft-kNC rule (predictions and `serving_default`; the certificate does not use it)
    has 2 sigma^2 = T, the scale the cross-entropy was trained at: its log-kernels are the
    training logits -||z - mu||^2 / T. The mean squared distance to the own center, the
    variance the magnet loss uses, is 50-65x T on a trained CIFAR-10 network; a rule that
    flat sums far clusters, and lost 3.6-3.9 points of test accuracy to the nearest center (the
    certified decision) and agreed with it on 77-80% of test images, where 2 sigma^2 = T
    loses 0.15-0.5 points and agrees on 92% (`benchmarks/certified.py --phases=serving_rule`).

    Args:
        certified_margin: r, the l2 radius in pixels to train for (> 0).
        clusters_per_class: K.
        neighbours: L of the soft-kNC rule.
        temperature: T of the cross-entropy (and 2 sigma^2 of the soft-kNC rule).
    """

    model_class = models.ClusTRModel
    metric_names = ("accuracy", "nearest_center_accuracy", "certified_accuracy")
    evaluation_metric_names = ("accuracy", "nearest_center_accuracy", "certified_accuracy")
    validation_metrics = {"val_accuracy": "clean_accuracy", "val_nearest_center_accuracy": "nearest_center_accuracy"}

    def __init__(self, certified_margin, clusters_per_class=config.CLUSTERS_PER_CLASS, neighbours=config.NEIGHBOURS,
                 temperature=config.CERTIFIED_TEMPERATURE):
        self._init_margin(certified_margin, temperature)
        if not self.certified_margin:
            raise ValueError("CertifiedClusTR needs a `certified_margin` > 0 (the l2 radius to train for). "
                             f"Received: {certified_margin!r}")
        checks.positive_int("clusters_per_class", clusters_per_class)
        checks.positive_int("neighbours", neighbours)
        self.clusters_per_class, self.neighbours = clusters_per_class, neighbours

    @property
    def variance(self):
        """sigma^2 of the soft-kNC rule: T / 2."""
        return self.temperature / 2.0

    def build_model(self, backbone, num_classes):
        model = models.ClusTRModel(backbone, num_classes=num_classes, clusters_per_class=self.clusters_per_class,
                                   neighbours=min(self.neighbours, num_classes * self.clusters_per_class),
                                   trainable_centers=True)
        model.cluster_centers.variance.assign(self.variance)
        self.check_model(model)
        return model

    def check_model(self, model):
        CertifiedMargin.check_model(self, model)
        if not model.cluster_centers.trainable_centers:
            raise ValueError("CertifiedClusTR trains the centers: build the model with "
                             "`ClusTRModel(..., trainable_centers=True)` (or `CertifiedClusTR.build_model`). "
                             "Received: a model whose centers are not trainable")

    def batches(self, images, labels, num_classes, seed=0, batch_size=240):
        """Shuffled batches (`baselines.BatchSource`)."""
        del num_classes
        return baselines.BatchSource(images, labels, min(batch_size, len(labels)), seed=seed)

    def callbacks(self, batches, resumed=False, strategy=None, batch_size=256, seed=0):
        del strategy, batch_size
        return [] if resumed else [PrototypeInit(batches, self.variance, seed=seed)]

    def _values(self, model, features, labels):
        layer = model.cluster_centers
        distances = layer.squared_distances(features)
        logits, _ = certificate_logits(distances, layer.centers, labels, layer.clusters_per_class,
                                       self.feature_margin(model))
        loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits / self.temperature)
        hard = tf.argmin(distances, axis=-1) // layer.clusters_per_class
        metrics = {"accuracy": ops.correct(layer.logits_from_distances(distances), labels),
                   "nearest_center_accuracy": tf.cast(hard == labels, tf.float32),
                   # Certified at the training radius: the label's logit beats every other.
                   "certified_accuracy": ops.correct(logits, labels)}
        return loss, metrics

    def losses(self, model, images, targets, seed):
        del seed
        labels = tf.cast(targets["labels"], tf.int64)
        features = model.backbone(images, training=True)
        loss, metrics = self._values(model, features, labels)
        return Result(loss, metrics, None)

    def evaluation(self, model, images, labels):
        """The certificate cross-entropy, soft-kNC, nearest-center and certified-at-r
        accuracy, in inference mode."""
        features = model.embed(images, training=False)
        loss, metrics = self._values(model, features, labels)
        return {"loss": loss, **metrics}, model.logits_from_features(features)
