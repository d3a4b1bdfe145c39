"""Magnet-loss neighbourhood sampling as an in-graph `tf.data` pipeline.

The magnet loss pulls every example towards the mean of its own cluster and pushes it
away from the nearby clusters of other classes. A random batch rarely holds a cluster
together with the clusters that crowd it, so ClusTR (like Rippel et al.) builds each batch
around one *neighbourhood*:

1. a seed cluster is drawn with probability proportional to the mean of the most recent
   losses of its examples, so badly separated clusters come back more often;
2. its `m - 1` *impostors* are added: the clusters of OTHER classes whose centers are
   nearest to the seed's center;
3. `d` examples are drawn without replacement from each of these `m` clusters (all of a
   cluster's examples when it has fewer than `d`).

There are C classes and K clusters per class; cluster `j` belongs to class `j // K`.
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

import numpy as np
import tensorflow as tf
from absl import logging

from clustr_tf import checks


def initial_assignments(labels, num_classes, clusters_per_class):
    """Example n of class c goes to cluster c*K + (its rank among class c's examples) % K."""
    assignments = np.empty(labels.shape, np.int64)
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        assignments[members] = c * clusters_per_class + (
            np.arange(members.size) % clusters_per_class
        )
    return assignments


def initial_impostors(num_classes, clusters_per_class, m):
    """Cluster j of class c: the first m-1 clusters after class c's block, cyclically.

    That is clusters (c+1)*K, (c+1)*K + 1, ... taken modulo C*K, which walks through the
    other classes in order and never reaches class c before m-1 <= (C-1)*K are found.
    """
    num_clusters = num_classes * clusters_per_class
    impostors = np.empty((num_clusters, m - 1), np.int64)
    for j in range(num_clusters):
        start = (j // clusters_per_class + 1) * clusters_per_class
        impostors[j] = (start + np.arange(m - 1)) % num_clusters
    return impostors


def nearest_impostors(centers, sizes, clusters_per_class, num_impostors):
    """Each cluster's `num_impostors` nearest non-empty clusters of other classes.

    Distances are Euclidean between centers; ties are broken by the lower cluster index.
    Non-finite centers of empty clusters are allowed (they are never candidates).

    Args:
        centers: float array [C*K, D], the cluster centers.
        sizes: int array [C*K], the number of examples in each cluster.
        clusters_per_class: int, K.
        num_impostors: int >= 0, how many impostors per cluster (m - 1).

    Returns:
        int64 array [C*K, num_impostors].

    Raises:
        ValueError: if some cluster has fewer than `num_impostors` non-empty clusters of
            other classes.
    """
    centers = np.asarray(centers, np.float64)
    num_clusters = centers.shape[0]
    cluster_class = np.arange(num_clusters) // clusters_per_class
    candidate = (cluster_class[None, :] != cluster_class[:, None]) & (sizes > 0)[None, :]
    available = candidate.sum(axis=1)
    short = np.flatnonzero(available < num_impostors)
    if short.size:
        raise ValueError(
            f"Every cluster needs m-1={num_impostors} non-empty clusters of other classes. "
            f"Received: cluster {int(short[0])} has {int(available[short[0]])}."
        )
    with np.errstate(invalid="ignore", over="ignore"):
        distances = np.sqrt(np.sum((centers[:, None, :] - centers[None, :, :]) ** 2, -1))
    distances = np.where(np.isfinite(distances), distances, np.inf)
    # Stable sorts: by distance (the lower index first among equal ones), then candidates
    # before the rest, so a row never selects a non-candidate (even an empty cluster's
    # row, whose distances are all +inf when its center is NaN).
    order = np.argsort(distances, axis=1, kind="stable")
    not_candidate = np.take_along_axis(~candidate, order, axis=1)
    order = np.take_along_axis(order, np.argsort(not_candidate, axis=1, kind="stable"), 1)
    return order[:, :num_impostors]


def check_training_set(images, labels, num_classes, clusters_per_class):
    """The training set as the sampler keeps it, or ValueError naming what is wrong.

    Args:
        images: array-like [N, H, W, C], float in [0, 1] (warned about otherwise) or uint8.
        labels: integer array-like [N] in [0, num_classes).
        num_classes: int, C.
        clusters_per_class: int, K: every class needs at least K examples.

    Returns:
        `(images, labels)`: uint8 as given or float32 [N, H, W, C], and int64 [N].
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4:
        raise ValueError(
            f"`images` must have shape [N, H, W, C]. Received: shape {images.shape}"
        )
    if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
        raise ValueError(
            f"`images` must be floating point in [0, 1] or uint8. Received: dtype "
            f"{images.dtype}"
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"`labels` must be a 1-D integer array. Received: shape {labels.shape}, "
            f"dtype {labels.dtype}"
        )
    if len(images) != len(labels):
        raise ValueError(
            "`images` and `labels` must have the same length. Received: "
            f"{len(images)} images and {len(labels)} labels"
        )
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise ValueError(
            f"`labels` must be in [0, {num_classes}). Received: {labels[bad[0]]} "
            f"at index {bad[0]}"
        )
    counts = np.bincount(labels, minlength=num_classes)
    small = np.flatnonzero(counts < clusters_per_class)
    if small.size:
        raise ValueError(
            f"Every class needs at least clusters_per_class={clusters_per_class} "
            f"examples. Received: class {small[0]} has {counts[small[0]]}"
        )
    if images.dtype != np.uint8:
        if not np.all(np.isfinite(images)):
            raise ValueError("`images` must be finite. Received: NaN or infinite values")
        images = images.astype(np.float32, copy=False)
        if images.size and (images.min() < 0.0 or images.max() > 1.0):
            logging.warning(
                "NeighbourhoodSampler expects float images in [0, 1]; received values "
                "in [%g, %g].", images.min(), images.max()
            )
    return images, labels.astype(np.int64)


def check_assignments(assignments, centers, labels, clusters_per_class, num_clusters):
    """New assignments and centers, checked; ValueError naming what is wrong.

    Args:
        assignments: integer array [N] in [0, C*K); an example of class c must be in a
            cluster of class c (index // K == c).
        centers: float array [C*K, D], finite for every non-empty cluster.
        labels: int array [N], the training labels.
        clusters_per_class: int, K.
        num_clusters: int, C*K.

    Returns:
        `(assignments, centers, sizes)`: numpy arrays, sizes int [C*K].
    """
    assignments = np.asarray(assignments)
    centers = np.asarray(centers)
    if assignments.shape != (len(labels),) or not np.issubdtype(
        assignments.dtype, np.integer
    ):
        raise ValueError(
            f"`assignments` must be an integer array of shape [{len(labels)}]. "
            f"Received: shape {assignments.shape}, dtype {assignments.dtype}"
        )
    bad = np.flatnonzero((assignments < 0) | (assignments >= num_clusters))
    if bad.size:
        raise ValueError(
            f"`assignments` must be in [0, {num_clusters}). Received: "
            f"{assignments[bad[0]]} at index {bad[0]}"
        )
    wrong = np.flatnonzero(assignments // clusters_per_class != labels)
    if wrong.size:
        n = wrong[0]
        raise ValueError(
            "`assignments` must put each example in a cluster of its class "
            f"(cluster // {clusters_per_class} == label). Received: example {n} "
            f"of class {labels[n]} in cluster {assignments[n]}"
        )
    if centers.ndim != 2 or centers.shape[0] != num_clusters:
        raise ValueError(
            f"`centers` must have shape [{num_clusters}, D]. Received: shape "
            f"{centers.shape}"
        )
    sizes = np.bincount(assignments, minlength=num_clusters)
    if not np.all(np.isfinite(centers[sizes > 0])):
        raise ValueError(
            "`centers` must be finite for every non-empty cluster. Received: NaN or "
            "infinite values"
        )
    return assignments, centers, sizes


def member_lists(assignments, num_clusters):
    """`(members, offsets)`: the example indices sorted by cluster (stable), and for
    cluster j its members' slice `offsets[j]:offsets[j+1]`; int32 [N] and [C*K + 1]."""
    members = np.argsort(assignments, kind="stable").astype(np.int32)
    sizes = np.bincount(assignments, minlength=num_clusters)
    return members, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)


def cluster_means(values, assignments, num_clusters):
    """The mean of per-example `values` over each cluster: float32 [C*K], 0 if empty."""
    totals = tf.math.unsorted_segment_sum(values, assignments, num_clusters)
    sizes = tf.math.unsorted_segment_sum(tf.ones_like(assignments), assignments, num_clusters)
    return tf.math.divide_no_nan(totals, tf.cast(sizes, tf.float32))


def seed_probabilities(cluster_losses, cluster_sizes):
    """The probability of each cluster to be a batch's seed.

    Cluster losses (negative ones clipped to 0) normalised to sum to 1; zero for empty
    clusters; uniform over the non-empty clusters when all their losses are 0.

    Args:
        cluster_losses: float32 [C*K], the mean recent loss of each cluster.
        cluster_sizes: int [C*K], its number of examples.

    Returns:
        float32 tensor [C*K].
    """
    non_empty = cluster_sizes > 0
    losses = tf.where(non_empty, tf.maximum(cluster_losses, 0.0), 0.0)
    total = tf.reduce_sum(losses)
    uniform = tf.cast(non_empty, tf.float32)
    return tf.where(total > 0.0, losses / tf.where(total > 0.0, total, 1.0), uniform / tf.reduce_sum(uniform))


def draw_neighbourhood(seed, probabilities, impostors, members, offsets, m, d):
    """One neighbourhood batch: a seed cluster drawn from `probabilities`, its m-1
    impostors, and d examples without replacement from each (all of a smaller cluster's).

    Args:
        seed: int tensor [2], for the stateless random ops (same seed, same batch).
        probabilities: float32 [C*K], each cluster's seed probability.
        impostors: int32 [C*K, m-1], each cluster's nearest clusters of other classes.
        members, offsets: the member lists (`member_lists`).
        m, d: clusters per batch and examples per cluster.

    Returns:
        `(indices, clusters)`: int32 tensors [B], the example indices and their clusters,
        grouped cluster by cluster with the seed first, B = sum of min(d, cluster size).
    """
    seeds = tf.random.experimental.stateless_split(seed, num=2)
    logits = tf.math.log(probabilities)[tf.newaxis]
    seed_cluster = tf.random.stateless_categorical(logits, 1, seed=seeds[0], dtype=tf.int32)[0, 0]
    neighbourhood = tf.concat([seed_cluster[tf.newaxis], tf.gather(impostors, seed_cluster)], axis=0)
    starts = tf.gather(offsets, neighbourhood)
    sizes = tf.gather(offsets, neighbourhood + 1) - starts
    width = tf.reduce_max(sizes)
    # Sampling without replacement: the d largest of one uniform key per member.
    keys = tf.random.stateless_uniform(tf.stack([m, width]), seed=seeds[1])
    keys = tf.where(tf.range(width)[tf.newaxis] < sizes[:, tf.newaxis], keys, -1.0)
    values, positions = tf.math.top_k(keys, k=tf.minimum(d, width))
    taken = values >= 0.0
    indices = tf.gather(members, tf.boolean_mask(starts[:, tf.newaxis] + positions, taken))
    clusters = tf.boolean_mask(tf.broadcast_to(neighbourhood[:, tf.newaxis], tf.shape(positions)), taken)
    return indices, clusters


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

    def __init__(self, images, labels, num_classes, clusters_per_class=2, m=12, d=20, seed=0):
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

        images, labels = check_training_set(images, labels, num_classes, clusters_per_class)

        self._num_classes = int(num_classes)
        self._clusters_per_class = int(clusters_per_class)
        self._m = int(m)
        self._d = int(d)
        self._seed = int(seed)
        self._num_examples = len(labels)
        self._labels_np = labels.astype(np.int64)

        assignments = initial_assignments(labels, num_classes, clusters_per_class)
        members, offsets = member_lists(assignments, self.num_clusters)
        with tf.device("/CPU:0"):
            self._images = tf.Variable(images, trainable=False, name="images")
            self._labels = tf.Variable(self._labels_np, trainable=False, name="labels")
            self.assignments = tf.Variable(
                assignments.astype(np.int32), trainable=False, name="assignments"
            )
            self.impostors = tf.Variable(
                initial_impostors(num_classes, clusters_per_class, m).astype(np.int32),
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

    @property
    def images(self):
        """The training images, a tf.Variable [N, H, W, C] (uint8 or float32, as given)."""
        return self._images

    @property
    def labels(self):
        """The training labels, int64 numpy array [N]."""
        return self._labels_np

    @property
    def num_examples(self):
        """int, N."""
        return self._num_examples

    @property
    def num_classes(self):
        """int, C."""
        return self._num_classes

    @property
    def clusters_per_class(self):
        """int, K."""
        return self._clusters_per_class

    @property
    def num_clusters(self):
        """int, C*K."""
        return self._num_classes * self._clusters_per_class

    @property
    def m(self):
        """int, the number of clusters in a batch."""
        return self._m

    @property
    def d(self):
        """int, the number of examples drawn from each cluster."""
        return self._d

    @property
    def batch_size(self):
        """int, m*d: the batch size when every cluster has at least d examples."""
        return self._m * self._d

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
        assignments, centers, sizes = check_assignments(assignments, centers, self._labels_np,
                                                        self._clusters_per_class, self.num_clusters)
        # Every class has examples (checked at construction) and they must stay in their
        # class's clusters, so every class keeps a non-empty cluster.
        impostors = nearest_impostors(centers, sizes, self._clusters_per_class, self._m - 1)

        members, offsets = member_lists(assignments, self.num_clusters)
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
        return cluster_means(self.example_losses, self.assignments, self.num_clusters)

    def seed_probabilities(self):
        """Each cluster's probability to seed a batch (`seed_probabilities`): float32 [C*K]."""
        return seed_probabilities(self.cluster_losses(), self.cluster_sizes())

    def sample_indices(self, seed):
        """Draws one neighbourhood batch's examples (`draw_neighbourhood` on this state); the
        sampling step of `dataset()`.

        Args:
            seed: int32 or int64 tensor [2]; the same seed and state give the same result.

        Returns:
            `(indices, clusters)`: int32 [B], grouped cluster by cluster, the seed first.
        """
        return draw_neighbourhood(seed, self.seed_probabilities(), self.impostors, self._members,
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
