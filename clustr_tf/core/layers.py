"""The `ClusterCenters` layer: class decisions from distances to cluster centers.

ClusTR keeps K cluster centers per class in feature space and one shared variance. They
are not learned by the optimizer: per-class k-means on the training features assigns them
(see `clustr_tf.clustering.ClusterRefresh`), like the moving statistics of batch
normalization. Cluster `j` belongs to class `j // K`.

The layer turns features into class logits with the soft k-nearest-cluster (soft kNC)
rule of the paper, and exposes the hard rule that the certificate speaks about: the class
of the nearest center.
"""

import keras
import tensorflow as tf

from clustr_tf import checks
from clustr_tf import config
from clustr_tf.core import ops

# A class with no cluster among the L nearest has soft-kNC score 0. Its logit is set to
# the weakest selected cluster's log-kernel minus this constant: a probability below
# e^-100 of that cluster's (0 in float32 after normalisation), yet finite, so losses,
# attacks and their gradients stay defined.
_ABSENT_CLASS_GAP = 100.0


@keras.saving.register_keras_serializable(package="clustr_tf")
class ClusterCenters(keras.layers.Layer):
    """Cluster centers, the shared variance and the soft-kNC / nearest-center rules.

    Holds `num_classes * clusters_per_class` centers and a scalar variance as
    non-trainable weights. Calling the layer returns class logits: the log of the soft-kNC
    scores over the `neighbours` nearest clusters,

        score_c = sum over the L nearest clusters j of class c of exp(-||z - mu_j||^2 / (2 var)),
        logit_c = log(score_c)  (a logsumexp, never an exp followed by a log),

    so `softmax(logits)` is the soft-kNC probability `score / sum(score)`. A class with no
    cluster among the L nearest has score 0; its logit is finite but 100 below the weakest
    selected cluster's, so its probability is 0 in float32.

    Args:
        num_classes: int >= 1, the number of classes C.
        clusters_per_class: int >= 1, K (official ClusTR default: 2).
        neighbours: int in [1, C*K], L, the number of nearest clusters the soft-kNC rule
            looks at (official: 10 for training, 20 for evaluation). `None` means all.
        centers_initializer: initializer of the [C*K, D] centers, used until the first
            cluster refresh assigns them.
        trainable_centers: bool. False (ClusTR): the centers are assigned by the cluster
            refresh, never by the optimizer. True (certified ClusTR,
            `objectives.CertifiedClusTR`): they are trainable weights that the optimizer
            moves with the backbone.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        features: float tensor [batch, D].

    Returns:
        float tensor [batch, C]: class logits (log soft-kNC scores).

    Example:

    >>> layer = ClusterCenters(num_classes=3, clusters_per_class=2, neighbours=4)
    >>> logits = layer(tf.zeros([5, 8]))
    >>> logits.shape
    TensorShape([5, 3])

    Reference:
        Alfarra et al., "Rethinking Clustering for Robustness", BMVC 2021
        (arXiv:2006.07682).
    """

    def __init__(
        self,
        num_classes,
        clusters_per_class=config.CLUSTERS_PER_CLASS,
        neighbours=None,
        centers_initializer="random_normal",
        trainable_centers=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        checks.positive_int("num_classes", num_classes)
        checks.positive_int("clusters_per_class", clusters_per_class)
        num_clusters = num_classes * clusters_per_class
        if neighbours is not None:
            checks.positive_int("neighbours", neighbours)
            if neighbours > num_clusters:
                raise ValueError(
                    "`neighbours` (L) must be at most the number of clusters "
                    f"num_classes * clusters_per_class = {num_clusters}. "
                    f"Received: {neighbours}"
                )
        self.num_classes = num_classes
        self.clusters_per_class = clusters_per_class
        self.neighbours = neighbours
        self.centers_initializer = keras.initializers.get(centers_initializer)
        self.trainable_centers = bool(trainable_centers)
        self.input_spec = keras.layers.InputSpec(ndim=2)

    @property
    def num_clusters(self):
        """The number of clusters, C*K."""
        return self.num_classes * self.clusters_per_class

    def build(self, input_shape):
        dim = input_shape[-1]
        if dim is None:
            raise ValueError(
                "ClusterCenters needs a known feature dimension. "
                f"Received input shape: {input_shape}"
            )
        self.centers = self.add_weight(
            name="centers",
            shape=(self.num_clusters, dim),
            initializer=self.centers_initializer,
            trainable=self.trainable_centers,
            # Trainable: updated by the optimizer like any weight; else assigned by the refresh.
            **({} if self.trainable_centers else {"aggregation": "only_first_replica"}),
        )
        self.variance = self.add_weight(
            name="variance",
            shape=(),
            initializer="ones",
            trainable=False,
            aggregation="only_first_replica",
        )

    def cluster_classes(self):
        """int64 tensor [C*K]: the class of each cluster, `j // K`."""
        return tf.range(self.num_clusters, dtype=tf.int64) // self.clusters_per_class

    def squared_distances(self, features):
        """float tensor [batch, C*K]: `||features_n - centers_j||^2`."""
        features = tf.cast(features, self.compute_dtype)
        centers = tf.cast(self.centers, features.dtype)
        return ops.pairwise_squared_distances(features, centers)

    def nearest_center(self, features):
        """int64 tensor [batch]: the index of the nearest center."""
        return tf.argmin(self.squared_distances(features), axis=-1)

    def nearest_center_class(self, features):
        """int64 tensor [batch]: the class of the nearest center (the certified rule)."""
        return self.nearest_center(features) // self.clusters_per_class

    def _log_scores(self, squared_distances, neighbours):
        """`(log S [batch, C], present bool [batch, C], log-kernel of the L-th nearest)`."""
        neighbours = neighbours or self.neighbours or self.num_clusters
        if not 1 <= neighbours <= self.num_clusters:
            raise ValueError(
                f"`neighbours` must be in [1, {self.num_clusters}]. Received: {neighbours}"
            )
        variance = tf.cast(self.variance, squared_distances.dtype)
        log_kernel = -squared_distances / (2.0 * variance)
        # The L largest log-kernels are the L nearest clusters.
        nearest = tf.math.top_k(log_kernel, k=neighbours)
        threshold = nearest.values[:, -1:]
        selected = tf.reduce_any(
            tf.cast(tf.one_hot(nearest.indices, self.num_clusters), tf.bool), axis=1
        )
        # [batch, C, K]: cluster j sits at row j // K, column j % K.
        shape = [-1, self.num_classes, self.clusters_per_class]
        logits, present = ops.masked_logsumexp(
            tf.reshape(log_kernel, shape), tf.reshape(selected, shape), axis=-1
        )
        return logits, present, threshold

    def logits_from_distances(self, squared_distances, neighbours=None):
        """Soft-kNC class logits from squared distances to the centers.

        Args:
            squared_distances: float tensor [batch, C*K].
            neighbours: overrides the layer's L for this call (e.g. 20 at evaluation).

        Returns:
            float tensor [batch, C].
        """
        logits, present, threshold = self._log_scores(squared_distances, neighbours)
        floor = tf.stop_gradient(threshold - _ABSENT_CLASS_GAP)
        return tf.where(present, logits, floor)

    def scores_from_distances(self, squared_distances, neighbours=None):
        """The raw soft-kNC scores S from squared distances to the centers.

        `S_c` is the sum of the kernels `exp(-||z - mu_j||^2 / (2 var))` of the clusters of
        class c among the L nearest, in [0, K]; exactly 0 for a class with none of them.
        The official ClusTR code uses S as logits in its attack loss and in the QTRADES
        and cross-entropy terms (a softmax of S, not of log S). S is computed as the exp of
        a logsumexp, so it is S to float rounding, and it underflows to 0, as the direct
        sum does, when every kernel does.

        Args:
            squared_distances: float tensor [batch, C*K].
            neighbours: overrides the layer's L for this call.

        Returns:
            float tensor [batch, C].
        """
        logits, present, _ = self._log_scores(squared_distances, neighbours)
        return tf.where(present, tf.exp(logits), tf.zeros_like(logits))

    def call(self, features):
        return self.logits_from_distances(self.squared_distances(features))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes)

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "clusters_per_class": self.clusters_per_class,
            "neighbours": self.neighbours,
            "centers_initializer": keras.initializers.serialize(self.centers_initializer),
            "trainable_centers": self.trainable_centers,
        }
