"""What every dataset source shares: the dataset names, class names and splits, the
`DatasetInfo` of a dataset, the errors, a source's description (`Source`) and the pixel
conversions."""

import dataclasses
import types

import numpy as np
import tensorflow as tf

from clustr_tf.data import releases

# The fixed datasets (also the names the training binary's table lists).
DATASETS = ("digits", "cifar10", "cifar100", "svhn")
# The generic dataset read from a user's image folder (`data_dir` required).
IMAGE_FOLDER = "image_folder"
ALL_DATASETS = DATASETS + (IMAGE_FOLDER,)
SPLITS = ("train", "test")
# Pixel dtypes `load_arrays` can return.
DTYPES = ("float32", "uint8")

# Class names in label order. In an image folder, a fixed dataset's class
# folders must carry these names. CIFAR-10's and CIFAR-100's are TFDS's (for
# CIFAR-100, the fine labels, which are in alphabetical order); SVHN's are the
# digits (TFDS's `svhn_cropped` maps the digit 0 to label 0).
# fmt: off
CLASS_NAMES = types.MappingProxyType(
    {
        "digits": tuple(str(i) for i in range(10)),
        "cifar10": (
            "airplane", "automobile", "bird", "cat", "deer",
            "dog", "frog", "horse", "ship", "truck",
        ),
        "cifar100": (
            "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee",
            "beetle", "bicycle", "bottle", "bowl", "boy", "bridge", "bus",
            "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
            "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
            "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant",
            "flatfish", "forest", "fox", "girl", "hamster", "house",
            "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
            "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
            "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter",
            "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate",
            "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
            "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk",
            "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar",
            "sunflower", "sweet_pepper", "table", "tank", "telephone",
            "television", "tiger", "tractor", "train", "trout", "tulip",
            "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman",
            "worm",
        ),
        "svhn": tuple(str(i) for i in range(10)),
    }
)
# fmt: on


class DatasetNotFoundError(RuntimeError):
    """Raised when a dataset is neither on disk nor downloadable."""


# A file that exists but cannot be read (a ValueError; the message names the file).
CorruptDatasetError = releases.CorruptDatasetError


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset.

    Attributes:
        name: the dataset's name, one of `ALL_DATASETS`.
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
class Source:
    """How to load one dataset.

    Attributes:
        info: `data_dir -> DatasetInfo`.
        class_names: `data_dir -> tuple` of class names in label order.
        splits: the split names it accepts.
        load_dataset: `(split, data_dir, download) -> tf.data.Dataset` of
            `(image float32 [H, W, C] in [0, 1], label int64)`.
        load_arrays: `(split, data_dir, download, dtype) -> (images, labels)`,
            numpy `[N, H, W, C]` float32 in [0, 1] or uint8 in [0, 255], and
            int64 `[N]`.
        eight_bit: whether the pixels are 8-bit (so `dtype="uint8"` works).
        augment: whether `augmentation` gives random crop + flip.
    """

    info: object
    class_names: object
    splits: tuple
    load_dataset: object
    load_arrays: object
    eight_bit: bool
    augment: bool


def check_dtype(dtype):
    """Returns "float32" or "uint8" for `dtype` or raises ValueError."""
    if isinstance(dtype, tf.dtypes.DType):
        dtype = dtype.as_numpy_dtype
    try:
        canonical = np.dtype(dtype).name
    except TypeError:
        canonical = None
    if canonical not in DTYPES:
        raise ValueError(
            f"`dtype` must be one of {', '.join(DTYPES)}. Received: {dtype!r}"
        )
    return canonical


def from_uint8(images, dtype):
    """uint8 `[N, H, W, C]` -> the requested dtype (float32 in [0, 1])."""
    if dtype == "uint8":
        return np.asarray(images, np.uint8)
    result = np.asarray(images).astype(np.float32)
    result /= np.float32(255.0)  # In place: no second float32 copy.
    return result


def to_unit_float(image, label):
    """uint8 image in [0, 255] -> float32 in [0, 1]; label -> int64."""
    return tf.cast(image, tf.float32) / 255.0, tf.cast(label, tf.int64)
