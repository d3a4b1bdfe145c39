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


def _points():
    images = np.full((4, 3, 3, 1), 0.5, "float32")
    images[:, 0, 0, 0] = [0.3, 0.7, 0.35, 0.9]  # distances to the boundary: .2 .2 .15 .4
    return tf.constant(images), tf.constant([1, 0, 1, 0])


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
