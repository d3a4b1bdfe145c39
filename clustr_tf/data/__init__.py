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
  original release (`releases`: CIFAR's python or binary tarballs or
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

The package is laid out by concept, one module each:

    base          dataset names, class names, splits, `DatasetInfo`, the errors, `Source`
    registry      one `Source` per dataset name; `info`, `class_names`, `load`, ...
    digits        the embedded digits
    listing       where an image folder is and what it holds (local folders, streamed archives)
    folders       the image-folder dataset: a split read, decoded and checked; its classes and stats
    releases      the original CIFAR and SVHN release files
    tfds_sources  CIFAR and SVHN: releases, folders, else tensorflow-datasets (`Mirror`)
    augment       the training-time crop and flip

A new kind of source is a module with its loaders and one `base.Source` entry in
`registry._SOURCES`.
"""

import tensorflow_datasets as tfds  # noqa: F401: `data.tfds` is the TFDS module the sources use

from clustr_tf.data import releases
from clustr_tf.data.augment import CROP_PADDING
from clustr_tf.data.augment import random_crop_and_flip
from clustr_tf.data.base import ALL_DATASETS
from clustr_tf.data.base import CLASS_NAMES
from clustr_tf.data.base import DATASETS
from clustr_tf.data.base import DTYPES
from clustr_tf.data.base import IMAGE_FOLDER
from clustr_tf.data.base import SPLITS
from clustr_tf.data.base import CorruptDatasetError
from clustr_tf.data.base import DatasetInfo
from clustr_tf.data.base import DatasetNotFoundError
from clustr_tf.data.digits import DIGITS_SPLIT_SEED
from clustr_tf.data.digits import DIGITS_TEST_FRACTION
from clustr_tf.data.registry import augmentation
from clustr_tf.data.registry import class_names
from clustr_tf.data.registry import info
from clustr_tf.data.registry import load
from clustr_tf.data.registry import load_arrays
from clustr_tf.data.registry import split_holdout
from clustr_tf.data.tfds_sources import Mirror
