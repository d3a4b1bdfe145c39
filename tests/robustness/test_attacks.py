"""Tests of the CleverHans PGD adapter on models whose decision boundary is known."""

import keras
import numpy as np
import tensorflow as tf
from absl.testing import absltest
from absl.testing import parameterized

from clustr_tf import attacks


class ThresholdModel(keras.Model):
    """Class 0 if pixel (0, 0) is above 0.5, else class 1: the boundary is at 0.5."""

    def call(self, images, training=False):
        v = images[:, 0, 0, 0] - 0.5
        return tf.stack([10.0 * v, -10.0 * v], axis=1)


@tf.custom_gradient
def _reversed_gradient(x):
    return tf.identity(x), lambda upstream: -upstream


class ObfuscatedThresholdModel(ThresholdModel):
    """The same decisions as ThresholdModel, with its input gradient pointing the wrong
    way: gradient attacks walk away from the boundary; a gradient-free one does not."""

    def call(self, images, training=False):
        return super().call(_reversed_gradient(images))


def _points(size=3):
    images = np.full((4, size, size, 1), 0.5, "float32")
    images[:, 0, 0, 0] = [0.3, 0.7, 0.35, 0.9]  # distances to the boundary: .2 .2 .15 .4
    return tf.constant(images), tf.constant([1, 0, 1, 0])


class OfficialLossTest(absltest.TestCase):
    def test_official_loss_is_cross_entropy_on_the_raw_scores(self):
        """The official evaluation's loss, computed directly from distances, variance and L
        (the official repository clustr-official-account/Rethinking-Clustering-for-Robustness): kernels exp(-d / (2 var)), the L largest kept,
        S_c their per-class sums, cross-entropy with S as logits."""
        from clustr_tf import models

        keras.utils.set_random_seed(0)
        backbone = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(), keras.layers.Dense(5)])
        model = models.ClusTRModel(backbone, num_classes=4, clusters_per_class=2, neighbours=3)
        rng = np.random.default_rng(1)
        centers = rng.normal(size=(8, 5)).astype("float32")
        model.cluster_centers.centers.assign(centers)
        model.cluster_centers.variance.assign(0.7)
        images = rng.random((16, 4, 4, 1)).astype("float32")
        labels = np.arange(16) % 4
        for neighbours in (3, 5, 8):
            got = attacks.LOSSES["official"](labels, attacks.logits_function(model, neighbours)(images)).numpy()
            z = backbone(images).numpy().astype(np.float64)
            d = ((z[:, None, :] - centers[None].astype(np.float64)) ** 2).sum(-1)
            kernel = np.exp(-d / (2 * 0.7))
            kept = np.zeros_like(kernel, bool)
            np.put_along_axis(kept, np.argsort(-kernel, 1)[:, :neighbours], True, 1)
            scores = np.where(kept, kernel, 0.0).reshape(16, 4, 2).sum(-1)
            expected = np.log(np.exp(scores).sum(1)) - scores[np.arange(16), labels]
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        # Not the cross-entropy of softmax(p) the table used before, nor the one of log S.
        logits = attacks.logits_function(model, 3)(images)
        p = tf.nn.softmax(logits)
        self.assertGreater(float(tf.reduce_max(tf.abs(
            attacks.LOSSES["official"](labels, logits)
            - tf.nn.sparse_softmax_cross_entropy_with_logits(labels, p)))), 1e-3)
        # A softmax classifier's raw scores are its logits: there it is plain cross-entropy.
        linear = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(), keras.layers.Dense(3)])
        self.assertIs(attacks.loss_function("official", linear), attacks.LOSSES["logits"])
        self.assertIs(attacks.loss_function("official", model), attacks.LOSSES["official"])
        with self.assertRaisesRegex(ValueError, "Unknown attack loss.*Received: 'dlr'"):
            attacks.loss_function("dlr", model)


class PgdTest(parameterized.TestCase):
    def setUp(self):
        super().setUp()
        self.model_fn = attacks.logits_function(ThresholdModel())

    def test_eps_zero_changes_nothing(self):
        images, labels = _points()
        adv, robust = attacks.pgd(self.model_fn, images, labels, 0.0, 2 / 255, 5)
        np.testing.assert_array_equal(adv.numpy(), images.numpy())
        self.assertTrue(robust.all())

    @parameterized.parameters((np.inf, 0.1), (2, 0.3))
    def test_stays_in_the_ball_and_the_box(self, norm, eps):
        rng = np.random.default_rng(0)
        images = tf.constant(rng.random((6, 4, 4, 3)), tf.float32)
        model = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Flatten(), keras.layers.Dense(5)])
        fn = attacks.logits_function(model)
        adv, _ = attacks.pgd(fn, images, tf.zeros([6], tf.int64), eps, eps / 4, 10, norm=norm, restarts=2)
        delta = tf.reshape(adv - images, [6, -1])
        size = tf.reduce_max(tf.abs(delta), 1) if norm == np.inf else tf.norm(delta, axis=1)
        self.assertLessEqual(float(tf.reduce_max(size)), eps * (1 + 1e-5))
        self.assertGreaterEqual(float(tf.reduce_min(adv)), 0.0)
        self.assertLessEqual(float(tf.reduce_max(adv)), 1.0)

    @parameterized.product(loss=["official", "logits", "margin"], norm=[np.inf, 2])
    def test_broken_exactly_when_eps_exceeds_the_distance(self, loss, norm):
        """Distances to the boundary are 0.2, 0.2, 0.15 and 0.4 (one pixel matters, so in
        l_inf and l2 alike): eps = 0.19 breaks only the third; eps = 0.21 the first three."""
        images, labels = _points()
        _, robust = attacks.pgd(self.model_fn, images, labels, 0.19, 0.05, 20, norm=norm, loss=loss)
        self.assertEqual(robust.tolist(), [True, True, False, True])
        _, robust = attacks.pgd(self.model_fn, images, labels, 0.21, 0.05, 20, norm=norm, loss=loss)
        self.assertEqual(robust.tolist(), [False, False, False, True])

    def test_restarts_keep_the_worst_case(self):
        images, labels = _points()
        adv, robust = attacks.pgd(self.model_fn, images, labels, 0.21, 0.05, 20, restarts=3)
        fooled = tf.argmax(self.model_fn(adv), 1).numpy() != labels.numpy()
        np.testing.assert_array_equal(fooled, ~robust)

    def test_restarts_only_attack_the_examples_still_standing(self):
        """After a restart fools an example, later restarts leave it out: the model sees
        fewer examples in later restarts (padded to a power of two), and the result is the
        same worst case."""
        images, labels = _points()
        sizes = []
        model = ThresholdModel()

        def counting_fn(x):
            sizes.append(int(x.shape[0]))
            return model(x)

        _, robust = attacks.pgd(counting_fn, images, labels, 0.21, 0.05, 20, restarts=3)
        self.assertEqual(robust.tolist(), [False, False, False, True])
        self.assertEqual(sizes[0], 4)
        self.assertIn(1, sizes)  # only the fourth example is attacked by the last restart

    def test_logits_function_uses_the_evaluation_neighbours(self):
        from clustr_tf import models

        backbone = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model = models.ClusTRModel(backbone, num_classes=3, clusters_per_class=2, neighbours=2)
        x = tf.constant(np.random.default_rng(0).normal(size=(4, 3)), tf.float32)
        layer = model.cluster_centers
        expected = layer.logits_from_distances(layer.squared_distances(backbone(x)), 6)
        np.testing.assert_allclose(attacks.logits_function(model, 6)(x).numpy(), expected.numpy())
        np.testing.assert_allclose(attacks.logits_function(model)(x).numpy(), model(x).numpy())

    def test_margin_loss_by_hand(self):
        logits = tf.constant([[1.0, 3.0, 2.0]])
        self.assertAlmostEqual(float(attacks.LOSSES["margin"](tf.constant([1]), logits)[0]), -1.0)
        self.assertAlmostEqual(float(attacks.LOSSES["margin"](tf.constant([0]), logits)[0]), 2.0)

    @parameterized.parameters(
        ({"loss": "dlr"}, "Unknown attack loss.*'dlr'"),
        ({"norm": 1}, "norm.*Received: 1"),
        ({"eps": -0.1}, "eps.*Received: -0.1"),
        ({"step": 0.5}, "step.*Received: step=0.5"),
        ({"iterations": 0}, "iterations"),
    )
    def test_bad_arguments(self, kwargs, message):
        images, labels = _points()
        args = {"eps": 0.1, "step": 0.05, "iterations": 5, **kwargs}
        with self.assertRaisesRegex(ValueError, message):
            attacks.pgd(self.model_fn, images, labels, **args)


if __name__ == "__main__":
    absltest.main()


class SquareTest(parameterized.TestCase):
    def setUp(self):
        super().setUp()
        self.model_fn = attacks.logits_function(ThresholdModel())

    def test_eps_zero_changes_nothing(self):
        images, labels = _points(8)  # Square needs a few pixels a side
        adv, robust = attacks.square(self.model_fn, images, labels, 0.0, queries=10)
        np.testing.assert_array_equal(adv.numpy(), images.numpy())
        self.assertTrue(robust.all())

    @parameterized.parameters((np.inf, 0.1), (2, 0.5))
    def test_stays_in_the_ball_and_the_box(self, norm, eps):
        rng = np.random.default_rng(0)
        images = rng.random((6, 6, 6, 3)).astype("float32")
        model = keras.Sequential([keras.Input((6, 6, 3)), keras.layers.Flatten(), keras.layers.Dense(5)])
        labels = np.argmax(model(images), 1)  # all correctly classified: all attacked
        adv, _ = attacks.square(attacks.logits_function(model), images, labels, eps, queries=50, norm=norm)
        self.assertTrue(np.isfinite(adv.numpy()).all())
        delta = tf.reshape(adv - images, [6, -1])
        size = tf.reduce_max(tf.abs(delta), 1) if norm == np.inf else tf.norm(delta, axis=1)
        self.assertLessEqual(float(tf.reduce_max(size)), eps * (1 + 1e-5))
        self.assertGreater(float(tf.reduce_max(size)), 0.0)
        self.assertGreaterEqual(float(tf.reduce_min(adv)), 0.0)
        self.assertLessEqual(float(tf.reduce_max(adv)), 1.0)

    def test_broken_exactly_when_eps_exceeds_the_distance(self):
        images, labels = _points(8)  # Square needs a few pixels a side
        _, robust = attacks.square(self.model_fn, images, labels, 0.19, queries=300)
        self.assertEqual(robust.tolist(), [True, True, False, True])
        adv, robust = attacks.square(self.model_fn, images, labels, 0.21, queries=300)
        self.assertEqual(robust.tolist(), [False, False, False, True])
        fooled = tf.argmax(self.model_fn(adv), 1).numpy() != labels.numpy()
        np.testing.assert_array_equal(fooled, ~robust)

    def test_breaks_what_masked_gradients_hide_from_pgd(self):
        """PGD follows the reversed gradient away from the boundary and finds nothing;
        Square, which never reads a gradient, breaks every example within reach."""
        fn = attacks.logits_function(ObfuscatedThresholdModel())
        images, labels = _points(8)  # Square needs a few pixels a side
        _, robust = attacks.pgd(fn, images, labels, 0.21, 0.05, 20, loss="margin", restarts=3)
        self.assertTrue(robust.all())
        _, robust = attacks.square(fn, images, labels, 0.21, queries=300)
        self.assertEqual(robust.tolist(), [False, False, False, True])

    def test_bad_arguments(self):
        images, labels = _points(8)  # Square needs a few pixels a side
        with self.assertRaisesRegex(ValueError, "norm"):
            attacks.square(self.model_fn, images, labels, 0.1, norm=1)
        with self.assertRaisesRegex(ValueError, "queries"):
            attacks.square(self.model_fn, images, labels, 0.1, queries=0)
