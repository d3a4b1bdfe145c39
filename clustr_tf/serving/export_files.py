"""Reading an export back: `check_export(path)` finds the version folder, reads its
metadata (`assets.extra/clustr_export.json`), loads the SavedModel and runs every signature
on a batch of 1 and of 0 images. Each way a copied or half-written export can be broken
(no such folder, no saved_model.pb, a truncated saved_model.pb or variables file, damaged
or foreign metadata, a missing signature) is one `ExportError` line that names the file,
what is wrong and what to do. `export` runs the same check before it publishes a version;
`export/export_model.py --check_export=DIR` runs it on an existing export.
"""

import json
import os

import numpy as np

from clustr_tf.serving import signatures
from clustr_tf.serving import versions
from clustr_tf.serving.versions import ExportError

METADATA_FILE = "clustr_export.json"
_AGAIN = "export the run again (export/export_model.py --model_dir=RUN --export_dir=DIR)"


def _version_folder(path):
    """`path` itself when it holds saved_model.pb, else its highest numbered version."""
    if not os.path.isdir(path):
        raise ExportError(f"No export at {path}: not a directory")
    if os.path.exists(os.path.join(path, "saved_model.pb")):
        return path
    numbers = versions.existing_versions(path)
    if not numbers:
        raise ExportError(f"{path} is not an export: it holds no saved_model.pb and no numbered version folder")
    return os.path.join(path, str(max(numbers)))


def read_metadata(path):
    """The dict of `path/assets.extra/clustr_export.json`; ExportError when it is missing,
    truncated or lacks what this version of clustr_tf writes."""
    file = os.path.join(path, "assets.extra", METADATA_FILE)
    if not os.path.exists(file):
        raise ExportError(f"{path} was not written by clustr_tf's export (no assets.extra/{METADATA_FILE}): {_AGAIN}")
    try:
        with open(file) as fh:
            metadata = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{file} is truncated or not JSON ({os.path.getsize(file)} bytes; {e}): {_AGAIN}") from None
    shape = metadata.get("input", {}).get("shape") if isinstance(metadata, dict) else None
    if not (isinstance(shape, list) and len(shape) == 4 and all(isinstance(d, int) and d > 0 for d in shape[1:])):
        raise ExportError(f"{file} was written by an incompatible version of clustr_tf (no input shape "
                          f"[None, H, W, C]; received: {shape!r}): {_AGAIN}")
    return metadata


def _load(path):
    import tensorflow as tf
    from google.protobuf import message
    from tensorflow.core.protobuf import saved_model_pb2

    graph = os.path.join(path, "saved_model.pb")
    if not os.path.exists(graph):
        raise ExportError(f"{path} is not a SavedModel (no saved_model.pb): {_AGAIN}")
    with open(graph, "rb") as fh:
        data = fh.read()
    try:
        proto = saved_model_pb2.SavedModel()
        proto.ParseFromString(data)
        if not proto.meta_graphs:
            raise message.DecodeError("no meta graph")
    except message.DecodeError as e:
        raise ExportError(f"{graph} is truncated or not a SavedModel ({len(data)} bytes; {e}): {_AGAIN}") from None
    try:
        return tf.saved_model.load(path)
    except Exception as e:  # noqa: BLE001  (TensorFlow raises many kinds for a damaged variables file)
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ExportError(f"The variables of {path} (variables/) are truncated or damaged ({type(e).__name__}: "
                          f"{first}): {_AGAIN}") from None


def verify(path, image_shape):
    """Loads the SavedModel at `path` (`_load`) and runs every signature on a valid batch of
    1 and of 0 images."""
    import tensorflow as tf

    loaded = _load(path)
    for name in signatures.SIGNATURES:
        if name not in loaded.signatures:
            raise ExportError(f"The SavedModel at {path} lacks the signature {name!r}: {_AGAIN}")
        for batch in (1, 0):
            outputs = loaded.signatures[name](images=tf.constant(np.full((batch, *image_shape), 0.5, np.float32)))
            if sorted(outputs) != sorted(signatures.SIGNATURE_OUTPUTS[name]) or any(
                    int(v.shape[0]) != batch for v in outputs.values()):
                raise ExportError(f"Signature {name!r} of {path} gives outputs "
                                  f"{ {k: tuple(v.shape) for k, v in outputs.items()} } for a batch of {batch}")


def check_export(path):
    """Checks an export as TF Serving will load it.

    Args:
        path: a version folder (holding saved_model.pb), or the model's base folder (its
            highest version is checked).

    Returns:
        `(version_folder, metadata)`: the folder checked and its clustr_export.json dict.

    Raises:
        ExportError: one line naming the file and what is wrong with it.
    """
    folder = _version_folder(path)
    metadata = read_metadata(folder)
    verify(folder, tuple(metadata["input"]["shape"][1:]))
    return folder, metadata
