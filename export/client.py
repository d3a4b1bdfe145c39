"""A client for a ClusTR model served by TF Serving, over REST or gRPC.

    python export/client.py --rest=http://localhost:8501 --signature=certify --images=batch.npy
    python export/client.py --grpc=localhost:8500 --signature=predict --images=cat.png

Library:

```python
from export import client

with client.ClusTRClient(grpc_target="localhost:8500", model_name="clustr") as c:
    out = c.certify(images)        # images: float32 [N, H, W, C] (or [H, W, C]) in [0, 1]
    out["classes"], out["radius"]  # numpy arrays, one value per image
```

The signatures are those of `export/export_model.py` (../DESIGN.md): `serving_default`
(alias `predict`: `probabilities`, `classes`), `certify` (`classes`, `radius`,
`feature_radius`, `lipschitz_bound`, `runner_up`) and `embed` (`embeddings`).

REST requests use TF Serving's columnar JSON format (`{"signature_name": ..., "inputs":
{"images": ...}}`) and need only NumPy and the standard library; gRPC requests use
`PredictionServiceStub` from tensorflow-serving-api (which imports TensorFlow for its
protos). Both take a timeout and raise `ServerUnreachableError` when nothing answers,
`ServingTimeoutError` when the answer does not come in time, and `ServingError` (with the
server's status and message, e.g. INVALID_ARGUMENT for images outside [0, 1]) when the
server answers with an error. This file does not import the ClusTR library: copy it
where the clients run.
"""

import json
import os
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request

import numpy as np

DEFAULT_MODEL_NAME = "clustr"
DEFAULT_TIMEOUT = 10.0
INPUT_NAME = "images"
SIGNATURE_OUTPUTS = {
    "serving_default": ("probabilities", "classes"),
    "certify": ("classes", "radius", "feature_radius", "lipschitz_bound", "runner_up"),
    "embed": ("embeddings",),
}
SIGNATURE_ALIASES = {"predict": "serving_default", **{name: name for name in SIGNATURE_OUTPUTS}}
OUTPUT_DTYPES = {
    "probabilities": np.float32,
    "classes": np.int64,
    "radius": np.float32,
    "feature_radius": np.float32,
    "lipschitz_bound": np.float32,
    "runner_up": np.int64,
    "embeddings": np.float32,
}
# TF Serving's own gRPC limit is far above gRPC's 4 MiB default; a batch of 256 CIFAR
# images is 3 MiB of float32.
_MAX_GRPC_MESSAGE = 256 * 1024 * 1024


class ServingError(RuntimeError):
    """TF Serving answered with an error, or with something this client cannot read.

    Attributes:
        code: the HTTP status (REST) or the gRPC status name (e.g. "INVALID_ARGUMENT"),
            or None.
    """

    def __init__(self, message, code=None):
        super().__init__(message)
        self.code = code


class ServerUnreachableError(ServingError):
    """No TF Serving answers at the address (refused, unknown host, connection reset)."""


class ServingTimeoutError(ServingError):
    """The server did not answer within the timeout."""


def resolve_signature(name):
    """'predict' -> 'serving_default'; the other signature names map to themselves."""
    try:
        return SIGNATURE_ALIASES[name]
    except KeyError:
        raise ValueError(
            f"Unknown signature. Expected one of {', '.join(SIGNATURE_ALIASES)}. Received: {name!r}"
        ) from None


def as_batch(images):
    """float32 array [N, H, W, C] from a batch or a single [H, W, C] image.

    Values are not rescaled: the model takes pixels in [0, 1] and rejects anything else.
    """
    array = np.asarray(images, dtype=np.float32)
    if array.ndim == 3:
        array = array[np.newaxis]
    if array.ndim != 4:
        raise ValueError(
            f"`images` must be [N, H, W, C] or one [H, W, C] image. Received shape: {array.shape}"
        )
    return array


# ------------------------------------------------------------------------------- REST


def rest_url(base_url, model_name=DEFAULT_MODEL_NAME, version=None):
    """TF Serving's predict URL, e.g. http://host:8501/v1/models/clustr/versions/2:predict."""
    base = base_url.strip().rstrip("/")
    if "://" not in base:
        base = "http://" + base
    path = f"/v1/models/{urllib.parse.quote(model_name, safe='')}"
    if version is not None:
        path += f"/versions/{int(version)}"
    return base + path + ":predict"


def rest_request_body(images, signature="serving_default"):
    """The JSON request (a dict) in TF Serving's columnar format.

    Raises:
        ValueError: for a bad shape or signature, or an empty batch: JSON's `[]` carries
            no image shape, so the model would see a tensor of shape [0] (use gRPC, which
            sends the shape, or skip the call).
    """
    batch = as_batch(images)
    if batch.shape[0] == 0:
        raise ValueError(
            "An empty batch cannot be sent over REST: the JSON list [] carries no image shape. "
            f"Use gRPC or skip the call. Received shape: {batch.shape}"
        )
    return {
        "signature_name": resolve_signature(signature),
        "inputs": {INPUT_NAME: batch.tolist()},
    }


def _typed(outputs):
    return {k: np.asarray(v, dtype=OUTPUT_DTYPES.get(k)) for k, v in outputs.items()}


def parse_rest_response(payload, signature="serving_default"):
    """TF Serving's JSON answer (str, bytes or dict) -> dict output name -> numpy array.

    Reads the columnar answer (`{"outputs": {name: values}}`, or `{"outputs": values}` for
    a signature with one output, such as `embed`) and the row answer (`{"predictions":
    [...]}`).

    Raises:
        ServingError: for an `{"error": ...}` answer or one that is not TF Serving's.
    """
    signature = resolve_signature(signature)
    if isinstance(payload, (str, bytes)):
        try:
            payload = json.loads(payload)
        except ValueError:
            text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else payload
            raise ServingError(f"The server's answer is not JSON: {text[:200]!r}") from None
    if not isinstance(payload, dict):
        raise ServingError(f"The server's answer is not a JSON object: {str(payload)[:200]}")
    if "error" in payload:
        raise ServingError(str(payload["error"]))
    names = SIGNATURE_OUTPUTS[signature]
    if "outputs" in payload:
        outputs = payload["outputs"]
        if not isinstance(outputs, dict):
            if len(names) != 1:
                raise ServingError(
                    f"Expected the outputs {', '.join(names)} of signature {signature!r}. Received: "
                    f"{str(outputs)[:200]}"
                )
            outputs = {names[0]: outputs}
        return _typed(outputs)
    if "predictions" in payload:
        rows = payload["predictions"]
        if rows and isinstance(rows[0], dict):
            return _typed({k: [row[k] for row in rows] for k in rows[0]})
        if len(names) == 1:
            return _typed({names[0]: rows})
        return _typed({name: [] for name in names})
    raise ServingError(f"The server's answer has neither 'outputs' nor 'predictions': {str(payload)[:200]}")


def _is_timeout(error):
    return isinstance(error, (TimeoutError, socket.timeout))


def rest_predict(images, url, model_name=DEFAULT_MODEL_NAME, signature="serving_default", version=None,
                 timeout=DEFAULT_TIMEOUT):
    """Sends `images` to TF Serving's REST API and returns the signature's outputs.

    Args:
        images: float array [N, H, W, C] (or one [H, W, C] image) of pixels in [0, 1].
        url: the REST address, e.g. "http://localhost:8501".
        model_name: TF Serving's --model_name.
        signature: "predict"/"serving_default", "certify" or "embed".
        version: a model version to ask for, or None for the latest.
        timeout: seconds to wait for the connection and for the answer.

    Returns:
        dict output name -> numpy array with one row per image.

    Raises:
        ServerUnreachableError, ServingTimeoutError, ServingError.
    """
    address = rest_url(url, model_name, version)
    body = json.dumps(rest_request_body(images, signature)).encode("utf-8")
    request = urllib.request.Request(address, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read()
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            message = json.loads(raw).get("error", raw.decode("utf-8", "replace"))
        except (ValueError, AttributeError):
            message = raw.decode("utf-8", "replace")
        raise ServingError(f"TF Serving at {address} answered HTTP {e.code}: {message}", code=e.code) from None
    except urllib.error.URLError as e:
        if _is_timeout(e.reason):
            raise ServingTimeoutError(f"No answer from {address} within {timeout} s") from None
        raise ServerUnreachableError(
            f"Cannot reach TF Serving's REST endpoint {address}: {e.reason}. Is the server running "
            "and publishing its REST port (--rest_api_port, 8501 in the docker image)?"
        ) from None
    except OSError as e:  # timeouts while reading, connection reset
        if _is_timeout(e):
            raise ServingTimeoutError(f"No answer from {address} within {timeout} s") from None
        raise ServerUnreachableError(f"The connection to {address} failed: {e}") from None
    return parse_rest_response(text, signature)


# ------------------------------------------------------------------------------- gRPC


def grpc_request(images, model_name=DEFAULT_MODEL_NAME, signature="serving_default", version=None):
    """A `tensorflow_serving.apis.predict_pb2.PredictRequest` for `images`."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = resolve_signature(signature)
    if version is not None:
        request.model_spec.version.value = int(version)
    request.inputs[INPUT_NAME].CopyFrom(tf.make_tensor_proto(as_batch(images), dtype=tf.float32))
    return request


def parse_grpc_response(response):
    """A `PredictResponse` -> dict output name -> numpy array."""
    import tensorflow as tf

    return {name: tf.make_ndarray(tensor) for name, tensor in response.outputs.items()}


def grpc_channel(target):
    """An insecure gRPC channel to `target` ("host:port") that allows large batches."""
    import grpc

    return grpc.insecure_channel(target, options=[("grpc.max_send_message_length", _MAX_GRPC_MESSAGE),
                                                  ("grpc.max_receive_message_length", _MAX_GRPC_MESSAGE)])


def grpc_predict(images, target, model_name=DEFAULT_MODEL_NAME, signature="serving_default", version=None,
                 timeout=DEFAULT_TIMEOUT, channel=None):
    """Sends `images` to TF Serving's gRPC PredictionService and returns the outputs.

    Args:
        images: float array [N, H, W, C] (or one [H, W, C] image) of pixels in [0, 1].
        target: "host:port" of TF Serving's gRPC port (8500 in the docker image).
        model_name: TF Serving's --model_name.
        signature: "predict"/"serving_default", "certify" or "embed".
        version: a model version to ask for, or None for the latest.
        timeout: deadline of the call in seconds.
        channel: a `grpc.Channel` to reuse (else one is opened and closed).

    Returns:
        dict output name -> numpy array with one row per image.

    Raises:
        ServerUnreachableError, ServingTimeoutError, ServingError.
    """
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    request = grpc_request(images, model_name, signature, version)
    own = channel is None
    channel = grpc_channel(target) if own else channel
    try:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        response = stub.Predict(request, timeout=timeout)
    except grpc.RpcError as e:
        code, details = e.code(), e.details()
        if code == grpc.StatusCode.UNAVAILABLE:
            raise ServerUnreachableError(
                f"Cannot reach TF Serving's gRPC endpoint {target}: {details}. Is the server running and "
                "publishing its gRPC port (--port, 8500 in the docker image)?", code=code.name,
            ) from None
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise ServingTimeoutError(f"No answer from {target} within {timeout} s", code=code.name) from None
        raise ServingError(f"TF Serving at {target} answered {code.name}: {details}", code=code.name) from None
    finally:
        if own:
            channel.close()
    return parse_grpc_response(response)


# ----------------------------------------------------------------------------- client


class ClusTRClient:
    """Predictions, certificates and embeddings from a ClusTR model behind TF Serving.

    Args:
        rest_url: TF Serving's REST address ("http://host:8501"), or
        grpc_target: its gRPC address ("host:8500"); exactly one of the two.
        model_name: TF Serving's --model_name.
        version: a model version, or None for the latest.
        timeout: seconds per request.

    Example:

    ```python
    with ClusTRClient(rest_url="http://localhost:8501") as c:
        print(c.certify(images)["radius"])
    ```
    """

    def __init__(self, rest_url=None, grpc_target=None, model_name=DEFAULT_MODEL_NAME, version=None,
                 timeout=DEFAULT_TIMEOUT):
        if (rest_url is None) == (grpc_target is None):
            raise ValueError(
                f"Give exactly one of `rest_url` and `grpc_target`. Received: {rest_url!r}, {grpc_target!r}"
            )
        if not timeout > 0:
            raise ValueError(f"`timeout` must be > 0 seconds. Received: {timeout!r}")
        self.rest_url, self.grpc_target = rest_url, grpc_target
        self.model_name, self.version, self.timeout = model_name, version, timeout
        self._channel = grpc_channel(grpc_target) if grpc_target is not None else None

    def call(self, signature, images):
        """The outputs of `signature` for `images` (dict name -> numpy array)."""
        if self._channel is not None:
            return grpc_predict(images, self.grpc_target, self.model_name, signature, self.version,
                                self.timeout, channel=self._channel)
        return rest_predict(images, self.rest_url, self.model_name, signature, self.version, self.timeout)

    def predict(self, images):
        """`probabilities` float32 [N, classes] and `classes` int64 [N] (soft kNC)."""
        return self.call("serving_default", images)

    def certify(self, images):
        """`classes`, `radius`, `feature_radius`, `lipschitz_bound`, `runner_up`, one per image."""
        return self.call("certify", images)

    def embed(self, images):
        """`embeddings` float32 [N, D]."""
        return self.call("embed", images)

    def close(self):
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -------------------------------------------------------------------------------- CLI


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
        return as_batch(array)
    except ValueError as e:
        raise UsageError(f"{e} (in {path})") from None


def define_flags():
    from absl import flags

    flags.DEFINE_string("rest", None, "TF Serving's REST address, e.g. http://localhost:8501.")
    flags.DEFINE_string("grpc", None, "TF Serving's gRPC address, e.g. localhost:8500.")
    flags.DEFINE_string("model_name", DEFAULT_MODEL_NAME, "TF Serving's --model_name.")
    flags.DEFINE_string("version", None, "Model version (default: the latest).")
    flags.DEFINE_string("signature", "certify", f"One of {', '.join(SIGNATURE_ALIASES)}.")
    flags.DEFINE_string("images", None, ".npy array [N, H, W, C] in [0, 1] (uint8 is scaled), or an image file.")
    flags.DEFINE_float("timeout", DEFAULT_TIMEOUT, "Seconds per request.")


def _run(f):
    if (f.rest is None) == (f.grpc is None):
        raise UsageError("Give exactly one of --rest (e.g. http://localhost:8501) and --grpc (e.g. localhost:8500).")
    if not f.images:
        raise UsageError("--images is required (.npy array or image file).")
    try:
        signature = resolve_signature(f.signature)
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
    images = load_images(f.images)
    with ClusTRClient(rest_url=f.rest, grpc_target=f.grpc, model_name=f.model_name, version=version,
                      timeout=f.timeout) as client:
        outputs = client.call(signature, images)
    return {name: value.tolist() for name, value in outputs.items()}


def main(argv):
    from absl import flags

    if len(argv) > 1:
        sys.stderr.write(f"client.py: error: unexpected arguments: {' '.join(argv[1:])}\n")
        sys.exit(2)
    try:
        result = _run(flags.FLAGS)
    except UsageError as e:
        sys.stderr.write(f"client.py: error: {e}\n")
        sys.exit(2)
    except ServingError as e:
        sys.stderr.write(f"client.py: error: {e}\n")
        sys.exit(1)
    print(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import app

    define_flags()
    app.run(main)
