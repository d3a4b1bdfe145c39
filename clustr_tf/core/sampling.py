"""Magnet-loss neighbourhood sampling: the state-free functions.

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
This module holds each step as a function of arrays, with no state: the checks of a
training set and of new assignments, the initial assignments and impostors, the nearest
impostors, the member lists, per-cluster means, seed probabilities and the draw of one
neighbourhood (stateless random ops: the same seed gives the same batch).
`clustr_tf.sampler.NeighbourhoodSampler` keeps the state in variables and runs these
functions in a `tf.data` pipeline.

Reference:
    Rippel, Paluri, Dollar, Bourdev, "Metric Learning with Adaptive Density
    Discrimination", ICLR 2016. Alfarra et al., "Rethinking Clustering for Robustness",
    BMVC 2021 (arXiv:2006.07682).
"""

import numpy as np
import tensorflow as tf
from absl import logging


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


def _check_in_range(name, values, size):
    """ValueError naming the first of the integer `values` outside [0, size), if any."""
    bad = np.flatnonzero((values < 0) | (values >= size))
    if bad.size:
        raise ValueError(f"`{name}` must be in [0, {size}). Received: {values[bad[0]]} at index {bad[0]}")


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
    _check_in_range("labels", labels, num_classes)
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
    _check_in_range("assignments", assignments, num_clusters)
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
