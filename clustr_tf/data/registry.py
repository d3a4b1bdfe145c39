"""The registry: one `base.Source` per dataset name, and the public functions that look a
dataset up and load it (`info`, `class_names`, `load`, `load_arrays`, `augmentation`)."""

import numpy as np
import tensorflow as tf  # noqa: F401: the doctests use it

from clustr_tf.data import augment
from clustr_tf.data import base
from clustr_tf.data import digits
from clustr_tf.data import folders
from clustr_tf.data import tfds_sources

_SOURCES = {
    "digits": digits.SOURCE,
    "cifar10": tfds_sources.source("cifar10", "cifar10", 10, (32, 32, 3), (0.4914, 0.4822, 0.4465),
                                   (0.2470, 0.2435, 0.2616)),
    "cifar100": tfds_sources.source("cifar100", "cifar100", 100, (32, 32, 3), (0.5071, 0.4865, 0.4409),
                                    (0.2673, 0.2564, 0.2762)),
    "svhn": tfds_sources.source("svhn", "svhn_cropped", 10, (32, 32, 3), (0.4377, 0.4438, 0.4728),
                                (0.1980, 0.2010, 0.1970)),
    base.IMAGE_FOLDER: folders.SOURCE,
}


def _source(name, split=None):
    """Looks up a dataset (and checks the split) or raises ValueError."""
    if not isinstance(name, str) or name not in _SOURCES:
        raise ValueError(
            f"Unknown dataset {name!r}. Expected one of: "
            f"{', '.join(base.ALL_DATASETS)}."
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




def info(name, data_dir=None):
    """Returns the `DatasetInfo` of a dataset.

    Args:
        name: one of `base.ALL_DATASETS`.
        data_dir: the image folder of `image_folder` (required there); ignored
            by the fixed datasets, whose `DatasetInfo` is a constant (CIFAR's
            and SVHN's published mean/std, whichever source the images come
            from).

    Returns:
        A frozen `DatasetInfo(name, num_classes, image_shape, mean, std)`. For
        `image_folder`: the number of class folders of the train split, the
        shape of its first image, and the exact per-channel mean/std of all
        its pixels in [0, 1] (population std). This reads and decodes the
        whole train split once.

    Raises:
        ValueError: if `name` is unknown, or (`image_folder`) `data_dir` is
            None or not a readable image folder.
        DatasetNotFoundError: if (`image_folder`) `data_dir` does not exist.

    Example:

    >>> info("digits").image_shape
    (8, 8, 1)
    """
    return _source(name).info(data_dir)


def class_names(name, data_dir=None):
    """Returns a dataset's class names in label order.

    Args:
        name: one of `base.ALL_DATASETS`.
        data_dir: the image folder of `image_folder` (required there; its
            train split is listed, no image is decoded); ignored otherwise.

    Returns:
        A tuple of `num_classes` strings: `CLASS_NAMES[name]` for the fixed
        datasets, the sorted class-folder names of the train split for
        `image_folder`.

    Raises:
        ValueError: if `name` is unknown, or (`image_folder`) `data_dir` is
            None or not a readable image folder.
        DatasetNotFoundError: if (`image_folder`) `data_dir` does not exist.

    Example:

    >>> class_names("cifar10")[:3]
    ('airplane', 'automobile', 'bird')
    """
    return tuple(_source(name).class_names(data_dir))


def load(name, split, data_dir=None, download=True, mirror=None):
    """Loads a dataset split as an unbatched `tf.data.Dataset`.

    The order of the examples is deterministic (no shuffling here). Images
    from an image folder are sorted by (label, file name), file names compared
    as strings, and are decoded (and every one checked) when `load` is called:
    the dataset then holds them in memory as uint8.

    Args:
        name: one of `base.ALL_DATASETS`.
        split: "train" or "test": the splits the training binary trains and
            evaluates on.
        data_dir: for `cifar10`, `cifar100` and `svhn`: an original release
            (`clustr_tf.data.releases`: CIFAR's python or binary tarball or its
            extracted folder, SVHN's .mat files; or a folder holding one), an
            image folder (a folder or `.tar`/`.tar.gz`/`.tgz` archive in
            split/class/image layout, class folders named as in
            `CLASS_NAMES`), else where TFDS datasets live (TFDS's default when
            None). Required by `image_folder`. Unused by `digits`, which ships
            with scikit-learn.
        download: whether a TFDS dataset missing from `data_dir` may be
            downloaded and prepared there. Unused by image folders.
        mirror: None (TFDS downloads from the publishers' sites), or a
            `Mirror` (or its URL) to download the original files from.

    Returns:
        A `tf.data.Dataset` of `(image, label)`: image float32 `[H, W, C]` in
        [0, 1], label int64 scalar.

    Raises:
        ValueError: if `name` or `split` is unknown; for image folders, if the
            split folder is missing or empty, a class folder has an unknown
            name, an image cannot be decoded or has another shape (the
            message names the file), or the layout is wrong.
        CorruptDatasetError (a ValueError): a file that exists but cannot be
            read (a truncated or corrupt archive, release or .mat file).
        DatasetNotFoundError: if the data is not in `data_dir` and cannot be
            downloaded, or `data_dir` names a missing archive.

    Example:

    >>> ds = load("digits", "train")
    >>> ds.element_spec[0].shape
    TensorShape([8, 8, 1])
    """
    return _source(name, split).load_dataset(split, data_dir, download, mirror=mirror)


def load_arrays(name, split, data_dir=None, download=True, dtype="float32", mirror=None):
    """Loads a dataset split into memory as numpy arrays.

    Same examples, in the same order, as `load(name, split, data_dir)`.

    Args:
        name: one of `base.ALL_DATASETS`.
        split: "train" or "test".
        data_dir: as in `load`.
        download: whether a TFDS dataset missing from `data_dir` may be
            downloaded and prepared there.
        dtype: "float32" (default): pixels in [0, 1]; or "uint8": the raw
            pixels in [0, 255] of an 8-bit dataset (every dataset but
            `digits`), a quarter of the memory; `image / 255` gives the
            float32 pixels exactly. `np.float32`/`np.uint8` are accepted too.
        mirror: as in `load`.

    Returns:
        `(images, labels)`: images `[N, H, W, C]` (float32 in [0, 1] or uint8
        in [0, 255]) and labels int64 `[N]`.

    Raises:
        ValueError: as in `load`; and if `dtype` is neither float32 nor uint8,
            or is uint8 for `digits` (whose pixels are 0..16 / 16, not 8-bit).
        DatasetNotFoundError: as in `load`.

    Example:

    >>> images, labels = load_arrays("digits", "test")
    >>> images.shape, labels.shape
    ((360, 8, 8, 1), (360,))
    """
    source = _source(name, split)
    dtype = base.check_dtype(dtype)
    if dtype == "uint8" and not source.eight_bit:
        raise ValueError(
            f"`dtype='uint8'` needs 8-bit images, but dataset '{name}' has "
            "pixels 0..16 / 16. Use dtype='float32'. Received: dtype='uint8'"
        )
    return source.load_arrays(split, data_dir, download, dtype, mirror=mirror)


def augmentation(name):
    """Returns a dataset's training-time augmentation, or None.

    The official ClusTR code augments CIFAR only: `cifar10` and `cifar100`
    get `random_crop_and_flip` (zero-pad 4, random crop, random horizontal
    flip), and so does `image_folder` (the same recipe, whatever the image
    size: 4 pixels of padding); `digits` and `svhn` get None (no
    augmentation; a flipped digit is another symbol).

    Args:
        name: one of `ALL_DATASETS`.

    Returns:
        None, or `augment(images, seed) -> images`: images float32
        `[B, H, W, C]` in [0, 1], seed int `[2]` (stateless), applied per
        image, deterministic for a given seed, usable inside `tf.data` and
        `tf.function`.

    Raises:
        ValueError: if `name` is unknown.

    Example:

    >>> augmentation("cifar10")(tf.zeros([2, 32, 32, 3]), [0, 1]).shape
    TensorShape([2, 32, 32, 3])
    >>> augmentation("svhn") is None
    True
    """
    if not _source(name).augment:
        return None
    return augment.random_crop_and_flip


HOLDOUT_SEED = 20211122  # one fixed choice of held-out examples, whatever a run's --seed


def split_holdout(labels, examples):
    """Splits a training set into what a run trains on and `examples` held-out examples.

    The held-out examples are a fixed seeded choice (`HOLDOUT_SEED`): every run with the
    same `examples` holds out the same ones, so hyperparameters can be tuned on them
    instead of on the test split (`--holdout_examples`, benchmarks/certified.py's sweep).

    Args:
        labels: int array [N].
        examples: int in [0, N): how many to hold out.

    Returns:
        `(train, holdout)`: sorted int64 index arrays.
    """
    n = len(labels)
    if isinstance(examples, bool) or not isinstance(examples, (int, np.integer)) or not 0 <= examples < n:
        raise ValueError(f"`holdout_examples` must be an int in [0, {n}) (the training examples). "
                         f"Received: {examples!r}")
    order = np.random.default_rng(HOLDOUT_SEED).permutation(n)
    return np.sort(order[examples:]), np.sort(order[:examples])
