"""A sound upper bound of a feature extractor's l2 Lipschitz constant.

The bound composes per-layer bounds along the model's graph: the constant of a layer's
output with respect to the model's input is the layer's own constant times that of its
input, and the sum of its inputs' constants for an addition (residual connections). Each
per-layer bound is exact or an over-estimate, computed without iterative approximation:

- convolutions (any stride, 'same'/'valid' padding): a zero-padded convolution on an
  H x W input is a restriction of the circular convolution on an (H+k-1) x (W+k-1) grid
  (and a stride only drops outputs), so its norm is at most the circular convolution's,
  which is the largest singular value of the kernel's 2-D DFT over all frequencies
  (Sedghi et al., ICLR 2019): computed exactly with an FFT and an SVD per frequency;
- dense layers: the largest singular value of the kernel (SVD);
- batch normalization in inference mode, Normalization: the largest per-channel scale; a
  convolution whose only consumer is a batch normalization is bounded together with it
  (the kernel scaled per output channel), which is far tighter than the product;
- ReLU and linear activations: 1; global average pooling over H x W: 1/sqrt(HW);
  average pooling p with stride s: ceil(p/s)/p; max pooling: ceil(p/s);
- zero padding, flatten, reshape, dropout: 1; nested models: their own bound;
- the Lipschitz-by-construction layers of `clustr_tf.aol_layers` (`AOLConv2D`,
  `AOLDense`) and `clustr_tf.lipschitz_layers` (`MaxMin`, `SpaceToDepth`,
  `ScaledGlobalAveragePooling2D`): 1, exactly by construction, for any weights.

A layer it does not know raises an error rather than a guess. Power iteration is never
used, so no iteration error has to be accounted for.

`construction_bound` is the bound of a model built ONLY of layers whose constant does not
depend on trained weights (the layers above, a Normalization layer and reshapes): the
product of the normalization's factor and 1s, exact by construction. For any other model
it raises `NotLipschitzByConstructionError` naming the first layer that is not.
"""

import math

import keras
import numpy as np
import threadpoolctl

from clustr_tf.nets import aol_layers
from clustr_tf.nets import lipschitz_layers

# Layers whose l2 Lipschitz constant is 1 whatever their weights.
_ONE_LIPSCHITZ_BY_CONSTRUCTION = (
    aol_layers.AOLConv2D,
    aol_layers.AOLDense,
    lipschitz_layers.MaxMin,
    lipschitz_layers.SpaceToDepth,
    lipschitz_layers.ScaledGlobalAveragePooling2D,
)
# What `construction_bound` accepts: those, the input normalization (its factor is fixed
# by the data statistics, not trained) and norm-preserving reshapes. Exact classes, not
# subclasses, which could change `call`.
_BY_CONSTRUCTION = _ONE_LIPSCHITZ_BY_CONSTRUCTION + (
    keras.layers.InputLayer,
    keras.layers.Normalization,
    keras.layers.Flatten,
    keras.layers.Reshape,
    keras.layers.Identity,
)


class NotLipschitzByConstructionError(ValueError):
    """A model has a layer whose Lipschitz bound depends on its trained weights."""


def conv2d_norm_bound(kernel, input_hw, dilation=(1, 1)):
    """Upper bound of the l2 operator norm of a 2-D convolution (any stride and padding).

    Args:
        kernel: array [kh, kw, c_in, c_out].
        input_hw: (H, W) of the convolution's input.
        dilation: the dilation rate (dilated kernels are expanded with zeros).

    Returns:
        float.
    """
    kernel = np.asarray(kernel, np.float64)
    if tuple(dilation) != (1, 1):
        kh, kw, cin, cout = kernel.shape
        dh, dw = dilation
        expanded = np.zeros(((kh - 1) * dh + 1, (kw - 1) * dw + 1, cin, cout))
        expanded[::dh, ::dw] = kernel
        kernel = expanded
    kh, kw, cin, cout = kernel.shape
    grid = (int(input_hw[0]) + kh - 1, int(input_hw[1]) + kw - 1)
    padded = np.zeros(grid + (cin, cout))
    padded[:kh, :kw] = kernel
    spectrum = np.fft.fft2(padded, axes=(0, 1)).reshape(-1, cin, cout)
    # Many small SVDs: BLAS threads only contend (on a busy 2-core machine, 2 threads
    # took 48 s where 1 takes 0.1 s for a 128-channel convolution).
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        return float(np.linalg.svd(spectrum, compute_uv=False).max())


def _activation_bound(layer):
    activation = getattr(layer, "activation", None)
    if activation is None:
        return 1.0
    name = getattr(activation, "__name__", str(activation))
    if name in ("linear", "relu"):
        return 1.0
    raise ValueError(
        f"No Lipschitz bound for activation {name!r} of layer {layer.name!r} "
        "(supported: linear, relu)"
    )


def _pool_size(layer):
    pool = layer.pool_size if isinstance(layer.pool_size, (tuple, list)) else (layer.pool_size,) * 2
    strides = layer.strides or pool
    strides = strides if isinstance(strides, (tuple, list)) else (strides,) * 2
    return pool, strides


def layer_bound(layer, input_shape):
    """The l2 Lipschitz bound of one layer, given the shape of its (first) input."""
    if isinstance(layer, keras.Model):
        return model_bound(layer)
    kind = type(layer).__name__
    if kind in ("InputLayer", "Flatten", "Reshape", "Dropout", "ZeroPadding2D", "Identity"):
        return 1.0
    if kind == "ReLU":
        if getattr(layer, "negative_slope", 0.0) or (layer.max_value is not None and layer.max_value <= 0):
            raise ValueError(f"No Lipschitz bound for ReLU layer {layer.name!r} with these arguments")
        return 1.0
    if kind == "Activation":
        return _activation_bound(layer)
    if type(layer) in _ONE_LIPSCHITZ_BY_CONSTRUCTION:
        return 1.0
    if kind == "Normalization":
        # (x - mean) / max(std, eps), or x * max(std, eps) + mean when inverted: diagonal.
        std = np.maximum(np.sqrt(np.asarray(layer.variance, np.float64)), keras.config.epsilon())
        return float(np.max(std if getattr(layer, "invert", False) else 1.0 / std))
    if kind == "BatchNormalization":
        return float(np.max(np.abs(_bn_scale(layer))))
    if kind == "Conv2D":
        if layer.data_format != "channels_last" or layer.groups != 1:
            raise ValueError(f"No Lipschitz bound for Conv2D {layer.name!r}: channels_last, groups=1 only")
        bound = conv2d_norm_bound(layer.kernel.numpy(), input_shape[1:3], layer.dilation_rate)
        return bound * _activation_bound(layer)
    if kind == "Dense":
        return float(np.linalg.norm(np.asarray(layer.kernel, np.float64), 2)) * _activation_bound(layer)
    if kind == "GlobalAveragePooling2D":
        return 1.0 / math.sqrt(int(input_shape[1]) * int(input_shape[2]))
    if kind == "AveragePooling2D":
        (ph, pw), (sh, sw) = _pool_size(layer)
        return math.ceil(ph / sh) * math.ceil(pw / sw) / math.sqrt(ph * pw * math.ceil(ph / sh) * math.ceil(pw / sw))
    if kind == "MaxPooling2D":
        (ph, pw), (sh, sw) = _pool_size(layer)
        return math.sqrt(math.ceil(ph / sh) * math.ceil(pw / sw))
    raise ValueError(f"No Lipschitz bound for layer {layer.name!r} of type {kind}")


def _bn_scale(layer):
    scale = 1.0 / np.sqrt(np.asarray(layer.moving_variance, np.float64) + layer.epsilon)
    if layer.scale:
        scale = scale * np.asarray(layer.gamma, np.float64)
    return scale


def _conv_bn_bound(conv, bn, input_shape):
    """Bound of BN(conv(x)) as one linear map (up to BN's shift), conv without activation."""
    if _activation_bound(conv) != 1.0 or getattr(conv.activation, "__name__", "") != "linear":
        return layer_bound(conv, input_shape) * layer_bound(bn, None)
    kernel = conv.kernel.numpy() * _bn_scale(bn)[np.newaxis, np.newaxis, np.newaxis, :]
    return conv2d_norm_bound(kernel, input_shape[1:3], conv.dilation_rate)


def _history(arg):
    """The (layer name, shape) of every Keras tensor in a serialized call argument."""
    if isinstance(arg, dict) and arg.get("class_name") == "__keras_tensor__":
        return [(arg["config"]["keras_history"][0], arg["config"]["shape"])]
    if isinstance(arg, (list, tuple)):
        return [h for a in arg for h in _history(a)]
    return []


def model_bound(model):
    """An upper bound of the l2 Lipschitz constant of `model` (input -> output).

    Args:
        model: a functional or Sequential Keras model of the layers listed in the module
            docstring, each called once, with one input and one output.

    Returns:
        float.

    Raises:
        ValueError: for a layer or activation without a known bound, a layer called more
            than once, or several inputs or outputs.
    """
    if isinstance(model, keras.Sequential):
        bound, shape = 1.0, tuple(model.inputs[0].shape)
        for layer in model.layers:
            bound *= layer_bound(layer, shape)
            shape = layer.compute_output_shape(shape)
        return bound
    config = model.get_config()
    ends = []
    for key in ("input_layers", "output_layers"):
        value = config.get(key) or []
        ends.append([value] if value and isinstance(value[0], str) else value)
    if len(ends[0]) != 1 or len(ends[1]) != 1:
        raise ValueError(f"Model {model.name!r} must have one input and one output for a Lipschitz bound")
    consumers = {}
    for entry in config["layers"]:
        for node in entry["inbound_nodes"]:
            for src, _ in _history(node["args"]):
                consumers[src] = consumers.get(src, 0) + 1
    classes = {entry["name"]: entry["class_name"] for entry in config["layers"]}
    sources = {}
    bounds = {}
    for entry in config["layers"]:
        name = entry["name"]
        nodes = entry["inbound_nodes"]
        if len(nodes) > 1:
            raise ValueError(f"Layer {name!r} is called {len(nodes)} times; shared layers are not supported")
        inputs = _history(nodes[0]["args"]) if nodes else []
        if entry["class_name"] == "Add":
            bounds[name] = sum(bounds[src] for src, _ in inputs)
            continue
        if len(inputs) > 1:
            raise ValueError(f"No Lipschitz bound for layer {name!r} of type {entry['class_name']} with several inputs")
        upstream = bounds[inputs[0][0]] if inputs else 1.0
        shape = inputs[0][1] if inputs else None
        sources[name] = inputs
        src = inputs[0][0] if inputs else None
        if (entry["class_name"] == "BatchNormalization" and classes.get(src) == "Conv2D"
                and consumers.get(src) == 1):
            # conv followed only by BN: bound the merged linear map (much tighter than the
            # product of the two bounds).
            conv_input = sources[src][0]
            bounds[name] = (bounds[conv_input[0]] if conv_input else 1.0) * _conv_bn_bound(
                model.get_layer(src), model.get_layer(name), conv_input[1]
            )
            continue
        bounds[name] = upstream * layer_bound(model.get_layer(name), shape)
    return bounds[ends[1][0][0]]


def _not_by_construction(model):
    """The first layer of `model` (searching nested models) not in `_BY_CONSTRUCTION`.

    A model other than a functional or Sequential one is itself returned: its `call` could
    do anything with its layers.
    """
    if type(model).__name__ not in ("Functional", "Sequential"):
        return model
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            offending = _not_by_construction(layer)
            if offending is not None:
                return offending
        elif type(layer) not in _BY_CONSTRUCTION:
            return layer
    return None


def construction_bound(model):
    """The l2 Lipschitz bound of a model that is Lipschitz by construction.

    Every layer must be one of the 1-Lipschitz layers of `clustr_tf.aol_layers` (`AOLConv2D`,
    `AOLDense`) and `clustr_tf.lipschitz_layers` (`MaxMin`, `SpaceToDepth`,
    `ScaledGlobalAveragePooling2D`),
    an input `Normalization` (factor `1 / min(std)`; 1 for mean subtraction only, i.e.
    variance 1), `Flatten`, `Reshape`, `Identity` or an input layer, composed as
    `model_bound` composes them. The bound is then exact by construction: it holds for
    any weights, trained or not, and is `1 / min(std)` (1.0 for a
    `clustr_tf.backbones.lipschitz_convnet` with mean subtraction only).

    Args:
        model: a Keras model (nested models are searched too).

    Returns:
        float.

    Raises:
        NotLipschitzByConstructionError: naming the first layer that is not Lipschitz by
            construction and its class.
        ValueError: as `model_bound` does (several inputs or outputs, shared layers).
    """
    offending = _not_by_construction(model)
    if offending is not None:
        accepted = ", ".join(cls.__name__ for cls in _BY_CONSTRUCTION)
        raise NotLipschitzByConstructionError(
            f"Model {model.name!r} is not Lipschitz by construction: its layer {offending.name!r} "
            f"of type {type(offending).__name__} is not one of the layers whose bound holds for any "
            f"weights ({accepted}; in functional or Sequential models), so its bound would be a "
            "product of trained layer norms, loose by orders of magnitude. Use a backbone built of "
            "Lipschitz layers: pass `--backbone=lipschitz` (`clustr_tf.backbones.lipschitz_convnet`)."
        )
    return model_bound(model)
