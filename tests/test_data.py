"""Tests for clustr_tf.data. Nothing here touches the network."""

import collections
import dataclasses
import re
import shutil
import tempfile
from unittest import mock

import numpy as np
import tensorflow as tf
from absl.testing import absltest
from absl.testing import parameterized

from clustr_tf import data


def _tempdir(test_case):
    """A temporary directory removed after the test (works under pytest)."""
    path = tempfile.mkdtemp()
    test_case.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path


def _dataset_to_numpy(ds):
    images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return np.stack(images), np.stack(labels)


class DigitsTest(parameterized.TestCase):
    def test_sizes_shapes_dtypes_ranges(self):
        x_train, y_train = data.load_arrays("digits", "train")
        x_test, y_test = data.load_arrays("digits", "test")
        # 1,797 images; test_size=0.2 -> ceil(359.4) = 360 test images.
        self.assertEqual(x_train.shape, (1437, 8, 8, 1))
        self.assertEqual(x_test.shape, (360, 8, 8, 1))
        self.assertEqual(y_train.shape, (1437,))
        self.assertEqual(y_test.shape, (360,))
        for x, y in ((x_train, y_train), (x_test, y_test)):
            self.assertEqual(x.dtype, np.float32)
            self.assertEqual(y.dtype, np.int64)
            self.assertGreaterEqual(x.min(), 0.0)
            self.assertLessEqual(x.max(), 1.0)
            self.assertEqual(x.max(), 1.0)  # 16 / 16 occurs.
            self.assertTrue(np.all(np.isin(x * 16.0, np.arange(17))))

    def test_disjoint_and_complete(self):
        """Train and test partition scikit-learn's 1,797 (image, label) pairs.

        Compared as multisets, since a few digits images occur twice.
        """
        from sklearn.datasets import load_digits

        def pairs(images, labels):
            flat = np.asarray(images, np.float32).reshape(len(images), -1)
            return collections.Counter(
                (row.tobytes(), int(label)) for row, label in zip(flat, labels)
            )

        digits = load_digits()
        everything = pairs(digits.images / 16.0, digits.target)
        train = pairs(*data.load_arrays("digits", "train"))
        test = pairs(*data.load_arrays("digits", "test"))
        self.assertEqual(sum(everything.values()), 1797)
        self.assertEqual(train + test, everything)

    def test_deterministic(self):
        for split in ("train", "test"):
            x1, y1 = data.load_arrays("digits", split)
            x2, y2 = data.load_arrays("digits", split)
            np.testing.assert_array_equal(x1, x2)
            np.testing.assert_array_equal(y1, y2)

    def test_stratified(self):
        _, y_train = data.load_arrays("digits", "train")
        _, y_test = data.load_arrays("digits", "test")
        train_counts = np.bincount(y_train, minlength=10)
        test_counts = np.bincount(y_test, minlength=10)
        self.assertTrue(np.all(train_counts > 0))
        self.assertTrue(np.all(test_counts > 0))
        # Each class's share of the test split is ~20% (stratified).
        fraction = test_counts / (train_counts + test_counts)
        np.testing.assert_allclose(fraction, 0.2, atol=0.01)

    @parameterized.parameters("train", "test")
    def test_load_matches_load_arrays(self, split):
        ds = data.load("digits", split)
        self.assertIsInstance(ds, tf.data.Dataset)
        image_spec, label_spec = ds.element_spec
        self.assertEqual(image_spec.shape, (8, 8, 1))
        self.assertEqual(image_spec.dtype, tf.float32)
        self.assertEqual(label_spec.shape, ())
        self.assertEqual(label_spec.dtype, tf.int64)
        x_ds, y_ds = _dataset_to_numpy(ds)
        x_np, y_np = data.load_arrays("digits", split)
        np.testing.assert_array_equal(x_ds, x_np)
        np.testing.assert_array_equal(y_ds, y_np)

    def test_info_mean_std_match_train_split(self):
        info = data.info("digits")
        x_train, y_train = data.load_arrays("digits", "train")
        self.assertEqual(info.name, "digits")
        self.assertEqual(info.num_classes, 10)
        self.assertEqual(info.image_shape, (8, 8, 1))
        self.assertEqual(info.image_shape, x_train.shape[1:])
        self.assertEqual(int(y_train.max()) + 1, info.num_classes)
        np.testing.assert_allclose(
            info.mean, x_train.mean(axis=(0, 1, 2)), atol=1e-4
        )
        np.testing.assert_allclose(
            info.std, x_train.std(axis=(0, 1, 2)), atol=1e-4
        )


class InfoTest(parameterized.TestCase):
    @parameterized.parameters(
        ("cifar10", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
        ("cifar100", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
        ("svhn", 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    )
    def test_tfds_info(self, name, num_classes, mean, std):
        info = data.info(name)
        self.assertEqual(
            info, data.DatasetInfo(name, num_classes, (32, 32, 3), mean, std)
        )

    def test_frozen(self):
        info = data.info("cifar10")
        with self.assertRaises(dataclasses.FrozenInstanceError):
            info.num_classes = 3

    def test_every_dataset_has_info(self):
        self.assertEqual(data.DATASETS, ("digits", "cifar10", "cifar100", "svhn"))
        for name in data.DATASETS:
            info = data.info(name)
            self.assertEqual(info.name, name)
            self.assertLen(info.mean, info.image_shape[-1])
            self.assertLen(info.std, info.image_shape[-1])


class ErrorsTest(parameterized.TestCase):
    @parameterized.parameters("load", "load_arrays")
    def test_unknown_dataset(self, fn):
        with self.assertRaisesRegex(
            ValueError,
            "Unknown dataset 'mnist'. Expected one of: "
            "digits, cifar10, cifar100, svhn",
        ):
            getattr(data, fn)("mnist", "train")

    def test_unknown_dataset_info(self):
        with self.assertRaisesRegex(ValueError, "Unknown dataset 'x'"):
            data.info("x")

    @parameterized.parameters(
        ("load", "digits", "validation"),
        ("load_arrays", "digits", "extra"),
        ("load", "cifar10", "train[:10]"),
        ("load", "svhn", "extra"),
    )
    def test_unknown_split(self, fn, name, split):
        with self.assertRaisesRegex(
            ValueError,
            re.escape(
                f"Unknown split '{split}' for dataset '{name}'. "
                "Expected one of: train, test."
            ),
        ):
            getattr(data, fn)(name, split)


class _FakeBuilder:
    """Stands in for a TFDS builder; never touches disk or network."""

    def __init__(self, prepared, download_error=None):
        self._prepared = prepared
        self._download_error = download_error
        self.download_calls = 0
        rng = np.random.default_rng(0)
        self.images = rng.integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
        self.images[0, 0, 0, 0] = 0
        self.images[0, 0, 0, 1] = 255
        self.labels = np.array([3, 1, 4, 1, 5], np.int64)

    def is_prepared(self):
        return self._prepared

    def download_and_prepare(self):
        self.download_calls += 1
        raise self._download_error

    def as_dataset(
        self, split, as_supervised, shuffle_files=False, batch_size=None
    ):
        del split, shuffle_files
        assert as_supervised
        if batch_size == -1:
            return tf.constant(self.images), tf.constant(self.labels)
        return tf.data.Dataset.from_tensor_slices((self.images, self.labels))


class TfdsTest(parameterized.TestCase):
    @parameterized.parameters("cifar10", "cifar100", "svhn")
    def test_missing_dataset_without_download(self, name):
        """A real TFDS lookup in an empty data_dir, with downloads disabled."""
        data_dir = _tempdir(self)
        for fn in (data.load, data.load_arrays):
            with self.assertRaises(data.DatasetNotFoundError) as ctx:
                fn(name, "train", data_dir=data_dir, download=False)
            message = str(ctx.exception)
            self.assertIn(f"'{name}'", message)
            self.assertIn("could not be found or downloaded", message)
            self.assertIn("--data_dir", message)
            self.assertIn(data_dir, message)

    def test_failed_download(self):
        """The download path, with TFDS's builder replaced by a fake."""
        fake = _FakeBuilder(
            prepared=False, download_error=ConnectionError("no network")
        )
        data_dir = _tempdir(self)
        with mock.patch.object(data.tfds, "builder", return_value=fake) as m:
            with self.assertRaises(data.DatasetNotFoundError) as ctx:
                data.load("svhn", "test", data_dir=data_dir)
        m.assert_called_once_with("svhn_cropped", data_dir=data_dir)
        self.assertEqual(fake.download_calls, 1)
        message = str(ctx.exception)
        self.assertIn("'svhn'", message)
        self.assertIn("could not be found or downloaded", message)
        self.assertIn("no network", message)
        self.assertIn("--data_dir", message)
        self.assertIsInstance(ctx.exception.__cause__, ConnectionError)

    def test_error_is_a_runtime_error(self):
        self.assertTrue(issubclass(data.DatasetNotFoundError, RuntimeError))

    def test_prepared_dataset_conversion(self):
        """uint8 TFDS images become float32 in [0, 1]; labels int64."""
        fake = _FakeBuilder(prepared=True)
        with mock.patch.object(data.tfds, "builder", return_value=fake):
            ds = data.load("cifar10", "train")
            x_ds, y_ds = _dataset_to_numpy(ds)
            x_np, y_np = data.load_arrays("cifar10", "train")
        self.assertEqual(fake.download_calls, 0)
        self.assertEqual(ds.element_spec[0].dtype, tf.float32)
        self.assertEqual(ds.element_spec[1].dtype, tf.int64)
        self.assertEqual(x_np.dtype, np.float32)
        self.assertEqual(y_np.dtype, np.int64)
        self.assertEqual(x_np.shape, (5, 32, 32, 3))
        np.testing.assert_allclose(x_np, fake.images / 255.0, rtol=1e-6)
        self.assertEqual(x_np[0, 0, 0, 0], 0.0)
        self.assertEqual(x_np[0, 0, 0, 1], 1.0)
        np.testing.assert_array_equal(x_ds, x_np)
        np.testing.assert_array_equal(y_ds, y_np)
        np.testing.assert_array_equal(y_np, fake.labels)


if __name__ == "__main__":
    absltest.main()
