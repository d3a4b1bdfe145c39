"""`digits`: scikit-learn's handwritten digits (1,797 real 8x8 grey images, 10 classes),
shipped inside scikit-learn, so nothing is downloaded. It has no official split: a fixed,
seeded, stratified 80/20 split gives 1,437 training and 360 test images."""

import numpy as np
import tensorflow as tf

from clustr_tf.data import base

# Seeded, stratified split of scikit-learn's digits.
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0

# Mean/std of the 1,437 training images, all pixels (computed once with
# `load_arrays("digits", "train")`; checked in tests/data/test_data.py).
INFO = base.DatasetInfo("digits", 10, (8, 8, 1), (0.3054,), (0.3761,))


def load_arrays(split, data_dir=None, download=True, dtype="float32", mirror=None):
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


def load_dataset(split, data_dir=None, download=True, mirror=None):
    images, labels = load_arrays(split, data_dir, download)
    return tf.data.Dataset.from_tensor_slices((images, labels))


# --------------------------------------------------------------------------


SOURCE = base.Source(
    info=lambda data_dir: INFO,
    class_names=lambda data_dir: base.CLASS_NAMES["digits"],
    splits=base.SPLITS,
    load_dataset=load_dataset,
    load_arrays=load_arrays,
    eight_bit=False,  # Pixels are 0..16 / 16.
    augment=False,
)
