"""Datasets: images in [0, 1] with integer labels, as tf.data or numpy.

Every dataset the training binary accepts is loaded here, with the split the
binary trains ("train") and evaluates ("test") on:

- `digits`: scikit-learn's handwritten digits (1,797 real 8x8 grey images,
  10 classes), shipped inside scikit-learn, so nothing is downloaded. It has no
  official split: a fixed, seeded, stratified 80/20 split gives 1,437 training
  and 360 test images.
- `cifar10`, `cifar100`, `svhn`: through tensorflow-datasets (`svhn` is TFDS's
  `svhn_cropped`). When the data is neither in `data_dir` nor downloadable a
  `DatasetNotFoundError` says so and how to point `--data_dir` at it.

`load` gives an unbatched `tf.data.Dataset` of `(image, label)`; `load_arrays`
gives the same examples, in the same order, as numpy arrays (the in-memory
form the neighbourhood sampler needs). `info` gives the number of classes, the
image shape and the per-channel mean/std used by the backbones' Normalization
layer.

A new kind of source (e.g. an image folder or a .tar.gz) is added by writing
its two loader functions and one `_Source` entry in `_SOURCES`.
"""

import dataclasses

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

DATASETS = ("digits", "cifar10", "cifar100", "svhn")
SPLITS = ("train", "test")

# Seeded, stratified split of scikit-learn's digits.
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


class DatasetNotFoundError(RuntimeError):
    """Raised when a dataset is neither on disk nor downloadable."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset.

    Attributes:
        name: the dataset's name, one of `DATASETS`.
        num_classes: number of classes; labels are in `[0, num_classes)`.
        image_shape: `(height, width, channels)` of every image.
        mean: per-channel mean of the training images in [0, 1], a tuple of
            `channels` floats.
        std: per-channel standard deviation of the training images, a tuple of
            `channels` floats.
    """

    name: str
    num_classes: int
    image_shape: tuple
    mean: tuple
    std: tuple


@dataclasses.dataclass(frozen=True)
class _Source:
    """How to load one dataset.

    Attributes:
        info: its `DatasetInfo`.
        splits: the split names it accepts.
        load_dataset: `(split, data_dir, download) -> tf.data.Dataset` of
            `(image float32 [H, W, C] in [0, 1], label int64)`.
        load_arrays: `(split, data_dir, download) -> (images, labels)`, numpy
            float32 `[N, H, W, C]` in [0, 1] and int64 `[N]`.
    """

    info: DatasetInfo
    splits: tuple
    load_dataset: object
    load_arrays: object


# --------------------------------------------------------------------------
# digits: embedded in scikit-learn.
# --------------------------------------------------------------------------


def _digits_arrays(split, data_dir=None, download=True):
    """Digits split as numpy arrays; `data_dir` and `download` are unused."""
    del data_dir, download  # The data ships with scikit-learn.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(labels.shape[0]),
        test_size=DIGITS_TEST_FRACTION,
        random_state=DIGITS_SPLIT_SEED,
        stratify=labels,
    )
    # Keep scikit-learn's original order inside each split.
    idx = np.sort(train_idx if split == "train" else test_idx)
    images = (digits.images[idx] / 16.0).astype(np.float32)[..., np.newaxis]
    return images, labels[idx]


def _digits_dataset(split, data_dir=None, download=True):
    images, labels = _digits_arrays(split, data_dir, download)
    return tf.data.Dataset.from_tensor_slices((images, labels))


# --------------------------------------------------------------------------
# tensorflow-datasets.
# --------------------------------------------------------------------------


def _tfds_builder(name, tfds_name, data_dir, download):
    """Returns a prepared TFDS builder or raises `DatasetNotFoundError`."""
    where = data_dir if data_dir is not None else "the default TFDS data_dir"
    hint = (
        f"Pass --data_dir=DIR (data_dir=DIR in Python) where DIR holds the "
        f"prepared TFDS dataset '{tfds_name}' (e.g. made with "
        f"`tfds build {tfds_name} --data_dir=DIR` on a machine with network "
        "access), or allow the download."
    )
    try:
        builder = tfds.builder(tfds_name, data_dir=data_dir)
        if builder.is_prepared():
            return builder
    except Exception as e:  # TFDS raises assorted errors for bad folders.
        raise DatasetNotFoundError(
            f"Dataset '{name}' could not be found or downloaded: reading "
            f"{where} failed ({type(e).__name__}: {e}). {hint}"
        ) from e
    if not download:
        raise DatasetNotFoundError(
            f"Dataset '{name}' could not be found or downloaded: it is not "
            f"in {where} and downloading is disabled. {hint}"
        )
    try:
        builder.download_and_prepare()
    except Exception as e:  # Network, disk and checksum errors alike.
        raise DatasetNotFoundError(
            f"Dataset '{name}' could not be found or downloaded: it is not "
            f"in {where} and the download failed ({type(e).__name__}: {e}). "
            f"{hint}"
        ) from e
    return builder


def _to_unit_float(image, label):
    """uint8 image in [0, 255] -> float32 in [0, 1]; label -> int64."""
    return tf.cast(image, tf.float32) / 255.0, tf.cast(label, tf.int64)


def _make_tfds_loaders(name, tfds_name):
    """Returns the `(load_dataset, load_arrays)` pair of a TFDS dataset."""

    def load_dataset(split, data_dir=None, download=True):
        builder = _tfds_builder(name, tfds_name, data_dir, download)
        ds = builder.as_dataset(
            split=split, as_supervised=True, shuffle_files=False
        )
        return ds.map(_to_unit_float, num_parallel_calls=tf.data.AUTOTUNE)

    def load_arrays(split, data_dir=None, download=True):
        builder = _tfds_builder(name, tfds_name, data_dir, download)
        images, labels = tfds.as_numpy(
            builder.as_dataset(split=split, as_supervised=True, batch_size=-1)
        )
        images = np.asarray(images).astype(np.float32) / np.float32(255.0)
        return images, np.asarray(labels).astype(np.int64)

    return load_dataset, load_arrays


def _tfds_source(name, tfds_name, num_classes, image_shape, mean, std):
    load_dataset, load_arrays = _make_tfds_loaders(name, tfds_name)
    return _Source(
        info=DatasetInfo(name, num_classes, image_shape, mean, std),
        splits=SPLITS,
        load_dataset=load_dataset,
        load_arrays=load_arrays,
    )


# --------------------------------------------------------------------------
# Registry.
# --------------------------------------------------------------------------

_SOURCES = {
    # Mean/std of the 1,437 training images, all pixels (computed once with
    # `load_arrays("digits", "train")`; checked in tests/test_data.py).
    "digits": _Source(
        info=DatasetInfo("digits", 10, (8, 8, 1), (0.3054,), (0.3761,)),
        splits=SPLITS,
        load_dataset=_digits_dataset,
        load_arrays=_digits_arrays,
    ),
    "cifar10": _tfds_source(
        "cifar10",
        "cifar10",
        10,
        (32, 32, 3),
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
    ),
    "cifar100": _tfds_source(
        "cifar100",
        "cifar100",
        100,
        (32, 32, 3),
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
    ),
    "svhn": _tfds_source(
        "svhn",
        "svhn_cropped",
        10,
        (32, 32, 3),
        (0.4377, 0.4438, 0.4728),
        (0.1980, 0.2010, 0.1970),
    ),
}


def _source(name, split=None):
    """Looks up a dataset (and checks the split) or raises ValueError."""
    if not isinstance(name, str) or name not in _SOURCES:
        raise ValueError(
            f"Unknown dataset {name!r}. Expected one of: {', '.join(DATASETS)}."
        )
    source = _SOURCES[name]
    if split is not None and (
        not isinstance(split, str) or split not in source.splits
    ):
        raise ValueError(
            f"Unknown split {split!r} for dataset '{name}'. Expected one of: "
            f"{', '.join(source.splits)}."
        )
    return source


def info(name):
    """Returns the `DatasetInfo` of a dataset.

    Args:
        name: one of `DATASETS`.

    Returns:
        A frozen `DatasetInfo(name, num_classes, image_shape, mean, std)`.

    Raises:
        ValueError: if `name` is unknown.

    Example:

    >>> info("digits").image_shape
    (8, 8, 1)
    """
    return _source(name).info


def load(name, split, data_dir=None, download=True):
    """Loads a dataset split as an unbatched `tf.data.Dataset`.

    The order of the examples is deterministic (no shuffling here).

    Args:
        name: one of `DATASETS`.
        split: "train" or "test": the splits the training binary trains and
            evaluates on.
        data_dir: where TFDS datasets live (TFDS's default when None). Unused
            by `digits`, which ships with scikit-learn.
        download: whether a TFDS dataset missing from `data_dir` may be
            downloaded and prepared there.

    Returns:
        A `tf.data.Dataset` of `(image, label)`: image float32 `[H, W, C]` in
        [0, 1], label int64 scalar.

    Raises:
        ValueError: if `name` or `split` is unknown.
        DatasetNotFoundError: if the data is not in `data_dir` and cannot be
            downloaded.

    Example:

    >>> ds = load("digits", "train")
    >>> ds.element_spec[0].shape
    TensorShape([8, 8, 1])
    """
    return _source(name, split).load_dataset(split, data_dir, download)


def load_arrays(name, split, data_dir=None, download=True):
    """Loads a dataset split into memory as numpy arrays.

    Same examples, in the same order, as `load(name, split, data_dir)`.

    Args:
        name: one of `DATASETS`.
        split: "train" or "test".
        data_dir: where TFDS datasets live (TFDS's default when None). Unused
            by `digits`.
        download: whether a TFDS dataset missing from `data_dir` may be
            downloaded and prepared there.

    Returns:
        `(images, labels)`: images float32 `[N, H, W, C]` in [0, 1] and labels
        int64 `[N]`.

    Raises:
        ValueError: if `name` or `split` is unknown.
        DatasetNotFoundError: if the data is not in `data_dir` and cannot be
            downloaded.

    Example:

    >>> images, labels = load_arrays("digits", "test")
    >>> images.shape, labels.shape
    ((360, 8, 8, 1), (360,))
    """
    return _source(name, split).load_arrays(split, data_dir, download)
