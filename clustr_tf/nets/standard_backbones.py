"""Backbones of stock Keras layers: the paper's CIFAR ResNet-18 and a small ConvNet.

Both are functional `keras.Model`s of convolutions, batch normalization and ReLU after the
input normalization (`clustr_tf.backbone_inputs`), so a saved `.keras` file reloads with
`keras.saving.load_model` without any custom objects. Their Lipschitz constant depends on
the trained weights (`clustr_tf.lipschitz.model_bound` bounds it); for a network whose
bound is exact by construction see `clustr_tf.lipschitz_backbone`.

- `resnet18`: the CIFAR variant of ResNet-18 used by ClusTR (3x3 stride-1 stem, no
  max-pool, four stages of two BasicBlocks), output D = 512 * width.
- `small_convnet`: a three-convolution network that trains in seconds on a CPU for tiny
  images such as the 8x8 digits.

Reference:
    - He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.
    - Alfarra et al., "Rethinking Clustering for Robustness", BMVC 2021,
      arXiv:2006.07682.
"""

import keras

from clustr_tf.nets import backbone_inputs
from clustr_tf import checks

# BatchNormalization settings of the PyTorch reference implementation
# (PyTorch momentum 0.1 == Keras momentum 0.9).
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5
_KERNEL_INITIALIZER = "he_normal"

_RESNET18_WIDTHS = (64, 128, 256, 512)
_RESNET18_STRIDES = (1, 2, 2, 2)
_RESNET18_BLOCKS = (2, 2, 2, 2)


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
    input_shape = backbone_inputs.check_input_shape(input_shape)
    backbone_inputs.check_width_multiplier(width_multiplier)

    inputs = keras.Input(shape=input_shape, name="images")
    x = backbone_inputs.normalization(inputs, mean, std)
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
        mean: per-channel mean of the data in [0, 1], as for `resnet18`.
        std: per-channel standard deviation of the data, as for `resnet18`.
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
    input_shape = backbone_inputs.check_input_shape(input_shape)
    checks.positive_int("width", width)
    checks.positive_int("embedding_dim", embedding_dim)

    inputs = keras.Input(shape=input_shape, name="images")
    x = backbone_inputs.normalization(inputs, mean, std)
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
