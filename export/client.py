"""The command-line client of a ClusTR model served by TF Serving, over REST or gRPC.

    python export/client.py --rest=http://localhost:8501 --signature=certify --images=batch.npy
    python export/client.py --grpc=localhost:8500 --signature=predict --images=cat.png
    clustr-client --rest=http://localhost:8501 --images=batch.npy     # installed with pip

Prints the outputs as one JSON object. The library it runs is `clustr_tf.serving.client`
(NumPy only; no TensorFlow needed for .npy images over REST). A bad flag or input is one
line and exit status 2; a server that cannot be reached or answers with an error, exit 1.
"""

import json
import os
import sys

import numpy as np


def _library():
    """`clustr_tf.serving.client`, imported when first needed (after the entry point has
    deferred the library's TensorFlow imports)."""
    from clustr_tf.serving import client

    return client


class UsageError(ValueError):
    """A bad flag or input file."""


def load_images(path):
    """Images from a .npy file ([N, H, W, C] or [H, W, C]; 8-bit integers are divided by
    255) or an image file (PNG, JPEG, BMP, GIF: divided by 255)."""
    if not os.path.isfile(path):
        raise UsageError(f"--images is not a file. Received: {path}")
    if path.endswith(".npy"):
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UsageError(f"Cannot read {path} as a .npy array: {e}") from None
        if array.dtype == np.uint8:
            array = array.astype(np.float32) / 255.0
    else:
        import tensorflow as tf

        try:
            array = tf.io.decode_image(tf.io.read_file(path), expand_animations=False).numpy()
        except tf.errors.OpError as e:
            raise UsageError(f"Cannot decode {path} as an image (PNG, JPEG, BMP, GIF): {e.message}") from None
        array = array.astype(np.float32) / 255.0
    try:
        return _library().as_batch(array)
    except ValueError as e:
        raise UsageError(f"{e} (in {path})") from None


def define_flags():
    from absl import flags

    lib = _library()
    flags.DEFINE_string("rest", None, "TF Serving's REST address, e.g. http://localhost:8501.")
    flags.DEFINE_string("grpc", None, "TF Serving's gRPC address, e.g. localhost:8500.")
    flags.DEFINE_string("model_name", lib.DEFAULT_MODEL_NAME, "TF Serving's --model_name.")
    flags.DEFINE_string("version", None, "Model version (default: the latest).")
    flags.DEFINE_string("signature", "certify", f"One of {', '.join(lib.SIGNATURE_ALIASES)}.")
    flags.DEFINE_string("images", None, ".npy array [N, H, W, C] in [0, 1] (uint8 is scaled), or an image file.")
    flags.DEFINE_float("timeout", lib.DEFAULT_TIMEOUT, "Seconds per request.")
    flags.DEFINE_integer("max_batch_size", lib.DEFAULT_MAX_BATCH_SIZE,
                         "The most images per request (the export's --max_batch_size); more go as several requests.")


def _run(f):
    lib = _library()
    if (f.rest is None) == (f.grpc is None):
        raise UsageError("Give exactly one of --rest (e.g. http://localhost:8501) and --grpc (e.g. localhost:8500).")
    if not f.images:
        raise UsageError("--images is required (.npy array or image file).")
    try:
        signature = lib.resolve_signature(f.signature)
    except ValueError as e:
        raise UsageError(f"--signature: {e}") from None
    version = None
    if f.version is not None:
        try:
            version = int(f.version)
        except ValueError:
            version = -1
        if version < 1:
            raise UsageError(f"--version must be an integer >= 1. Received: {f.version!r}")
    if not f.timeout > 0:
        raise UsageError(f"--timeout must be > 0 seconds. Received: {f.timeout}")
    if f.max_batch_size < 1:
        raise UsageError(f"--max_batch_size must be >= 1. Received: {f.max_batch_size}")
    images = load_images(f.images)
    if not len(images):
        raise UsageError(f"--images holds no image (shape {images.shape}). Received: {f.images}")
    with lib.ClusTRClient(rest_url=f.rest, grpc_target=f.grpc, model_name=f.model_name, version=version,
                      timeout=f.timeout, max_batch_size=f.max_batch_size) as client:
        outputs = client.call(signature, images)
    return {name: value.tolist() for name, value in outputs.items()}


def main(argv):
    from absl import flags

    from clustr_tf import cli

    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}", 2)
    try:
        result = _run(flags.FLAGS)
    except UsageError as e:
        cli.fail(e, 2)
    except _library().ServingError as e:
        cli.fail(e, 1)
    print(json.dumps(result))


def console_main():
    """The `clustr-client` command of the pip package (pyproject.toml)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ["CLUSTR_TF_DEFER_IMPORTS"] = "1"  # the client needs no TensorFlow
    from clustr_tf import cli

    cli.start(main, define_flags, __name__)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    console_main()
