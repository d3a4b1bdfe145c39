"""Tests of the magnet loss: hand-derived cases, a direct implementation, and stability."""

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from clustr_tf import losses


def _direct_batch_magnet(features, clusters, k, alpha, epsilon=None):
    """The formula of DESIGN.md written out directly in float64 (exp, then log); with
    `epsilon`, the official code's relu(-log(num / (den + eps) + eps))."""
    features = np.asarray(features, np.float64)
    unique = np.unique(clusters)
    means = {c: features[clusters == c].mean(0) for c in unique}
    own = np.array([((r - means[c]) ** 2).sum() for r, c in zip(features, clusters)])
    variance = own.sum() / (len(features) - 1)
    out = []
    for r, c, o in zip(features, clusters, own):
        numerator = np.exp(-o / (2 * variance) - alpha)
        denominator = sum(
            np.exp(-((r - means[u]) ** 2).sum() / (2 * variance)) for u in unique if u // k != c // k
        )
        ratio = numerator / denominator if epsilon is None else numerator / (denominator + epsilon) + epsilon
        out.append(max(0.0, -np.log(ratio)))
    return np.array(out)


class MagnetLossTest(parameterized.TestCase):
    @parameterized.parameters((0, 1, 0.5, 1.0), (1, 2, 12.5, 1.0), (2, 2, 12.5, 4.0), (3, 3, 4.0, 0.3))
    def test_official_cap_matches_the_official_formula(self, seed, k, alpha, spread):
        """`epsilon=OFFICIAL_EPSILON` is the official relu(-log(num / (den + eps) + eps)): equal
        to it where it is defined, and never above -log(1e-8) = 18.42."""
        rng = np.random.default_rng(seed)
        m, d, dim = 4, 5, 6
        clusters = np.repeat(rng.choice(4 * k, size=m, replace=False), d)
        centers = rng.normal(size=(4 * k, dim)) * 2
        features = (centers[clusters] + spread * rng.normal(size=(m * d, dim))).astype("float32")
        got = losses.magnet_loss(clusters, features, k, alpha, epsilon=losses.OFFICIAL_EPSILON).numpy()
        np.testing.assert_allclose(got, _direct_batch_magnet(features, clusters, k, alpha, epsilon=1e-8),
                                   rtol=1e-4, atol=1e-4)
        self.assertLessEqual(got.max(), -np.log(1e-8) + 1e-4)
        uncapped = losses.magnet_loss(clusters, features, k, alpha).numpy()
        self.assertTrue(np.all(got <= uncapped + 1e-4))

    def test_official_cap_bounds_a_hard_example_and_fades_its_gradient(self):
        """An example of class 1 sitting on class 0's center (stored centers, variance 0.5):
        uncapped 12.5 + 25 - 0 = 37.5 nats, capped 18.42 with a gradient that has all but
        vanished (the official code in effect ignores it); an easy example is unchanged."""
        features = tf.Variable([[0.0], [5.0]])
        centers, variance = tf.constant([[0.0], [5.0]]), 0.5
        with tf.GradientTape(persistent=True) as tape:
            uncapped = losses.magnet_loss_with_centers([1, 1], features, centers, variance, 1)
            capped = losses.magnet_loss_with_centers([1, 1], features, centers, variance, 1,
                                                     epsilon=losses.OFFICIAL_EPSILON)
            u, c = uncapped[0], capped[0]
        self.assertAlmostEqual(float(u), 37.5, places=4)
        self.assertAlmostEqual(float(c), -np.log(1e-8), places=3)
        self.assertLess(float(tf.norm(tape.gradient(c, features))), 1e-3 * float(tf.norm(tape.gradient(u, features))))
        self.assertAlmostEqual(float(capped[1]), float(uncapped[1]), places=4)

    def test_hand_derived_case(self):
        """1-D features: cluster 0 = {0, 1} (mean 0.5), cluster 1 = {0.5, 1.5} (mean 1.0).

        Every own squared distance is 0.25, so sigma^2 = 4 * 0.25 / 3 = 1/3 and
        1 / (2 sigma^2) = 1.5. For r = 0: 12.5 + 0.25 * 1.5 + (-(0 - 1)^2 * 1.5) = 11.375.
        For r = 1: the other mean is at distance 0, so 12.5 + 0.375 + 0 = 12.875.
        Symmetrically r = 0.5 -> 12.875 and r = 1.5 -> 11.375.
        """
        features = tf.constant([[0.0], [1.0], [0.5], [1.5]])
        values = losses.magnet_loss(tf.constant([0, 0, 1, 1]), features, clusters_per_class=1)
        np.testing.assert_allclose(values.numpy(), [11.375, 12.875, 12.875, 11.375], rtol=1e-6)

    def test_hinge_at_zero(self):
        """Same batch, alpha = 0: r = 0 gives 0.375 - 1.5 < 0 -> 0; r = 1 gives 0.375."""
        features = tf.constant([[0.0], [1.0], [0.5], [1.5]])
        values = losses.magnet_loss([0, 0, 1, 1], features, clusters_per_class=1, alpha=0.0)
        np.testing.assert_allclose(values.numpy(), [0.0, 0.375, 0.375, 0.0], atol=1e-6)

    def test_same_class_clusters_are_not_impostors(self):
        """Clusters 0 and 1 are both class 0 (K=2): only cluster 2 is in the denominator.

        Features 0,0 | 4,4 | 2,2: every own distance is 0, sigma^2 floored, so every
        example is infinitely far from cluster 2 relative to its own -> loss 0 with
        alpha = 0. With cluster 1 counted as an impostor it would not change the answer,
        so check the value where it matters: batch {0, 2} | {1, 3} | {10, 12}."""
        features = tf.constant([[0.0], [2.0], [1.0], [3.0], [10.0], [12.0]])
        clusters = tf.constant([0, 0, 1, 1, 2, 2])
        got = losses.magnet_loss(clusters, features, clusters_per_class=2, alpha=1.0).numpy()
        expected = _direct_batch_magnet(features.numpy(), clusters.numpy(), 2, 1.0)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        wrong = _direct_batch_magnet(features.numpy(), clusters.numpy(), 1, 1.0)
        self.assertGreater(np.abs(wrong - expected).max(), 0.1)

    @parameterized.parameters((0, 1, 0.5), (1, 2, 1.0), (2, 2, 12.5), (3, 3, 4.0))
    def test_matches_direct_formula(self, seed, k, alpha):
        rng = np.random.default_rng(seed)
        m, d, dim = 4, 5, 6
        clusters = np.repeat(rng.choice(4 * k, size=m, replace=False), d)
        centers = rng.normal(size=(4 * k, dim)) * 2
        features = (centers[clusters] + rng.normal(size=(m * d, dim))).astype("float32")
        got = losses.magnet_loss(clusters, features, clusters_per_class=k, alpha=alpha).numpy()
        expected = _direct_batch_magnet(features, clusters, k, alpha)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

    @parameterized.parameters((0, 1), (1, 2), (2, 3))
    def test_static_cluster_form_matches_and_compiles_with_xla(self, seed, k):
        rng = np.random.default_rng(seed)
        clusters = np.repeat(rng.choice(4 * k, size=4, replace=False), 5).astype("int32")
        features = rng.normal(size=(20, 3)).astype("float32") * 2
        dynamic = losses.magnet_loss(clusters, features, k, alpha=1.0)
        static = losses.magnet_loss(clusters, features, k, alpha=1.0, num_clusters=4 * k)
        np.testing.assert_allclose(static.numpy(), dynamic.numpy(), rtol=1e-5, atol=1e-6)
        compiled = tf.function(
            lambda c, f: losses.magnet_loss(c, f, k, alpha=1.0, num_clusters=4 * k), jit_compile=True
        )
        np.testing.assert_allclose(compiled(clusters, features).numpy(), dynamic.numpy(), rtol=1e-4, atol=1e-5)

    def test_large_distances_finite_where_direct_underflows(self):
        """A 240-example batch (12 clusters x 20) with one outlier 100 away: its squared
        distances are about 1e4 against sigma^2 of about 42, so exp(-1e4 / 84) underflows in
        float32 and the official exp(...) / sum(exp(...)) gives 0 / 0. Ours stays finite
        and agrees with the float64 direct formula."""
        rng = np.random.default_rng(0)
        centers = rng.normal(size=(12, 8)).astype("float32")
        clusters = np.repeat(np.arange(12), 20)
        points = centers[clusters] + 0.01 * rng.normal(size=(240, 8)).astype("float32")
        points[0] += 100.0
        features = tf.Variable(points)
        with tf.GradientTape() as tape:
            values = losses.magnet_loss(clusters, features, clusters_per_class=1, alpha=1.0)
            total = tf.reduce_sum(values)
        with np.errstate(all="ignore"):
            f32 = points.astype(np.float32)
            own = np.float32(((f32[0] - f32[:20].mean(0)) ** 2).sum())
            means = np.stack([f32[clusters == c].mean(0) for c in range(12)])
            all_own = ((f32 - means[clusters]) ** 2).sum(-1)
            var = np.float32(all_own.sum() / 239)
            num = np.exp(np.float32(-own / (2 * var) - 1.0))
            den = np.exp(-((f32[0] - means[1:]) ** 2).sum(-1) / (2 * var)).sum()
            official = -np.log(num / den)
        self.assertFalse(np.isfinite(official))  # the float32 direct form breaks down
        self.assertTrue(np.all(np.isfinite(values.numpy())))
        self.assertTrue(np.all(np.isfinite(tape.gradient(total, features).numpy())))
        expected = _direct_batch_magnet(points, clusters, 1, 1.0)  # float64 holds here
        np.testing.assert_allclose(values.numpy(), expected, rtol=1e-4, atol=1e-4)

    def test_stored_centers_large_distances(self):
        """Squared distances of 1e4 with sigma^2 = 1: the direct form would be 0 / 0."""
        centers = tf.constant([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]])
        features = tf.Variable([[100.0, 100.0], [-100.0, 0.0]])
        with tf.GradientTape() as tape:
            values = losses.magnet_loss_with_centers([0, 1], features, centers, 1.0, 1, 12.5)
            total = tf.reduce_sum(values)
        self.assertTrue(np.all(np.isfinite(values.numpy())))
        self.assertTrue(np.all(np.isfinite(tape.gradient(total, features).numpy())))
        # Example 0 (class 0, own 2e4): 12.5 + 1e4 + logsumexp(-1e4/2, -1e4/2) = 12.5 + 1e4 - 5e3 + ln 2.
        np.testing.assert_allclose(values.numpy()[0], 12.5 + 1e4 - 5e3 + np.log(2), rtol=1e-6)

    def test_all_equal_features(self):
        """Identical features: every distance is 0, sigma^2 is floored, and
        loss = alpha + 0 + log(number of other-class clusters) = 2 + ln 2."""
        features = tf.Variable(tf.ones([6, 3]))
        with tf.GradientTape() as tape:
            values = losses.magnet_loss([0, 0, 1, 1, 2, 2], features, clusters_per_class=1, alpha=2.0)
            total = tf.reduce_sum(values)
        np.testing.assert_allclose(values.numpy(), np.full(6, 2.0 + np.log(2.0)), rtol=1e-6)
        self.assertTrue(np.all(np.isfinite(tape.gradient(total, features).numpy())))

    def test_all_equal_distances(self):
        """Three clusters at the corners of an equilateral triangle, examples at the
        centers: own distance 0, other distances 1, sigma^2 floored -> loss 0 (alpha=1)."""
        corners = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, np.sqrt(3) / 2]], "float32")
        features = tf.Variable(np.repeat(corners, 2, axis=0))
        with tf.GradientTape() as tape:
            values = losses.magnet_loss([0, 0, 1, 1, 2, 2], features, 1, alpha=1.0)
        self.assertTrue(np.all(np.isfinite(tape.gradient(values, features).numpy())))
        np.testing.assert_allclose(values.numpy(), 0.0)

    def test_no_other_class_in_batch_gives_zero(self):
        features = tf.Variable([[0.0], [1.0], [5.0], [6.0]])
        with tf.GradientTape() as tape:
            values = losses.magnet_loss([0, 0, 1, 1], features, clusters_per_class=2)
        np.testing.assert_array_equal(values.numpy(), np.zeros(4))
        self.assertTrue(np.all(tape.gradient(values, features).numpy() == 0))

    def test_stored_form_matches_direct(self):
        rng = np.random.default_rng(5)
        k, num_classes, dim = 2, 3, 4
        centers = rng.normal(size=(num_classes * k, dim))
        labels = rng.integers(0, num_classes, size=10)
        features = rng.normal(size=(10, dim))
        variance, alpha = 0.7, 1.0
        d = ((features[:, None] - centers[None]) ** 2).sum(-1)
        cls = np.arange(num_classes * k) // k
        expected = []
        for n in range(10):
            own = d[n][cls == labels[n]].min()
            den = np.exp(-d[n][cls != labels[n]] / (2 * variance)).sum()
            expected.append(max(0.0, -np.log(np.exp(-own / (2 * variance) - alpha) / den)))
        got = losses.magnet_loss_with_centers(labels, features, centers, variance, k, alpha)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)

    def test_keras_loss_reduces_per_example_values(self):
        features = tf.constant([[0.0], [1.0], [0.5], [1.5]])
        loss = losses.MagnetLoss(clusters_per_class=1)
        self.assertAlmostEqual(float(loss([0, 0, 1, 1], features)), 12.125, places=5)
        none = losses.MagnetLoss(clusters_per_class=1, reduction="none")
        np.testing.assert_allclose(none([0, 0, 1, 1], features).numpy(), [11.375, 12.875, 12.875, 11.375])
        summed = losses.MagnetLoss(clusters_per_class=1, reduction="sum")
        self.assertAlmostEqual(float(summed([0, 0, 1, 1], features)), 48.5, places=4)

    def test_keras_loss_config_round_trip(self):
        loss = losses.MagnetLoss(clusters_per_class=3, alpha=2.5, epsilon=1e-8, name="m")
        restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
        self.assertIsInstance(restored, losses.MagnetLoss)
        self.assertEqual((restored.clusters_per_class, restored.alpha, restored.epsilon, restored.name),
                         (3, 2.5, 1e-8, "m"))

    @parameterized.parameters(({"clusters_per_class": 0}, "clusters_per_class.*Received: 0"),
                              ({"alpha": -1.0}, "alpha.*Received: -1.0"),
                              ({"epsilon": 0.0}, "epsilon.*Received: 0.0"))
    def test_bad_arguments(self, kwargs, message):
        with self.assertRaisesRegex(ValueError, message):
            losses.MagnetLoss(**kwargs)
