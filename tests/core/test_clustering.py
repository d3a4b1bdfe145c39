"""Tests of per-class k-means, the variance estimate and the ClusterRefresh callback."""

import keras
import numpy as np
import tensorflow as tf
from absl import logging
from unittest import mock
from absl.testing import absltest

from clustr_tf import clustering
from clustr_tf import objectives
from clustr_tf import models
from clustr_tf import sampler as sampler_lib


def _blobs(seed=0, num_classes=3, k=2, per_cluster=30, dim=4):
    """Well-separated blobs, K per class; returns features, labels, true cluster ids."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(num_classes * k, dim)) * 20
    clusters = np.repeat(np.arange(num_classes * k), per_cluster)
    features = means[clusters] + rng.normal(size=(len(clusters), dim))
    perm = rng.permutation(len(clusters))
    return features[perm].astype("float32"), clusters[perm] // k, clusters[perm], means


class KMeansPerClassTest(absltest.TestCase):
    def test_recovers_separated_blobs(self):
        features, labels, truth, means = _blobs()
        centers, assignments = clustering.kmeans_per_class(features, labels, 3, 2, seed=0)
        self.assertEqual(centers.shape, (6, 4))
        self.assertEqual(assignments.dtype, np.int32)
        np.testing.assert_array_equal(assignments // 2, labels)
        # Each found cluster is exactly one true blob (k-means may swap the two of a class).
        for j in range(6):
            self.assertLen(set(truth[assignments == j]), 1)
            blob = truth[assignments == j][0]
            np.testing.assert_allclose(centers[j], means[blob], atol=0.6)
            np.testing.assert_allclose(centers[j], features[assignments == j].mean(0), atol=1e-4)

    def test_deterministic(self):
        features, labels, _, _ = _blobs(seed=3)
        a = clustering.kmeans_per_class(features, labels, 3, 2, seed=7)
        b = clustering.kmeans_per_class(features, labels, 3, 2, seed=7)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])

    def test_class_with_fewer_examples_than_k_is_an_error(self):
        features = np.zeros((5, 2), "float32")
        labels = np.array([0, 0, 0, 1, 2])
        with self.assertRaisesRegex(ValueError, "Class 1 has 1 training examples, fewer than clusters_per_class=2"):
            clustering.kmeans_per_class(features, labels, 3, 2)

    def test_duplicate_features_fall_back_to_order_split(self):
        """Class 1's features all coincide: it is split by example order, with a warning."""
        features, labels, _, _ = _blobs(seed=1)
        features[labels == 1] = 5.0
        with self.assertLogs(logging.get_absl_logger(), level="WARNING") as logs:
            centers, assignments = clustering.kmeans_per_class(features, labels, 3, 2)
        self.assertIn("Class 1", "\n".join(logs.output))
        members = np.flatnonzero(labels == 1)
        np.testing.assert_array_equal(assignments[members], 2 + np.arange(len(members)) % 2)
        np.testing.assert_allclose(centers[2:4], 5.0)
        np.testing.assert_array_equal(assignments[labels != 1] // 2, labels[labels != 1])

    def test_nan_features_are_an_error(self):
        features = np.full((6, 2), np.nan, "float32")
        with self.assertRaisesRegex(ValueError, "NaN"):
            clustering.kmeans_per_class(features, np.array([0, 0, 1, 1, 2, 2]), 3, 1)

    def test_variance_by_hand(self):
        """Residuals (1, 0), (-1, 0), (0, 2): sum of squares 6 over N - 1 = 2 -> 3."""
        features = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 3.0]])
        centers = np.array([[0.0, 0.0], [0.0, 1.0]])
        self.assertAlmostEqual(clustering.estimate_variance(features, centers, [0, 0, 1]), 3.0)

    def test_center_separation(self):
        centers = np.array([[0.0, 0.0], [0.0, 1.0], [3.0, 0.0], [3.0, 4.0]])
        # Other-class pairs: (0,2)=3, (0,3)=5, (1,2)=sqrt(10), (1,3)=sqrt(18), each twice.
        expected = np.mean([3, 5, np.sqrt(10), np.sqrt(18)])
        self.assertAlmostEqual(clustering.center_separation(centers, 2), expected, places=6)


def _model(num_classes=3, k=2, dim=4):
    backbone = keras.Sequential([keras.Input((dim,)), keras.layers.Dense(dim, use_bias=False)])
    backbone.layers[0].kernel.assign(np.eye(dim, dtype="float32"))
    model = models.ClusTRModel(backbone, num_classes=num_classes, clusters_per_class=k, neighbours=4)
    return model


class ClusterRefreshTest(absltest.TestCase):
    def test_refresh_sets_centers_variance_and_sampler(self):
        features, labels, _, _ = _blobs(seed=2)
        model = _model()
        sampler = sampler_lib.NeighbourhoodSampler(
            features[:, :, None, None], labels, num_classes=3, clusters_per_class=2, m=3, d=4
        )
        flat = keras.Sequential([keras.Input((4, 1, 1)), keras.layers.Reshape((4,)), model.backbone])
        model = models.ClusTRModel(flat, num_classes=3, clusters_per_class=2, neighbours=4)
        callback = clustering.ClusterRefresh(sampler, seed=0, batch_size=8)
        callback.set_model(model)
        with mock.patch.object(clustering, "_PROGRESS_SECONDS", 0), self.assertLogs("absl", "INFO") as logs:
            stats = callback.refresh()
        # What a long refresh says: its start, the embedding's progress, k-means, its end.
        said = "\n".join(logs.output)
        self.assertIn(f"Cluster refresh 1: embedding {len(labels)} training images, then k-means in each of the 3 "
                      "classes", said)
        self.assertIn(f"Embedded 8 of {len(labels)} training images", said)
        self.assertIn("k-means: 1 of 3 classes clustered", said)
        self.assertRegex(said, r"Cluster refresh 1 done in \d+ s")
        centers, assignments = clustering.kmeans_per_class(features, labels, 3, 2, seed=0)
        np.testing.assert_allclose(model.cluster_centers.centers.numpy(), centers, atol=1e-5)
        np.testing.assert_array_equal(sampler.assignments.numpy(), assignments)
        variance = clustering.estimate_variance(features, centers, assignments)
        self.assertAlmostEqual(float(model.cluster_centers.variance.numpy()), variance, places=4)
        self.assertAlmostEqual(stats["variance"], variance, places=4)
        self.assertGreater(stats["center_separation"], 0)

    def test_runs_before_training_and_at_the_chosen_frequency(self):
        features, labels, _, _ = _blobs(seed=4)
        images = features[:, :, None, None]
        sampler = sampler_lib.NeighbourhoodSampler(images, labels, num_classes=3, clusters_per_class=2, m=3, d=4)
        backbone = keras.Sequential([keras.Input((4, 1, 1)), keras.layers.Flatten(), keras.layers.Dense(4)])
        model = models.ClusTRModel(backbone, num_classes=3, clusters_per_class=2, neighbours=4)
        model.compile(optimizer=keras.optimizers.Adam(1e-3),
                      objective=objectives.ClusTR(clusters_per_class=2, neighbours=4, m=3, d=4))
        callback = clustering.ClusterRefresh(sampler, frequency=2)
        history = model.fit(sampler.dataset(), steps_per_epoch=2, epochs=4, callbacks=[callback], verbose=0)
        self.assertEqual(callback.refreshes, 1 + 2)  # before training, after epochs 2 and 4
        self.assertIs(model.loss_recorder, sampler)
        self.assertIn("variance", history.history)
        self.assertIn("center_separation", history.history)
        self.assertTrue(np.all(np.isfinite(history.history["loss"])))

    def test_needs_a_clustr_model(self):
        features, labels, _, _ = _blobs()
        callback = clustering.ClusterRefresh(images=features, labels=labels)
        callback.set_model(keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]))
        with self.assertRaisesRegex(TypeError, "ClusTRModel"):
            callback.refresh()

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "sampler"):
            clustering.ClusterRefresh()
        features, labels, _, _ = _blobs()
        with self.assertRaisesRegex(ValueError, "frequency.*Received: 0"):
            clustering.ClusterRefresh(images=features, labels=labels, frequency=0)


if __name__ == "__main__":
    absltest.main()
