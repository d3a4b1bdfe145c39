"""Datasets: images in [0, 1] with integer labels, as tf.data or numpy.

Every dataset the training binary accepts is loaded here, with the split the
binary trains ("train") and evaluates ("test") on:

- `digits`: scikit-learn's handwritten digits (1,797 real 8x8 grey images,
  10 classes), shipped inside scikit-learn, so nothing is downloaded. It has no
  official split: a fixed, seeded, stratified 80/20 split gives 1,437 training
  and 360 test images.
- `cifar10`, `cifar100`, `svhn`: through tensorflow-datasets (`svhn` is TFDS's
  `svhn_cropped`), downloaded from the publishers or from a `Mirror`. When the
  data is neither in `data_dir` nor downloadable a `DatasetNotFoundError` says
  so and how to point `--data_dir` at it. When `data_dir` is (or holds) an
  original release (`clustr_tf.releases`: CIFAR's python or binary tarballs or
  their extracted folders, SVHN's .mat files) or an image folder (below), the
  images are read from it instead, offline; image-folder classes are named as
  in `CLASS_NAMES`.
- `image_folder`: a user's own images in an image folder; `data_dir` is
  required. Classes are the sorted class-folder names of the train split,
  the image shape is the first training image's, and `info`'s mean/std are
  computed exactly from the train split's pixels (not defaults).

An image folder is a local folder or a `.tar`/`.tar.gz`/`.tgz` archive laid out
as `<split>/<class>/<image>` (e.g. `train/airplane/0001.jpg`), optionally under
one top-level folder (`cifar10-jpeg/train/airplane/0001.jpg`). Images are
JPEG, PNG, GIF or BMP files that all have the same size; hidden entries (names
starting with ".") and `__MACOSX` folders are skipped. Archives are streamed,
never extracted.

`load` gives an unbatched `tf.data.Dataset` of `(image, label)`; `load_arrays`
gives the same examples, in the same order, as numpy arrays (the in-memory
form the neighbourhood sampler needs), float32 in [0, 1] or raw uint8. `info`
gives the number of classes, the image shape and the per-channel mean/std used
by the backbones' Normalization layer. `augmentation` gives the training-time
augmentation of a dataset (random crop and flip for CIFAR, as the official
ClusTR code does), or None.

A new kind of source is added by writing its loader functions and one
`_Source` entry in `_SOURCES`.
"""

import dataclasses
import difflib
import os
import posixpath
import re
import shutil
import tarfile
import types
import urllib.parse
import urllib.request
import zlib

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from clustr_tf import releases

# The fixed datasets (also the names the training binary's table lists).
DATASETS = ("digits", "cifar10", "cifar100", "svhn")
# The generic dataset read from a user's image folder (`data_dir` required).
IMAGE_FOLDER = "image_folder"
ALL_DATASETS = DATASETS + (IMAGE_FOLDER,)
SPLITS = ("train", "test")
# Pixel dtypes `load_arrays` can return.
DTYPES = ("float32", "uint8")

# Seeded, stratified split of scikit-learn's digits.
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0

# Zero padding of the random crop (PyTorch `RandomCrop(32, padding=4)`).
CROP_PADDING = 4

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

_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tbz2", ".tar.xz")
_DECODE_BATCH = 1024


class DatasetNotFoundError(RuntimeError):
    """Raised when a dataset is neither on disk nor downloadable."""


# A file that exists but cannot be read (a ValueError; the message names the file).
CorruptDatasetError = releases.CorruptDatasetError


@dataclasses.dataclass(frozen=True)
class Mirror:
    """Where TFDS downloads a dataset's original files from, instead of their publishers.

    Each file TFDS's builder asks for (e.g. `cifar-10-binary.tar.gz`) is fetched from
    `url + "/" + its file name` by TFDS's own downloader, then verified (size and sha256)
    against TFDS's registered checksum of the original file, extracted and prepared by
    TFDS as usual: a mirror cannot serve other data.

    Attributes:
        url: the mirror's base URL (http, https or ftp).
        checksums: optional `{file name: (size in bytes, sha256 hex digest)}` for files
            TFDS has no checksum for (your own builds of the files, tests); they replace
            the registered ones for those names.
    """

    url: str
    checksums: dict | None = None


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
class _Source:
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


def _check_dtype(dtype):
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


def _from_uint8(images, dtype):
    """uint8 `[N, H, W, C]` -> the requested dtype (float32 in [0, 1])."""
    if dtype == "uint8":
        return np.asarray(images, np.uint8)
    result = np.asarray(images).astype(np.float32)
    result /= np.float32(255.0)  # In place: no second float32 copy.
    return result


def _to_unit_float(image, label):
    """uint8 image in [0, 255] -> float32 in [0, 1]; label -> int64."""
    return tf.cast(image, tf.float32) / 255.0, tf.cast(label, tf.int64)


# --------------------------------------------------------------------------
# digits: embedded in scikit-learn.
# --------------------------------------------------------------------------


def _digits_arrays(split, data_dir=None, download=True, dtype="float32", mirror=None):
    """Digits split as numpy arrays; `data_dir`, `download` and `mirror` are unused."""
    del data_dir, download, mirror  # The data ships with scikit-learn.
    del dtype  # Only float32: `load_arrays` rejects uint8 for digits.
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


def _digits_dataset(split, data_dir=None, download=True, mirror=None):
    images, labels = _digits_arrays(split, data_dir, download)
    return tf.data.Dataset.from_tensor_slices((images, labels))


# --------------------------------------------------------------------------
# Image folders: a local folder or archive laid out as split/class/image.
# --------------------------------------------------------------------------


@dataclasses.dataclass
class _Listing:
    """The contents of an image folder, as far as they were read.

    Attributes:
        where: how messages name the folder or archive.
        splits: split -> class -> file name -> source: a file path (folder),
            the file's bytes (archive, the split that was read) or None
            (archive, other splits).
        display: `(split, class, file name or None) -> str` naming an entry.
        first_train: `(class, file name, source)` of the first training image
            in (class, file name) order, or None.
    """

    where: str
    splits: dict
    display: object
    first_train: object = None


def _some(names, limit=12):
    """Joins names for a message, at most `limit` of them."""
    names = list(names)
    if not names:
        return "none"
    shown = ", ".join(str(n) for n in names[:limit])
    if len(names) > limit:
        shown += f", ... ({len(names) - limit} more)"
    return shown


def _hidden(name):
    return name.startswith(".") or name == "__MACOSX"


def _has_split_folder(path):
    return any(os.path.isdir(os.path.join(path, s)) for s in SPLITS)


def _locate_image_folder(data_dir):
    """Finds an image folder at `data_dir`.

    Returns:
        `("archive", path)`, `("folder", root)` with `root` the folder that
        holds the split folders, or None when `data_dir` is not an image
        folder (e.g. a TFDS data_dir).

    Raises:
        DatasetNotFoundError: if `data_dir` names an archive that is missing.
        ValueError: if `data_dir` is a file but not an archive.
    """
    if data_dir is None:
        return None
    try:
        path = os.fspath(data_dir)
    except TypeError:
        raise ValueError(
            f"`data_dir` must be a path. Received: {data_dir!r}"
        ) from None
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if os.path.isdir(path):
        if _has_split_folder(path):
            return ("folder", path)
        subfolders = [
            e.path
            for e in os.scandir(path)
            if e.is_dir() and not _hidden(e.name)
        ]
        if len(subfolders) == 1 and _has_split_folder(subfolders[0]):
            return ("folder", subfolders[0])
        return None
    if path.lower().endswith(_ARCHIVE_SUFFIXES):
        if not os.path.isfile(path):
            raise DatasetNotFoundError(
                f"The archive {path} could not be found: no such file. Pass "
                "--data_dir=PATH (data_dir=PATH in Python) naming an existing "
                "folder or .tar/.tar.gz/.tgz archive in split/class/image "
                "layout."
            )
        return ("archive", path)
    if os.path.exists(path):
        raise ValueError(
            f"`data_dir` {path} is a file, but not a .tar, .tar.gz or .tgz "
            "archive. Expected a folder or an archive laid out as "
            "<split>/<class>/<image>."
        )
    return None


def _layout_error(where, what):
    return ValueError(
        f"{what} in {where}: expected the layout <split>/<class>/<image> "
        "(e.g. train/airplane/0001.jpg), optionally under one top-level folder."
    )


def _list_folder(root, needed_splits):
    """Lists the splits of a local image folder (nothing is read)."""

    def display(split, cls=None, fname=None):
        return os.path.join(root, *[p for p in (split, cls, fname) if p])

    splits = {}
    for split in SPLITS:
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            continue
        splits[split] = {}
        if split not in needed_splits:
            continue
        for entry in os.scandir(split_dir):
            if _hidden(entry.name):
                continue
            if not entry.is_dir():
                raise _layout_error(
                    root, f"{entry.path} is a file directly in a split folder"
                )
            files = {}
            for item in os.scandir(entry.path):
                if _hidden(item.name):
                    continue
                if item.is_dir():
                    raise _layout_error(
                        root, f"{item.path} is a folder inside a class folder"
                    )
                files[item.name] = item.path
            splits[split][entry.name] = files
    listing = _Listing(where=root, splits=splits, display=display)
    train = splits.get("train", {})
    keys = [(c, f) for c, files in train.items() for f in files]
    if keys:
        cls, fname = min(keys)
        listing.first_train = (cls, fname, train[cls][fname])
    return listing


def _list_archive(path, read_split):
    """Streams an archive once; keeps the bytes of `read_split`'s images."""
    splits = {}
    roots = set()  # Top-level folders that hold split folders ("" = none).
    first_train = None

    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                parts = [
                    p for p in member.name.split("/") if p not in ("", ".")
                ]
                if not parts or any(_hidden(p) for p in parts):
                    continue
                if parts[0] in SPLITS:
                    roots.add("")
                    rel = parts
                elif len(parts) > 1 and parts[1] in SPLITS:
                    roots.add(parts[0])
                    rel = parts[1:]
                else:
                    continue  # Outside the split folders (README, "extra").
                split = rel[0]
                classes = splits.setdefault(split, {})
                if member.isdir():
                    if len(rel) == 2:
                        classes.setdefault(rel[1], {})
                    continue
                if len(rel) != 3:
                    what = (
                        "is a file directly in a split folder"
                        if len(rel) == 2
                        else "is nested inside a class folder"
                    )
                    raise _layout_error(path, f"Member {member.name} {what}")
                if not member.isfile():
                    raise ValueError(
                        f"Member {member.name} of {path} is a link or special "
                        "file; archives must hold the images as regular files."
                    )
                cls, fname = rel[1], rel[2]
                source = None
                if split == read_split:
                    source = tar.extractfile(member).read()
                if split == "train" and (
                    first_train is None or (cls, fname) < first_train[:2]
                ):
                    if source is None:
                        source = tar.extractfile(member).read()
                    first_train = (cls, fname, source)
                    if split != read_split:
                        source = None
                classes.setdefault(cls, {})[fname] = source
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise CorruptDatasetError(
            f"Could not read the archive {path} ({type(e).__name__}: {e}). "
            "Expected a .tar, .tar.gz or .tgz archive."
        ) from e
    if len(roots) > 1:
        raise _layout_error(
            path,
            "Split folders under several top-level folders ("
            + ", ".join(
                repr(r) if r else "the archive's top" for r in sorted(roots)
            )
            + ")",
        )
    root = next(iter(roots)) if roots else ""

    def display(split, cls=None, fname=None):
        inner = "/".join(p for p in (root, split, cls, fname) if p)
        return f"{path} (member {inner})"

    return _Listing(
        where=path, splits=splits, display=display, first_train=first_train
    )


def _list_image_folder(location, split, need_train):
    kind, path = location
    if kind == "archive":
        return _list_archive(path, split)
    return _list_folder(path, {split, "train"} if need_train else {split})


def _decode_one(source, from_file):
    contents = tf.io.read_file(source) if from_file else source
    return tf.io.decode_image(contents, expand_animations=False)


def _decode_error(display, source, from_file):
    """Decodes one image eagerly to report why it cannot be read."""
    try:
        _decode_one(source, from_file)
        reason = "it could not be read"
    except (tf.errors.OpError, ValueError) as e:
        message = re.sub(r"\{\{[^}]*\}\}\s*", "", str(getattr(e, "message", e)))
        reason = f"{type(e).__name__}: {message.split(' [Op:')[0]}"
    return ValueError(
        f"Could not read the image {display}: expected a JPEG, PNG, GIF or "
        f"BMP file ({reason.strip()})."
    )


def _decode_images(sources, displays, shape, from_file):
    """Decodes images into a uint8 `[N, *shape]` array, checking every one.

    Args:
        sources: N file paths (`from_file`) or N encoded images (bytes).
        displays: N strings naming the images in error messages.
        shape: `(height, width, channels)` every image must have.
        from_file: whether `sources` are paths.

    Returns:
        uint8 numpy array `[N, height, width, channels]`.

    Raises:
        ValueError: naming the first image that cannot be decoded or that
            has another shape.
    """
    n = len(sources)
    images = np.empty((n, *shape), np.uint8)
    if n == 0:
        return images
    expected = tf.constant(shape, tf.int32)

    def decode(index, source):
        image = _decode_one(source, from_file)
        found = tf.shape(image, out_type=tf.int32)
        ok = tf.reduce_all(tf.equal(found, expected))
        image = tf.cond(
            ok,
            lambda: tf.reshape(image, shape),
            lambda: tf.zeros(shape, tf.uint8),
        )
        return index, image, found

    ds = (
        tf.data.Dataset.from_tensor_slices(sources)
        .enumerate()
        .map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .ignore_errors()  # Unreadable files are found (and named) below.
        .batch(_DECODE_BATCH)
        .prefetch(2)
    )
    decoded = np.zeros(n, bool)
    shapes = np.zeros((n, 3), np.int64)
    for index, batch, found in ds.as_numpy_iterator():
        images[index] = batch
        shapes[index] = found
        decoded[index] = True
    unreadable = np.flatnonzero(~decoded)
    if unreadable.size:
        i = unreadable[0]
        error = _decode_error(displays[i], sources[i], from_file)
        if unreadable.size > 1:
            error = ValueError(
                f"{error} ({unreadable.size - 1} more unreadable.)"
            )
        raise error
    wrong = np.flatnonzero(np.any(shapes != np.asarray(shape), axis=1))
    if wrong.size:
        i = wrong[0]
        more = f" ({wrong.size - 1} more.)" if wrong.size > 1 else ""
        raise ValueError(
            f"The image {displays[i]} has shape (height, width, channels) = "
            f"{tuple(int(s) for s in shapes[i])}; every image of this dataset "
            f"must have shape {tuple(shape)}.{more}"
        )
    return images


def _image_folder_classes(listing, name):
    """Class names of the generic image folder: the train split's folders."""
    train = listing.splits.get("train")
    if train is None:
        raise ValueError(
            f"The image folder {listing.where} has no 'train' split folder, "
            f"which defines the classes of dataset '{name}'. Found split "
            f"folders: {_some(sorted(listing.splits))}."
        )
    classes = tuple(sorted(train))
    if not classes:
        raise ValueError(
            f"The train split folder {listing.display('train')} holds no class "
            "folders."
        )
    empty = [c for c in classes if not train[c]]
    if empty:
        raise ValueError(
            f"The class folder {listing.display('train', empty[0])} holds no "
            "images."
        )
    return classes


def _first_image_shape(listing, from_file):
    cls, fname, source = listing.first_train
    display = listing.display("train", cls, fname)
    try:
        image = _decode_one(source, from_file)
    except (tf.errors.OpError, ValueError):
        raise _decode_error(display, source, from_file) from None
    return tuple(int(s) for s in image.shape)


def _read_image_folder(name, location, split, class_names, image_shape):
    """Reads one split of an image folder.

    Args:
        name: the dataset's name, for messages.
        location: from `_locate_image_folder`.
        split: "train" or "test".
        class_names: class names in label order, or None for the sorted
            class folders of the train split.
        image_shape: `(height, width, channels)`, or None for the shape of the
            first training image.

    Returns:
        `(images, labels, class_names, image_shape)`: uint8
        `[N, H, W, C]`, int64 `[N]`, a tuple of str, a tuple of 3 ints.
    """
    from_file = location[0] == "folder"
    listing = _list_image_folder(
        location, split, need_train=class_names is None or image_shape is None
    )
    if split not in listing.splits:
        raise ValueError(
            f"The image folder {listing.where} has no '{split}' split folder "
            f"for dataset '{name}'. Found split folders: "
            f"{_some(sorted(listing.splits))}."
        )
    if class_names is None:
        class_names = _image_folder_classes(listing, name)
    if image_shape is None:
        image_shape = _first_image_shape(listing, from_file)
    labels_of = {c: i for i, c in enumerate(class_names)}
    classes = listing.splits[split]
    unknown = sorted(set(classes) - set(labels_of))
    if unknown:
        close = difflib.get_close_matches(unknown[0], class_names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        expected = _some(class_names, limit=20)
        if len(class_names) > 20 and name in CLASS_NAMES:
            expected += f" (all in clustr_tf.data.CLASS_NAMES['{name}'])"
        raise ValueError(
            f"Unknown class folder {listing.display(split, unknown[0])} for "
            f"dataset '{name}': {unknown[0]!r} is not a class name.{hint} "
            f"Found class folders: {_some(sorted(classes))}. Expected names "
            f"among: {expected}."
        )
    entries = sorted(
        (labels_of[c], fname, source)
        for c, files in classes.items()
        for fname, source in files.items()
    )
    if not entries:
        raise ValueError(
            f"The split folder {listing.display(split)} of dataset '{name}' "
            "holds no images."
        )
    displays = [
        listing.display(split, class_names[l], f) for l, f, _ in entries
    ]
    sources = [s for _, _, s in entries]
    labels = np.fromiter((l for l, _, _ in entries), np.int64, len(entries))
    del entries, listing  # Drop the encoded bytes as soon as possible.
    images = _decode_images(sources, displays, image_shape, from_file)
    return images, labels, tuple(class_names), tuple(image_shape)


def _mean_std(images):
    """Per-channel mean/std in [0, 1] of uint8 `[N, H, W, C]`, exactly."""
    values = np.arange(256, dtype=np.float64) / 255.0
    mean, std = [], []
    for c in range(images.shape[-1]):
        counts = np.bincount(images[..., c].ravel(), minlength=256)
        counts = counts.astype(np.float64) / counts.sum()
        m = float(counts @ values)
        mean.append(m)
        std.append(float(np.sqrt(counts @ (values - m) ** 2)))
    return tuple(mean), tuple(std)


def _require_image_folder(data_dir):
    if data_dir is None:
        raise ValueError(
            f"Dataset '{IMAGE_FOLDER}' needs `data_dir` (--data_dir): a folder "
            "or .tar/.tar.gz/.tgz archive laid out as <split>/<class>/<image>."
            " Received: data_dir=None"
        )
    location = _locate_image_folder(data_dir)
    if location is None:
        path = os.fspath(data_dir)
        if not os.path.exists(path):
            raise DatasetNotFoundError(
                f"Dataset '{IMAGE_FOLDER}' could not be found: {path} does not "
                "exist. Pass --data_dir=PATH (data_dir=PATH in Python) naming "
                "a folder or .tar/.tar.gz/.tgz archive in split/class/image "
                "layout."
            )
        found = sorted(e for e in os.listdir(path) if not _hidden(e))
        raise _layout_error(
            path,
            "No 'train' or 'test' split folder (directly or under one "
            f"sub-folder); found: {_some(found)}",
        )
    return location


def _image_folder_arrays(split, data_dir=None, download=True, dtype="float32", mirror=None):
    del download, mirror  # Nothing to download.
    location = _require_image_folder(data_dir)
    images, labels, _, _ = _read_image_folder(
        IMAGE_FOLDER, location, split, None, None
    )
    return _from_uint8(images, dtype), labels


def _image_folder_dataset(split, data_dir=None, download=True, mirror=None):
    images, labels = _image_folder_arrays(split, data_dir, download, "uint8")
    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    return ds.map(_to_unit_float, num_parallel_calls=tf.data.AUTOTUNE)


def _image_folder_info(data_dir):
    location = _require_image_folder(data_dir)
    images, _, classes, shape = _read_image_folder(
        IMAGE_FOLDER, location, "train", None, None
    )
    mean, std = _mean_std(images)
    return DatasetInfo(IMAGE_FOLDER, len(classes), shape, mean, std)


def _image_folder_class_names(data_dir):
    location = _require_image_folder(data_dir)
    listing = _list_image_folder(location, None, need_train=True)
    return _image_folder_classes(listing, IMAGE_FOLDER)


# --------------------------------------------------------------------------
# tensorflow-datasets (or an image folder with the canonical class names).
# --------------------------------------------------------------------------


def _one_line(error, limit=400):
    """`Type: message` of an exception on one line (TFDS's messages span several)."""
    text = " ".join(str(error).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _as_mirror(mirror):
    if mirror is None or isinstance(mirror, Mirror):
        return mirror
    if isinstance(mirror, str) and mirror:
        return Mirror(mirror)
    raise ValueError(f"`mirror` must be a URL or a `Mirror`. Received: {mirror!r}")


def _file_name(url):
    return posixpath.basename(urllib.parse.urlparse(url).path)


class _MirroredDownloads:
    """The download manager a builder's `_split_generators` sees: the same TFDS
    `DownloadManager`, with every URL replaced by the mirror's copy of its file."""

    def __init__(self, manager, rewrite):
        self._manager = manager
        self._rewrite = rewrite

    def __getattr__(self, name):
        return getattr(self._manager, name)

    def _urls(self, tree):
        if isinstance(tree, str):
            return self._rewrite(tree)
        if isinstance(tree, dict):
            return {k: self._urls(v) for k, v in tree.items()}
        if isinstance(tree, (list, tuple)):
            return type(tree)(self._urls(v) for v in tree)
        return tree  # a tfds.download.Resource or a path: left as it is

    def download(self, url_or_urls):
        return self._manager.download(self._urls(url_or_urls))

    def download_and_extract(self, url_or_urls):
        return self._manager.download_and_extract(self._urls(url_or_urls))


def _mirrored_builder(tfds_name, data_dir, mirror):
    """A TFDS builder of `tfds_name` (same name, version and data folder) whose files come
    from `mirror`, each checked against the registered checksum of its original."""
    from tensorflow_datasets.core.download import checksums as tfds_checksums

    base = tfds.builder_cls(tfds_name)
    root = mirror.url.rstrip("/")

    def rewrite(url):
        return f"{root}/{_file_name(url)}"

    registered = dict(base.url_infos or {})
    infos = {rewrite(url): info for url, info in registered.items()}
    for name, (size, sha256) in (mirror.checksums or {}).items():
        infos[f"{root}/{name}"] = tfds_checksums.UrlInfo(size=int(size), checksum=str(sha256), filename=name)

    class MirroredBuilder(base, skip_registration=True):
        name = base.name
        url_infos = infos

        def _split_generators(self, dl_manager, *args, **kwargs):
            return super()._split_generators(_MirroredDownloads(dl_manager, rewrite), *args, **kwargs)

    return MirroredBuilder(data_dir=data_dir), sorted(infos)


def _check_mirror(urls, timeout=10):
    """Fails fast, with the URL, when the mirror does not serve a file (TFDS's downloader
    retries a refused connection for minutes)."""
    for url in urls:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
                pass
        except (OSError, ValueError) as e:  # URLError and HTTPError are OSErrors
            raise OSError(f"the mirror does not serve {url} ({_one_line(e)})") from None


def _tfds_builder(name, tfds_name, data_dir, download, mirror=None):
    """Returns a prepared TFDS builder or raises `DatasetNotFoundError`."""
    mirror = _as_mirror(mirror)
    where = data_dir if data_dir is not None else "the default TFDS data_dir"
    hint = (
        f"Pass --data_dir=DIR (data_dir=DIR in Python) where DIR holds the "
        f"prepared TFDS dataset '{tfds_name}' (e.g. made with "
        f"`tfds build {tfds_name} --data_dir=DIR` on a machine with network "
        "access), the original release files, or the images in split/class/image "
        "layout (a folder or a .tar.gz), or allow the download."
    )
    try:
        if mirror is None:
            builder, urls = tfds.builder(tfds_name, data_dir=data_dir), []
        else:
            builder, urls = _mirrored_builder(tfds_name, data_dir, mirror)
        if builder.is_prepared():
            return builder
    except Exception as e:  # TFDS raises assorted errors for bad folders.
        raise DatasetNotFoundError(
            f"Dataset '{name}' could not be found or downloaded: reading "
            f"{where} failed ({_one_line(e)}). {hint}"
        ) from e
    if not download:
        raise DatasetNotFoundError(
            f"Dataset '{name}' could not be found or downloaded: it is not "
            f"in {where} and downloading is disabled. {hint}"
        )
    root = getattr(builder, "data_dir_root", None)
    downloads = os.path.join(os.fspath(root), "downloads") if root is not None else None
    before = set(os.listdir(downloads)) if downloads and os.path.isdir(downloads) else set()
    source = f" from {mirror.url}" if mirror else ""
    try:
        if mirror is not None:
            _check_mirror(urls)
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(force_checksums_validation=True))
        else:
            builder.download_and_prepare()
    except Exception as e:  # Network, disk and checksum errors alike.
        # TFDS writes the dataset into an "incomplete" folder it renames when done, so
        # nothing here looks prepared; the download's temporary files of this attempt go.
        if downloads and os.path.isdir(downloads):
            for entry in set(os.listdir(downloads)) - before:
                if ".tmp." in entry:
                    shutil.rmtree(os.path.join(downloads, entry), ignore_errors=True)
        raise DatasetNotFoundError(
            f"Dataset '{name}' could not be found or downloaded: it is not "
            f"in {where} and the download{source} failed ({_one_line(e)}). "
            f"{hint}"
        ) from e
    return builder


def _make_tfds_loaders(name, tfds_name, image_shape):
    """Returns the `(load_dataset, load_arrays)` pair of a TFDS dataset."""

    def local_arrays(data_dir, split):
        """The split from an original release or an image folder at `data_dir`, or None."""
        release = releases.find(name, data_dir)
        if release is not None:
            return releases.read(release, split)
        location = _locate_image_folder(data_dir)
        if location is not None:
            images, labels, _, _ = _read_image_folder(
                name, location, split, CLASS_NAMES[name], image_shape
            )
            return images, labels
        return None

    def load_dataset(split, data_dir=None, download=True, mirror=None):
        arrays = local_arrays(data_dir, split)
        if arrays is not None:
            ds = tf.data.Dataset.from_tensor_slices(arrays)
        else:
            builder = _tfds_builder(name, tfds_name, data_dir, download, mirror)
            ds = builder.as_dataset(
                split=split, as_supervised=True, shuffle_files=False
            )
        return ds.map(_to_unit_float, num_parallel_calls=tf.data.AUTOTUNE)

    def load_arrays(split, data_dir=None, download=True, dtype="float32", mirror=None):
        arrays = local_arrays(data_dir, split)
        if arrays is not None:
            images, labels = arrays
        else:
            builder = _tfds_builder(name, tfds_name, data_dir, download, mirror)
            images, labels = tfds.as_numpy(
                builder.as_dataset(
                    split=split, as_supervised=True, batch_size=-1
                )
            )
        return _from_uint8(images, dtype), np.asarray(labels).astype(np.int64)

    return load_dataset, load_arrays


def _tfds_source(name, tfds_name, num_classes, image_shape, mean, std):
    load_dataset, load_arrays = _make_tfds_loaders(name, tfds_name, image_shape)
    info = DatasetInfo(name, num_classes, image_shape, mean, std)
    return _Source(
        info=lambda data_dir: info,
        class_names=lambda data_dir: CLASS_NAMES[name],
        splits=SPLITS,
        load_dataset=load_dataset,
        load_arrays=load_arrays,
        eight_bit=True,
        augment=name.startswith("cifar"),
    )


# --------------------------------------------------------------------------
# Registry.
# --------------------------------------------------------------------------

# Mean/std of the 1,437 training images, all pixels (computed once with
# `load_arrays("digits", "train")`; checked in tests/test_data.py).
_DIGITS_INFO = DatasetInfo("digits", 10, (8, 8, 1), (0.3054,), (0.3761,))

_SOURCES = {
    "digits": _Source(
        info=lambda data_dir: _DIGITS_INFO,
        class_names=lambda data_dir: CLASS_NAMES["digits"],
        splits=SPLITS,
        load_dataset=_digits_dataset,
        load_arrays=_digits_arrays,
        eight_bit=False,  # Pixels are 0..16 / 16.
        augment=False,
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
    IMAGE_FOLDER: _Source(
        info=_image_folder_info,
        class_names=_image_folder_class_names,
        splits=SPLITS,
        load_dataset=_image_folder_dataset,
        load_arrays=_image_folder_arrays,
        eight_bit=True,
        augment=True,
    ),
}


def _source(name, split=None):
    """Looks up a dataset (and checks the split) or raises ValueError."""
    if not isinstance(name, str) or name not in _SOURCES:
        raise ValueError(
            f"Unknown dataset {name!r}. Expected one of: "
            f"{', '.join(ALL_DATASETS)}."
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


# --------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------


def info(name, data_dir=None):
    """Returns the `DatasetInfo` of a dataset.

    Args:
        name: one of `ALL_DATASETS`.
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
        name: one of `ALL_DATASETS`.
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
        name: one of `ALL_DATASETS`.
        split: "train" or "test": the splits the training binary trains and
            evaluates on.
        data_dir: for `cifar10`, `cifar100` and `svhn`: an original release
            (`clustr_tf.releases`: CIFAR's python or binary tarball or its
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
        name: one of `ALL_DATASETS`.
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
    dtype = _check_dtype(dtype)
    if dtype == "uint8" and not source.eight_bit:
        raise ValueError(
            f"`dtype='uint8'` needs 8-bit images, but dataset '{name}' has "
            "pixels 0..16 / 16. Use dtype='float32'. Received: dtype='uint8'"
        )
    return source.load_arrays(split, data_dir, download, dtype, mirror=mirror)


def random_crop_and_flip(images, seed, padding=CROP_PADDING):
    """Randomly crops and flips each image of a batch (the CIFAR recipe).

    Per image, as PyTorch's `RandomCrop(H, padding=4)` followed by
    `RandomHorizontalFlip()`: zero-pad `padding` pixels on each side, crop an
    `H x W` window at a uniformly drawn offset in `[0, 2 * padding]` along each
    axis (so the image shifts by up to `padding` pixels and zeros come in from
    the border), then mirror it left-right with probability 0.5. Stateless and
    vectorised (one gather per axis, no loop over images): the same `seed`
    gives the same output, in eager mode, `tf.function` and `tf.data` alike.

    Args:
        images: float32 `[B, H, W, C]`, pixels in [0, 1] (any dtype works: the
            pixels are only moved).
        seed: int32 or int64 `[2]`, the stateless random seed (e.g. from
            `tf.data.Dataset.random` or `tf.random.split`).
        padding: non-negative Python int, the zero padding of the crop.

    Returns:
        `[B, H, W, C]`, same dtype as `images`.

    Raises:
        ValueError: if `images` is not a batch of rank 4, `seed` is not an
            integer `[2]` tensor, or `padding` is not a non-negative int.

    Example:

    >>> batch = tf.random.uniform([8, 32, 32, 3])
    >>> random_crop_and_flip(batch, seed=[1, 2]).shape
    TensorShape([8, 32, 32, 3])
    """
    if isinstance(padding, bool) or not isinstance(padding, (int, np.integer)):
        raise ValueError(
            f"`padding` must be an int >= 0. Received: {padding!r}"
        )
    if padding < 0:
        raise ValueError(f"`padding` must be an int >= 0. Received: {padding}")
    images = tf.convert_to_tensor(images)
    if images.shape.rank is not None and images.shape.rank != 4:
        raise ValueError(
            "`images` must be a batch [B, H, W, C]. Received shape: "
            f"{images.shape}"
        )
    seed = tf.convert_to_tensor(seed)
    if not seed.dtype.is_integer or (
        seed.shape.rank is not None
        and seed.shape.as_list() not in ([2], [None])
    ):
        raise ValueError(
            "`seed` must be an int32/int64 tensor of shape [2]. Received: "
            f"dtype {seed.dtype.name}, shape {seed.shape}"
        )
    shape = tf.shape(images)
    batch, height, width = shape[0], shape[1], shape[2]
    crop_seed, flip_seed = tf.unstack(tf.random.split(seed, num=2))
    offsets = tf.random.stateless_uniform(
        [batch, 2], crop_seed, minval=0, maxval=2 * padding + 1, dtype=tf.int32
    )
    flip = tf.random.stateless_uniform([batch], flip_seed) < 0.5
    padded = tf.pad(
        images, [[0, 0], [padding, padding], [padding, padding], [0, 0]]
    )
    # Row i of the crop is row offsets[b, 0] + i of the padded image; a flip
    # reverses the order of the columns taken.
    rows = offsets[:, :1] + tf.range(height)[tf.newaxis, :]
    cols = offsets[:, 1:] + tf.range(width)[tf.newaxis, :]
    cols = tf.where(flip[:, tf.newaxis], tf.reverse(cols, axis=[1]), cols)
    cropped = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(cropped, cols, axis=2, batch_dims=1)


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
    return random_crop_and_flip
