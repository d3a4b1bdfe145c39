"""Per-class k-means on the features, and the callback that keeps centers fresh.

ClusTR's centers are not learned by gradient descent: after each epoch (officially) the
features of the whole training set are clustered, class by class, with k-means++, and the
shared variance is re-estimated from the distances of the examples to their centers. The
pure functions here do the mathematics; `ClusterRefresh` runs them from `model.fit`.
"""

import time
import warnings

import keras
import numpy as np
import tensorflow as tf
from absl import logging
from sklearn.cluster import KMeans

from clustr_tf import checks
from clustr_tf.core import models


def kmeans_per_class(features, labels, num_classes, clusters_per_class, seed=0, n_init=3):
    """Clusters each class's features into `clusters_per_class` groups with k-means++.

    Cluster `c * K + k` is the k-th cluster of class c.

    A class whose features take fewer than K distinct values (a collapsed network can map
    every image of a class to one point) cannot be split by k-means. Such a class is split
    into K groups by example order instead (example i of the class goes to group i % K),
    each center is its group's mean, and a warning is logged: training continues, and the
    magnet loss then pushes the features apart.

    Args:
        features: float array [N, D].
        labels: int array [N], classes in [0, num_classes).
        num_classes: int, C.
        clusters_per_class: int, K.
        seed: int, seeds k-means.
        n_init: int, k-means restarts per class (the best inertia is kept).

    Returns:
        `(centers, assignments)`: float32 [C*K, D] and int32 [N] (global cluster indices).

    Raises:
        ValueError: if a class has fewer than K examples, or shapes disagree.
    """
    features = np.asarray(features, dtype=np.float32)
    labels = np.asarray(labels).reshape(-1)
    if features.ndim != 2 or len(features) != len(labels):
        raise ValueError(
            "`features` must be [N, D] with one label per row. Received features of shape "
            f"{features.shape} and {len(labels)} labels"
        )
    if not np.all(np.isfinite(features)):
        raise ValueError("`features` contain NaN or Inf: the network has diverged")
    k = clusters_per_class
    centers = np.zeros([num_classes * k, features.shape[1]], np.float32)
    assignments = np.zeros([len(labels)], np.int32)
    last = time.time()
    for c in range(num_classes):
        if time.time() - last >= _PROGRESS_SECONDS:  # a line at least every 10 s
            logging.info("k-means: %d of %d classes clustered", c, num_classes)
            last = time.time()
        members = np.flatnonzero(labels == c)
        if len(members) < k:
            raise ValueError(
                f"Class {c} has {len(members)} training examples, fewer than "
                f"clusters_per_class={k}: each of its clusters needs at least one example"
            )
        x = features[members]
        if len(np.unique(x, axis=0)) < k:
            logging.warning(
                "Class %d: its %d features take fewer than %d distinct values; splitting "
                "it into %d clusters by example order.", c, len(members), k, k,
            )
            local = np.arange(len(members)) % k
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ConvergenceWarning on near-duplicates
                local = KMeans(
                    n_clusters=k, init="k-means++", n_init=n_init, random_state=seed + c
                ).fit(x).labels_
        for j in range(k):
            group = x[local == j]
            if len(group):
                centers[c * k + j] = group.mean(axis=0)
        assignments[members] = c * k + local
    return centers, assignments


def estimate_variance(features, centers, assignments):
    """The shared variance: sum_n ||r_n - mu_a(n)||^2 / (N - 1), as the magnet loss uses.

    Args:
        features: float array [N, D].
        centers: float array [C*K, D].
        assignments: int array [N], the cluster of each example.

    Returns:
        float, sigma^2.
    """
    features = np.asarray(features, np.float64)
    residual = features - np.asarray(centers, np.float64)[np.asarray(assignments)]
    return float(np.sum(residual**2) / max(len(features) - 1, 1))


def center_separation(centers, clusters_per_class):
    """Mean Euclidean distance between centers of different classes (a health signal)."""
    centers = np.asarray(centers, np.float64)
    cls = np.arange(len(centers)) // clusters_per_class
    dist = np.sqrt(np.maximum(((centers[:, None] - centers[None]) ** 2).sum(-1), 0.0))
    other = cls[:, None] != cls[None, :]
    return float(dist[other].mean()) if other.any() else 0.0


_PROGRESS_SECONDS = 10  # the longest silence of a long refresh


def embedding_function(model, strategy=None):
    """A `tf.function` computing `model.embed(images, training=False)`; reuse it.

    Under a strategy with several replicas, each replica embeds its slice of a batch and
    the features are gathered back in order on every worker.
    """
    if strategy is None or strategy.num_replicas_in_sync == 1:
        return tf.function(lambda x: model.embed(x, training=False), reduce_retracing=True)

    def step(x):
        features = strategy.run(lambda x: model.embed(x, training=False), args=(x,))
        return strategy.gather(features, axis=0)

    return tf.function(step, reduce_retracing=True)


def embed(model, images, batch_size=256, embed_fn=None, strategy=None):
    """Features of `images` in order, computed in inference mode.

    Args:
        model: a model with an `embed(images, training=False)` method (`ClusTRModel`).
        images: array or tensor [N, H, W, C] (uint8 images are scaled to [0, 1]).
        batch_size: int.
        embed_fn: the result of `embedding_function(model, strategy)`, to avoid a new
            trace.
        strategy: optional `tf.distribute.Strategy`: the pass runs on all its replicas
            (every worker reads the whole set and receives all features).

    Returns:
        float32 numpy array [N, D].
    """
    dataset = tf.data.Dataset.from_tensor_slices(images).batch(batch_size)
    if dataset.element_spec.dtype == tf.uint8:
        dataset = dataset.map(lambda x: tf.cast(x, tf.float32) / 255.0)
    step = embed_fn or embedding_function(model, strategy)
    total, done, last = int(images.shape[0]), 0, time.time()
    if strategy is None or strategy.num_replicas_in_sync == 1:
        features = []
        for batch in dataset.prefetch(2):
            features.append(step(batch).numpy())
            done += len(features[-1])
            if time.time() - last >= _PROGRESS_SECONDS and done < total:  # a line at least every 10 s
                logging.info("Embedded %d of %d training images", done, total)
                last = time.time()
        return np.concatenate(features, axis=0)
    # Every worker reads the whole set; replica r of R embeds slice r of each batch and
    # the slices are gathered back in order (no tf.data sharding, whose order differs
    # between strategies).
    replicas = strategy.num_replicas_in_sync
    features = []
    for batch in dataset.rebatch(batch_size * replicas).prefetch(2):
        per = -(-int(tf.shape(batch)[0]) // replicas)
        values = strategy.experimental_distribute_values_from_function(
            lambda ctx, b=batch, n=per: b[ctx.replica_id_in_sync_group * n:(ctx.replica_id_in_sync_group + 1) * n]
        )
        features.append(step(values).numpy())
    return np.concatenate(features, axis=0)


class ClusterRefresh(keras.callbacks.Callback):
    """Re-clusters the training features and resets centers and variance during `fit`.

    Before the first epoch (unless disabled) and at the end of every `frequency`-th epoch,
    embeds the whole training set in inference mode, runs `kmeans_per_class`, assigns the
    model's `cluster_centers.centers` and `.variance`, and, given a sampler, hands it the new
    assignments and centers. It also connects the sampler to the model, so that the
    training step records each example's loss for the sampler's seed distribution.
    Adds `variance` and `center_separation` to the epoch logs.

    The refresh of an epoch runs after its last training batch, before `fit` validates: the
    logged `val_*` metrics (and EarlyStopping, ModelCheckpoint, ReduceLROnPlateau, which
    read them) are those of the model as the epoch leaves it. (Where the number of steps
    is unknown, it runs at the epoch's end, after validation.)

    Args:
        sampler: a `clustr_tf.sampler.NeighbourhoodSampler`; its images and labels are the
            training set that is clustered. Or pass `images` and `labels`.
        images: [N, H, W, C] training images, when no sampler is given.
        labels: [N] training labels, when no sampler is given.
        frequency: int >= 1, refresh after every `frequency` epochs.
        refresh_on_train_begin: whether to refresh before the first epoch.
        batch_size: int, the batch size of the embedding pass.
        seed: int, seeds k-means (each refresh uses a new derived seed).
        n_init: int, k-means restarts per class.
        strategy: optional `tf.distribute.Strategy` the embedding pass runs under.

    Example:

    ```python
    sampler = clustr_tf.sampler.NeighbourhoodSampler(x, y, num_classes=10)
    model.fit(sampler.dataset(), steps_per_epoch=50, epochs=10,
              callbacks=[clustr_tf.clustering.ClusterRefresh(sampler)])
    ```
    """

    def __init__(
        self,
        sampler=None,
        images=None,
        labels=None,
        frequency=1,
        refresh_on_train_begin=True,
        batch_size=256,
        seed=0,
        n_init=3,
        strategy=None,
    ):
        super().__init__()
        if sampler is None and (images is None or labels is None):
            raise ValueError("ClusterRefresh needs a `sampler`, or both `images` and `labels`")
        checks.positive_int("frequency", frequency)
        self.sampler = sampler
        self.images = sampler.images if sampler is not None else images
        self.labels = np.asarray(sampler.labels if sampler is not None else labels).reshape(-1)
        self.frequency = frequency
        self.refresh_on_train_begin = refresh_on_train_begin
        self.batch_size = batch_size
        self.seed = seed
        self.n_init = n_init
        self.strategy = strategy
        self.refreshes = 0
        self.last = {}
        self._epoch, self._refreshed = 0, False
        self._embed_fn = None
        self._embed_model = None

    def _check_model(self):
        if not isinstance(self.model, models.ClusTRModel):
            raise TypeError(f"ClusterRefresh needs a clustr_tf.models.ClusTRModel. Received: "
                            f"{type(self.model).__name__}")

    def refresh(self):
        """Runs one refresh now; returns `{"variance", "center_separation"}`."""
        self._check_model()
        layer = self.model.cluster_centers
        start = time.time()
        logging.info("Cluster refresh %d: embedding %d training images, then k-means in each of the %d classes",
                     self.refreshes + 1, len(self.labels), layer.num_classes)
        if self._embed_model is not self.model:
            self._embed_fn = embedding_function(self.model, self.strategy)
            self._embed_model = self.model
        features = embed(
            self.model, self.images, self.batch_size, self._embed_fn, self.strategy
        )
        centers, assignments = kmeans_per_class(
            features,
            self.labels,
            layer.num_classes,
            layer.clusters_per_class,
            seed=self.seed + 1000 * self.refreshes,
            n_init=self.n_init,
        )
        variance = estimate_variance(features, centers, assignments)
        logging.info("Cluster refresh %d done in %.0f s", self.refreshes + 1, time.time() - start)
        layer.centers.assign(centers)
        layer.variance.assign(variance)
        if self.sampler is not None:
            self.sampler.update(assignments, centers)
        self.refreshes += 1
        self.last = {
            "variance": variance,
            "center_separation": center_separation(centers, layer.clusters_per_class),
        }
        return self.last

    def on_train_begin(self, logs=None):
        self._check_model()
        if self.sampler is not None:
            self.model.loss_recorder = self.sampler
        if self.refresh_on_train_begin:
            self.refresh()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._refreshed = epoch, False

    def _due(self, epoch, logs):
        diverged = not np.isfinite(float((logs or {}).get("loss", 0.0)))  # TerminateOnNaN stops the run
        return (epoch + 1) % self.frequency == 0 and not diverged and not self._refreshed

    def on_train_batch_end(self, batch, logs=None):
        steps = (self.params or {}).get("steps")
        if steps and batch + 1 >= steps and self._due(self._epoch, logs):  # the epoch's last batch
            self.refresh()
            self._refreshed = True

    def on_epoch_end(self, epoch, logs=None):
        if self._due(epoch, logs):
            self.refresh()
        self._refreshed = False
        if logs is not None and self.last:
            logs.update(self.last)
