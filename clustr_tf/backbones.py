"""Backbones: feature extractors f that map an image in [0, 1] to R^D.

Every backbone is a functional `keras.Model` whose first layer after the input
is a `keras.layers.Normalization` holding the dataset's per-channel mean and
variance, so that attacks, certificates and serving all work in pixel space
[0, 1]. `resnet18` and `small_convnet` are built from stock Keras layers only,
so a saved `.keras` file reloads with `keras.saving.load_model` without any
custom objects.

Three backbones are provided:

- `resnet18`: the CIFAR variant of ResNet-18 used by ClusTR (3x3 stride-1 stem,
  no max-pool, four stages of two BasicBlocks), output D = 512 * width.
- `small_convnet`: a three-convolution network that trains in seconds on a CPU
  for tiny images such as the 8x8 digits.
- `lipschitz_convnet`: a network that is 1-Lipschitz in l2 by construction (AOL
  convolutions, MaxMin, space-to-depth), so that the certificate's Lipschitz
  bound is exact instead of 1e6 or more. It uses the layers of
  `clustr_tf.lipschitz_layers`, which `import clustr_tf` registers.

Reference:
    - Alfarra et al., "Rethinking Clustering for Robustness", BMVC 2021,
      arXiv:2006.07682.
    - He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.
    - Prach & Lampert, "Almost-Orthogonal Layers for Efficient General-Purpose
      Lipschitz Networks", ECCV 2022.
"""

import math
import numbers

import keras

from clustr_tf import checks
from clustr_tf import lipschitz_layers

BACKBONES = ("resnet18", "convnet", "lipschitz")

DEFAULT_MEAN = 0.5
DEFAULT_STD = 0.25

# BatchNormalization settings of the PyTorch reference implementation
# (PyTorch momentum 0.1 == Keras momentum 0.9).
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5
_KERNEL_INITIALIZER = "he_normal"

_RESNET18_WIDTHS = (64, 128, 256, 512)
_RESNET18_STRIDES = (1, 2, 2, 2)
_RESNET18_BLOCKS = (2, 2, 2, 2)


def _validate_input_shape(input_shape):
    """Checks that `input_shape` is (H, W, C) with positive integers."""
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


def _normalization(inputs, mean, std):
    """Applies (x - mean) / std per channel with a Normalization layer."""
    channels = inputs.shape[-1]
    mean = _per_channel(mean, DEFAULT_MEAN, channels, "mean", positive=False)
    std = _per_channel(std, DEFAULT_STD, channels, "std", positive=True)
    return keras.layers.Normalization(
        mean=mean, variance=[s * s for s in std], name="normalization"
    )(inputs)


def _conv_bn(x, filters, kernel_size, strides, name, relu):
    """Conv (no bias) -> BatchNorm [-> ReLU], with PyTorch-style padding.

    A strided 3x3 convolution pads one pixel on every side, as PyTorch does,
    instead of Keras' asymmetric "same" padding.
    """
    if strides > 1 and kernel_size > 1:
        x = keras.layers.ZeroPadding2D(kernel_size // 2, name=f"{name}_pad")(x)
        padding = "valid"
    else:
        padding = "same"
    x = keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding=padding,
        use_bias=False,
        kernel_initializer=_KERNEL_INITIALIZER,
        name=f"{name}_conv",
    )(x)
    x = keras.layers.BatchNormalization(
        momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON, name=f"{name}_bn"
    )(x)
    if relu:
        x = keras.layers.ReLU(name=f"{name}_relu")(x)
    return x


def _basic_block(x, filters, strides, name):
    """ResNet BasicBlock: conv3x3-BN-ReLU-conv3x3-BN + shortcut, then ReLU."""
    shortcut = x
    y = _conv_bn(x, filters, 3, strides, f"{name}_1", relu=True)
    y = _conv_bn(y, filters, 3, 1, f"{name}_2", relu=False)
    if strides != 1 or x.shape[-1] != filters:
        shortcut = _conv_bn(
            x, filters, 1, strides, f"{name}_shortcut", relu=False
        )
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def _check_width_multiplier(width_multiplier):
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


def _scaled_width(base, width_multiplier):
    return max(1, int(round(base * width_multiplier)))


def resnet18(
    input_shape=(32, 32, 3),
    width_multiplier=1.0,
    mean=None,
    std=None,
    name="resnet18",
):
    """The CIFAR variant of ResNet-18 used by ClusTR, as a feature extractor.

    Architecture: Normalization; conv3x3 (stride 1, 64 * width channels), BN,
    ReLU, no max-pool; four stages of two BasicBlocks with 64, 128, 256, 512
    channels (times `width_multiplier`, rounded, at least 1) and strides 1, 2,
    2, 2; global average pooling. A BasicBlock is conv3x3-BN-ReLU-conv3x3-BN
    plus a shortcut (1x1 conv with stride s + BN when the shape changes),
    followed by ReLU. Convolutions have no bias. There is no classification
    layer: the output is the pooled feature vector. Block layers are named
    `stage{s}_block{b}_*` (s in 1..4, b in 1..2).

    With `width_multiplier=1` and 32x32x3 inputs the model has 11,168,832
    trainable parameters (the standard CIFAR ResNet-18 without its final
    dense layer).

    Args:
        input_shape: tuple `(height, width, channels)` of positive ints.
        width_multiplier: float > 0 that scales every layer's channels.
        mean: per-channel mean of the data in [0, 1]: a float or a sequence of
            1 or `channels` floats. Defaults to 0.5 per channel.
        std: per-channel standard deviation, > 0, same forms as `mean`.
            Defaults to 0.25 per channel.
        name: name of the model.

    Returns:
        A `keras.Model` mapping `images` float32 `[batch, H, W, C]` in [0, 1]
        to features float32 `[batch, D]` with
        `D = max(1, round(512 * width_multiplier))`.

    Raises:
        ValueError: if `input_shape`, `width_multiplier`, `mean` or `std` is
            invalid.

    Example:

    >>> model = resnet18(width_multiplier=0.25)
    >>> model.output_shape
    (None, 128)

    Reference:
        - He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.
        - Alfarra et al., "Rethinking Clustering for Robustness", BMVC 2021.
    """
    input_shape = _validate_input_shape(input_shape)
    _check_width_multiplier(width_multiplier)

    inputs = keras.Input(shape=input_shape, name="images")
    x = _normalization(inputs, mean, std)
    x = _conv_bn(
        x, _scaled_width(64, width_multiplier), 3, 1, "stem", relu=True
    )
    for stage, (base, strides, blocks) in enumerate(
        zip(_RESNET18_WIDTHS, _RESNET18_STRIDES, _RESNET18_BLOCKS), start=1
    ):
        filters = _scaled_width(base, width_multiplier)
        for block in range(1, blocks + 1):
            x = _basic_block(
                x,
                filters,
                strides if block == 1 else 1,
                name=f"stage{stage}_block{block}",
            )
    outputs = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(inputs, outputs, name=name)


def small_convnet(
    input_shape,
    width=32,
    embedding_dim=64,
    mean=None,
    std=None,
    name="small_convnet",
):
    """A small, fast ConvNet for quick runs on tiny images (e.g. 8x8 digits).

    Architecture: Normalization; conv3x3(width)-BN-ReLU;
    conv3x3(2 * width)-BN-ReLU; 2x2 max-pool only when the spatial size is at
    least 4x4; conv3x3(2 * width)-BN-ReLU; global average pooling;
    Dense(embedding_dim) with no activation.

    Args:
        input_shape: tuple `(height, width, channels)` of positive ints.
        width: int >= 1, channels of the first convolution.
        embedding_dim: int >= 1, dimension D of the output features.
        mean: per-channel mean of the data in [0, 1]: a float or a sequence of
            1 or `channels` floats. Defaults to 0.5 per channel.
        std: per-channel standard deviation, > 0, same forms as `mean`.
            Defaults to 0.25 per channel.
        name: name of the model.

    Returns:
        A `keras.Model` mapping `images` float32 `[batch, H, W, C]` in [0, 1]
        to features float32 `[batch, embedding_dim]`.

    Raises:
        ValueError: if an argument is invalid.

    Example:

    >>> model = small_convnet((8, 8, 1), width=16, embedding_dim=32)
    >>> model.output_shape
    (None, 32)
    """
    input_shape = _validate_input_shape(input_shape)
    checks.positive_int("width", width)
    checks.positive_int("embedding_dim", embedding_dim)

    inputs = keras.Input(shape=input_shape, name="images")
    x = _normalization(inputs, mean, std)
    x = _conv_bn(x, width, 3, 1, "conv1", relu=True)
    x = _conv_bn(x, 2 * width, 3, 1, "conv2", relu=True)
    if min(input_shape[0], input_shape[1]) >= 4:
        x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = _conv_bn(x, 2 * width, 3, 1, "conv3", relu=True)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = keras.layers.Dense(
        embedding_dim, kernel_initializer="glorot_uniform", name="embedding"
    )(x)
    return keras.Model(inputs, outputs, name=name)


LIPSCHITZ_POOLINGS = ("flatten", "average")

# Defaults of `lipschitz_convnet` for small images (max(H, W) <= 16, e.g. the 8x8
# digits) and for larger ones (e.g. 32x32 CIFAR).
_LIPSCHITZ_DEFAULTS = {
    "small": {"width": 16, "depth": 2, "feature_dim": 64},
    "large": {"width": 16, "depth": 2, "feature_dim": 128},
}


def _even_width(width, width_multiplier):
    """`width * width_multiplier` rounded to an even int >= 2 (MaxMin pairs channels)."""
    return 2 * max(1, int(round(width * width_multiplier / 2)))


def lipschitz_convnet(
    input_shape,
    width=None,
    depth=None,
    feature_dim=None,
    mean=None,
    std=None,
    width_multiplier=1.0,
    pooling="flatten",
    name="lipschitz_convnet",
):
    """A feature extractor that is 1-Lipschitz in l2 by construction.

    Built only of `clustr_tf.lipschitz_layers` (AOL convolutions and dense layers,
    MaxMin, space-to-depth) after the input normalization; no batch normalization,
    ReLU, strided convolution or plain pooling, whose bounds depend on trained
    weights. Its l2 Lipschitz constant is at most the normalization's factor:
    exactly 1 with mean subtraction only (`std=None`), `1 / min(std)` when dividing
    by `std`; `clustr_tf.lipschitz.model_bound` and `construction_bound` return
    that number.

    Architecture (a plain, LiResNet/AOL-style network scaled for a CPU):
    Normalization; stage 1 at full resolution: `depth` x [AOLConv2D 3x3 (`width`
    channels) -> MaxMin]; then, while H and W are even and at least 8, a
    `SpaceToDepth(2)` (H/2 x W/2 x 4C) and another stage of `depth` x [AOLConv2D
    3x3 -> MaxMin] with twice the channels (its first convolution maps the 4C
    channels to 2C); then `Flatten` (norm-preserving: every pixel is kept) or, with
    `pooling="average"`, `ScaledGlobalAveragePooling2D` (sqrt(HW) times the mean);
    AOLDense(2 * feature_dim) -> MaxMin -> AOLDense(feature_dim), linear, named
    "embedding". For 32x32 images the stages run at 32, 16, 8 and 4 pixels with
    `width`, 2, 4 and 8 `width` channels, for 8x8 images at 8 and 4 pixels. Layers
    are named `stage{s}_conv{b}`, `stage{s}_maxmin{b}` and `stage{s}_to_depth`.

    Defaults: `width=16`, `depth=2`, `feature_dim=64` for small images
    (max(H, W) <= 16, e.g. the 8x8 digits: 0.10M parameters); `width=16`,
    `depth=2`, `feature_dim=128` for larger ones (e.g. CIFAR 32x32: 1.14M
    parameters, the output dimension of `resnet18(width_multiplier=0.25)` and
    about 2/3 of its forward+backward time on a CPU). Convolutions start
    delta-orthogonal (each an isometry or a projection), so the plain stack
    neither shrinks nor explodes the signal at init. In short runs with a
    1-Lipschitz linear head and cross-entropy, `depth=2` trained better than
    `depth=3` on CIFAR-10 (44.6% against 42.2% test accuracy after 200 steps,
    with less CPU time), and `Flatten` far better than the scaled average pooling
    on digits (97% against 53% after 15 epochs).

    Train with Adam at about 1e-4 (the project's default): at 1e-3 Adam's first,
    sign-like steps put noise on every kernel tap, the AOL row sums
    `sum_j |K^T K|_ij` grow with it, each layer contracts, and the network can
    collapse to a constant output.

    Args:
        input_shape: tuple `(height, width, channels)` of positive ints.
        width: even int >= 2, channels of the first stage (None: the default above).
        depth: int >= 1, convolutions per stage (None: the default above).
        feature_dim: int >= 1, the dimension D of the features (None: the default).
        mean: per-channel mean of the data in [0, 1], subtracted: a float or a
            sequence of 1 or `channels` floats. Defaults to 0.5 per channel.
        std: None (the default) for mean subtraction only, Lipschitz constant 1; or
            per-channel standard deviations > 0 to divide by, which multiplies the
            constant by `1 / min(std)` (the certified radius is the same for a
            network that is that much larger).
        width_multiplier: float > 0 that scales every stage's channels (rounded to
            an even number >= 2), as for `resnet18`.
        pooling: "flatten" (default: trains better, it keeps where features are) or
            "average" (`ScaledGlobalAveragePooling2D`, fewer parameters).
        name: name of the model.

    Returns:
        A `keras.Model` mapping `images` float32 `[batch, H, W, C]` in [0, 1] to
        features `[batch, feature_dim]`.

    Raises:
        ValueError: if an argument is invalid.

    Example:

    >>> model = lipschitz_convnet((8, 8, 1))
    >>> model.output_shape
    (None, 64)
    >>> from clustr_tf import lipschitz
    >>> lipschitz.construction_bound(model)
    1.0

    Reference:
        - Prach & Lampert, "Almost-Orthogonal Layers for Efficient General-Purpose
          Lipschitz Networks", ECCV 2022.
        - Hu et al., "Unlocking Deterministic Robustness Certification on ImageNet"
          (LiResNet), NeurIPS 2023.
    """
    input_shape = _validate_input_shape(input_shape)
    defaults = _LIPSCHITZ_DEFAULTS["small" if max(input_shape[:2]) <= 16 else "large"]
    width = defaults["width"] if width is None else width
    depth = defaults["depth"] if depth is None else depth
    feature_dim = defaults["feature_dim"] if feature_dim is None else feature_dim
    checks.positive_int("width", width)
    if width % 2:
        raise ValueError(
            f"`width` must be an even integer >= 2 (MaxMin pairs channels). Received: {width!r}"
        )
    checks.positive_int("depth", depth)
    checks.positive_int("feature_dim", feature_dim)
    _check_width_multiplier(width_multiplier)
    checks.one_of("pooling", pooling, LIPSCHITZ_POOLINGS)

    inputs = keras.Input(shape=input_shape, name="images")
    channels = input_shape[-1]
    mean = _per_channel(mean, DEFAULT_MEAN, channels, "mean", positive=False)
    if std is None:
        variance = [1.0] * channels  # mean subtraction only: the factor is 1
    else:
        variance = [s * s for s in _per_channel(std, None, channels, "std", positive=True)]
    x = keras.layers.Normalization(mean=mean, variance=variance, name="normalization")(inputs)
    height, wide = input_shape[:2]
    filters = _even_width(width, width_multiplier)
    stage = 1
    while True:
        for block in range(1, depth + 1):
            x = lipschitz_layers.AOLConv2D(filters, 3, name=f"stage{stage}_conv{block}")(x)
            x = lipschitz_layers.MaxMin(name=f"stage{stage}_maxmin{block}")(x)
        if height % 2 or wide % 2 or min(height, wide) < 8:
            break
        x = lipschitz_layers.SpaceToDepth(2, name=f"stage{stage}_to_depth")(x)
        height, wide, filters, stage = height // 2, wide // 2, 2 * filters, stage + 1
    if pooling == "flatten":
        x = keras.layers.Flatten(name="flatten")(x)
    else:
        x = lipschitz_layers.ScaledGlobalAveragePooling2D(name="pool")(x)
    x = lipschitz_layers.AOLDense(2 * feature_dim, name="dense")(x)
    x = lipschitz_layers.MaxMin(name="dense_maxmin")(x)
    outputs = lipschitz_layers.AOLDense(feature_dim, name="embedding")(x)
    return keras.Model(inputs, outputs, name=name)


_BUILDERS = {"resnet18": resnet18, "convnet": small_convnet, "lipschitz": lipschitz_convnet}


def get_backbone(name, input_shape, mean=None, std=None, **kwargs):
    """Builds a backbone by name.

    Args:
        name: one of `BACKBONES`: "resnet18", "convnet" (`small_convnet`) or
            "lipschitz" (`lipschitz_convnet`).
        input_shape: tuple `(height, width, channels)` of positive ints.
        mean: per-channel mean of the data in [0, 1] (see `resnet18`).
        std: per-channel standard deviation of the data (see `resnet18`).
            "lipschitz" does not use it: it subtracts the mean only, so that its
            Lipschitz bound is exactly 1 (dividing by a per-channel std would
            multiply the bound by `1 / min(std)`, which for unequal stds is
            looser, and change nothing else: the layers after it are
            scale-free up to their biases). Call `lipschitz_convnet(std=...)`
            directly to divide by a std.
        **kwargs: further arguments of the builder, e.g. `width_multiplier`
            for "resnet18" and "lipschitz", `width` and `embedding_dim` for
            "convnet".

    Returns:
        A `keras.Model` mapping images float32 `[batch, H, W, C]` in [0, 1]
        to features float32 `[batch, D]`.

    Raises:
        ValueError: if `name` is unknown or an argument is invalid.

    Example:

    >>> model = get_backbone("convnet", (8, 8, 1), embedding_dim=16)
    >>> model.output_shape
    (None, 16)
    """
    if not isinstance(name, str) or name not in _BUILDERS:
        raise ValueError(
            f"Unknown backbone {name!r}. Expected one of: "
            f"{', '.join(BACKBONES)}."
        )
    if name == "lipschitz":
        std = None  # mean subtraction only: the bound by construction is 1
    return _BUILDERS[name](input_shape=input_shape, mean=mean, std=std, **kwargs)
