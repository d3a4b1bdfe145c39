"""The Lipschitz bound is an upper bound of every observed ratio and local estimate."""

import keras
import numpy as np
import tensorflow as tf
from absl.testing import absltest
from absl.testing import parameterized

from clustr_tf import backbones
from clustr_tf import lipschitz


def _power_iteration_conv(kernel, hw, strides, padding, iterations=300):
    """A lower estimate of the conv's operator norm (power iteration, float64)."""
    k = tf.constant(kernel)
    v = tf.random.stateless_normal([1, *hw, kernel.shape[2]], seed=[1, 2], dtype=tf.float64)
    for _ in range(iterations):
        with tf.GradientTape() as tape:
            tape.watch(v)
            energy = tf.reduce_sum(tf.nn.conv2d(v, k, strides, padding) ** 2) / 2
        v = tape.gradient(energy, v)
        v /= tf.norm(v)
    return float(tf.norm(tf.nn.conv2d(v, k, strides, padding)))


def _local_estimates(model, x, rng, pairs=64):
    """Largest ||f(x)-f(y)||/||x-y|| over random nearby pairs, and Jacobian norm estimates."""
    x = tf.constant(x, tf.float32)
    n = x.shape[0]
    ratios = []
    for scale in (1e-2, 1e-1, 1.0):
        y = x + scale * tf.constant(rng.normal(size=x.shape), tf.float32)
        diff = tf.reshape(model(x, training=False) - model(y, training=False), [n, -1])
        ratios.append(tf.norm(diff, axis=1) / tf.norm(tf.reshape(x - y, [n, -1]), axis=1))
    u = tf.constant(rng.normal(size=model(x, training=False).shape), tf.float32)

    @tf.function  # one trace, then one graph call per iteration
    def step(u):
        u = u / tf.norm(u, axis=1, keepdims=True)
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = model(x, training=False)
            s = tf.reduce_sum(out * u)
        g = tape.gradient(s, x)  # J^T u
        with tf.autodiff.ForwardAccumulator(x, g) as acc:
            out = model(x, training=False)
        return acc.jvp(out), g  # J J^T u

    for _ in range(20):  # power iteration on J^T J per example
        u, g = step(u)
    jacobian = tf.norm(tf.reshape(g, [n, -1]), axis=1)  # ||J^T u|| with unit u
    return float(tf.reduce_max(tf.concat(ratios, 0))), float(tf.reduce_max(jacobian))


class ConvBoundTest(parameterized.TestCase):
    @parameterized.parameters((1, "SAME", 8), (2, "SAME", 8), (1, "VALID", 7), (2, "VALID", 9))
    def test_conv_bound_is_at_least_power_iteration(self, stride, padding, size):
        rng = np.random.default_rng(stride * 10 + size)
        kernel = rng.normal(size=(3, 3, 4, 5))
        bound = lipschitz.conv2d_norm_bound(kernel, (size, size))
        estimate = _power_iteration_conv(kernel, (size, size), stride, padding)
        self.assertGreaterEqual(bound, estimate * (1 - 1e-9))
        if stride == 1 and padding == "SAME":
            self.assertLess(bound, 1.2 * estimate)  # and not absurdly loose

    def test_one_by_one_conv_is_exact(self):
        """A 1x1 conv is the channel matrix applied at every pixel: norm = its top singular value."""
        kernel = np.random.default_rng(3).normal(size=(1, 1, 6, 4))
        self.assertAlmostEqual(lipschitz.conv2d_norm_bound(kernel, (5, 5)),
                               np.linalg.norm(kernel[0, 0], 2), places=10)


class ModelBoundTest(parameterized.TestCase):
    def test_dense_chain_is_exact_for_one_layer(self):
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, use_bias=False)])
        self.assertAlmostEqual(lipschitz.model_bound(model),
                               np.linalg.norm(model.layers[0].kernel.numpy(), 2), places=5)

    @parameterized.parameters(("resnet18", (16, 16, 3)), ("convnet", (8, 8, 1)))
    def test_bound_exceeds_every_observed_ratio(self, name, shape):
        keras.utils.set_random_seed(0)
        kwargs = {"width_multiplier": 0.125} if name == "resnet18" else {"width": 4, "embedding_dim": 8}
        model = backbones.get_backbone(name, shape, mean=0.4, std=0.3, **kwargs)
        # Non-trivial batch-norm statistics, as after training.
        rng = np.random.default_rng(0)
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.moving_variance.assign(rng.uniform(0.2, 3.0, layer.moving_variance.shape))
                layer.gamma.assign(rng.uniform(0.5, 1.5, layer.gamma.shape))
        bound = lipschitz.model_bound(model)
        ratio, jacobian = _local_estimates(model, rng.random((16, *shape)), rng)
        self.assertGreaterEqual(bound, ratio)
        self.assertGreaterEqual(bound, jacobian)

    def test_residual_addition_sums_the_branches(self):
        inputs = keras.Input((4,))
        a = keras.layers.Dense(4, use_bias=False, name="a")(inputs)
        out = keras.layers.Add()([a, inputs])
        model = keras.Model(inputs, out)
        kernel = np.diag([2.0, 1.0, 1.0, 1.0]).astype("float32")
        model.get_layer("a").kernel.assign(kernel)
        # x -> 2x_0 + x_0: the sum rule gives 2 + 1 = 3, here exact.
        self.assertAlmostEqual(lipschitz.model_bound(model), 3.0, places=5)

    def test_unknown_layer_is_an_error(self):
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, activation="gelu")])
        with self.assertRaisesRegex(ValueError, "activation 'gelu'"):
            lipschitz.model_bound(model)
        model = keras.Sequential([keras.Input((4, 1)), keras.layers.LSTM(2)])
        with self.assertRaisesRegex(ValueError, "LSTM"):
            lipschitz.model_bound(model)


if __name__ == "__main__":
    absltest.main()
