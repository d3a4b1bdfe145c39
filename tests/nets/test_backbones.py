"""Tests for clustr_tf.backbones."""

import os
import subprocess
import sys

import keras
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from clustr_tf import backbones


def _num_trainable(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)



def _random_images(shape, batch=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.0, 1.0, size=(batch,) + tuple(shape)).astype(np.float32)


class ResNet18Test(parameterized.TestCase):
    def test_parameter_count_width_one(self):
        """Standard CIFAR ResNet-18 without its dense layer.

        PyTorch's CIFAR ResNet-18 has 11,173,962 parameters with a 512 -> 10
        dense layer (5,130 parameters): 11,173,962 - 5,130 = 11,168,832.
        """
        model = backbones.resnet18()
        self.assertEqual(_num_trainable(model), 11_168_832)
        self.assertEqual(model.output_shape, (None, 512))

    def test_structure(self):
        model = backbones.resnet18(width_multiplier=0.125)
        layer_types = [type(layer) for layer in model.layers]
        # No max-pool anywhere.
        self.assertNotIn(keras.layers.MaxPooling2D, layer_types)
        # Normalization is the first layer after the input.
        self.assertIsInstance(model.layers[0], keras.layers.InputLayer)
        self.assertIsInstance(model.layers[1], keras.layers.Normalization)
        # Stem: 3x3, stride 1, no bias, no pooling after it.
        stem = model.get_layer("stem_conv")
        self.assertEqual(stem.kernel_size, (3, 3))
        self.assertEqual(stem.strides, (1, 1))
        self.assertFalse(stem.use_bias)
        self.assertIs(model.layers[2], stem)
        # 8 BasicBlocks, each ending in an Add; 3 projection shortcuts.
        adds = [l for l in model.layers if isinstance(l, keras.layers.Add)]
        self.assertLen(adds, 8)
        self.assertEqual(
            [l.name for l in adds],
            [f"stage{s}_block{b}_add" for s in range(1, 5) for b in (1, 2)],
        )
        shortcuts = [l.name for l in model.layers if "shortcut_conv" in l.name]
        self.assertEqual(
            shortcuts,
            [f"stage{s}_block1_shortcut_conv" for s in (2, 3, 4)],
        )
        convs = [l for l in model.layers if isinstance(l, keras.layers.Conv2D)]
        # 1 stem + 8 blocks * 2 + 3 shortcuts.
        self.assertLen(convs, 20)
        self.assertTrue(all(not c.use_bias for c in convs))
        # Spatial sizes 32 -> 32, 16, 8, 4.
        for stage, size in zip(range(1, 5), (32, 16, 8, 4)):
            out = model.get_layer(f"stage{stage}_block2_out").output
            self.assertEqual(tuple(out.shape[1:3]), (size, size))
        self.assertIsInstance(
            model.layers[-1], keras.layers.GlobalAveragePooling2D
        )

    @parameterized.parameters((0.125, 64), (0.25, 128), (0.5, 256), (0.001, 1))
    def test_width_multiplier_scales_output(self, width, dim):
        model = backbones.resnet18(width_multiplier=width)
        self.assertEqual(model.output_shape, (None, dim))
        self.assertEqual(
            model.get_layer("stem_conv").filters, max(1, round(64 * width))
        )

    def test_forward_small_input(self):
        model = backbones.resnet18((8, 8, 1), width_multiplier=0.125)
        out = model(_random_images((8, 8, 1), batch=3), training=False)
        self.assertEqual(tuple(out.shape), (3, 64))
        self.assertEqual(out.dtype, "float32")
        self.assertTrue(np.all(np.isfinite(keras.ops.convert_to_numpy(out))))

    @parameterized.parameters(0, -1.0, float("nan"), float("inf"), "1", None, True)
    def test_bad_width_multiplier(self, value):
        with self.assertRaisesRegex(ValueError, "`width_multiplier` must be"):
            backbones.resnet18(width_multiplier=value)


class SmallConvNetTest(parameterized.TestCase):
    @parameterized.parameters(
        ((8, 8, 1), 16, 32), ((32, 32, 3), 8, 10), ((3, 3, 1), 4, 5)
    )
    def test_output_shape(self, input_shape, width, dim):
        model = backbones.small_convnet(
            input_shape, width=width, embedding_dim=dim
        )
        self.assertEqual(model.output_shape, (None, dim))
        out = model(_random_images(input_shape, batch=2), training=False)
        self.assertEqual(tuple(out.shape), (2, dim))
        has_pool = any(
            isinstance(l, keras.layers.MaxPooling2D) for l in model.layers
        )
        self.assertEqual(has_pool, min(input_shape[:2]) >= 4)

    def test_trains_quickly(self):
        """A few steps of regression on 8x8 inputs reduce the loss."""
        keras.utils.set_random_seed(0)
        model = backbones.small_convnet((8, 8, 1), width=8, embedding_dim=4)
        x = _random_images((8, 8, 1), batch=64, seed=1)
        y = np.random.default_rng(2).normal(size=(64, 4)).astype(np.float32)
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
        history = model.fit(x, y, epochs=20, batch_size=32, verbose=0)
        losses = history.history["loss"]
        self.assertLess(losses[-1], losses[0])

    @parameterized.parameters(
        ("width", 0), ("width", 2.5), ("embedding_dim", 0), ("embedding_dim", None)
    )
    def test_bad_arguments(self, arg, value):
        with self.assertRaisesRegex(ValueError, f"`{arg}` must be"):
            backbones.small_convnet((8, 8, 1), **{arg: value})


class NormalizationTest(parameterized.TestCase):
    @parameterized.parameters("resnet18", "convnet")
    def test_normalization_inside_model(self, name):
        mean = (0.1, 0.2, 0.3)
        std = (0.5, 0.25, 0.2)
        model = backbones.get_backbone(
            name, (8, 8, 3), mean=mean, std=std,
            **({"width_multiplier": 0.125} if name == "resnet18" else {}),
        )
        norm = model.layers[1]
        self.assertIsInstance(norm, keras.layers.Normalization)
        x = _random_images((8, 8, 3), batch=2)
        sub = keras.Model(model.input, norm.output)
        got = keras.ops.convert_to_numpy(sub(x))
        expected = (x - np.array(mean, np.float32)) / np.array(std, np.float32)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

    def test_default_mean_std(self):
        model = backbones.small_convnet((4, 4, 2))
        sub = keras.Model(model.input, model.layers[1].output)
        x = np.stack(
            [np.zeros((4, 4, 2)), np.full((4, 4, 2), 0.5), np.ones((4, 4, 2))]
        ).astype(np.float32)
        got = keras.ops.convert_to_numpy(sub(x))
        np.testing.assert_allclose(got[0], -2.0, atol=1e-5)  # (0 - .5) / .25
        np.testing.assert_allclose(got[1], 0.0, atol=1e-5)
        np.testing.assert_allclose(got[2], 2.0, atol=1e-5)

    def test_scalar_mean_std_broadcast(self):
        model = backbones.small_convnet((4, 4, 3), mean=0.5, std=[0.5])
        sub = keras.Model(model.input, model.layers[1].output)
        got = keras.ops.convert_to_numpy(sub(np.ones((1, 4, 4, 3), np.float32)))
        np.testing.assert_allclose(got, 1.0, atol=1e-5)

    @parameterized.parameters(
        ({"mean": (0.5, 0.5)}, "`mean` must have 1 or 3"),
        ({"std": (0.1, 0.0, 0.1)}, "`std` must be > 0"),
        ({"std": -1.0}, "`std` must be > 0"),
        ({"mean": float("nan")}, "`mean` must be finite"),
        ({"mean": "abc"}, "`mean` must be a number"),
    )
    def test_bad_mean_std(self, kwargs, message):
        with self.assertRaisesRegex(ValueError, message):
            backbones.small_convnet((8, 8, 3), **kwargs)


class GetBackboneAndValidationTest(parameterized.TestCase):
    def test_get_backbone(self):
        model = backbones.get_backbone("convnet", (8, 8, 1), embedding_dim=16)
        self.assertEqual(model.output_shape, (None, 16))
        model = backbones.get_backbone(
            "resnet18", (16, 16, 3), width_multiplier=0.25
        )
        self.assertEqual(model.output_shape, (None, 128))
        self.assertEqual(backbones.BACKBONES, ("resnet18", "convnet", "lipschitz"))

    def test_unknown_backbone(self):
        with self.assertRaisesRegex(
            ValueError, "Unknown backbone 'vgg'. Expected one of: resnet18, convnet"
        ):
            backbones.get_backbone("vgg", (8, 8, 1))

    @parameterized.parameters(
        {"shape": (8, 8)},
        {"shape": (8, 8, 0)},
        {"shape": (8, 8, 1, 1)},
        {"shape": (8.0, 8, 1)},
        {"shape": None},
        {"shape": "abc"},
    )
    def test_bad_input_shape(self, shape):
        with self.assertRaisesRegex(ValueError, "`input_shape` must be"):
            backbones.small_convnet(shape)
        with self.assertRaisesRegex(ValueError, "`input_shape` must be"):
            backbones.resnet18(shape)


class SerializationTest(parameterized.TestCase):
    @parameterized.parameters("resnet18", "convnet")
    def test_save_and_reload(self, name):
        keras.utils.set_random_seed(0)
        kwargs = {"width_multiplier": 0.125} if name == "resnet18" else {}
        model = backbones.get_backbone(
            name, (8, 8, 1), mean=0.3, std=0.4, **kwargs
        )
        # Make BatchNormalization statistics non-trivial.
        x = _random_images((8, 8, 1), batch=8, seed=3)
        model.compile(optimizer="sgd", loss="mse")
        model.fit(x, np.zeros((8,) + model.output_shape[1:]), epochs=1, verbose=0)
        path = os.path.join(self.create_tempdir().full_path, "model.keras")
        model.save(path)
        reloaded = keras.saving.load_model(path)
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(model(x, training=False)),
            keras.ops.convert_to_numpy(reloaded(x, training=False)),
        )

    def test_reload_in_fresh_process_without_clustr_tf(self):
        """The models use stock layers only: plain Keras can reload them."""
        model = backbones.small_convnet((8, 8, 1), width=4, embedding_dim=3)
        x = _random_images((8, 8, 1), batch=2)
        expected = keras.ops.convert_to_numpy(model(x, training=False))
        tmp = self.create_tempdir().full_path
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        np.save(os.path.join(tmp, "x.npy"), x)
        code = (
            "import sys, numpy as np, keras\n"
            "assert 'clustr_tf' not in sys.modules\n"
            f"m = keras.saving.load_model({path!r})\n"
            f"x = np.load({os.path.join(tmp, 'x.npy')!r})\n"
            f"np.save({os.path.join(tmp, 'y.npy')!r}, "
            "keras.ops.convert_to_numpy(m(x, training=False)))\n"
        )
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
        subprocess.run(
            [sys.executable, "-c", code], check=True, env=env, cwd=tmp,
            capture_output=True,
        )
        np.testing.assert_array_equal(
            np.load(os.path.join(tmp, "y.npy")), expected
        )


if __name__ == "__main__":
    absltest.main()
