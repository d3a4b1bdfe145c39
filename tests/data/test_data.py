"""Tests for clustr_tf.data. Nothing here touches the network."""

import collections
import dataclasses
import os
import re
import shutil
import tarfile
from unittest import mock

import numpy as np
import tensorflow as tf
from absl.testing import absltest
from absl.testing import parameterized

from clustr_tf import data



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
        self.assertEqual(
            data.DATASETS, ("digits", "cifar10", "cifar100", "svhn")
        )
        self.assertEqual(data.ALL_DATASETS, data.DATASETS + ("image_folder",))
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
            "digits, cifar10, cifar100, svhn, image_folder",
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
        data_dir = self.create_tempdir().full_path
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
        data_dir = self.create_tempdir().full_path
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

    def test_prepared_dataset_uint8(self):
        """dtype="uint8" returns TFDS's raw pixels, not a float copy."""
        fake = _FakeBuilder(prepared=True)
        with mock.patch.object(data.tfds, "builder", return_value=fake):
            x_u8, y_u8 = data.load_arrays("cifar10", "train", dtype="uint8")
            x_f32, _ = data.load_arrays("cifar10", "train")
        self.assertEqual(x_u8.dtype, np.uint8)
        np.testing.assert_array_equal(x_u8, fake.images)
        np.testing.assert_array_equal(y_u8, fake.labels)
        np.testing.assert_array_equal(
            x_u8.astype(np.float32) / np.float32(255.0), x_f32
        )


# --------------------------------------------------------------------------
# Image folders (folders and archives in split/class/image layout).
# --------------------------------------------------------------------------

REAL_ARCHIVE = "/work/shared/data/cifar10-jpeg.tar.gz"

# A subset of CIFAR-10's classes (labels 0, 3, 9: not the folders' ranks) and
# file names whose string order ("10" < "9" < "a") is not their number order.
_CIFAR_TRAIN = {
    "airplane": ("9.png", "10.png", "a.jpg"),
    "cat": ("0001.png", "0000.png"),
    "truck": ("b.png", "a.png"),
}
_CIFAR_TEST = {"cat": ("x.png",), "truck": ("y.jpg", "w.png")}


def _encode(image, fname):
    """PNG or JPEG bytes of a uint8 [H, W, C] image, by file extension."""
    if fname.endswith(".jpg"):
        return tf.io.encode_jpeg(image, quality=95).numpy()
    return tf.io.encode_png(image).numpy()


def _write(path, contents):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(contents)


def _write_tree(root, tree, shape, seed):
    """Writes random images as root/split/class/file.

    Args:
        root: the folder to write into.
        tree: split -> class -> file names.
        shape: (H, W, C) of every image.
        seed: numpy seed of the pixels.

    Returns:
        split -> class -> file name -> the uint8 [H, W, C] pixels a decoder
        gives back (JPEGs are decoded once more, as the loader will).
    """
    rng = np.random.default_rng(seed)
    pixels = {}
    for split, classes in tree.items():
        for cls, fnames in classes.items():
            for fname in fnames:
                image = rng.integers(0, 256, size=shape, dtype=np.uint8)
                contents = _encode(image, fname)
                _write(os.path.join(root, split, cls, fname), contents)
                if fname.endswith(".jpg"):
                    image = tf.io.decode_jpeg(contents).numpy()
                pixels.setdefault(split, {}).setdefault(cls, {})[fname] = image
    return pixels


def _make_archive(folder, path, top=None):
    """Packs folder's splits into a .tar/.tar.gz/.tgz, under `top` if given."""
    mode = "w" if path.endswith(".tar") else "w:gz"
    with tarfile.open(path, mode) as tar:
        for split in sorted(os.listdir(folder)):
            arcname = f"{top}/{split}" if top else split
            tar.add(os.path.join(folder, split), arcname=arcname)
    return path


def _expected(pixels, split, class_names):
    """Images and labels in (label, file name) order."""
    entries = sorted(
        (class_names.index(cls), fname, image)
        for cls, files in pixels[split].items()
        for fname, image in files.items()
    )
    images = np.stack([image for _, _, image in entries])
    labels = np.array([label for label, _, _ in entries], np.int64)
    return images, labels


def _sources(test_case, tree, shape=(32, 32, 3), seed=0):
    """The same images as four data_dirs: two folders and two archives.

    Returns:
        `(pixels, {kind: data_dir})`: a folder with the splits at its top, a
        folder with them under one sub-folder, a .tar.gz with one top-level
        folder, and a .tar without one.
    """
    tmp = test_case.create_tempdir().full_path
    flat = os.path.join(tmp, "flat")
    pixels = _write_tree(flat, tree, shape, seed)
    nested = os.path.join(tmp, "nested")
    shutil.copytree(flat, os.path.join(nested, "cifar10-jpeg"))
    _write(os.path.join(nested, "README.txt"), b"not a split")
    return pixels, {
        "folder": flat,
        "nested_folder": nested,
        "tar.gz": _make_archive(
            flat, os.path.join(tmp, "c.tar.gz"), top="cifar10-jpeg"
        ),
        "tar": _make_archive(flat, os.path.join(tmp, "c.tar")),
    }


_KINDS = ("folder", "nested_folder", "tar.gz", "tar")


class ImageFolderTest(parameterized.TestCase):
    @parameterized.product(kind=_KINDS, split=("train", "test"))
    def test_cifar10_labels_order_pixels(self, kind, split):
        pixels, dirs = _sources(
            self, {"train": _CIFAR_TRAIN, "test": _CIFAR_TEST}
        )
        names = list(data.CLASS_NAMES["cifar10"])
        x_expected, y_expected = _expected(pixels, split, names)
        x_u8, y = data.load_arrays(
            "cifar10", split, data_dir=dirs[kind], dtype="uint8"
        )
        self.assertEqual(x_u8.dtype, np.uint8)
        self.assertEqual(y.dtype, np.int64)
        np.testing.assert_array_equal(x_u8, x_expected)
        np.testing.assert_array_equal(y, y_expected)
        if split == "train":
            # Labels are CIFAR-10's (airplane 0, cat 3, truck 9); files sorted
            # as strings inside a class.
            np.testing.assert_array_equal(y, [0, 0, 0, 3, 3, 9, 9])
            np.testing.assert_array_equal(
                x_u8[:3],
                [
                    pixels["train"]["airplane"][f]
                    for f in ("10.png", "9.png", "a.jpg")
                ],
            )
        x_f32, y_f32 = data.load_arrays("cifar10", split, data_dir=dirs[kind])
        self.assertEqual(x_f32.dtype, np.float32)
        np.testing.assert_array_equal(
            x_f32, x_u8.astype(np.float32) / np.float32(255.0)
        )
        np.testing.assert_array_equal(y_f32, y)
        ds = data.load("cifar10", split, data_dir=dirs[kind], download=False)
        self.assertEqual(ds.element_spec[0].shape, (32, 32, 3))
        self.assertEqual(ds.element_spec[0].dtype, tf.float32)
        self.assertEqual(ds.element_spec[1].dtype, tf.int64)
        x_ds, y_ds = _dataset_to_numpy(ds)
        np.testing.assert_array_equal(x_ds, x_f32)
        np.testing.assert_array_equal(y_ds, y)

    @parameterized.parameters(*_KINDS)
    def test_deterministic_and_read_only(self, kind):
        """Two reads agree and nothing is written next to the data."""
        _, dirs = _sources(self, {"train": _CIFAR_TRAIN, "test": _CIFAR_TEST})
        parent = os.path.dirname(dirs[kind])
        before = sorted(os.walk(parent))
        first = data.load_arrays("cifar10", "train", data_dir=dirs[kind])
        second = data.load_arrays("cifar10", "train", data_dir=dirs[kind])
        np.testing.assert_array_equal(first[0], second[0])
        np.testing.assert_array_equal(first[1], second[1])
        self.assertEqual(sorted(os.walk(parent)), before)

    def test_cifar100_and_svhn_class_names(self):
        tree = {
            "train": {
                "worm": ("a.png",),
                "apple": ("b.png",),
                "keyboard": ("c.png",),
            },
            "test": {"worm": ("d.png",)},
        }
        _, dirs = _sources(self, tree)
        _, y = data.load_arrays("cifar100", "train", data_dir=dirs["tar.gz"])
        np.testing.assert_array_equal(y, [0, 39, 99])
        _write(
            os.path.join(dirs["folder"], "test", "tv", "e.png"),
            tf.io.encode_png(np.zeros((32, 32, 3), np.uint8)).numpy(),
        )
        with self.assertRaisesRegex(
            ValueError,
            r"'tv' is not a class name.*among: apple, .*\(80 more\) \(all in"
            r" clustr_tf.data.CLASS_NAMES\['cifar100'\]\)",
        ):
            data.load("cifar100", "test", data_dir=dirs["folder"])
        tree = {
            "train": {"0": ("a.png",), "7": ("b.png",)},
            "test": {"3": ("c.png",)},
        }
        _, dirs = _sources(self, tree, seed=1)
        _, y = data.load_arrays("svhn", "train", data_dir=dirs["folder"])
        np.testing.assert_array_equal(y, [0, 7])
        _, y = data.load_arrays("svhn", "test", data_dir=dirs["tar"])
        np.testing.assert_array_equal(y, [3])

    def test_hidden_entries_skipped(self):
        tree = {"train": {"cat": ("a.png",)}, "test": {"cat": ("b.png",)}}
        pixels, dirs = _sources(self, tree)
        for root in (
            dirs["folder"],
            os.path.join(dirs["nested_folder"], "cifar10-jpeg"),
        ):
            _write(os.path.join(root, "train", "cat", ".DS_Store"), b"junk")
            _write(os.path.join(root, "train", ".hidden", "x.png"), b"junk")
        archive = os.path.join(os.path.dirname(dirs["tar"]), "mac.tgz")
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(dirs["folder"], arcname="top")
            tar.add(dirs["folder"], arcname="__MACOSX/top")
        for data_dir in (dirs["folder"], dirs["nested_folder"], archive):
            x, y = data.load_arrays(
                "cifar10", "train", data_dir=data_dir, dtype="uint8"
            )
            np.testing.assert_array_equal(x, [pixels["train"]["cat"]["a.png"]])
            np.testing.assert_array_equal(y, [3])

    @parameterized.parameters(*_KINDS)
    def test_generic_image_folder(self, kind):
        # Classes are the sorted folder names: "Bee" < "ant" < "zebra".
        tree = {
            "train": {
                "zebra": ("1.png", "0.png"),
                "ant": ("a.png",),
                "Bee": ("z.png", "y.png"),
            },
            "test": {"ant": ("t.png",), "zebra": ("s.png",)},
        }
        pixels, dirs = _sources(self, tree, shape=(6, 5, 3), seed=2)
        names = ["Bee", "ant", "zebra"]
        self.assertEqual(
            data.class_names("image_folder", data_dir=dirs[kind]), tuple(names)
        )
        for split in ("train", "test"):
            x_expected, y_expected = _expected(pixels, split, names)
            x, y = data.load_arrays(
                "image_folder", split, data_dir=dirs[kind], dtype="uint8"
            )
            np.testing.assert_array_equal(x, x_expected)
            np.testing.assert_array_equal(y, y_expected)
            x_ds, y_ds = _dataset_to_numpy(
                data.load("image_folder", split, data_dir=dirs[kind])
            )
            np.testing.assert_array_equal(
                x_ds, x.astype(np.float32) / np.float32(255.0)
            )
            np.testing.assert_array_equal(y_ds, y)
        info = data.info("image_folder", data_dir=dirs[kind])
        x_train, _ = data.load_arrays(
            "image_folder", "train", data_dir=dirs[kind]
        )
        self.assertEqual(info.name, "image_folder")
        self.assertEqual(info.num_classes, 3)
        self.assertEqual(info.image_shape, (6, 5, 3))
        # Exact per-channel statistics of the train split's pixels.
        np.testing.assert_allclose(
            info.mean,
            x_train.astype(np.float64).mean(axis=(0, 1, 2)),
            atol=1e-6,
        )
        np.testing.assert_allclose(
            info.std, x_train.astype(np.float64).std(axis=(0, 1, 2)), atol=1e-6
        )

    def test_generic_grayscale(self):
        tree = {
            "train": {"a": ("0.png",), "b": ("1.png",)},
            "test": {"b": ("2.png",)},
        }
        _, dirs = _sources(self, tree, shape=(7, 4, 1))
        info = data.info("image_folder", data_dir=dirs["tar.gz"])
        self.assertEqual(info.image_shape, (7, 4, 1))
        self.assertLen(info.mean, 1)
        x, y = data.load_arrays("image_folder", "test", data_dir=dirs["tar.gz"])
        self.assertEqual(x.shape, (1, 7, 4, 1))
        np.testing.assert_array_equal(y, [1])

    def test_fixed_info_ignores_data_dir(self):
        _, dirs = _sources(self, {"train": {"cat": ("a.png",)}})
        self.assertEqual(
            data.info("cifar10", data_dir=dirs["folder"]), data.info("cifar10")
        )
        self.assertEqual(
            data.class_names("cifar10", data_dir="/nowhere"),
            data.CLASS_NAMES["cifar10"],
        )


class ClassNamesTest(absltest.TestCase):
    def test_tables(self):
        for name in data.DATASETS:
            names = data.class_names(name)
            self.assertLen(names, data.info(name).num_classes)
            self.assertLen(set(names), len(names))
        # TFDS's CIFAR-100 fine labels are alphabetical; spot checks.
        cifar100 = data.CLASS_NAMES["cifar100"]
        self.assertEqual(list(cifar100), sorted(cifar100))
        self.assertEqual(
            (cifar100[0], cifar100[39], cifar100[99]),
            ("apple", "keyboard", "worm"),
        )
        self.assertEqual(
            data.CLASS_NAMES["cifar10"],
            (
                "airplane",
                "automobile",
                "bird",
                "cat",
                "deer",
                "dog",
                "frog",
                "horse",
                "ship",
                "truck",
            ),
        )
        self.assertEqual(data.CLASS_NAMES["svhn"], tuple("0123456789"))

    def test_image_folder_needs_data_dir(self):
        with self.assertRaisesRegex(
            ValueError, "needs `data_dir`.*Received: data_dir=None"
        ):
            data.class_names("image_folder")


def _break_folder(test_case, kind, what):
    """A CIFAR-10 image folder (or its archive) with one defect."""
    tree = {"train": {"cat": ("0.png", "1.png")}, "test": {"cat": ("2.png",)}}
    tmp = test_case.create_tempdir().full_path
    folder = os.path.join(tmp, "folder")
    _write_tree(folder, tree, (32, 32, 3), seed=3)
    bad = {
        "unknown_class": os.path.join(folder, "train", "airplanes", "5.png"),
        "wrong_size": os.path.join(folder, "train", "dog", "5.png"),
        "grey": os.path.join(folder, "train", "dog", "5.png"),
        "alpha": os.path.join(folder, "train", "dog", "5.png"),
        "unreadable": os.path.join(folder, "train", "dog", "5.png"),
        "file_in_split": os.path.join(folder, "train", "5.png"),
        "nested": os.path.join(folder, "train", "dog", "deeper", "5.png"),
    }.get(what)
    contents = {
        "wrong_size": tf.io.encode_png(np.zeros((16, 16, 3), np.uint8)).numpy(),
        "grey": tf.io.encode_png(np.zeros((32, 32, 1), np.uint8)).numpy(),
        "alpha": tf.io.encode_png(np.zeros((32, 32, 4), np.uint8)).numpy(),
        "unreadable": b"this is not an image",
    }.get(what, tf.io.encode_png(np.zeros((32, 32, 3), np.uint8)).numpy())
    if what == "missing_split":
        shutil.rmtree(os.path.join(folder, "test"))
    elif bad is not None:
        _write(bad, contents)
    if kind == "folder":
        return folder
    return _make_archive(folder, os.path.join(tmp, "c.tar.gz"), top="top")


class ImageFolderErrorsTest(parameterized.TestCase):
    @parameterized.product(
        kind=("folder", "archive"),
        case=(
            (
                "unknown_class",
                "train",
                r"Unknown class folder .*airplanes.*'airplanes' is not a"
                r" class name. Did you mean 'airplane'\? Found class folders:"
                r" airplanes, cat.*airplane, automobile",
            ),
            (
                "missing_split",
                "test",
                r"has no 'test' split folder for dataset 'cifar10'. Found"
                r" split folders: train",
            ),
            (
                "wrong_size",
                "train",
                r"The image .*dog.5\.png.* has shape .* = \(16, 16, 3\);"
                r" every image .* must have shape \(32, 32, 3\)",
            ),
            (
                "grey",
                "train",
                r"The image .*dog.5\.png.* \(32, 32, 1\); .*\(32, 32, 3\)",
            ),
            (
                "alpha",
                "train",
                r"The image .*dog.5\.png.* \(32, 32, 4\); .*\(32, 32, 3\)",
            ),
            (
                "unreadable",
                "train",
                r"Could not read the image .*dog.5\.png.*: expected a JPEG,"
                r" PNG, GIF or BMP file \(InvalidArgumentError: Unknown image"
                r" file format",
            ),
            (
                "file_in_split",
                "train",
                r"5\.png.* is a file directly in a split folder.*expected the"
                r" layout <split>/<class>/<image>",
            ),
            ("nested", "train", r"deeper.*expected the layout"),
        ),
    )
    def test_defect(self, kind, case):
        what, split, pattern = case
        data_dir = _break_folder(self, kind, what)
        for fn in (data.load, data.load_arrays):
            with self.assertRaisesRegex(ValueError, pattern) as ctx:
                fn("cifar10", split, data_dir=data_dir)
            self.assertIn(data_dir, str(ctx.exception))

    def test_unknown_class_in_generic_test_split(self):
        tree = {"train": {"a": ("0.png",)}, "test": {"b": ("1.png",)}}
        _, dirs = _sources(self, tree, shape=(4, 4, 3))
        with self.assertRaisesRegex(
            ValueError,
            r"Unknown class folder .*'b' is not a class name.*Expected names"
            r" among: a\.",
        ):
            data.load_arrays("image_folder", "test", data_dir=dirs["tar"])

    def test_generic_image_of_another_size(self):
        tree = {"train": {"a": ("0.png",)}}
        _, dirs = _sources(self, tree, shape=(4, 4, 3))
        _write(
            os.path.join(dirs["folder"], "train", "b", "1.png"),
            tf.io.encode_png(np.zeros((4, 5, 3), np.uint8)).numpy(),
        )
        with self.assertRaisesRegex(
            ValueError, r"b.1\.png.*\(4, 5, 3\).*must have shape \(4, 4, 3\)"
        ):
            data.info("image_folder", data_dir=dirs["folder"])

    def test_generic_empty_class_folder(self):
        tree = {"train": {"a": ("0.png",)}}
        _, dirs = _sources(self, tree, shape=(4, 4, 3))
        os.makedirs(os.path.join(dirs["folder"], "train", "empty"))
        with self.assertRaisesRegex(
            ValueError, r"class folder .*empty holds no images"
        ):
            data.load_arrays("image_folder", "train", data_dir=dirs["folder"])

    def test_generic_needs_data_dir(self):
        for call in (
            lambda: data.load("image_folder", "train"),
            lambda: data.load_arrays("image_folder", "train"),
            lambda: data.info("image_folder"),
        ):
            with self.assertRaisesRegex(
                ValueError,
                r"Dataset 'image_folder' needs `data_dir`.*Received:"
                r" data_dir=None",
            ):
                call()

    def test_generic_folder_without_splits(self):
        tmp = self.create_tempdir().full_path
        _write(os.path.join(tmp, "cats", "0.png"), b"")
        with self.assertRaisesRegex(
            ValueError, r"No 'train' or 'test' split folder .*found: cats"
        ):
            data.load_arrays("image_folder", "train", data_dir=tmp)

    def test_missing_paths(self):
        tmp = self.create_tempdir().full_path
        with self.assertRaisesRegex(
            data.DatasetNotFoundError, r"nope\.tar\.gz could not be found"
        ):
            data.load_arrays(
                "cifar10", "train", data_dir=os.path.join(tmp, "nope.tar.gz")
            )
        with self.assertRaisesRegex(
            data.DatasetNotFoundError,
            r"'image_folder' could not be found: .*nowhere does not exist",
        ):
            data.load_arrays(
                "image_folder", "train", data_dir=os.path.join(tmp, "nowhere")
            )

    def test_not_an_archive(self):
        tmp = self.create_tempdir().full_path
        corrupt = os.path.join(tmp, "corrupt.tar.gz")
        _write(corrupt, b"\x1f\x8b garbage that is not gzip")
        with self.assertRaisesRegex(
            ValueError, r"Could not read the archive .*corrupt\.tar\.gz"
        ):
            data.load_arrays("cifar10", "train", data_dir=corrupt)
        other = os.path.join(tmp, "images.zip")
        _write(other, b"PK")
        with self.assertRaisesRegex(
            ValueError, r"images\.zip is a file, but not a \.tar"
        ):
            data.load("cifar10", "train", data_dir=other)

    def test_several_top_level_folders(self):
        _, dirs = _sources(self, {"train": {"cat": ("0.png",)}})
        archive = os.path.join(os.path.dirname(dirs["tar"]), "two.tar")
        with tarfile.open(archive, "w") as tar:
            tar.add(dirs["folder"], arcname="one")
            tar.add(dirs["folder"], arcname="two")
        with self.assertRaisesRegex(
            ValueError, r"several top-level folders \('one', 'two'\)"
        ):
            data.load_arrays("cifar10", "train", data_dir=archive)


class DtypeTest(parameterized.TestCase):
    def test_digits_has_no_uint8(self):
        with self.assertRaisesRegex(
            ValueError,
            r"needs 8-bit images, but dataset 'digits' has pixels 0\.\.16 /"
            r" 16.*Received: dtype='uint8'",
        ):
            data.load_arrays("digits", "train", dtype="uint8")

    @parameterized.parameters("float16", "int32", "bogus", None)
    def test_unsupported_dtype(self, dtype):
        with self.assertRaisesRegex(
            ValueError, r"`dtype` must be one of float32, uint8. Received: "
        ):
            data.load_arrays("digits", "train", dtype=dtype)

    @parameterized.parameters(np.float32, tf.float32, "float32")
    def test_float32_spellings(self, dtype):
        x, _ = data.load_arrays("digits", "test", dtype=dtype)
        self.assertEqual(x.dtype, np.float32)

    @parameterized.parameters(np.uint8, tf.uint8)
    def test_uint8_spellings(self, dtype):
        _, dirs = _sources(self, {"train": {"cat": ("0.png",)}})
        x, _ = data.load_arrays(
            "cifar10", "train", data_dir=dirs["folder"], dtype=dtype
        )
        self.assertEqual(x.dtype, np.uint8)


class RealArchiveTest(absltest.TestCase):
    def test_cifar10_jpeg_test_split(self):
        """The test split of the real CIFAR-10 JPEG archive, read offline."""
        if not os.path.exists(REAL_ARCHIVE):
            self.skipTest(
                f"{REAL_ARCHIVE} not present (real CIFAR-10 JPEG archive)"
            )
        x, y = data.load_arrays(
            "cifar10", "test", data_dir=REAL_ARCHIVE, dtype="uint8"
        )
        self.assertEqual(x.shape, (10000, 32, 32, 3))
        self.assertEqual(x.dtype, np.uint8)
        np.testing.assert_array_equal(np.bincount(y), [1000] * 10)
        np.testing.assert_array_equal(y, np.repeat(np.arange(10), 1000))
        # JPEG-decoded pixels: close to, not equal to, the published mean.
        mean = x.reshape(-1, 3).mean(axis=0) / 255.0
        np.testing.assert_allclose(mean, data.info("cifar10").mean, atol=0.02)
        self.assertGreater(x.std(), 40)  # Real images, not blanks.


# --------------------------------------------------------------------------
# Augmentation.
# --------------------------------------------------------------------------


def _shifted(images, dy, dx):
    """images shifted so that out[y, x] = images[y + dy, x + dx] (0 outside)."""
    _, h, w, _ = images.shape
    out = np.zeros_like(images)
    ys, xs = slice(max(0, -dy), min(h, h - dy)), slice(
        max(0, -dx), min(w, w - dx)
    )
    yi, xi = slice(max(0, dy), min(h, h + dy)), slice(
        max(0, dx), min(w, w + dx)
    )
    out[:, ys, xs] = images[:, yi, xi]
    return out


def _explain(original, augmented, padding):
    """Finds, per image, the (dy, dx, flipped) that produced it, or None."""
    found = [None] * len(original)
    for flipped in (False, True):
        for dy in range(-padding, padding + 1):
            for dx in range(-padding, padding + 1):
                candidate = _shifted(original, dy, dx)
                if flipped:
                    candidate = candidate[:, :, ::-1]
                match = np.all(candidate == augmented, axis=(1, 2, 3))
                for i in np.flatnonzero(match):
                    if found[i] is not None:
                        raise AssertionError(f"image {i} is ambiguous")
                    found[i] = (dy, dx, flipped)
    return found


class AugmentationTest(parameterized.TestCase):
    def _images(self, n=64, h=10, w=12, c=3):
        # Strictly positive pixels, so zeros can only come from the padding.
        rng = np.random.default_rng(0)
        return rng.uniform(0.05, 1.0, size=(n, h, w, c)).astype(np.float32)

    def test_which_datasets(self):
        for name in ("digits", "svhn"):
            self.assertIsNone(data.augmentation(name))
        for name in ("cifar10", "cifar100", "image_folder"):
            self.assertIs(data.augmentation(name), data.random_crop_and_flip)
        with self.assertRaisesRegex(ValueError, "Unknown dataset 'mnist'"):
            data.augmentation("mnist")

    def test_shape_dtype_range(self):
        images = self._images()
        out = data.augmentation("cifar10")(images, tf.constant([1, 2]))
        self.assertEqual(out.shape, images.shape)
        self.assertEqual(out.dtype, tf.float32)
        self.assertGreaterEqual(float(tf.reduce_min(out)), 0.0)
        self.assertLessEqual(float(tf.reduce_max(out)), 1.0)

    def test_deterministic_and_seed_dependent(self):
        augment = data.augmentation("cifar10")
        images = self._images()
        a = augment(images, tf.constant([3, 4], tf.int64)).numpy()
        b = augment(images, tf.constant([3, 4], tf.int64)).numpy()
        c = augment(images, tf.constant([3, 5], tf.int64)).numpy()
        np.testing.assert_array_equal(a, b)
        self.assertFalse(np.array_equal(a, c))
        # Per image, not one transform for the whole batch.
        transforms = set(_explain(images, c, 4))
        self.assertGreater(len(transforms), 10)

    def test_same_in_tf_function_and_tf_data(self):
        augment = data.augmentation("image_folder")
        images = self._images(n=32)
        seed = tf.constant([7, 8], tf.int32)
        eager = augment(images, seed).numpy()
        traced = tf.function(augment)
        np.testing.assert_array_equal(traced(images, seed).numpy(), eager)
        # Unknown batch size inside a graph.
        spec = tf.TensorSpec([None, 10, 12, 3], tf.float32)
        graph = tf.function(
            augment, input_signature=[spec, tf.TensorSpec([2], tf.int32)]
        )
        np.testing.assert_array_equal(graph(images, seed).numpy(), eager)
        ds = (
            tf.data.Dataset.from_tensor_slices(images)
            .batch(32)
            .map(lambda x: augment(x, seed))
        )
        np.testing.assert_array_equal(next(iter(ds)).numpy(), eager)

    def test_crop_is_a_bounded_shift_and_flip_is_fair(self):
        """Each output is the input shifted by <= 4 pixels (zeros coming in
        from the border), maybe mirrored; about half are mirrored, and every
        offset in [-4, 4] occurs (PyTorch draws the crop corner in [0, 8])."""
        images = self._images(n=1000, h=8, w=9, c=1)
        out = data.random_crop_and_flip(images, tf.constant([0, 42])).numpy()
        found = _explain(images, out, 4)
        self.assertNotIn(None, found)
        dys, dxs, flips = (np.array(v) for v in zip(*found))
        self.assertEqual(set(dys), set(range(-4, 5)))
        self.assertEqual(set(dxs), set(range(-4, 5)))
        # Binomial(1000, 0.5): std 0.016, so 0.44..0.56 is > 3.5 std.
        self.assertBetween(flips.mean(), 0.44, 0.56)
        # A shift brings in zeros: exactly the border rows/columns it exposed.
        i = int(np.flatnonzero((np.abs(dys) == 4) & (np.abs(dxs) == 4))[0])
        zeros = out[i, ..., 0] == 0
        self.assertEqual(zeros.sum(), 8 * 9 - 4 * 5)

    def test_no_padding_only_flips(self):
        images = self._images(n=50)
        out = data.random_crop_and_flip(images, [5, 6], padding=0).numpy()
        for image, result in zip(images, out):
            self.assertTrue(
                np.array_equal(result, image)
                or np.array_equal(result, image[:, ::-1])
            )

    def test_errors(self):
        with self.assertRaisesRegex(
            ValueError,
            r"`images` must be a batch \[B, H, W, C\]. Received shape: \(32,"
            r" 32, 3\)",
        ):
            data.random_crop_and_flip(tf.zeros([32, 32, 3]), [1, 2])
        with self.assertRaisesRegex(
            ValueError,
            r"`seed` must be an int32/int64 tensor of shape \[2\]. Received:"
            r" dtype int32, shape \(3,\)",
        ):
            data.random_crop_and_flip(tf.zeros([1, 32, 32, 3]), [1, 2, 3])
        with self.assertRaisesRegex(
            ValueError, r"`seed` must be .* Received: dtype float32"
        ):
            data.random_crop_and_flip(tf.zeros([1, 32, 32, 3]), [1.0, 2.0])
        with self.assertRaisesRegex(
            ValueError, r"`padding` must be an int >= 0. Received: -1"
        ):
            data.random_crop_and_flip(
                tf.zeros([1, 32, 32, 3]), [1, 2], padding=-1
            )


if __name__ == "__main__":
    absltest.main()
