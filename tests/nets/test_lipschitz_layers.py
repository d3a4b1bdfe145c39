"""The Lipschitz-by-construction layers and backbone are 1-Lipschitz in l2, whatever the weights.

Each bound is checked against power iteration on the layer as a function, on the input size
it is called with (J^T J v by a vector-Jacobian product after a Jacobian-vector product),
for random weights and for weights that Adam trained to MAXIMIZE the norm: the construction,
not the initialization, must hold the bound. Power iteration gives a lower estimate of the
norm, so each test also checks that the adversary got close to 1 (the test can fail).
"""

import os

import keras
import numpy as np
import tensorflow as tf
from absl.testing import absltest
from absl.testing import parameterized

from clustr_tf import aol_layers
from clustr_tf import backbones
from clustr_tf import lipschitz
from clustr_tf import lipschitz_layers

TOL = 1e-4



def _norm(t):
    """Per-example l2 norm of a batched tensor, [batch]."""
    return tf.norm(tf.reshape(t, [tf.shape(t)[0], -1]), axis=1)


def _jacobian_norms(fn, x, iterations=40, seed=0):
    """Per-example ||J_fn(x)||_2 by power iteration on J J^T (a lower estimate)."""
    x = tf.convert_to_tensor(x, tf.float32)
    u = tf.random.stateless_normal(tf.shape(fn(x)), seed=[seed, 1])

    @tf.function  # one trace, then each iteration is one graph call (eager: about 20x slower)
    def step(u):
        u = u / tf.reshape(_norm(u), [-1] + [1] * (len(u.shape) - 1))
        with tf.GradientTape() as tape:
            tape.watch(x)
            s = tf.reduce_sum(tf.cast(fn(x), tf.float32) * u)
        g = tape.gradient(s, x)  # J^T u
        with tf.autodiff.ForwardAccumulator(x, g) as acc:
            out = tf.cast(fn(x), tf.float32)
        return acc.jvp(out), g  # J J^T u

    for _ in range(iterations):
        u, g = step(u)
    return _norm(g).numpy()  # ||J^T u||, u a unit vector


def _maximize_norm(layer, input_shape, steps=300, learning_rate=0.02):
    """Trains `layer`'s weights with Adam to maximize its operator norm (linear layers).

    The top singular vector is tracked by one power-iteration step per Adam step, and the
    loss is -||f(v) - f(0)||^2 for that unit v (the bias, which the norm ignores, cancels).
    """
    optimizer = keras.optimizers.Adam(learning_rate)
    zero = tf.zeros((1, *input_shape[1:]))
    v = tf.Variable(tf.random.stateless_normal((1, *input_shape[1:]), seed=[3, 4]))

    @tf.function
    def step():
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(v)
            energy = tf.reduce_sum((layer(v) - layer(zero)) ** 2)
        grad_v = tape.gradient(energy, v)  # 2 J^T J v
        grads = tape.gradient(energy, layer.trainable_variables)
        optimizer.apply_gradients(zip([-g for g in grads], layer.trainable_variables))
        v.assign(grad_v / tf.norm(grad_v))

    for _ in range(steps):
        step()


def _conv_gram_scale_numpy(kernel, eps=1e-6):
    """d_i = (sum_j sum_shifts |sum_{o,p} K[p,i,o] K[p+s,j,o]| + eps)^-1/2, written out."""
    kh, kw, cin, cout = kernel.shape
    total = np.zeros(cin)
    for sy in range(-kh + 1, kh):
        for sx in range(-kw + 1, kw):
            m = np.zeros((cin, cin))
            for py in range(kh):
                for px in range(kw):
                    qy, qx = py + sy, px + sx
                    if 0 <= qy < kh and 0 <= qx < kw:
                        m += kernel[py, px] @ kernel[qy, qx].T
            total += np.abs(m).sum(axis=1)
    return 1.0 / np.sqrt(total + eps)


class AOLLayerTest(parameterized.TestCase):
    def test_conv_scale_is_the_sum_over_shifts_of_the_gram_kernel(self):
        kernel = np.random.default_rng(0).normal(size=(3, 3, 4, 5))
        got = aol_layers.aol_conv_scale(tf.constant(kernel, tf.float32)).numpy()
        np.testing.assert_allclose(got, _conv_gram_scale_numpy(kernel), rtol=1e-5)

    def test_conv_layer_applies_the_rescaled_kernel(self):
        keras.utils.set_random_seed(0)
        layer = aol_layers.AOLConv2D(6, 3, bias_initializer="random_normal")
        x = np.random.default_rng(1).normal(size=(2, 5, 7, 4)).astype("float32")
        y = layer(x)
        kernel = layer.kernel.numpy() * _conv_gram_scale_numpy(layer.kernel.numpy())[None, None, :, None]
        expected = tf.nn.conv2d(x, kernel.astype("float32"), 1, "SAME") + layer.bias.numpy()
        np.testing.assert_allclose(y.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)

    @parameterized.parameters(
        (3, 8, 3), (8, 8, 3), (16, 4, 3), (8, 2, 1), (2, 8, 1), (5, 5, 1), (6, 3, (1, 3)),
    )
    def test_conv_norm_at_most_one(self, cin, cout, kernel_size):
        shape = (1, 6, 7, cin)
        keras.utils.set_random_seed(cin * 100 + cout)
        random = aol_layers.AOLConv2D(cout, kernel_size, kernel_initializer="glorot_normal")
        random.build(shape)
        self.assertLessEqual(_jacobian_norms(random, np.zeros(shape))[0], 1 + TOL)
        # The delta-orthogonal default starts at norm 1: an isometry or a projection.
        default = aol_layers.AOLConv2D(cout, kernel_size)
        self.assertAlmostEqual(_jacobian_norms(default, np.zeros(shape))[0], 1.0, delta=1e-4)
        _maximize_norm(random, shape)
        trained = _jacobian_norms(random, np.zeros(shape), iterations=100)[0]
        self.assertLessEqual(trained, 1 + TOL)
        self.assertGreater(trained, 0.95)  # the adversary reached the bound: it is tight

    @parameterized.parameters((10, 4), (4, 10), (7, 7))
    def test_dense_norm_at_most_one(self, n_in, n_out):
        keras.utils.set_random_seed(n_in + n_out)
        layer = aol_layers.AOLDense(n_out, kernel_initializer="random_normal")
        layer.build((None, n_in))
        self.assertLessEqual(np.linalg.norm(layer.rescaled_kernel().numpy(), 2), 1 + TOL)
        _maximize_norm(layer, (1, n_in))
        norm = np.linalg.norm(layer.rescaled_kernel().numpy().astype(np.float64), 2)
        self.assertLessEqual(norm, 1 + TOL)
        self.assertGreater(norm, 0.95)
        self.assertLessEqual(_jacobian_norms(layer, np.zeros((1, n_in)))[0], 1 + TOL)

    def test_zero_kernel_is_finite(self):
        """epsilon: a zero kernel gives a zero map, not NaN."""
        layer = aol_layers.AOLConv2D(4, 3, kernel_initializer="zeros")
        y = layer(np.ones((1, 4, 4, 2), "float32"))
        np.testing.assert_array_equal(y.numpy(), 0.0)

    @parameterized.parameters(
        ({"filters": 0, "kernel_size": 3}, "`filters` must be"),
        ({"filters": 4, "kernel_size": 0}, "`kernel_size` must be"),
        ({"filters": 4, "kernel_size": 3, "epsilon": 0.0}, "`epsilon` must be"),
        ({"filters": 4, "kernel_size": 3, "use_bias": "yes"}, "`use_bias` must be"),
    )
    def test_bad_arguments(self, kwargs, message):
        with self.assertRaisesRegex(ValueError, message):
            aol_layers.AOLConv2D(**kwargs)
        with self.assertRaisesRegex(ValueError, "`units` must be"):
            aol_layers.AOLDense(0)


class NonlinearAndReshapeLayerTest(parameterized.TestCase):
    def test_maxmin_sorts_pairs(self):
        y = lipschitz_layers.MaxMin()(np.array([[1.0, -2.0, 3.0, 0.0]], "float32"))
        np.testing.assert_array_equal(y.numpy(), [[3.0, 0.0, 1.0, -2.0]])

    def test_maxmin_is_one_lipschitz_on_random_and_adversarial_pairs(self):
        layer = lipschitz_layers.MaxMin()
        rng = np.random.default_rng(0)
        x = tf.Variable(rng.normal(size=(64, 3, 8)).astype("float32"))
        y = tf.Variable(rng.normal(size=(64, 3, 8)).astype("float32"))

        def ratios():
            return _norm(layer(x) - layer(y)) / _norm(x - y)

        self.assertLessEqual(float(tf.reduce_max(ratios())), 1 + TOL)
        optimizer = keras.optimizers.Adam(0.05)
        for _ in range(100):
            with tf.GradientTape() as tape:
                loss = -tf.reduce_sum(ratios())
            optimizer.apply_gradients(zip(tape.gradient(loss, [x, y]), [x, y]))
        self.assertLessEqual(float(tf.reduce_max(ratios())), 1 + TOL)
        self.assertLessEqual(float(tf.reduce_max(_jacobian_norms(layer, x))), 1 + TOL)
        np.testing.assert_allclose(_norm(layer(x)), _norm(x), rtol=1e-6)  # norm-preserving

    def test_maxmin_odd_channels(self):
        with self.assertRaisesRegex(ValueError, r"even number of channels.*\(None, 4, 4, 3\)"):
            lipschitz_layers.MaxMin().build((None, 4, 4, 3))

    def test_space_to_depth_is_tf_space_to_depth_and_an_isometry(self):
        x = np.random.default_rng(0).normal(size=(3, 4, 6, 5)).astype("float32")
        y = lipschitz_layers.SpaceToDepth(2)(x)
        np.testing.assert_array_equal(y.numpy(), tf.nn.space_to_depth(x, 2).numpy())
        np.testing.assert_allclose(_norm(y), _norm(x), rtol=1e-6)
        self.assertAlmostEqual(
            float(_jacobian_norms(lipschitz_layers.SpaceToDepth(2), x[:1])[0]), 1.0, delta=TOL
        )

    @parameterized.parameters((None, 5, 4, 3), (None, 4, 7, 3))
    def test_space_to_depth_indivisible(self, *shape):
        with self.assertRaisesRegex(ValueError, "divisible by block_size=2"):
            lipschitz_layers.SpaceToDepth(2).build(shape)
        with self.assertRaisesRegex(ValueError, "`block_size` must be"):
            lipschitz_layers.SpaceToDepth(1)

    def test_scaled_global_average_pooling_norm_is_one(self):
        layer = lipschitz_layers.ScaledGlobalAveragePooling2D()
        x = np.random.default_rng(0).normal(size=(2, 3, 5, 4)).astype("float32")
        np.testing.assert_allclose(layer(x).numpy(), x.sum(axis=(1, 2)) / np.sqrt(15), rtol=1e-5)
        norm = _jacobian_norms(layer, x)
        np.testing.assert_allclose(norm, 1.0, atol=TOL)  # attained by constant maps


def _small_model():
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Normalization(mean=[0.5, 0.4], variance=[1.0, 1.0])(inputs)
    x = aol_layers.AOLConv2D(6, 3, bias_initializer="random_normal")(x)
    x = lipschitz_layers.MaxMin()(x)
    x = lipschitz_layers.SpaceToDepth(2)(x)
    x = aol_layers.AOLConv2D(4, 1, kernel_initializer="glorot_uniform")(x)
    pooled = lipschitz_layers.ScaledGlobalAveragePooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Concatenate()([x, pooled])  # not by construction: model_bound only
    outputs = aol_layers.AOLDense(3, epsilon=1e-5)(x)
    return keras.Model(inputs, outputs)


class SerializationTest(absltest.TestCase):
    def test_save_and_reload(self):
        keras.utils.set_random_seed(0)
        model = _small_model()
        x = np.random.default_rng(0).random((4, 8, 8, 2)).astype("float32")
        path = os.path.join(self.create_tempdir().full_path, "model.keras")
        model.save(path)
        reloaded = keras.saving.load_model(path)
        np.testing.assert_array_equal(model(x).numpy(), reloaded(x).numpy())
        self.assertIsInstance(reloaded.layers[2], aol_layers.AOLConv2D)
        self.assertEqual(reloaded.layers[-1].epsilon, 1e-5)

    def test_backbone_save_and_reload(self):
        keras.utils.set_random_seed(0)
        model = backbones.lipschitz_convnet((8, 8, 1), width=4, feature_dim=6, mean=0.3, std=0.4)
        x = np.random.default_rng(0).random((4, 8, 8, 1)).astype("float32")
        path = os.path.join(self.create_tempdir().full_path, "model.keras")
        model.save(path)
        reloaded = keras.saving.load_model(path)
        np.testing.assert_array_equal(model(x).numpy(), reloaded(x).numpy())
        self.assertAlmostEqual(lipschitz.construction_bound(reloaded), 1 / 0.4, places=5)

    def test_initializer_config(self):
        init = aol_layers.DeltaOrthogonal(seed=3)
        again = keras.initializers.deserialize(keras.initializers.serialize(init))
        np.testing.assert_array_equal(init((3, 3, 2, 4)), again((3, 3, 2, 4)))
        self.assertEqual(float(tf.reduce_sum(tf.abs(init((3, 3, 2, 4))[0]))), 0.0)


class LipschitzConvnetTest(parameterized.TestCase):
    @parameterized.parameters(((8, 8, 1), 64, 2), ((32, 32, 3), 128, 4))
    def test_builds_with_defaults(self, shape, dim, stages):
        model = backbones.lipschitz_convnet(shape)
        self.assertEqual(model.output_shape, (None, dim))
        self.assertEqual(model.get_layer(f"stage{stages}_conv1").filters, 16 * 2 ** (stages - 1))
        self.assertEqual(lipschitz.construction_bound(model), 1.0)
        self.assertEqual(lipschitz.model_bound(model), 1.0)
        built = backbones.get_backbone("lipschitz", shape, mean=0.5, width_multiplier=0.5)
        self.assertEqual(built.get_layer("stage1_conv1").filters, 8)
        self.assertIn("lipschitz", backbones.BACKBONES)

    def test_std_factor_is_in_the_bound(self):
        model = backbones.lipschitz_convnet((8, 8, 3), mean=0.5, std=(0.5, 0.25, 0.4), width=4)
        self.assertAlmostEqual(lipschitz.construction_bound(model), 4.0, places=5)
        self.assertAlmostEqual(lipschitz.model_bound(model), 4.0, places=5)
        # get_backbone, as training.run calls it with the data's std: mean subtraction only.
        model = backbones.get_backbone("lipschitz", (8, 8, 3), mean=0.5, std=(0.5, 0.25, 0.4), width=4)
        self.assertEqual(lipschitz.construction_bound(model), 1.0)
        x = np.full((1, 8, 8, 3), 0.75, "float32")
        normalized = keras.Model(model.input, model.get_layer("normalization").output)(x)
        np.testing.assert_allclose(normalized.numpy(), 0.25)

    def test_odd_input_is_not_downsampled(self):
        model = backbones.lipschitz_convnet((7, 9, 1), width=4, feature_dim=3)
        self.assertEqual(model.output_shape, (None, 3))
        self.assertFalse([l for l in model.layers if isinstance(l, lipschitz_layers.SpaceToDepth)])

    @parameterized.parameters(
        ({"width": 3}, "`width` must be an even"),
        ({"width": 0}, "`width` must be"),
        ({"depth": 0}, "`depth` must be"),
        ({"feature_dim": 2.5}, "`feature_dim` must be"),
        ({"width_multiplier": -1.0}, "`width_multiplier` must be"),
        ({"pooling": "max"}, "Unknown `pooling`"),
        ({"std": 0.0}, "`std` must be > 0"),
    )
    def test_bad_arguments(self, kwargs, message):
        with self.assertRaisesRegex(ValueError, message):
            backbones.lipschitz_convnet((8, 8, 1), **kwargs)

    @parameterized.parameters(((8, 8, 1), {}), ((32, 32, 3), {"width": 4, "depth": 1}))
    def test_network_norm_below_bound_before_and_after_training(self, shape, kwargs):
        keras.utils.set_random_seed(0)
        model = backbones.lipschitz_convnet(shape, mean=0.45, **kwargs)
        bound = lipschitz.model_bound(model)
        rng = np.random.default_rng(0)
        x = rng.random((4, *shape)).astype("float32")
        self.assertLessEqual(_jacobian_norms(model, x, iterations=20).max(), bound * (1 + TOL))
        # A few steps of training on random data, then an adversary that maximizes the local
        # Lipschitz ratio over both the weights and pairs of inputs.
        model.compile(keras.optimizers.Adam(1e-2), "mse")
        model.fit(x, rng.normal(size=(4, model.output_shape[1])), epochs=5, verbose=0)
        y = tf.Variable(x + 0.1 * rng.normal(size=x.shape).astype("float32"))
        optimizer = keras.optimizers.Adam(1e-2)
        variables = model.trainable_variables + [y]

        @tf.function  # one trace, then one graph call per adversary step
        def ascend():
            with tf.GradientTape() as tape:
                loss = -tf.reduce_sum(_norm(model(x) - model(y)) / _norm(x - y))
            optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))

        for _ in range(15):
            ascend()
        ratio = (_norm(model(x) - model(y)) / _norm(x - y)).numpy().max()
        jacobian = _jacobian_norms(model, x, iterations=20).max()
        self.assertLessEqual(ratio, bound * (1 + 1e-3))  # float32 differences of outputs
        self.assertLessEqual(jacobian, bound * (1 + TOL))
        self.assertEqual(lipschitz.construction_bound(model), bound)

    def test_mixed_bfloat16(self):
        keras.utils.set_random_seed(0)
        reference = backbones.lipschitz_convnet((8, 8, 1), width=4)
        try:
            keras.mixed_precision.set_global_policy("mixed_bfloat16")
            model = backbones.lipschitz_convnet((8, 8, 1), width=4)
            model.set_weights(reference.get_weights())
            conv = model.get_layer("stage1_conv1")
            self.assertEqual(conv.kernel.dtype, "float32")
            self.assertEqual(conv.rescaled_kernel().dtype, "float32")
            x = np.random.default_rng(0).random((4, 8, 8, 1)).astype("float32")
            with tf.GradientTape() as tape:
                y = model(x)
                loss = tf.reduce_sum(tf.cast(y, "float32") ** 2)
            self.assertEqual(y.dtype, "bfloat16")
            grads = tape.gradient(loss, model.trainable_variables)
            self.assertTrue(all(np.isfinite(g.numpy()).all() for g in grads))
            np.testing.assert_allclose(
                tf.cast(y, "float32").numpy(), reference(x).numpy(), atol=0.05, rtol=0.05
            )
            self.assertEqual(lipschitz.construction_bound(model), 1.0)
        finally:
            keras.mixed_precision.set_global_policy("float32")


class ConstructionBoundTest(parameterized.TestCase):
    @parameterized.parameters(
        ("convnet", (8, 8, 1), {}, "BatchNormalization|Conv2D"),
        ("resnet18", (8, 8, 3), {"width_multiplier": 0.125}, "Conv2D|BatchNormalization"),
    )
    def test_other_backbones_are_rejected(self, name, shape, kwargs, kind):
        model = backbones.get_backbone(name, shape, **kwargs)
        with self.assertRaisesRegex(
            lipschitz.NotLipschitzByConstructionError, rf"layer '\w+' of type ({kind}).*--backbone=lipschitz"
        ):
            lipschitz.construction_bound(model)
        self.assertTrue(issubclass(lipschitz.NotLipschitzByConstructionError, ValueError))

    def test_a_composed_but_not_constructed_model_is_rejected(self):
        inputs = keras.Input((4,))
        outputs = keras.layers.Add(name="residual")([aol_layers.AOLDense(4)(inputs), inputs])
        model = keras.Model(inputs, outputs)
        self.assertEqual(lipschitz.model_bound(model), 2.0)  # the sum rule: a composed bound
        with self.assertRaisesRegex(lipschitz.NotLipschitzByConstructionError, "'residual' of type Add"):
            lipschitz.construction_bound(model)
        with self.assertRaisesRegex(lipschitz.NotLipschitzByConstructionError, "Concatenate"):
            lipschitz.construction_bound(_small_model())

    def test_subclass_is_not_trusted(self):
        class Scaled(aol_layers.AOLDense):
            def call(self, inputs):
                return 3.0 * super().call(inputs)

        model = keras.Sequential([keras.Input((4,)), Scaled(4)])
        with self.assertRaisesRegex(lipschitz.NotLipschitzByConstructionError, "Scaled"):
            lipschitz.construction_bound(model)
        with self.assertRaisesRegex(ValueError, "No Lipschitz bound for layer .* of type Scaled"):
            lipschitz.model_bound(model)

    def test_subclassed_model_is_rejected(self):
        class Wrapper(keras.Model):
            def __init__(self):
                super().__init__()
                self.dense = aol_layers.AOLDense(2)

            def call(self, inputs):
                return 5.0 * self.dense(inputs)

        model = Wrapper()
        model(np.zeros((1, 3), "float32"))
        with self.assertRaisesRegex(lipschitz.NotLipschitzByConstructionError, "type Wrapper"):
            lipschitz.construction_bound(model)

    def test_normalization_factor(self):
        """std (2, 3): dividing scales by at most 1/2, multiplying (invert) by at most 3."""
        for invert, expected in ((False, 0.5), (True, 3.0)):
            layer = keras.layers.Normalization(mean=[0.0, 1.0], variance=[4.0, 9.0], invert=invert)
            model = keras.Sequential([keras.Input((2,)), layer, aol_layers.AOLDense(2)])
            self.assertAlmostEqual(lipschitz.construction_bound(model), expected, places=6)

    def test_nested_model(self):
        inner = backbones.lipschitz_convnet((8, 8, 1), width=4, feature_dim=4)
        outer = keras.Sequential([keras.Input((8, 8, 1)), inner, aol_layers.AOLDense(2)])
        self.assertEqual(lipschitz.construction_bound(outer), 1.0)
        outer = keras.Sequential([keras.Input((8, 8, 1)), inner, keras.layers.Dense(2)])
        with self.assertRaisesRegex(lipschitz.NotLipschitzByConstructionError, "type Dense"):
            lipschitz.construction_bound(outer)


if __name__ == "__main__":
    absltest.main()
