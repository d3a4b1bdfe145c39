"""The image-folder dataset: one split of an image folder read into arrays (every image
decoded and checked: JPEG, PNG, GIF or BMP, all of one size), its classes and statistics,
and the `base.Source` of dataset `image_folder`.

`image_folder` is a user's own images (classes: the sorted class folders of the train
split; mean/std computed exactly from its pixels); a fixed dataset (CIFAR, SVHN) may be an
image folder too, its class folders named as in `base.CLASS_NAMES` (`read`). Where the
folder is and what it holds is `listing`'s: a local folder or a streamed archive laid out
as `<split>/<class>/<image>`.
"""

import difflib
import os
import re
import time

import numpy as np
import tensorflow as tf
from absl import logging

from clustr_tf.data import base
from clustr_tf.data import listing as listing_lib

_DECODE_BATCH = 1024


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
    last = time.time()
    for index, batch, found in ds.as_numpy_iterator():
        images[index] = batch
        shapes[index] = found
        decoded[index] = True
        if time.time() - last >= 10:  # a long decoding says how far it is, at least every 10 s
            logging.info("Decoded %d of %d images", int(decoded.sum()), n)
            last = time.time()
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
            f"folders: {listing_lib.some_names(sorted(listing.splits))}."
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


def read(name, location, split, class_names, image_shape):
    """Reads one split of an image folder.

    Args:
        name: the dataset's name, for messages.
        location: from `locate`.
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
    listing = listing_lib.list_image_folder(
        location, split, need_train=class_names is None or image_shape is None
    )
    if split not in listing.splits:
        raise ValueError(
            f"The image folder {listing.where} has no '{split}' split folder "
            f"for dataset '{name}'. Found split folders: "
            f"{listing_lib.some_names(sorted(listing.splits))}."
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
        expected = listing_lib.some_names(class_names, limit=20)
        if len(class_names) > 20 and name in base.CLASS_NAMES:
            expected += f" (all in clustr_tf.data.CLASS_NAMES['{name}'])"
        raise ValueError(
            f"Unknown class folder {listing.display(split, unknown[0])} for "
            f"dataset '{name}': {unknown[0]!r} is not a class name.{hint} "
            f"Found class folders: {listing_lib.some_names(sorted(classes))}. Expected names "
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
    start = time.time()
    logging.info("%s: decoding the %d images of the %s split", name, len(sources), split)
    images = _decode_images(sources, displays, image_shape, from_file)
    logging.info("%s: %s split decoded in %.0f s", name, split, time.time() - start)
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
            f"Dataset '{base.IMAGE_FOLDER}' needs `data_dir` (--data_dir): a folder "
            "or .tar/.tar.gz/.tgz archive laid out as <split>/<class>/<image>."
            " Received: data_dir=None"
        )
    location = listing_lib.locate(data_dir)
    if location is None:
        path = os.fspath(data_dir)
        if not os.path.exists(path):
            raise base.DatasetNotFoundError(
                f"Dataset '{base.IMAGE_FOLDER}' could not be found: {path} does not "
                "exist. Pass --data_dir=PATH (data_dir=PATH in Python) naming "
                "a folder or .tar/.tar.gz/.tgz archive in split/class/image "
                "layout."
            )
        found = sorted(e for e in os.listdir(path) if not listing_lib.is_hidden(e))
        raise listing_lib.layout_error(
            path,
            "No 'train' or 'test' split folder (directly or under one "
            f"sub-folder); found: {listing_lib.some_names(found)}",
        )
    return location


def load_arrays(split, data_dir=None, download=True, dtype="float32", mirror=None):
    del download, mirror  # Nothing to download.
    location = _require_image_folder(data_dir)
    images, labels, _, _ = read(
        base.IMAGE_FOLDER, location, split, None, None
    )
    return base.from_uint8(images, dtype), labels


def load_dataset(split, data_dir=None, download=True, mirror=None):
    images, labels = load_arrays(split, data_dir, download, "uint8")
    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    return ds.map(base.to_unit_float, num_parallel_calls=tf.data.AUTOTUNE)


def folder_info(data_dir):
    location = _require_image_folder(data_dir)
    images, _, classes, shape = read(
        base.IMAGE_FOLDER, location, "train", None, None
    )
    mean, std = _mean_std(images)
    return base.DatasetInfo(base.IMAGE_FOLDER, len(classes), shape, mean, std)


def folder_class_names(data_dir):
    location = _require_image_folder(data_dir)
    listing = listing_lib.list_image_folder(location, None, need_train=True)
    return _image_folder_classes(listing, base.IMAGE_FOLDER)


SOURCE = base.Source(
    info=folder_info,
    class_names=folder_class_names,
    splits=base.SPLITS,
    load_dataset=load_dataset,
    load_arrays=load_arrays,
    eight_bit=True,
    augment=True,
)
