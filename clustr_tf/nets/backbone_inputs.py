"""What every backbone takes: an image shape and the data's per-channel mean and std.

A backbone maps images in pixel space [0, 1] to features; its first layer after the input
is a `keras.layers.Normalization` that holds the dataset's per-channel mean and variance,
so that attacks, certificates and serving all work on pixels. This module checks the
arguments the builders of `clustr_tf.backbones` share (`input_shape`, `mean`, `std`,
`width_multiplier`) and builds that first layer.
"""

import math
import numbers

import keras

DEFAULT_MEAN = 0.5
DEFAULT_STD = 0.25


def check_input_shape(input_shape):
    """`input_shape` as a tuple (H, W, C) of positive ints, or ValueError."""
    try:
        shape = tuple(input_shape)
    except TypeError:
        raise ValueError(
            "`input_shape` must be a tuple (height, width, channels). "
            f"Received: {input_shape!r}"
        ) from None
    if len(shape) != 3 or not all(
        isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 1
        for d in shape
    ):
        raise ValueError(
            "`input_shape` must be a tuple of 3 positive integers "
            f"(height, width, channels). Received: {input_shape!r}"
        )
    return tuple(int(d) for d in shape)


def _per_channel(values, default, channels, arg_name, positive):
    """Returns `values` as a list of `channels` Python floats.

    A scalar, or a sequence of length 1, is broadcast to every channel.
    """
    if values is None:
        values = default
    try:
        seq = [float(v) for v in values]
    except TypeError:
        try:
            seq = [float(values)]
        except (TypeError, ValueError):
            raise ValueError(
                f"`{arg_name}` must be a number or a sequence of numbers. "
                f"Received: {values!r}"
            ) from None
    except ValueError:
        raise ValueError(
            f"`{arg_name}` must be a number or a sequence of numbers. "
            f"Received: {values!r}"
        ) from None
    if len(seq) == 1:
        seq = seq * channels
    if len(seq) != channels:
        raise ValueError(
            f"`{arg_name}` must have 1 or {channels} (number of channels) "
            f"values. Received: {values!r}"
        )
    if not all(math.isfinite(v) for v in seq):
        raise ValueError(f"`{arg_name}` must be finite. Received: {values!r}")
    if positive and not all(v > 0 for v in seq):
        raise ValueError(f"`{arg_name}` must be > 0. Received: {values!r}")
    return seq


def normalization(inputs, mean, std, default_std=DEFAULT_STD):
    """Applies (x - mean) / std per channel with a Normalization layer named "normalization".

    Args:
        inputs: symbolic tensor `[batch, H, W, C]`, the images in [0, 1].
        mean: per-channel mean of the data in [0, 1]: a float or a sequence of 1 or C
            floats; None for `DEFAULT_MEAN`.
        std: per-channel standard deviation, > 0, same forms as `mean`; None for
            `default_std`.
        default_std: the std when `std` is None (1.0: mean subtraction only).

    Returns:
        The normalized symbolic tensor, same shape.

    Raises:
        ValueError: if `mean` or `std` is invalid.
    """
    channels = inputs.shape[-1]
    mean = _per_channel(mean, DEFAULT_MEAN, channels, "mean", positive=False)
    std = _per_channel(std, default_std, channels, "std", positive=True)
    return keras.layers.Normalization(
        mean=mean, variance=[s * s for s in std], name="normalization"
    )(inputs)


def check_width_multiplier(width_multiplier):
    """Raises ValueError unless `width_multiplier` is a finite number > 0."""
    if (
        isinstance(width_multiplier, bool)
        or not isinstance(width_multiplier, numbers.Real)
        or not math.isfinite(width_multiplier)
        or width_multiplier <= 0
    ):
        raise ValueError(
            "`width_multiplier` must be a finite number > 0. "
            f"Received: {width_multiplier!r}"
        )
