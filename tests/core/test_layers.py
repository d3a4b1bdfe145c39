"""Tests of the ClusterCenters layer against direct NumPy implementations."""

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from clustr_tf import layers


def _layer(num_classes, k, neighbours, dim, seed=0, variance=1.5):
    layer = layers.ClusterCenters(num_classes, k, neighbours)
    layer.build((None, dim))
    rng = np.random.default_rng(seed)
    layer.centers.assign(rng.normal(size=(num_classes * k, dim)).astype("float32"))
    layer.variance.assign(variance)
    return layer


def _soft_knc_probabilities(features, centers, variance, k, neighbours, num_classes):
    """The paper's rule, written out: scores over the L nearest clusters, normalised."""
    d = ((features[:, None, :] - centers[None]) ** 2).sum(-1)
    probs = np.zeros([len(features), num_classes])
    for n in range(len(features)):
        for j in np.argsort(d[n])[:neighbours]:
            probs[n, j // k] += np.exp(-d[n, j] / (2 * variance))
    return probs / probs.sum(1, keepdims=True), d


class ClusterCentersTest(parameterized.TestCase):
    @parameterized.parameters((3, 2, 6), (3, 2, 3), (4, 1, 2), (5, 3, 1))
    def test_logits_are_log_soft_knc_scores(self, num_classes, k, neighbours):
        layer = _layer(num_classes, k, neighbours, dim=4)
        features = np.random.default_rng(1).normal(size=(16, 4)).astype("float32")
        logits = layer(features).numpy()
        expected, d = _soft_knc_probabilities(
            features, layer.centers.numpy(), 1.5, k, neighbours, num_classes
        )
        np.testing.assert_allclose(tf.nn.softmax(logits).numpy(), expected, atol=1e-5)
        np.testing.assert_allclose(
            layer.squared_distances(features).numpy(), d, rtol=1e-4, atol=1e-4
        )
        # Where a class has clusters among the L nearest, its logit is log(score).
        present = expected > 0
        scores = np.zeros_like(expected)
        for n in range(len(features)):
            for j in np.argsort(d[n])[:neighbours]:
                scores[n, j // k] += np.exp(-d[n, j] / 3.0)
        np.testing.assert_allclose(logits[present], np.log(scores[present]), rtol=1e-4, atol=1e-4)
        # An absent class is finite and far below every present one.
        self.assertTrue(np.all(np.isfinite(logits)))
        if (~present).any():
            self.assertLess(logits[~present].max(), logits[present].min() - 50)

    @parameterized.parameters((3, 2, 6), (3, 2, 3), (4, 1, 2), (5, 3, 1))
    def test_scores_are_the_raw_kernel_sums(self, num_classes, k, neighbours):
        """S_c: the sum of the kernels of class c among the L nearest, exactly 0 without one."""
        layer = _layer(num_classes, k, neighbours, dim=4)
        features = np.random.default_rng(1).normal(size=(16, 4)).astype("float32")
        d = ((features[:, None, :].astype(np.float64) - layer.centers.numpy()[None]) ** 2).sum(-1)
        expected = np.zeros([16, num_classes])
        for n in range(16):
            for j in np.argsort(d[n])[:neighbours]:
                expected[n, j // k] += np.exp(-d[n, j] / 3.0)
        got = layer.scores_from_distances(layer.squared_distances(features)).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(got == 0, expected == 0)
        self.assertLessEqual(got.max(), k)

    def test_nearest_center_and_its_class(self):
        layer = layers.ClusterCenters(num_classes=2, clusters_per_class=2)
        layer.build((None, 2))
        layer.centers.assign([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
        features = tf.constant([[1.0, 1.0], [9.0, 1.0], [1.0, 9.0], [9.0, 9.5]])
        self.assertEqual(layer.nearest_center(features).numpy().tolist(), [0, 1, 2, 3])
        self.assertEqual(layer.nearest_center_class(features).numpy().tolist(), [0, 0, 1, 1])
        self.assertEqual(layer.cluster_classes().numpy().tolist(), [0, 0, 1, 1])

    def test_large_distances_stay_finite_with_gradients(self):
        layer = _layer(3, 2, 4, dim=3, variance=1e-3)
        features = tf.Variable(np.full((2, 3), 100.0, "float32"))
        with tf.GradientTape() as tape:
            logits = layer(features)
            loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits([0, 1], logits))
        grad = tape.gradient(loss, features)
        self.assertTrue(np.all(np.isfinite(logits.numpy())))
        self.assertTrue(np.all(np.isfinite(grad.numpy())))

    def test_weights_are_non_trainable(self):
        layer = _layer(3, 2, 4, dim=3)
        self.assertEqual(layer.trainable_weights, [])
        self.assertEqual(len(layer.non_trainable_weights), 2)
        self.assertEqual(tuple(layer.centers.shape), (6, 3))
        self.assertEqual(tuple(layer.variance.shape), ())

    def test_neighbours_override(self):
        layer = _layer(3, 2, 2, dim=3)
        features = np.random.default_rng(2).normal(size=(5, 3)).astype("float32")
        d = layer.squared_distances(features)
        all_clusters = tf.nn.softmax(layer.logits_from_distances(d, neighbours=6)).numpy()
        expected, _ = _soft_knc_probabilities(features, layer.centers.numpy(), 1.5, 2, 6, 3)
        np.testing.assert_allclose(all_clusters, expected, atol=1e-5)
        with self.assertRaisesRegex(ValueError, "neighbours.*Received: 7"):
            layer.logits_from_distances(d, neighbours=7)

    def test_config_round_trip(self):
        layer = layers.ClusterCenters(4, 3, 5, name="cc")
        clone = layers.ClusterCenters.from_config(layer.get_config())
        self.assertEqual(
            (clone.num_classes, clone.clusters_per_class, clone.neighbours, clone.name),
            (4, 3, 5, "cc"),
        )
        restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
        self.assertIsInstance(restored, layers.ClusterCenters)

    @parameterized.parameters(
        ({"num_classes": 0}, "num_classes.*Received: 0"),
        ({"num_classes": 3, "clusters_per_class": 0}, "clusters_per_class.*Received: 0"),
        ({"num_classes": 3, "clusters_per_class": 2, "neighbours": 7}, "neighbours.*6.*Received: 7"),
        ({"num_classes": 3, "neighbours": 0}, "neighbours.*Received: 0"),
    )
    def test_bad_arguments(self, kwargs, message):
        with self.assertRaisesRegex(ValueError, message):
            layers.ClusterCenters(**kwargs)
