"""SavedModel export for TF Serving: the serving functions of a ClusTR model, the export,
its checks and its warmup requests.

`export(model, export_dir)` writes `export_dir/<version>/` (TF Serving's layout; the next
free version by default, an existing one is never overwritten) with three signatures, the
contract of ../DESIGN.md:

- `serving_default`: `images` float32 [batch, H, W, C] in [0, 1] -> `probabilities`
  float32 [batch, classes] (soft kNC over the evaluation L nearest clusters) and
  `classes` int64 [batch] (their argmax);
- `certify`: `images` -> `classes` int64 [batch] (nearest-center class), `radius` float32
  [batch] (certified l2 radius in pixel space), `feature_radius` float32 [batch],
  `lipschitz_bound` float32 [batch] (the same stored bound on every row), `runner_up`
  int64 [batch] (the class the decision would change to first): the theorem of
  `clustr_tf.certify.feature_radius`, run inside the graph in float64 on the features;
  radius = feature_radius / lipschitz_bound;
- `embed`: `images` -> `embeddings` float32 [batch, D].

The graph checks every request first (rank, image size and channels, finite values in
[0, 1]) and fails it with a readable `InvalidArgumentError` (INVALID_ARGUMENT in TF
Serving, which does not check input shapes itself). The Lipschitz bound of the backbone
(`clustr_tf.lipschitz.model_bound`) is computed at export and stored in the model as a
variable. `assets.extra/tf_serving_warmup_requests` holds one PredictionLog per signature;
`assets.extra/clustr_export.json` describes the export. The SavedModel needs plain
TensorFlow only: this project need not be installed where it is served.

`export/export_model.py` is the binary around `export`; `training/main.py --export_dir`
calls `export` at the end of training.
"""

import contextlib
import datetime
import json
import os
import shutil
import tempfile

SIGNATURES = ("serving_default", "certify", "embed")
SIGNATURE_OUTPUTS = {
    "serving_default": ("probabilities", "classes"),
    "certify": ("classes", "radius", "feature_radius", "lipschitz_bound", "runner_up"),
    "embed": ("embeddings",),
}
INPUT_NAME = "images"
WARMUP_FILE = "tf_serving_warmup_requests"
METADATA_FILE = "clustr_export.json"
DEFAULT_MODEL_NAME = "clustr"
# L of the soft-kNC rule at evaluation in the paper, capped by the number of clusters.
DEFAULT_EVAL_NEIGHBOURS = 20


class ExportError(ValueError):
    """An export that cannot be done; the message names the problem and what was received."""


def parse_version(text):
    """A version flag value -> int >= 1; raises ExportError."""
    try:
        version = int(str(text).strip())
    except ValueError:
        raise ExportError(f"--version must be an integer >= 1. Received: {text!r}") from None
    if version < 1:
        raise ExportError(f"--version must be an integer >= 1. Received: {text!r}")
    return version


def existing_versions(export_dir):
    """The sorted version numbers under `export_dir` (folders named by an integer)."""
    if not os.path.isdir(export_dir):
        return []
    return sorted(int(n) for n in os.listdir(export_dir)
                  if n.isdigit() and os.path.isdir(os.path.join(export_dir, n)))


def next_version(export_dir):
    """The version TF Serving would serve after the ones in `export_dir`: max + 1, or 1."""
    versions = existing_versions(export_dir)
    return versions[-1] + 1 if versions else 1


def check_export_dir(export_dir):
    """Creates `export_dir` if needed and checks it is a writable folder; ExportError if not."""
    if not export_dir:
        raise ExportError("--export_dir is required (the model's base folder for TF Serving).")
    if os.path.exists(export_dir) and not os.path.isdir(export_dir):
        raise ExportError(f"--export_dir exists and is not a directory. Received: {export_dir}")
    try:
        os.makedirs(export_dir, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=export_dir, prefix=".write_test", delete=True)
        probe.close()
    except OSError as e:
        raise ExportError(
            f"--export_dir is not a writable directory: {e.strerror or e}. Received: {export_dir}"
        ) from None


def _image_shape(model):
    backbone = model.backbone
    inputs = getattr(backbone, "inputs", None)
    shape = tuple(inputs[0].shape[1:]) if inputs else ()
    if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ExportError(
            "Export needs a backbone with a fixed input shape (height, width, channels). "
            f"Received: {shape or 'no inputs'}"
        )
    return shape


def _check_inputs(images, image_shape):
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


def serving_functions(model, neighbours, lipschitz_bound):
    """The three signature functions of a ClusTR model, and the variable of the bound.

    Args:
        model: a built `clustr_tf.models.ClusTRModel` with a fixed input shape.
        neighbours: int, L of the soft-kNC rule of `serving_default`.
        lipschitz_bound: float > 0, the l2 Lipschitz bound of `model.backbone`.

    Returns:
        A tuple `(functions, bound_variable)`: a dict signature name -> `tf.function`
        with input signature `images` float32 [None, H, W, C], and the float64
        `tf.Variable` that stores the bound.
    """
    import tensorflow as tf

    from clustr_tf import certify

    layer = model.cluster_centers
    image_shape = _image_shape(model)
    spec = tf.TensorSpec([None, *image_shape], tf.float32, name=INPUT_NAME)
    num_classes = layer.num_classes
    dim = int(model.backbone.compute_output_shape((None, *image_shape))[-1])
    bound = tf.Variable(lipschitz_bound, dtype=tf.float64, trainable=False, name="lipschitz_bound")

    def features(images):
        return tf.cast(model.embed(images, training=False), tf.float32)

    def per_request(images, compute, empty):
        # An empty batch never reaches the backbone: oneDNN's Conv2D (on by default in
        # TF 2.21 on CPU) returns a wrongly shaped result for a batch of 0.
        images = _check_inputs(images, image_shape)
        return tf.cond(tf.shape(images)[0] > 0, lambda: compute(images), empty)

    def predict(images):
        def compute(x):
            logits = layer.logits_from_distances(layer.squared_distances(features(x)), neighbours)
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
            radius_f, classes, runner_up = certify.feature_radius(
                tf.cast(features(x), tf.float64), tf.cast(layer.centers, tf.float64),
                layer.clusters_per_class,
            )
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


def _single_threaded_blas():
    """Limits OpenBLAS to one thread while the Lipschitz bound runs its batched SVDs.

    Measured on the 2-core machines of this project: with the CPU shared with another
    process, OpenBLAS's 2 threads took 48 s for the SVDs of one 128-channel convolution
    that take 0.09 s on one thread (ResNet-18 x0.25: 4 minutes against seconds).
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # a scikit-learn dependency; without it, OpenBLAS's defaults
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _warmup_requests(image_shape, model_name):
    """One PredictionLog per signature, on a batch of one mid-grey image."""
    import numpy as np
    import tensorflow as tf
    from tensorflow_serving.apis import model_pb2
    from tensorflow_serving.apis import predict_pb2
    from tensorflow_serving.apis import prediction_log_pb2

    image = np.full((1, *image_shape), 0.5, np.float32)
    logs = []
    for name in SIGNATURES:
        request = predict_pb2.PredictRequest(
            model_spec=model_pb2.ModelSpec(name=model_name, signature_name=name)
        )
        request.inputs[INPUT_NAME].CopyFrom(tf.make_tensor_proto(image, dtype=tf.float32))
        logs.append(prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(request=request)
        ))
    return logs


def _verify(path, image_shape):
    """Loads the written SavedModel and runs every signature on a valid and an empty batch."""
    import numpy as np
    import tensorflow as tf

    loaded = tf.saved_model.load(path)
    for name in SIGNATURES:
        if name not in loaded.signatures:
            raise ExportError(f"The SavedModel at {path} lacks the signature {name!r}")
        for batch in (1, 0):
            outputs = loaded.signatures[name](
                images=tf.constant(np.full((batch, *image_shape), 0.5, np.float32))
            )
            if sorted(outputs) != sorted(SIGNATURE_OUTPUTS[name]) or any(
                    int(v.shape[0]) != batch for v in outputs.values()):
                raise ExportError(
                    f"Signature {name!r} of {path} gives outputs "
                    f"{ {k: tuple(v.shape) for k, v in outputs.items()} } for a batch of {batch}"
                )


def export(model, export_dir, version=None, neighbours=None, lipschitz_bound=None,
           model_name=DEFAULT_MODEL_NAME, verify=True, compute_precision="float32"):
    """Writes `model` as SavedModel `export_dir/<version>/` for TF Serving.

    The version folder is written under a hidden temporary name and renamed at the end, so
    TF Serving, which polls `export_dir`, never sees a half-written version.

    Args:
        model: a built `clustr_tf.models.ClusTRModel` whose backbone has a fixed input
            shape (H, W, C) and a Lipschitz bound (`clustr_tf.lipschitz.model_bound`).
        export_dir: str, the model's base folder (TF Serving's `model_base_path`).
        version: int >= 1, or None for the next free version (max existing + 1, or 1).
        neighbours: int, L of the soft-kNC rule of `serving_default`; None means
            min(20, number of clusters), the paper's evaluation L.
        lipschitz_bound: float > 0 to store instead of computing
            `clustr_tf.lipschitz.model_bound(model.backbone)`.
        model_name: the model name written into the warmup requests.
        verify: load the written SavedModel and run each signature before publishing it.
        compute_precision: what the signatures' backbone computes in: "float32" (default,
            the network the certificate and the evaluation are stated for), "bfloat16" or
            "float16" (`clustr_tf.precision`), or None for the model's own. The
            signatures' inputs and outputs keep their dtypes (float32 in; float32 and
            int64 out) whatever it is; the certificate is computed in float64.

    Returns:
        str, the path of the version folder.

    Raises:
        ExportError: for an existing version, a bad argument, a model without a fixed
            input shape or a Lipschitz bound, or a SavedModel that fails to verify.

    Example:

    ```python
    path = export(keras.saving.load_model("RUN/model.keras"), "serving/clustr")
    ```
    """
    import numpy as np
    import tensorflow as tf

    from clustr_tf import lipschitz

    from clustr_tf import models

    if not isinstance(model, models.ClusTRModel) or not model.built:
        raise ExportError(
            f"export needs a built ClusTR model (clustr_tf.models.ClusTRModel). Received: {type(model).__name__}"
        )
    layer = model.cluster_centers
    image_shape = _image_shape(model)
    if neighbours is None:
        neighbours = min(DEFAULT_EVAL_NEIGHBOURS, layer.num_clusters)
    if isinstance(neighbours, bool) or not isinstance(neighbours, (int, np.integer)) or not (
            1 <= neighbours <= layer.num_clusters):
        raise ExportError(
            f"`neighbours` (L) must be an integer in [1, {layer.num_clusters}] (the number of "
            f"clusters). Received: {neighbours!r}"
        )
    if lipschitz_bound is None:
        try:
            with _single_threaded_blas():
                lipschitz_bound = lipschitz.model_bound(model.backbone)
        except ValueError as e:
            raise ExportError(f"No Lipschitz bound for the backbone, so no certificate: {e}") from None
    if not (np.isfinite(lipschitz_bound) and lipschitz_bound > 0):
        raise ExportError(f"`lipschitz_bound` must be finite and > 0. Received: {lipschitz_bound!r}")
    check_export_dir(export_dir)
    if version is None:
        version = next_version(export_dir)
    elif isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < 1:
        raise ExportError(f"`version` must be an integer >= 1. Received: {version!r}")
    final = os.path.join(export_dir, str(int(version)))
    if os.path.exists(final):
        raise ExportError(f"Version {version} already exists; it is never overwritten. Received: {final}")

    from clustr_tf import precision

    trained = precision.of(model)
    if compute_precision is None:
        compute_precision = trained
    precision.check(compute_precision, ExportError, "compute_precision")
    precision.set_precision(model, compute_precision)
    try:  # traced here, in compute_precision; the caller's model is left as it was
        functions, bound = serving_functions(model, int(neighbours), float(lipschitz_bound))
        root = tf.Module(name="clustr_serving")
        root.lipschitz_bound = bound
        for name, fn in functions.items():
            setattr(root, name, fn)
        concrete = {name: fn.get_concrete_function() for name, fn in functions.items()}
    finally:
        precision.set_precision(model, trained)
    # Track exactly the variables the signatures read (as keras.export.ExportArchive
    # does): tracking the Keras model itself would also save its wrapper objects, and a
    # TF1-style loader such as TF Serving's then restores the wrong ones.
    seen, variables = set(), []
    for fn in concrete.values():
        for v in fn.variables:
            if id(v) not in seen:
                seen.add(id(v))
                variables.append(v)
    root.model_variables = variables

    tmp = tempfile.mkdtemp(prefix=f".tmp-{int(version)}-", dir=export_dir)
    try:
        tf.saved_model.save(root, tmp, signatures=concrete)
        extra = os.path.join(tmp, "assets.extra")
        os.makedirs(extra, exist_ok=True)
        with tf.io.TFRecordWriter(os.path.join(extra, WARMUP_FILE)) as writer:
            for log in _warmup_requests(image_shape, model_name):
                writer.write(log.SerializeToString())
        metadata = {
            "signatures": {name: list(SIGNATURE_OUTPUTS[name]) for name in SIGNATURES},
            "input": {"name": INPUT_NAME, "dtype": "float32", "shape": [None, *image_shape],
                      "range": [0.0, 1.0]},
            "num_classes": layer.num_classes,
            "clusters_per_class": layer.clusters_per_class,
            "neighbours": int(neighbours),
            "lipschitz_bound": float(lipschitz_bound),
            "compute_precision": compute_precision,
            "trained_precision": trained,
            "embedding_dim": int(concrete["embed"].structured_outputs["embeddings"].shape[-1]),
            "version": int(version),
            "tensorflow": tf.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        with open(os.path.join(extra, METADATA_FILE), "w") as fh:
            json.dump(metadata, fh, indent=2)
        if verify:
            _verify(tmp, image_shape)
        if os.path.exists(final):  # another export took this version meanwhile
            raise ExportError(f"Version {version} already exists; it is never overwritten. Received: {final}")
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
