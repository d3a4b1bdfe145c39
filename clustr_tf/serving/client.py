"""A client for a ClusTR model served by TF Serving, over REST or gRPC (no TensorFlow).

```python
from clustr_tf.serving import client

with client.ClusTRClient(grpc_target="localhost:8500", model_name="clustr") as c:
    out = c.certify(images)        # images: float32 [N, H, W, C] (or [H, W, C]) in [0, 1]
    out["classes"], out["radius"]  # numpy arrays, one value per image
```

The signatures are those of `clustr_tf.serving.export` (docs/serving.md): `serving_default`
(alias `predict`: `probabilities`, `classes`), `certify` (`classes`, `radius`,
`feature_radius`, `lipschitz_bound`, `runner_up`) and `embed` (`embeddings`).

REST requests use TF Serving's columnar JSON format (`{"signature_name": ..., "inputs":
{"images": ...}}`) and need only NumPy and the standard library; gRPC requests use
`PredictionServiceStub` from tensorflow-serving-api (which imports TensorFlow for its
protos). Both take a timeout and raise `ServerUnreachableError` when nothing answers,
`ServingTimeoutError` when the answer does not come in time, and `ServingError` (with the
server's status and message, e.g. INVALID_ARGUMENT for images outside [0, 1]) when the
server answers with an error. `ClusTRClient` sends a batch larger than `max_batch_size` as
several requests and joins the answers, and refuses an empty batch. This module imports
neither TensorFlow nor the rest of the library: it works where only NumPy is installed
(the command around it is `clustr-client`, or `python export/client.py`).
"""

import json
import socket
import urllib.error
import urllib.parse
import urllib.request

import numpy as np

DEFAULT_MODEL_NAME = "clustr"
DEFAULT_TIMEOUT = 10.0
# The export's default limit on the images of one request (export/export_model.py
# --max_batch_size); the client sends larger batches as several requests.
DEFAULT_MAX_BATCH_SIZE = 1024
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
        max_batch_size: the most images sent in one request (the export's
            `--max_batch_size`, default 1024): a larger batch goes as several requests,
            whose outputs are joined in order.

    Example:

    ```python
    with ClusTRClient(rest_url="http://localhost:8501") as c:
        print(c.certify(images)["radius"])
    ```
    """

    def __init__(self, rest_url=None, grpc_target=None, model_name=DEFAULT_MODEL_NAME, version=None,
                 timeout=DEFAULT_TIMEOUT, max_batch_size=DEFAULT_MAX_BATCH_SIZE):
        if (rest_url is None) == (grpc_target is None):
            raise ValueError(
                f"Give exactly one of `rest_url` and `grpc_target`. Received: {rest_url!r}, {grpc_target!r}"
            )
        if not timeout > 0:
            raise ValueError(f"`timeout` must be > 0 seconds. Received: {timeout!r}")
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, (int, np.integer)) \
                or max_batch_size < 1:
            raise ValueError(f"`max_batch_size` must be an int >= 1. Received: {max_batch_size!r}")
        self.max_batch_size = int(max_batch_size)
        self.rest_url, self.grpc_target = rest_url, grpc_target
        self.model_name, self.version, self.timeout = model_name, version, timeout
        self._channel = grpc_channel(grpc_target) if grpc_target is not None else None

    def call(self, signature, images):
        """The outputs of `signature` for `images` (dict name -> numpy array), in requests
        of at most `max_batch_size` images.

        Raises:
            ValueError: a bad shape (or, over REST, an empty batch: see `rest_request_body`).
        """
        images = as_batch(images)
        if not len(images):
            return self._call_once(signature, images)
        parts = [self._call_once(signature, images[i:i + self.max_batch_size])
                 for i in range(0, len(images), self.max_batch_size)]
        if len(parts) == 1:
            return parts[0]
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

    def _call_once(self, signature, images):
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
