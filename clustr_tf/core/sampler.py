"""Magnet-loss neighbourhood batches as an in-graph `tf.data` pipeline.

Every batch is one neighbourhood: a seed cluster drawn in proportion to its examples'
recent losses, its `m - 1` nearest clusters of other classes (impostors), and `d` examples
from each (`clustr_tf.sampling` explains the steps and holds them as state-free functions).
`NeighbourhoodSampler` keeps the sampling state (cluster assignments, impostors, recent
per-example losses) in non-trainable `tf.Variable`s that the `tf.data` pipeline reads when
it builds each batch. A training step records the per-example losses of its batch with
`record_losses`, and a cluster refresh (k-means on the features) calls `update`; both take
effect on later batches without rebuilding the dataset.

Reference:
    Rippel, Paluri, Dollar, Bourdev, "Metric Learning with Adaptive Density
    Discrimination", ICLR 2016. Alfarra et al., "Rethinking Clustering for Robustness",
    BMVC 2021 (arXiv:2006.07682).
"""

import operator

import numpy as np
import tensorflow as tf
from absl import logging

from clustr_tf import checks
from clustr_tf import config
from clustr_tf.core import sampling


def _read_only(attribute, doc):
    """A read-only property that returns `self.<attribute>`."""
    return property(operator.attrgetter(attribute), doc=doc)


class NeighbourhoodSampler:
    """Draws magnet-loss neighbourhood batches from an in-memory dataset.

    Every batch is one neighbourhood: a seed cluster drawn with probability proportional
    to the mean recent loss of its examples, its `m - 1` nearest clusters of other classes
    (impostors), and `d` examples drawn without replacement from each of these `m`
    clusters, grouped cluster by cluster with the seed first.

    State, each a non-trainable `tf.Variable` (created on the CPU, where `tf.data` runs):

    - `assignments`: int32 [N], the global cluster index of each example. Initially
      example n of class c is in cluster c*K + (its rank among class c's examples) % K.
    - `impostors`: int32 [C*K, m-1], for each cluster its m-1 nearest clusters of other
      classes. Until the first `update`, cluster j of class c gets the m-1 clusters that
      follow class c's block cyclically: (c+1)*K, (c+1)*K + 1, ... modulo C*K.
    - `example_losses`: float32 [N], the most recent loss recorded for each example,
      initially 1.0 (so seeds start uniform over clusters).

    Change `assignments` and `impostors` only through `update`, which also refreshes the
    member lists the pipeline draws from. Create the sampler outside any
    `tf.distribute.Strategy` scope so that its variables stay ordinary CPU variables.

    Args:
        images: array-like [N, H, W, C], float in [0, 1], or uint8 (the dataset then
            outputs float32 `images / 255`).
        labels: integer array-like [N], values in [0, num_classes).
        num_classes: int >= 1, the number of classes C.
        clusters_per_class: int >= 1, K (official ClusTR default: 2).
        m: int >= 1, the number of clusters in a batch (official: 12); needs
            m - 1 <= (C - 1) * K.
        d: int >= 1, the number of examples drawn from each cluster (official: 20).
        seed: int, the seed of the batch sequence.

    Raises:
        ValueError: if an argument is out of range, the images are not finite or do not
            match the labels, or a class has fewer than `clusters_per_class` examples.

    Example:

    ```python
    sampler = NeighbourhoodSampler(x_train, y_train, num_classes=10)
    for images, info in sampler.dataset().take(2):
        per_example_loss = ...  # float32 [B]
        sampler.record_losses(info["indices"], per_example_loss)
    sampler.update(assignments, centers)  # after each k-means refresh
    ```

    Reference:
        Rippel et al., "Metric Learning with Adaptive Density Discrimination", ICLR 2016.
    """

    images = _read_only("_images", "The training images, a tf.Variable [N, H, W, C] (uint8 or float32, as given).")
    labels = _read_only("_labels_np", "The training labels, int64 numpy array [N].")
    num_examples = _read_only("_num_examples", "int, N.")
    num_classes = _read_only("_num_classes", "int, C.")
    clusters_per_class = _read_only("_clusters_per_class", "int, K.")
    num_clusters = _read_only("_num_clusters", "int, C*K.")
    m = _read_only("_m", "int, the number of clusters in a batch.")
    d = _read_only("_d", "int, the number of examples drawn from each cluster.")
    batch_size = _read_only("_batch_size", "int, m*d: the batch size when every cluster has at least d examples.")

    def __init__(self, images, labels, num_classes, clusters_per_class=config.CLUSTERS_PER_CLASS,
                 m=config.CLUSTERS_PER_BATCH, d=config.EXAMPLES_PER_CLUSTER, seed=0):
        for name, value in (("num_classes", num_classes), ("clusters_per_class", clusters_per_class), ("m", m),
                            ("d", d)):
            checks.positive_int(name, value)
        checks.integer("seed", seed)
        max_m = (num_classes - 1) * clusters_per_class + 1
        if m > max_m:
            raise ValueError(
                "`m` - 1 must be <= (num_classes - 1) * clusters_per_class = "
                f"{max_m - 1} (the clusters of other classes). Received: m={m}"
            )

        images, labels = sampling.check_training_set(images, labels, num_classes, clusters_per_class)

        self._num_classes = int(num_classes)
        self._clusters_per_class = int(clusters_per_class)
        self._m = int(m)
        self._d = int(d)
        self._seed = int(seed)
        self._num_clusters = self._num_classes * self._clusters_per_class
        self._batch_size = self._m * self._d
        self._num_examples = len(labels)
        self._labels_np = labels.astype(np.int64)

        assignments = sampling.initial_assignments(labels, num_classes, clusters_per_class)
        members, offsets = sampling.member_lists(assignments, self.num_clusters)
        with tf.device("/CPU:0"):
            self._images = tf.Variable(images, trainable=False, name="images")
            self._labels = tf.Variable(self._labels_np, trainable=False, name="labels")
            self.assignments = tf.Variable(
                assignments.astype(np.int32), trainable=False, name="assignments"
            )
            self.impostors = tf.Variable(
                sampling.initial_impostors(num_classes, clusters_per_class, m).astype(np.int32),
                trainable=False,
                name="impostors",
            )
            self.example_losses = tf.Variable(
                tf.ones([self._num_examples], tf.float32),
                trainable=False,
                name="example_losses",
            )
            # Derived from `assignments` by `update`: the example indices sorted by cluster
            # and, for cluster j, its members' slice offsets[j]:offsets[j+1].
            self._members = tf.Variable(members, trainable=False, name="members")
            self._offsets = tf.Variable(offsets, trainable=False, name="offsets")
        self._warn_small_clusters(np.diff(offsets))

    def _warn_small_clusters(self, sizes):
        small = np.flatnonzero((sizes > 0) & (sizes < self._d))
        if small.size:
            logging.warning(
                "Clusters smaller than d=%d contribute all their examples to a batch "
                "(cluster: size): %s",
                self._d,
                {int(j): int(sizes[j]) for j in small},
            )

    def update(self, assignments, centers):
        """Sets new cluster assignments and recomputes the impostors from the centers.

        The impostors of each cluster become its m-1 nearest (Euclidean distance between
        centers) non-empty clusters of other classes, ties broken by the lower index. Logs
        one warning naming the non-empty clusters smaller than `d` with their sizes.

        Args:
            assignments: integer array [N], the cluster of each example in [0, C*K); an
                example of class c must be in a cluster of class c (index // K == c).
            centers: float array [C*K, D], the cluster centers (finite for every
                non-empty cluster).

        Raises:
            ValueError: if the shapes or values are invalid, an example is assigned to a
                cluster of another class (so no class can be left without a non-empty
                cluster), or some cluster has fewer than m-1 non-empty clusters of other
                classes.
        """
        assignments, centers, sizes = sampling.check_assignments(
            assignments, centers, self._labels_np, self._clusters_per_class, self.num_clusters)
        # Every class has examples (checked at construction) and they must stay in their
        # class's clusters, so every class keeps a non-empty cluster.
        impostors = sampling.nearest_impostors(centers, sizes, self._clusters_per_class, self._m - 1)

        members, offsets = sampling.member_lists(assignments, self.num_clusters)
        self.assignments.assign(assignments.astype(np.int32))
        self.impostors.assign(impostors.astype(np.int32))
        self._members.assign(members)
        self._offsets.assign(offsets)
        self._warn_small_clusters(sizes)

    def record_losses(self, indices, losses):
        """Stores the most recent loss of some examples; usable inside a `tf.function`.

        Args:
            indices: integer tensor [B], example indices (the dataset's `"indices"`).
            losses: float tensor [B], their per-example losses (finite, >= 0).

        Returns:
            The updated `example_losses` variable.
        """
        indices = tf.reshape(tf.cast(indices, tf.int32), [-1])
        losses = tf.reshape(tf.cast(tf.stop_gradient(losses), tf.float32), [-1])
        return self.example_losses.scatter_update(tf.IndexedSlices(losses, indices))

    def cluster_sizes(self):
        """The number of examples in each cluster: int32 tensor [C*K]."""
        return tf.math.unsorted_segment_sum(
            tf.ones_like(self.assignments), self.assignments, self.num_clusters
        )

    def cluster_losses(self):
        """The mean recorded loss of each cluster's members: float32 [C*K], 0 if empty."""
        return sampling.cluster_means(self.example_losses, self.assignments, self.num_clusters)

    def seed_probabilities(self):
        """Each cluster's probability to seed a batch (`sampling.seed_probabilities`): float32 [C*K]."""
        return sampling.seed_probabilities(self.cluster_losses(), self.cluster_sizes())

    def sample_indices(self, seed):
        """Draws one neighbourhood batch's examples (`sampling.draw_neighbourhood` on this
        state); the sampling step of `dataset()`.

        Args:
            seed: int32 or int64 tensor [2]; the same seed and state give the same result.

        Returns:
            `(indices, clusters)`: int32 [B], grouped cluster by cluster, the seed first.
        """
        return sampling.draw_neighbourhood(seed, self.seed_probabilities(), self.impostors, self._members,
                                           self._offsets.read_value(), self._m, self._d)

    def dataset(self, start=0, stream=0, augment=None):
        """An infinite dataset of neighbourhood batches.

        Batch i is drawn with a stateless seed made from `(seed, stream, i)` from the
        state at the time it is built, so recorded losses and `update` take effect on
        later batches (after the few batches already prefetched).

        Args:
            start: int, the index of the first batch: a resumed run passes the number of
                batches it already consumed and continues the same sequence.
            stream: int, selects an independent sequence of batches (one per worker of a
                multi-worker run).
            augment: optional `augment(images, seed) -> images` applied to each batch
                (images float32 [B, H, W, C], seed int [2]), e.g.
                `clustr_tf.data.augmentation("cifar10")`.

        Returns:
            A `tf.data.Dataset` of `(images, info)`: `images` float32 [B, H, W, C] in
            [0, 1], and `info` a dict of `"labels"` int64 [B], `"clusters"` int32 [B] and
            `"indices"` int32 [B] (the example indices, for `record_losses`), grouped
            cluster by cluster with the seed first. B is m*d unless a cluster has fewer
            than d examples.
        """
        base_seed = tf.constant([self._seed, int(stream)], tf.int64)

        def make_batch(step):
            batch_seed = tf.random.experimental.stateless_fold_in(base_seed, step)
            indices, clusters = self.sample_indices(batch_seed)
            images = tf.gather(self._images, indices)
            if images.dtype == tf.uint8:
                images = tf.cast(images, tf.float32) / 255.0
            if augment is not None:
                images = augment(images, tf.random.experimental.stateless_fold_in(batch_seed, 1))
            labels = tf.gather(self._labels, indices)
            return images, {"labels": labels, "clusters": clusters, "indices": indices}

        return (
            tf.data.Dataset.counter(start=int(start), dtype=tf.int64)
            .map(make_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .prefetch(tf.data.AUTOTUNE)
        )

    def state_variables(self):
        """The sampling state to checkpoint: a dict of name -> tf.Variable.

        Restoring all of them (e.g. with `tf.train.Checkpoint(**sampler.state_variables())`)
        brings back assignments, impostors, member lists and recorded losses together.
        """
        return {
            "assignments": self.assignments,
            "impostors": self.impostors,
            "example_losses": self.example_losses,
            "members": self._members,
            "offsets": self._offsets,
        }
