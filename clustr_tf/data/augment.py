"""Training-time augmentation: the official ClusTR recipe for CIFAR (zero-pad 4, random
crop, random horizontal flip), seeded and stateless, usable inside tf.data and tf.function.
`registry.augmentation(name)` says which datasets get it."""

import numpy as np
import tensorflow as tf

# Zero padding of the random crop (PyTorch `RandomCrop(32, padding=4)`).
CROP_PADDING = 4


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
