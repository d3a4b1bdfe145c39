"""Backbones: feature extractors f that map an image in [0, 1] to R^D, built by name.

Every backbone is a functional `keras.Model` whose first layer after the input
is a `keras.layers.Normalization` holding the dataset's per-channel mean and
variance, so that attacks, certificates and serving all work in pixel space
[0, 1] (`clustr_tf.backbone_inputs`). `get_backbone(name, ...)` builds one of
`BACKBONES`; the builders are re-exported here:

- `resnet18`: the CIFAR variant of ResNet-18 used by ClusTR (3x3 stride-1 stem,
  no max-pool, four stages of two BasicBlocks), output D = 512 * width.
- `small_convnet`: a three-convolution network that trains in seconds on a CPU
  for tiny images such as the 8x8 digits.
- `lipschitz_convnet`: a network that is 1-Lipschitz in l2 by construction (AOL
  convolutions, MaxMin, space-to-depth), so that the certificate's Lipschitz
  bound is exact instead of 1e6 or more.

The first two, of stock Keras layers, live in `clustr_tf.standard_backbones`;
the third in `clustr_tf.lipschitz_backbone`.

Reference:
    - Alfarra et al., "Rethinking Clustering for Robustness", BMVC 2021,
      arXiv:2006.07682.
    - He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.
    - Prach & Lampert, "Almost-Orthogonal Layers for Efficient General-Purpose
      Lipschitz Networks", ECCV 2022.
"""

# The public names of the builders' modules, re-exported: users write `backbones.resnet18(...)`.
from clustr_tf.nets.backbone_inputs import DEFAULT_MEAN
from clustr_tf.nets.backbone_inputs import DEFAULT_STD
from clustr_tf.nets.lipschitz_backbone import LIPSCHITZ_POOLINGS
from clustr_tf.nets.lipschitz_backbone import lipschitz_convnet
from clustr_tf.nets.standard_backbones import resnet18
from clustr_tf.nets.standard_backbones import small_convnet

BACKBONES = ("resnet18", "convnet", "lipschitz")

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
