"""Compute precision: float32, or mixed float16/bfloat16 for the backbone.

A run trains in one of `PRECISIONS`:

- "float32": everything in float32.
- "float16": Keras's `mixed_float16` policy with loss scaling (GPUs with fast float16).
- "bfloat16": Keras's `mixed_bfloat16` policy, no loss scaling (bfloat16 has float32's
  exponent range): A100/H100-class GPUs, TPUs, and x86 CPUs with AVX512-BF16 or AMX.

Under a mixed policy only the backbone computes in low precision; its variables stay
float32. The heads (`ClusterCenters`, a baseline's Dense head), the magnet loss, every
distance and the consistency/cross-entropy terms compute in float32, and the certificate
in float64, whatever the run's precision.

A model saved by a mixed-precision run keeps its layers' policies (Keras records them in
model.keras). `set_precision` switches a built model's backbone to another precision in
place, without touching its weights: evaluation and export use it to compute in float32
by default, since low-precision gradients can mask an attack and the certificate is
stated for the float32 network.
"""

import keras

from clustr_tf.core import models

PRECISIONS = ("float32", "float16", "bfloat16")
POLICIES = {"float32": "float32", "float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}


def check(precision, error=ValueError, name="precision"):
    """Returns `precision` (one of `PRECISIONS`); raises `error` naming `name` otherwise."""
    if precision not in PRECISIONS:
        raise error(f"`{name}` must be one of {', '.join(PRECISIONS)}. Received: {precision!r}")
    return precision


def policy_name(precision):
    """The Keras dtype policy name of a precision ("bfloat16" -> "mixed_bfloat16")."""
    return POLICIES[check(precision)]


def uses_loss_scaling(precision):
    """True for float16, whose small exponent range needs a `LossScaleOptimizer`."""
    return check(precision) == "float16"


class policy_scope:
    """Sets Keras's global dtype policy for the layers built inside, then restores it.

    ```python
    with precision.policy_scope("bfloat16"):
        backbone = backbones.get_backbone("resnet18", (32, 32, 3))
    ```
    """

    def __init__(self, precision):
        self.policy = policy_name(precision)

    def __enter__(self):
        self._previous = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_global_policy(self.policy)
        return self

    def __exit__(self, *exc):
        keras.mixed_precision.set_global_policy(self._previous)
        return False


def _backbone(model):
    if not isinstance(model, models.Classifier):
        raise TypeError(f"`model` must be a clustr_tf.models.Classifier. Received: {type(model).__name__}")
    return model.backbone


def of(model):
    """The precision a model's backbone computes in: "float32", "float16" or "bfloat16"."""
    dtypes = {layer.compute_dtype for layer in _backbone(model)._flatten_layers(include_self=True)}
    for name in ("bfloat16", "float16"):
        if name in dtypes:
            return name
    return "float32"


def set_precision(model, precision):
    """Switches the backbone of a built `model` to `precision`, in place; the model itself
    (its input casting) and its heads stay float32, and no weight changes.

    Functions traced before the switch (a `tf.function` of the model) keep the old
    precision: trace new ones after it.

    Args:
        model: a `clustr_tf.models.Classifier` (ClusTRModel or a softmax classifier).
        precision: one of `PRECISIONS`.

    Returns:
        `model`.
    """
    policy = policy_name(precision)
    for layer in _backbone(model)._flatten_layers(include_self=True):
        layer.dtype_policy = policy
    model.dtype_policy = "float32"  # a mixed backbone casts its own inputs
    return model
