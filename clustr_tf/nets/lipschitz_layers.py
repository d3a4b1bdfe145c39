"""Parameter-free layers that are 1-Lipschitz in l2: an activation, a downsampling, a pooling.

A network built only of these layers, the AOL layers of `clustr_tf.aol_layers` (the
convolution and dense layers, 1-Lipschitz whatever their weights) and norm-preserving
reshapes is 1-Lipschitz in l2, so `clustr_tf.lipschitz.model_bound` is exact by
construction and the ClusTR certificate `radius = feature_radius / L` is not diluted by a
loose product of layer norms (1e6 and more for a ResNet-18 with batch normalization).

- `MaxMin`: the GroupSort-2 activation: sorts pairs of channels.
- `SpaceToDepth`: the norm-preserving downsampling (a permutation of the entries).
- `ScaledGlobalAveragePooling2D`: `sqrt(H W)` times the global average.

Reference:
    Anil, Lucas & Grosse, "Sorting out Lipschitz function approximation", ICML 2019
    (GroupSort / MaxMin).
"""

import math
import numbers

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="clustr_tf")
class MaxMin(keras.layers.Layer):
    """The MaxMin (GroupSort-2) activation: `concat(max(a, b), min(a, b))`.

    The last axis is split into two halves `a` and `b` (channel `i` is paired with
    channel `i + C/2`); the output has the same shape.

    Lipschitz constant (l2): exactly 1. Each pair `(a_i, b_i)` is sorted, i.e. mapped to
    itself or to `(b_i, a_i)`: a permutation per pair. Sorting two pairs brings them
    closer or leaves their distance unchanged (`||sort(u) - sort(v)||^2 - ||u - v||^2 =
    2 (u_1 v_1 + u_2 v_2 - max(u) max(v) - min(u) min(v)) <= 0` by the rearrangement
    inequality), and squared distances add over pairs. It also preserves the norm.

    Call arguments:
        inputs: float tensor `[..., C]`, C even.

    Returns:
        Tensor of the same shape.

    Raises:
        ValueError: if the number of channels is odd or unknown.

    Example:

    >>> MaxMin()(np.array([[1.0, -2.0, 3.0, 0.0]], "float32")).numpy()
    array([[ 3.,  0.,  1., -2.]], dtype=float32)

    Reference:
        Anil, Lucas & Grosse, "Sorting out Lipschitz function approximation", ICML 2019.
    """

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None or channels % 2:
            raise ValueError(
                "`MaxMin` needs an even number of channels on the last axis. "
                f"Received input shape: {tuple(input_shape)}"
            )

    def call(self, inputs):
        a, b = ops.split(inputs, 2, axis=-1)
        return ops.concatenate([ops.maximum(a, b), ops.minimum(a, b)], axis=-1)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)


@keras.saving.register_keras_serializable(package="clustr_tf")
class SpaceToDepth(keras.layers.Layer):
    """Norm-preserving downsampling: each `b x b` block of pixels becomes channels.

    `[batch, H, W, C] -> [batch, H/b, W/b, b*b*C]`, with the channel order of
    `tf.nn.space_to_depth` (depth index `(dy * b + dx) * C + c`).

    Lipschitz constant (l2): exactly 1, and the map is an isometry: it only permutes the
    entries of the tensor.

    Args:
        block_size: int >= 2.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: tensor `[batch, H, W, C]`, H and W divisible by `block_size`.

    Returns:
        Tensor `[batch, H/b, W/b, b*b*C]`.

    Raises:
        ValueError: if `block_size` is invalid, or H or W is unknown or not divisible.

    Example:

    >>> SpaceToDepth(2)(np.zeros((1, 4, 6, 3), "float32")).shape
    TensorShape([1, 2, 3, 12])
    """

    def __init__(self, block_size=2, **kwargs):
        super().__init__(**kwargs)
        if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral) or block_size < 2:
            raise ValueError(f"`block_size` must be an integer >= 2. Received: {block_size!r}")
        self.block_size = int(block_size)

    def build(self, input_shape):
        b = self.block_size
        if len(input_shape) != 4 or any(d is None or d % b for d in input_shape[1:3]):
            raise ValueError(
                f"`SpaceToDepth` needs inputs [batch, H, W, C] with H and W divisible by "
                f"block_size={b}. Received input shape: {tuple(input_shape)}"
            )

    def call(self, inputs):
        b = self.block_size
        _, h, w, c = inputs.shape
        x = ops.reshape(inputs, (-1, h // b, b, w // b, b, c))
        x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
        return ops.reshape(x, (-1, h // b, w // b, b * b * c))

    def compute_output_shape(self, input_shape):
        b = self.block_size
        _, h, w, c = input_shape
        return (input_shape[0], h // b, w // b, b * b * c)

    def get_config(self):
        return {**super().get_config(), "block_size": self.block_size}


@keras.saving.register_keras_serializable(package="clustr_tf")
class ScaledGlobalAveragePooling2D(keras.layers.Layer):
    """Global average pooling times `sqrt(H W)`: `sum over pixels / sqrt(H W)`.

    Lipschitz constant (l2): exactly 1. Per channel it is the inner product with the
    unit vector `(1, ..., 1) / sqrt(H W)`, whose norm is 1; channels are independent.
    (Plain global average pooling has constant `1 / sqrt(H W)`: it is this layer divided
    by `sqrt(H W)`.) It keeps only the per-channel sums; `keras.layers.Flatten`, also
    norm-preserving, keeps every pixel and is what `lipschitz_convnet` uses by default.

    Call arguments:
        inputs: float tensor `[batch, H, W, C]` with known H and W.

    Returns:
        Tensor `[batch, C]`.

    Raises:
        ValueError: if the input is not 4-D with known H and W.

    Example:

    >>> ScaledGlobalAveragePooling2D()(np.ones((1, 2, 2, 3), "float32")).numpy()
    array([[2., 2., 2.]], dtype=float32)
    """

    def build(self, input_shape):
        if len(input_shape) != 4 or input_shape[1] is None or input_shape[2] is None:
            raise ValueError(
                "`ScaledGlobalAveragePooling2D` needs inputs [batch, H, W, C] with known H and W. "
                f"Received input shape: {tuple(input_shape)}"
            )

    def call(self, inputs):
        h, w = inputs.shape[1], inputs.shape[2]
        return ops.sum(inputs, axis=(1, 2)) * ops.cast(1.0 / math.sqrt(h * w), inputs.dtype)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])
