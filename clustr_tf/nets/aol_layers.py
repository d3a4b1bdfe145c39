"""Almost-orthogonal (AOL) layers: convolution and dense layers 1-Lipschitz in l2 by construction.

AOL (Prach & Lampert, ECCV 2022) rescales the kernel per input channel, from the kernel
itself on every call, with no iteration: `K' = K diag(d)`, `d_i = (sum_j |K^T K|_ij)^(-1/2)`.
Then `K'^T K'` is dominated by the identity (`D M D <= D diag(row sums of |M|) D <= I` for
the symmetric `M = K^T K`, Gershgorin/Schur test), so `||K'||_2 <= 1` whatever the weights.
When a layer has more inputs than outputs it rescales the output side instead
(`||K'|| = ||K'^T||`).

- `aol_conv_scale`, `aol_conv_kernel`, `aol_dense_kernel`: the rescaling, as functions.
- `AOLConv2D`, `AOLDense`: the layers, which rescale their kernel on every call.
- `DeltaOrthogonal`: an initializer that makes an `AOLConv2D` an isometry at init.

With the parameter-free layers of `clustr_tf.lipschitz_layers` (`MaxMin`, `SpaceToDepth`,
`ScaledGlobalAveragePooling2D`) they build networks that are 1-Lipschitz by construction
(`clustr_tf.backbones.lipschitz_convnet`).

The bounds hold in exact arithmetic. The rescaling is computed in float32 from the
float32 variable; under a mixed policy (`mixed_bfloat16`, `mixed_float16`) the rescaled
kernel and the activations are then rounded to the compute dtype, which can exceed the
bound by about the unit roundoff per layer (2^-8 for bfloat16): certify in float32.

Reference:
    - Prach & Lampert, "Almost-Orthogonal Layers for Efficient General-Purpose Lipschitz
      Networks", ECCV 2022, arXiv:2208.03160.
    - Xiao et al., "Dynamical Isometry and a Mean Field Theory of CNNs", ICML 2018
      (delta-orthogonal initialization).
"""

import math
import numbers

import keras
from keras import ops

from clustr_tf import checks

# Added to the AOL row sums before the inverse square root: d_i = (s_i + eps)^(-1/2) is
# smaller than s_i^(-1/2), so the bound stays sound (the rescaled kernel's norm is at most
# max_i sqrt(s_i / (s_i + eps)) < 1), and a zero input channel (s_i = 0) gets a finite
# scale instead of inf * 0 = NaN.
_AOL_EPSILON = 1e-6


def _pair(value, arg_name):
    """`value` as a (int, int) tuple of positive ints."""
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or not all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in pair
    ):
        raise ValueError(
            f"`{arg_name}` must be a positive int or a tuple of 2 positive ints. Received: {value!r}"
        )
    return tuple(int(v) for v in pair)


def _epsilon(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
        math.isfinite(value) and value > 0
    ):
        raise ValueError(f"`epsilon` must be a finite number > 0. Received: {value!r}")
    return float(value)


def aol_conv_scale(kernel, epsilon=_AOL_EPSILON):
    """The AOL per-input-channel scale `d` of a convolution kernel.

    `d_i = (sum_j sum_shifts |(K^T K)_ij(shift)| + epsilon)^(-1/2)`, where
    `(K^T K)_ij(s) = sum_o sum_p K[p, i, o] K[p + s, j, o]` is the kernel correlated
    with itself over every spatial shift `s` (the Gram operator `P^T P` of the
    convolution `P` is the convolution with this kernel). Computed as one convolution
    of the kernel with itself.

    Args:
        kernel: float tensor `[kh, kw, c_in, c_out]`.
        epsilon: float > 0 added to the row sums (it can only shrink `d`).

    Returns:
        float tensor `[c_in]`, in the kernel's dtype.
    """
    kh, kw = kernel.shape[0], kernel.shape[1]
    # Batch = input channel i, spatial = kernel taps, channels = output channels o.
    images = ops.transpose(kernel, (2, 0, 1, 3))  # [c_in, kh, kw, c_out]
    images = ops.pad(images, [[0, 0], [kh - 1, kh - 1], [kw - 1, kw - 1], [0, 0]])
    filters = ops.transpose(kernel, (0, 1, 3, 2))  # [kh, kw, c_out, c_in]
    gram = ops.conv(images, filters, padding="valid")  # [c_in, 2kh-1, 2kw-1, c_in]
    return ops.rsqrt(ops.sum(ops.abs(gram), axis=(1, 2, 3)) + epsilon)


def aol_conv_kernel(kernel, epsilon=_AOL_EPSILON):
    """The AOL-rescaled convolution kernel, whose 'same' convolution is 1-Lipschitz.

    With `c_in <= c_out` the input channels are rescaled, `K diag(d)` with `d` from
    `aol_conv_scale(K)` (the paper's form). With `c_in > c_out` the output channels are
    rescaled instead, by the scale of the transposed convolution (`aol_conv_scale` of `K`
    with its channel axes swapped): `||D' P|| = ||P^T D'|| <= 1` by the same theorem
    applied to `P^T`. Rescaling the smaller side costs less (its Gram matrix is smaller)
    and is tight for a kernel with orthonormal rows or columns: a projection such as a
    channel-reducing orthogonal kernel keeps scale 1, where the larger side would shrink.

    Args:
        kernel: float tensor `[kh, kw, c_in, c_out]`.
        epsilon: float > 0 added to the row sums (it can only shrink the scale).

    Returns:
        float tensor of the kernel's shape and dtype.
    """
    if kernel.shape[2] <= kernel.shape[3]:
        return kernel * ops.reshape(aol_conv_scale(kernel, epsilon), (1, 1, -1, 1))
    scale = aol_conv_scale(ops.transpose(kernel, (0, 1, 3, 2)), epsilon)
    return kernel * ops.reshape(scale, (1, 1, 1, -1))


def aol_dense_kernel(kernel, epsilon=_AOL_EPSILON):
    """The AOL-rescaled dense kernel `W [in, out]` (`y = x W`), of norm at most 1.

    With `in <= out`: `diag(d) W` with `d_i = (sum_j |(W W^T)_ij| + epsilon)^(-1/2)` (the
    paper's `P D` with `P = W^T`); with `in > out`: `W diag(d')` with
    `d'_o = (sum_o' |(W^T W)_oo'| + epsilon)^(-1/2)` (the smaller side, see
    `aol_conv_kernel`).

    Args:
        kernel: float tensor `[in, out]`.
        epsilon: float > 0 added to the row sums (it can only shrink the scale).

    Returns:
        float tensor of the kernel's shape and dtype.
    """
    if kernel.shape[0] <= kernel.shape[1]:
        gram = ops.matmul(kernel, ops.transpose(kernel))
        return kernel * ops.rsqrt(ops.sum(ops.abs(gram), axis=1, keepdims=True) + epsilon)
    gram = ops.matmul(ops.transpose(kernel), kernel)
    return kernel * ops.reshape(ops.rsqrt(ops.sum(ops.abs(gram), axis=1) + epsilon), (1, -1))


@keras.saving.register_keras_serializable(package="clustr_tf")
class DeltaOrthogonal(keras.initializers.Initializer):
    """Delta-orthogonal initializer for `[kh, kw, c_in, c_out]` convolution kernels.

    The centre tap is a random (semi-)orthogonal `[c_in, c_out]` matrix and every other
    tap is zero, so the convolution is an orthogonal map per pixel. With `c_in <= c_out`
    its AOL scale is 1 and an `AOLConv2D` starts as an isometry; deep stacks of such
    layers and `MaxMin` then neither shrink nor blow up the signal.

    Args:
        seed: int or None, the seed of the orthogonal matrix.

    Reference:
        Xiao et al., "Dynamical Isometry and a Mean Field Theory of CNNs", ICML 2018.
    """

    def __init__(self, seed=None):
        self.seed = seed
        self._orthogonal = keras.initializers.Orthogonal(seed=seed)

    def __call__(self, shape, dtype=None):
        if len(shape) != 4:
            raise ValueError(
                f"`DeltaOrthogonal` initializes 4-D kernels [kh, kw, c_in, c_out]. Received shape: {shape}"
            )
        kh, kw, cin, cout = shape
        centre = ops.reshape(self._orthogonal((cin, cout), dtype=dtype), (1, 1, cin, cout))
        ch, cw = (kh - 1) // 2, (kw - 1) // 2
        return ops.pad(centre, [[ch, kh - 1 - ch], [cw, kw - 1 - cw], [0, 0], [0, 0]])

    def get_config(self):
        return {"seed": self.seed}


class _AOLBase(keras.layers.Layer):
    """Shared code: the input check, the weights, the kernel's rescaling in float32.

    A subclass passes its rescaling (`rescale(kernel, epsilon)`, e.g. `aol_dense_kernel`),
    the rank of its inputs and how to read them (for the error message), and defines
    `_kernel_shape(input_channels)`.
    """

    def __init__(self, rescale, input_rank, expects, use_bias, kernel_initializer, bias_initializer, epsilon,
                 **kwargs):
        # The rescaling must read the float32 variable, not a copy autocast to bfloat16:
        # the layer casts the inputs and the rescaled kernel itself.
        kwargs.pop("autocast", None)
        super().__init__(autocast=False, **kwargs)
        if not isinstance(use_bias, bool):
            raise ValueError(f"`use_bias` must be a bool. Received: {use_bias!r}")
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.epsilon = _epsilon(epsilon)
        self._rescale = rescale
        self._input_rank = input_rank
        self._expects = expects

    def build(self, input_shape):
        if len(input_shape) != self._input_rank or input_shape[-1] is None:
            raise ValueError(
                f"`{type(self).__name__}` expects inputs {self._expects}. Received input shape: {tuple(input_shape)}"
            )
        kernel_shape = self._kernel_shape(int(input_shape[-1]))
        self.kernel = self.add_weight(
            name="kernel", shape=kernel_shape, initializer=self.kernel_initializer, dtype=self.variable_dtype
        )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias", shape=kernel_shape[-1:], initializer=self.bias_initializer, dtype=self.variable_dtype
            )

    def rescaled_kernel(self):
        """The rescaled, 1-Lipschitz kernel that the layer applies, in float32."""
        return self._rescale(ops.cast(self.kernel, "float32"), self.epsilon)

    def _bias(self, outputs):
        if self.bias is None:
            return outputs
        return outputs + ops.cast(self.bias, self.compute_dtype)

    def get_config(self):
        return {
            **super().get_config(),
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            "epsilon": self.epsilon,
        }


@keras.saving.register_keras_serializable(package="clustr_tf")
class AOLConv2D(_AOLBase):
    """A 2-D convolution that is 1-Lipschitz in l2 by construction (AOL).

    On every call the kernel `K [kh, kw, c_in, c_out]` is rescaled per input channel by
    `d_i = (sum_j sum_shifts |(K^T K)_ij(shift)| + epsilon)^(-1/2)` (see
    `aol_conv_scale`) and the convolution uses `K diag(d)` (stride 1, 'same' zero
    padding, channels_last). When `c_in > c_out` the output channels are rescaled
    instead, from `K K^T` (see `aol_conv_kernel`): cheaper, and tight for orthogonal
    kernels.

    Lipschitz constant (l2): at most 1, for any kernel and any input size. The
    convolution on the infinite grid is a linear operator `P` whose Gram operator
    `P^T P` is the convolution with `K^T K`; each of its rows has absolute sum
    `d_i^-2 - epsilon` (the same at every pixel), so `D P^T P D <= D diag(row sums) D
    <= I` (Gershgorin: a symmetric matrix is below the diagonal of its absolute row
    sums) and `||P D|| <= 1`; for the output side the same holds for `P^T`, and
    `||D' P|| = ||P^T D'||`. The zero-padded convolution on an H x W input is this
    operator applied to the zero-extended input (an isometry) followed by keeping H x W
    outputs (a contraction), so its norm is at most 1 too. `epsilon` only makes the
    scale smaller, so it keeps the bound (the norm is then at most
    `max_i sqrt(s_i / (s_i + epsilon))` for row sums `s_i`, barely below 1 for the
    default 1e-6 unless the kernel is tiny). The bias does not change the constant. The
    layer is invariant to the scale of `K` (up to `epsilon`).

    Args:
        filters: int >= 1, the number of output channels.
        kernel_size: int or tuple of 2 ints >= 1.
        use_bias: bool.
        kernel_initializer: defaults to `DeltaOrthogonal()`: at init the layer is an
            isometry when `c_in <= filters`, else an orthogonal projection.
        bias_initializer: defaults to zeros.
        epsilon: float > 0 added to the row sums before the inverse square root.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: float tensor `[batch, H, W, c_in]`.

    Returns:
        Tensor `[batch, H, W, filters]` in the compute dtype.

    Raises:
        ValueError: for a bad argument, or an input that is not 4-D with known channels.

    Example:

    >>> layer = AOLConv2D(8, 3)
    >>> layer(np.zeros((2, 5, 5, 3), "float32")).shape
    TensorShape([2, 5, 5, 8])

    Reference:
        Prach & Lampert, "Almost-Orthogonal Layers for Efficient General-Purpose
        Lipschitz Networks", ECCV 2022.
    """

    def __init__(
        self,
        filters,
        kernel_size,
        use_bias=True,
        kernel_initializer=None,
        bias_initializer="zeros",
        epsilon=_AOL_EPSILON,
        **kwargs,
    ):
        super().__init__(
            aol_conv_kernel, 4, "[batch, H, W, channels] with known channels", use_bias,
            DeltaOrthogonal() if kernel_initializer is None else kernel_initializer, bias_initializer, epsilon,
            **kwargs,
        )
        self.filters = int(checks.positive_int("filters", filters))
        self.kernel_size = _pair(kernel_size, "kernel_size")

    def _kernel_shape(self, input_channels):
        return (*self.kernel_size, input_channels, self.filters)

    def call(self, inputs):
        kernel = ops.cast(self.rescaled_kernel(), self.compute_dtype)
        outputs = ops.conv(ops.cast(inputs, self.compute_dtype), kernel, strides=1, padding="same")
        return self._bias(outputs)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.filters)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size}


@keras.saving.register_keras_serializable(package="clustr_tf")
class AOLDense(_AOLBase):
    """A dense layer that is 1-Lipschitz in l2 by construction (AOL).

    On every call the kernel `W [in, units]` (`y = x W + b`) is rescaled per input unit
    by `d_i = (sum_j |(W W^T)_ij| + epsilon)^(-1/2)` and the layer applies
    `diag(d) W`; when `in > units`, per output unit from `W^T W` instead (`W diag(d')`,
    see `aol_dense_kernel`). There is no activation: the layer is affine.

    Lipschitz constant (l2): at most 1 for any kernel. With `M = W W^T` (symmetric),
    `M <= diag(sum_j |M_ij|)` (Gershgorin), so `(diag(d) W)(diag(d) W)^T = D M D <= I`
    and the largest singular value of `diag(d) W` is at most 1 (the same for `W^T W` and
    `W diag(d')`); `epsilon` only shrinks the scale, and the bias does not change the
    constant.

    Args:
        units: int >= 1, the output dimension.
        use_bias: bool.
        kernel_initializer: defaults to "orthogonal" (then the scale is 1: the layer starts
            as an isometry or an orthogonal projection).
        bias_initializer: defaults to zeros.
        epsilon: float > 0 added to the row sums before the inverse square root.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: float tensor `[batch, in]`.

    Returns:
        Tensor `[batch, units]` in the compute dtype.

    Raises:
        ValueError: for a bad argument, or an input that is not 2-D with known size.

    Example:

    >>> AOLDense(4)(np.ones((2, 6), "float32")).shape
    TensorShape([2, 4])

    Reference:
        Prach & Lampert, "Almost-Orthogonal Layers for Efficient General-Purpose
        Lipschitz Networks", ECCV 2022.
    """

    def __init__(
        self,
        units,
        use_bias=True,
        kernel_initializer="orthogonal",
        bias_initializer="zeros",
        epsilon=_AOL_EPSILON,
        **kwargs,
    ):
        super().__init__(
            aol_dense_kernel, 2, "[batch, features] with a known size (flatten first)", use_bias, kernel_initializer,
            bias_initializer, epsilon, **kwargs,
        )
        self.units = int(checks.positive_int("units", units))

    def _kernel_shape(self, input_channels):
        return (input_channels, self.units)

    def call(self, inputs):
        kernel = ops.cast(self.rescaled_kernel(), self.compute_dtype)
        return self._bias(ops.matmul(ops.cast(inputs, self.compute_dtype), kernel))

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.units)

    def get_config(self):
        return {**super().get_config(), "units": self.units}

