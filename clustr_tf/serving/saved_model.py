"""The export of a ClusTR model as a SavedModel for TF Serving: `export` checks the
model and its arguments, computes the backbone's Lipschitz bound, traces the signatures
(`serving.signatures`) in the compute precision, and writes `export_dir/<version>/` with
its warmup requests (`assets.extra/tf_serving_warmup_requests`, one PredictionLog per
signature) and metadata (`assets.extra/clustr_export.json`), verified before it is
published under its version number (`serving.versions`).
"""

import contextlib
import datetime
import json
import os
import shutil
import tempfile

import numpy as np
from absl import logging

from clustr_tf import config
from clustr_tf.serving import export_files
from clustr_tf.serving import signatures
from clustr_tf.serving import versions
from clustr_tf.serving.versions import ExportError

WARMUP_FILE = "tf_serving_warmup_requests"
# The most images one request may hold (`export(max_batch_size=...)`, export_model.py
# --max_batch_size): one request cannot take a server's memory; the client splits larger
# batches (clustr_tf.serving.client.DEFAULT_MAX_BATCH_SIZE is the same number).
DEFAULT_MAX_BATCH_SIZE = 1024
METADATA_FILE = export_files.METADATA_FILE
DEFAULT_MODEL_NAME = "clustr"
# L of the soft-kNC rule at evaluation in the paper, capped by the number of clusters.
DEFAULT_EVAL_NEIGHBOURS = config.EVAL_NEIGHBOURS


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
    for name in signatures.SIGNATURES:
        request = predict_pb2.PredictRequest(
            model_spec=model_pb2.ModelSpec(name=model_name, signature_name=name)
        )
        request.inputs[signatures.INPUT_NAME].CopyFrom(tf.make_tensor_proto(image, dtype=tf.float32))
        logs.append(prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(request=request)
        ))
    return logs


def _checked(model, neighbours, lipschitz_bound):
    """`(image_shape, neighbours, lipschitz_bound)` of `export`'s arguments, checked (the
    bound computed when it is None); ExportError for a model that cannot be exported or a
    bad argument."""
    import numpy as np

    from clustr_tf.nets import lipschitz
    from clustr_tf.core import models

    if not isinstance(model, models.Classifier) or not model.built:
        raise ExportError(
            "export needs a built classifier of this library (clustr_tf.models.ClusTRModel, or a linear-head "
            f"baseline). Received: {type(model).__name__}"
        )
    image_shape = signatures.fixed_image_shape(model)
    if not isinstance(model, models.ClusTRModel):  # a linear head: no L
        if neighbours is not None:
            raise ExportError(f"`neighbours` (L) applies to ClusTR models only. Received: {neighbours!r} for a "
                              f"{type(model).__name__}")
    else:
        layer = model.cluster_centers
        if neighbours is None:
            neighbours = model.evaluation_neighbours()
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
    return image_shape, None if neighbours is None else int(neighbours), float(lipschitz_bound)


def _traced(model, neighbours, lipschitz_bound, compute_precision, trained, max_batch_size):
    """The module to save and its concrete signature functions, traced in
    `compute_precision`; the caller's model is set back to `trained`, its precision."""
    import tensorflow as tf

    from clustr_tf.nets import precision

    precision.set_precision(model, compute_precision)
    try:
        functions, bound = signatures.serving_functions(model, neighbours, lipschitz_bound, max_batch_size)
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
    return root, concrete


def _metadata(model, image_shape, neighbours, lipschitz_bound, compute_precision, trained, embedding_dim, version,
              max_batch_size):
    """The contents of `assets.extra/clustr_export.json`."""
    import tensorflow as tf

    from clustr_tf.core import models

    clusters = model.cluster_centers.clusters_per_class if isinstance(model, models.ClusTRModel) else None
    return {
        "signatures": {name: list(signatures.SIGNATURE_OUTPUTS[name]) for name in signatures.SIGNATURES},
        "input": {"name": signatures.INPUT_NAME, "dtype": "float32", "shape": [None, *image_shape],
                  "range": [0.0, 1.0], "max_batch_size": max_batch_size},
        "num_classes": model.num_classes,
        "certified_rule": model.certified_rule,
        "clusters_per_class": clusters,
        "neighbours": neighbours,
        "lipschitz_bound": lipschitz_bound,
        "compute_precision": compute_precision,
        "trained_precision": trained,
        "embedding_dim": embedding_dim,
        "version": version,
        "tensorflow": tf.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def export(model, export_dir, version=None, neighbours=None, lipschitz_bound=None,
           model_name=DEFAULT_MODEL_NAME, verify=True, compute_precision="float32",
           max_batch_size=DEFAULT_MAX_BATCH_SIZE):
    """Writes `model` as SavedModel `export_dir/<version>/` for TF Serving.

    The version folder is written under a hidden temporary name and renamed at the end, so
    TF Serving, which polls `export_dir`, never sees a half-written version.

    Args:
        model: a built `clustr_tf.models.ClusTRModel` (or a linear-head baseline,
            `baselines.SoftmaxClassifier`: its softmax and its own margin certificate)
            whose backbone has a fixed input shape (H, W, C) and a Lipschitz bound
            (`clustr_tf.lipschitz.model_bound`).
        export_dir: str, the model's base folder (TF Serving's `model_base_path`).
        version: int >= 1, or None for the next free version (max existing + 1, or 1).
        neighbours: int, L of the soft-kNC rule of `serving_default`; None means
            min(20, number of clusters), the paper's evaluation L (and no L for a linear
            head).
        lipschitz_bound: float > 0 to store instead of computing
            `clustr_tf.lipschitz.model_bound(model.backbone)`.
        model_name: the model name written into the warmup requests.
        verify: load the written SavedModel and run each signature before publishing it.
        compute_precision: what the signatures' backbone computes in: "float32" (default,
            the network the certificate and the evaluation are stated for), "bfloat16" or
            "float16" (`clustr_tf.precision`), or None for the model's own. The
            signatures' inputs and outputs keep their dtypes (float32 in; float32 and
            int64 out) whatever it is; the certificate is computed in float64.
        max_batch_size: int >= 1, the most images one request may hold: a larger one gets
            INVALID_ARGUMENT naming the limit (recorded in clustr_export.json).

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
    import tensorflow as tf

    from clustr_tf.nets import precision

    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, (int, np.integer)) or max_batch_size < 1:
        raise ExportError(f"`max_batch_size` must be an int >= 1. Received: {max_batch_size!r}")
    image_shape, neighbours, lipschitz_bound = _checked(model, neighbours, lipschitz_bound)
    versions.check_export_dir(export_dir)
    final, number = versions.version_folder(export_dir, version)
    trained = precision.of(model)
    if compute_precision is None:
        compute_precision = trained
    precision.check(compute_precision, ExportError, "compute_precision")
    root, concrete = _traced(model, neighbours, lipschitz_bound, compute_precision, trained, int(max_batch_size))
    embedding_dim = int(concrete["embed"].structured_outputs["embeddings"].shape[-1])

    created = None  # the outermost folder this export makes
    folder = os.path.abspath(export_dir)
    while not os.path.exists(folder):
        created, folder = folder, os.path.dirname(folder)
    os.makedirs(export_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{number}-", dir=export_dir)
    published = False
    try:
        logging.info("Writing the SavedModel of version %d into %s", number, export_dir)
        tf.saved_model.save(root, tmp, signatures=concrete)
        extra = os.path.join(tmp, "assets.extra")
        os.makedirs(extra, exist_ok=True)
        with tf.io.TFRecordWriter(os.path.join(extra, WARMUP_FILE)) as writer:
            for log in _warmup_requests(image_shape, model_name):
                writer.write(log.SerializeToString())
        with open(os.path.join(extra, METADATA_FILE), "w") as fh:
            json.dump(_metadata(model, image_shape, neighbours, lipschitz_bound, compute_precision, trained,
                                embedding_dim, number, int(max_batch_size)), fh, indent=2)
        if verify:
            logging.info("Checking the SavedModel: each signature on a batch of 1 and of 0 images")
            export_files.verify(tmp, image_shape)
        versions.check_new_version(export_dir, number)  # another export may have taken it meanwhile
        os.rename(tmp, final)
        published = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and not published:  # a failed export leaves no folder it made
            shutil.rmtree(created, ignore_errors=True)
    return final
