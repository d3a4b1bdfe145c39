"""The magnet loss (Rippel et al., ICLR 2016) as ClusTR trains with it.

For example n with feature r_n in cluster c(n), cluster means mu and a shared variance
sigma^2, the loss is

    loss_n = max(0, -log( exp(-||r_n - mu_c(n)||^2 / (2 sigma^2) - alpha)
                          / sum over clusters c' of other classes of
                            exp(-||r_n - mu_c'||^2 / (2 sigma^2)) ))
           = max(0, alpha + ||r_n - mu_c(n)||^2 / (2 sigma^2)
                    + logsumexp_c'(-||r_n - mu_c'||^2 / (2 sigma^2))).

It is computed in the second form, in the log domain: the official code's
`exp(...) / sum(exp(...))` underflows to a constant once distances grow.

Two forms:
- `magnet_loss` (and `MagnetLoss`): the batch form of the official code and the paper.
  The means are those of the batch's clusters, sigma^2 = sum_n ||r_n - mu_c(n)||^2 / (N-1)
  is estimated from the batch, and gradients flow through both.
- `magnet_loss_with_centers`: the "total" form with stored centers and variance (the
  `ClusterCenters` weights). Each example's own cluster is the nearest center of its
  class; the denominator runs over the centers of other classes only (the official
  total-loss path lets same-class centers add exp(0) = 1 each: a bug not copied here).

The official code computes `relu(-log(num / (den + eps) + eps))` with eps = 1e-8, which caps
each example's loss at -log(1e-8) = 18.42 and fades its gradient before the cap (to half
the uncapped gradient at 17.7): the hardest examples are in effect ignored. Both forms take
`epsilon=1e-8` (`OFFICIAL_EPSILON`) to compute that capped loss, still in the log domain;
the default, `epsilon=None`, is the uncapped loss above, which is what `training/main.py`
trains (`--magnet_cap` for the official form).
"""

import keras
import numpy as np
import tensorflow as tf

from clustr_tf import checks
from clustr_tf import config
from clustr_tf.core import ops

# The variance is floored here so that a batch whose features all coincide gives a finite
# loss rather than a division by zero. It only acts when sigma^2 itself is below it.
_MIN_VARIANCE = 1e-12
# The official code's epsilon in relu(-log(num / (den + eps) + eps)): a cap of 18.42 nats.
OFFICIAL_EPSILON = 1e-8


def _check_epsilon(epsilon):
    if epsilon is not None and not (isinstance(epsilon, (int, float)) and 0 < epsilon < 1):
        raise ValueError(f"`epsilon` must be None or in (0, 1). Received: {epsilon!r}")


def _magnet_from_distances(own, squared_distances, other_class, variance, alpha, epsilon=None):
    """Per-example magnet loss from the squared distances.

    Args:
        own: float [N], squared distance of each example to its own cluster.
        squared_distances: float [N, M], squared distances to M clusters.
        other_class: bool [N, M], true where cluster m belongs to another class than n.
        variance: float scalar, sigma^2.
        alpha: float, the margin.
        epsilon: None (the loss), or the official code's epsilon: the loss of
            `relu(-log(num / (den + epsilon) + epsilon))`, computed as
            `relu(-logaddexp(log num - logaddexp(log den, log epsilon), log epsilon))`.

    Returns:
        float [N]; 0 for an example with no cluster of another class in sight.
    """
    scale = 1.0 / (2.0 * tf.maximum(variance, _MIN_VARIANCE))
    lse, has_other = ops.masked_logsumexp(-squared_distances * scale, other_class)
    if epsilon is None:
        value = tf.nn.relu(alpha + own * scale + lse)
    else:
        log_eps = tf.constant(float(np.log(epsilon)), lse.dtype)
        log_ratio = -own * scale - alpha - tf.experimental.numpy.logaddexp(lse, log_eps)
        value = tf.nn.relu(-tf.experimental.numpy.logaddexp(log_ratio, log_eps))
    return tf.where(has_other, value, tf.zeros_like(value))


def magnet_loss(y_true, y_pred, clusters_per_class, alpha=config.MAGNET_ALPHA, num_clusters=None, epsilon=None):
    """Batch-form magnet loss, one value per example.

    The clusters are those present in the batch: examples with the same cluster index form
    one cluster, whose mean is taken over the batch. Cluster `j` belongs to class
    `j // clusters_per_class`.

    Args:
        y_true: int tensor [N] (floats holding integers are accepted), the global cluster
            index of each example.
        y_pred: float tensor [N, D], the features.
        clusters_per_class: int >= 1, K.
        alpha: float, the margin (official: 12.5).
        num_clusters: optional int, the total number of clusters C*K. When given, the
            batch's clusters are found with static shapes (segment sums over all C*K
            clusters) instead of `tf.unique`, so the loss compiles with XLA
            (`jit_compile`); the values are the same.
        epsilon: None (default: uncapped), or `OFFICIAL_EPSILON` for the official code's
            capped form (see the module docstring).

    Returns:
        float32 tensor [N].

    Example:

    >>> features = tf.constant([[0.0], [0.0], [10.0], [10.0]])
    >>> magnet_loss(tf.constant([0, 0, 1, 1]), features, clusters_per_class=1).numpy()
    array([0., 0., 0., 0.], dtype=float32)

    Reference:
        Rippel et al., "Metric Learning with Adaptive Density Discrimination", ICLR 2016.
    """
    _check_epsilon(epsilon)
    features = tf.cast(y_pred, tf.float32)
    clusters = tf.reshape(tf.cast(y_true, tf.int32), [-1])
    if num_clusters is None:
        unique, position = tf.unique(clusters)
        present = tf.ones_like(unique, dtype=tf.bool)
        segments = tf.size(unique)
    else:  # every cluster is a segment; those absent from the batch are masked out
        unique = tf.range(num_clusters, dtype=tf.int32)
        position = clusters
        segments = num_clusters
        present = tf.math.unsorted_segment_sum(tf.ones_like(clusters), clusters, num_clusters) > 0
    means = tf.math.unsorted_segment_mean(features, position, segments)
    # [N, U, D] differences: the batch holds few clusters, and the direct form is exact.
    squared_distances = tf.reduce_sum(
        tf.square(features[:, tf.newaxis, :] - means[tf.newaxis, :, :]), axis=-1
    )
    own = tf.gather(squared_distances, position, axis=1, batch_dims=1)
    count = tf.cast(tf.shape(features)[0], tf.float32)
    variance = tf.reduce_sum(own) / tf.maximum(count - 1.0, 1.0)
    other_class = (unique // clusters_per_class)[tf.newaxis, :] != (
        clusters // clusters_per_class
    )[:, tf.newaxis]
    other_class = tf.logical_and(other_class, present[tf.newaxis, :])
    return _magnet_from_distances(own, squared_distances, other_class, variance, alpha, epsilon)


def magnet_loss_with_centers(labels, features, centers, variance, clusters_per_class, alpha=config.MAGNET_ALPHA,
                             epsilon=None):
    """Magnet loss against stored centers and variance, one value per example.

    Args:
        labels: int tensor [N], classes.
        features: float tensor [N, D].
        centers: float tensor [C*K, D]; center `j` belongs to class `j // K`.
        variance: float scalar, the stored sigma^2.
        clusters_per_class: int >= 1, K.
        alpha: float, the margin.
        epsilon: None (uncapped) or `OFFICIAL_EPSILON` (the official capped form).

    Returns:
        float32 tensor [N].
    """
    _check_epsilon(epsilon)
    features = tf.cast(features, tf.float32)
    centers = tf.cast(centers, tf.float32)
    labels = tf.reshape(tf.cast(labels, tf.int64), [-1])
    squared_distances = ops.pairwise_squared_distances(features, centers)
    center_class = tf.range(tf.shape(centers)[0], dtype=tf.int64) // clusters_per_class
    same_class = center_class[tf.newaxis, :] == labels[:, tf.newaxis]
    own = tf.reduce_min(
        tf.where(same_class, squared_distances, tf.fill(tf.shape(squared_distances), float("inf"))),
        axis=-1,
    )
    return _magnet_from_distances(
        own, squared_distances, tf.logical_not(same_class), tf.cast(variance, tf.float32), alpha, epsilon
    )


@keras.saving.register_keras_serializable(package="clustr_tf")
class MagnetLoss(keras.losses.Loss):
    """Batch-form magnet loss as a Keras loss (see `magnet_loss`).

    `y_true` holds each example's global cluster index (cluster `j` is of class
    `j // clusters_per_class`), `y_pred` the features [N, D]. Neighbourhood batches from
    `clustr_tf.sampler.NeighbourhoodSampler` provide both.

    Args:
        clusters_per_class: int >= 1, K (official: 2).
        alpha: float, the margin (official: 12.5).
        epsilon: None (uncapped, the default) or `OFFICIAL_EPSILON` (the official code's
            form, capped at 18.42 nats per example).
        reduction: as for every Keras loss (default `"sum_over_batch_size"`).
        name: the loss name.
        dtype: the loss computation dtype.

    Example:

    ```python
    model.compile(optimizer=keras.optimizers.Adam(1e-4),
                  loss=clustr_tf.losses.MagnetLoss(clusters_per_class=2, alpha=12.5))
    ```

    Reference:
        Rippel et al., "Metric Learning with Adaptive Density Discrimination", ICLR 2016;
        Alfarra et al., "Rethinking Clustering for Robustness", BMVC 2021.
    """

    def __init__(
        self,
        clusters_per_class=config.CLUSTERS_PER_CLASS,
        alpha=config.MAGNET_ALPHA,
        epsilon=None,
        reduction="sum_over_batch_size",
        name="magnet_loss",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        checks.positive_int("clusters_per_class", clusters_per_class)
        if not alpha >= 0:
            raise ValueError(f"`alpha` must be >= 0. Received: {alpha!r}")
        _check_epsilon(epsilon)
        self.clusters_per_class = clusters_per_class
        self.alpha = float(alpha)
        self.epsilon = epsilon

    def call(self, y_true, y_pred):
        return magnet_loss(y_true, y_pred, self.clusters_per_class, self.alpha, epsilon=self.epsilon)

    def get_config(self):
        return {
            **super().get_config(),
            "clusters_per_class": self.clusters_per_class,
            "alpha": self.alpha,
            "epsilon": self.epsilon,
        }
