"""Small numerical operations shared by the layer, the loss and the clustering.

Everything here works in the log domain and keeps values and gradients finite when a
reduction runs over an empty set (a class with no cluster among the nearest ones, a batch
without clusters of another class).
"""

import tensorflow as tf


def correct(logits, labels):
    """float32 [B]: 1 where the argmax of `logits` [B, C] is `labels` [B] (int64), else 0."""
    return tf.cast(tf.argmax(logits, -1) == labels, tf.float32)


def pairwise_squared_distances(x, y):
    """Squared Euclidean distances between the rows of `x` and the rows of `y`.

    Args:
        x: float tensor [N, D].
        y: float tensor [M, D].

    Returns:
        float tensor [N, M], `||x_n - y_m||^2`, clipped at 0 against rounding.
    """
    x_sq = tf.reduce_sum(tf.square(x), axis=-1, keepdims=True)
    y_sq = tf.reduce_sum(tf.square(y), axis=-1)
    cross = tf.matmul(x, y, transpose_b=True)
    return tf.nn.relu(x_sq - 2.0 * cross + y_sq[tf.newaxis, :])


def pairwise_distances(x, y, floor=1e-12):
    """Euclidean distances between the rows of `x` and of `y`, [N, M], with the squared
    distances floored at `floor` inside the square root, whose gradient is infinite at 0
    (so a zero distance gives 1e-6 and a finite gradient)."""
    return tf.sqrt(tf.maximum(pairwise_squared_distances(x, y), floor))


def masked_logsumexp(values, mask, axis=-1):
    """`log(sum(exp(values)))` over the entries where `mask` is true.

    Args:
        values: float tensor.
        mask: bool tensor broadcastable to `values`.
        axis: the axis to reduce.

    Returns:
        A pair `(lse, nonempty)`: `lse` is the masked log-sum-exp (0 where the mask selects
        nothing, so it stays finite; callers decide what an empty set means) and
        `nonempty` is a bool tensor that says where the mask selected something. The
        gradient is finite everywhere and zero for the entries the mask leaves out.
    """
    mask = tf.broadcast_to(mask, tf.shape(values))
    neg_inf = tf.constant(-float("inf"), dtype=values.dtype)
    masked = tf.where(mask, values, neg_inf)
    nonempty = tf.reduce_any(mask, axis=axis)
    peak = tf.stop_gradient(tf.reduce_max(masked, axis=axis, keepdims=True))
    peak = tf.where(tf.math.is_finite(peak), peak, tf.zeros_like(peak))
    # exp(-inf) is 0 with a 0 gradient; masked-out entries therefore add nothing.
    total = tf.reduce_sum(tf.exp(tf.where(mask, values - peak, neg_inf)), axis=axis)
    safe_total = tf.where(nonempty, total, tf.ones_like(total))
    lse = tf.squeeze(peak, axis=axis) + tf.math.log(safe_total)
    return tf.where(nonempty, lse, tf.zeros_like(lse)), nonempty
