"""The SavedModel's signatures: the serving functions of a ClusTR model (or of the
Lipschitz-margin linear-head baseline), the contract of docs/serving.md, each on `images`
float32 [batch, H, W, C] in [0, 1]:

- `serving_default` -> `probabilities` float32 [batch, classes] (soft kNC over the
  evaluation L nearest clusters) and `classes` int64 [batch] (their argmax);
- `certify` -> `classes` int64 [batch] (nearest-center class), `radius` float32 [batch]
  (certified l2 radius in pixel space), `feature_radius` float32 [batch],
  `lipschitz_bound` float32 [batch] (the same stored bound on every row), `runner_up`
  int64 [batch] (the class the decision would change to first): the theorem of
  `clustr_tf.certify.feature_radius`, run inside the graph in float64 on the features;
  radius = feature_radius / lipschitz_bound. For a linear head: its softmax, its argmax
  and its exact margin certificate (`certify.linear_feature_radius`);
- `embed` -> `embeddings` float32 [batch, D].

The graph checks every request first (rank, image size and channels, finite values in
[0, 1]) and fails it with a readable `InvalidArgumentError` (INVALID_ARGUMENT in TF
Serving, which does not check input shapes itself). The Lipschitz bound is stored in the
graph as a variable. TensorFlow is imported when the functions are built.
"""

from clustr_tf.serving.versions import ExportError

SIGNATURES = ("serving_default", "certify", "embed")
SIGNATURE_OUTPUTS = {
    "serving_default": ("probabilities", "classes"),
    "certify": ("classes", "radius", "feature_radius", "lipschitz_bound", "runner_up"),
    "embed": ("embeddings",),
}
INPUT_NAME = "images"


def fixed_image_shape(model):
    """`(height, width, channels)` of the model's fixed input shape; ExportError if it has none."""
    backbone = model.backbone
    inputs = getattr(backbone, "inputs", None)
    shape = tuple(inputs[0].shape[1:]) if inputs else ()
    if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ExportError(
            "Export needs a backbone with a fixed input shape (height, width, channels). "
            f"Received: {shape or 'no inputs'}"
        )
    return shape


def _check_inputs(images, image_shape, max_batch_size):
    """Graph-side checks of a request; returns `images` gated on them.

    Raw `Shape`/`Size` ops are used on purpose: the public wrappers fold the rank and
    shape known at trace time into constants, and TF Serving feeds tensors of any shape
    into the signature's placeholder without checking it.
    """
    import tensorflow as tf

    h, w, c = image_shape
    shape = tf.raw_ops.Shape(input=images, out_type=tf.int32)
    rank = tf.raw_ops.Size(input=shape, out_type=tf.int32)
    # Pads the shape so that a wrong rank still compares element-wise.
    tail = tf.concat([shape, tf.constant([-1, -1, -1, -1], tf.int32)], axis=0)[1:4]
    shape_ok = tf.logical_and(tf.equal(rank, 4), tf.reduce_all(tf.equal(tail, [h, w, c])))
    shape_check = tf.debugging.Assert(
        shape_ok,
        [f"`{INPUT_NAME}` must be a float32 tensor [batch, {h}, {w}, {c}] of pixels in [0, 1]. "
         "Received shape:", shape],
        summarize=8,
        name="check_shape",
    )
    with tf.control_dependencies([shape_check]):
        batch = tf.concat([shape, tf.constant([0], tf.int32)], axis=0)[0]  # (safe for any rank)
        batch_check = tf.debugging.Assert(
            batch <= max_batch_size,
            [f"`{INPUT_NAME}` holds at most {max_batch_size} images per request (the export's max_batch_size); "
             "send larger batches as several requests (clustr_tf.serving.client does). Received batch size:", batch],
            name="check_batch_size",
        )
    with tf.control_dependencies([batch_check]):
        finite = tf.math.is_finite(images)
        finite_check = tf.debugging.Assert(
            tf.reduce_all(finite),
            [f"`{INPUT_NAME}` must be finite; number of NaN or Inf values received:",
             tf.reduce_sum(1 - tf.cast(finite, tf.int32))],
            name="check_finite",
        )
    with tf.control_dependencies([finite_check]):
        in_range = tf.logical_and(images >= 0.0, images <= 1.0)
        range_check = tf.debugging.Assert(
            tf.reduce_all(in_range),
            [f"`{INPUT_NAME}` must be pixels in [0, 1] (divide 8-bit images by 255). Received "
             "min and max:", tf.reduce_min(images), tf.reduce_max(images)],
            name="check_range",
        )
    with tf.control_dependencies([range_check]):
        return tf.identity(images)


def serving_functions(model, neighbours, lipschitz_bound, max_batch_size):
    """The three signature functions of a classifier, and the variable of the bound.

    Args:
        model: a built `clustr_tf.models.Classifier` with a fixed input shape: a
            `ClusTRModel` (soft kNC; certificate of the nearest center) or a
            `baselines.SoftmaxClassifier` (softmax of the linear head; its certificate).
        neighbours: int, L of the soft-kNC rule of `serving_default` (None for a linear head).
        lipschitz_bound: float > 0, the l2 Lipschitz bound of `model.backbone`.
        max_batch_size: int, the most images a request may hold (more: INVALID_ARGUMENT).

    Returns:
        A tuple `(functions, bound_variable)`: a dict signature name -> `tf.function`
        with input signature `images` float32 [None, H, W, C], and the float64
        `tf.Variable` that stores the bound.
    """
    import tensorflow as tf

    image_shape = fixed_image_shape(model)
    spec = tf.TensorSpec([None, *image_shape], tf.float32, name=INPUT_NAME)
    num_classes = model.num_classes
    dim = int(model.backbone.compute_output_shape((None, *image_shape))[-1])
    bound = tf.Variable(lipschitz_bound, dtype=tf.float64, trainable=False, name="lipschitz_bound")

    def features(images):
        return tf.cast(model.embed(images, training=False), tf.float32)

    def per_request(images, compute, empty):
        # An empty batch never reaches the backbone: oneDNN's Conv2D (on by default in
        # TF 2.21 on CPU) returns a wrongly shaped result for a batch of 0.
        images = _check_inputs(images, image_shape, max_batch_size)
        return tf.cond(tf.shape(images)[0] > 0, lambda: compute(images), empty)

    def predict(images):
        def compute(x):
            logits = model.logits_from_features(features(x), neighbours)
            return {"probabilities": tf.nn.softmax(logits, axis=-1),
                    "classes": tf.argmax(logits, axis=-1, output_type=tf.int64)}

        def empty():
            return {"probabilities": tf.zeros([0, num_classes], tf.float32),
                    "classes": tf.zeros([0], tf.int64)}

        return per_request(images, compute, empty)

    def certify_fn(images):
        def compute(x):
            # float64: the radius is a difference of squared distances, which float32
            # computes with ~1e-3 relative error on trained CIFAR features (cancellation).
            radius_f, classes, runner_up = model.feature_certificate(tf.cast(features(x), tf.float64))
            bound_value = tf.identity(bound)
            return {"classes": classes,
                    "radius": tf.cast(radius_f / bound_value, tf.float32),
                    "feature_radius": tf.cast(radius_f, tf.float32),
                    "lipschitz_bound": tf.cast(tf.fill(tf.shape(classes), bound_value), tf.float32),
                    "runner_up": runner_up}

        def empty():
            return {"classes": tf.zeros([0], tf.int64),
                    "radius": tf.zeros([0], tf.float32),
                    "feature_radius": tf.zeros([0], tf.float32),
                    "lipschitz_bound": tf.zeros([0], tf.float32),
                    "runner_up": tf.zeros([0], tf.int64)}

        return per_request(images, compute, empty)

    def embed(images):
        return per_request(images, lambda x: {"embeddings": features(x)},
                           lambda: {"embeddings": tf.zeros([0, dim], tf.float32)})

    functions = {
        "serving_default": tf.function(predict, input_signature=[spec], autograph=False),
        "certify": tf.function(certify_fn, input_signature=[spec], autograph=False),
        "embed": tf.function(embed, input_signature=[spec], autograph=False),
    }
    return functions, bound
