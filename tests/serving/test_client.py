"""Tests of the client (clustr_tf.serving.client and its command, export/client.py): requests,
answers, errors, batching, the command line, and use without TensorFlow.

Request building and answer parsing are checked with tensorflow-serving-api's real protos
and with JSON laid out as TF Serving's REST API documents it. For the transport, small
stand-ins answer on localhost the way TF Serving does (a gRPC PredictionService and the
REST predict route) by running the exported SavedModel: no TF Serving binary can run here.
"""

import concurrent.futures
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import grpc
import keras
import numpy as np
import tensorflow as tf
from absl.testing import absltest
from absl.testing import parameterized
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

from clustr_tf import backbones
from clustr_tf import models
from clustr_tf import serving
from clustr_tf.serving import client

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLIENT = os.path.join(ROOT, "export", "client.py")
SHAPE = (8, 8, 1)



def _images(n, seed=1):
    return np.random.default_rng(seed).random((n, *SHAPE)).astype("float32")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_export(base):
    keras.utils.set_random_seed(0)
    model = models.ClusTRModel(backbones.small_convnet(SHAPE, width=8, embedding_dim=16), num_classes=3,
                               clusters_per_class=2, neighbours=4)
    features = model.embed(_images(6, seed=7)).numpy()
    model.cluster_centers.centers.assign(features + 0.1 * features.std())
    model.cluster_centers.variance.assign(float(features.var()))
    return serving.export(model, base, verify=False)


# ------------------------------------------------------- stand-ins for TF Serving


def _run_signature(loaded, name, images):
    """(outputs dict of numpy arrays, None) or (None, error message)."""
    if name not in loaded.signatures:
        return None, f"Serving signature name: \"{name}\" not found in signature def"
    try:
        out = loaded.signatures[name](images=tf.constant(images, tf.float32))
    except tf.errors.InvalidArgumentError as e:
        return None, e.message
    return {k: v.numpy() for k, v in out.items()}, None


class _Predictions(prediction_service_pb2_grpc.PredictionServiceServicer):
    """PredictionService.Predict over a loaded SavedModel, with TF Serving's status codes."""

    def __init__(self, loaded, delay=0.0):
        self.loaded, self.delay = loaded, delay

    def Predict(self, request, context):  # noqa: N802 (gRPC method name)
        time.sleep(self.delay)
        if request.model_spec.name != "clustr":
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"Servable not found for request: Latest({request.model_spec.name})")
        images = tf.make_ndarray(request.inputs["images"])
        outputs, error = _run_signature(self.loaded, request.model_spec.signature_name or "serving_default", images)
        if error is not None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, error)
        response = predict_pb2.PredictResponse()
        response.model_spec.CopyFrom(request.model_spec)
        for key, value in outputs.items():
            response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
        return response


def _rest_handler(loaded, delay=0.0):
    route = re.compile(r"^/v1/models/(?P<name>[^/:]+)(/versions/(?P<version>\d+))?:predict$")

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _answer(self, status, payload):
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                self.wfile.write(body)
            except BrokenPipeError:  # the client gave up (timeout tests)
                pass

        def do_POST(self):  # noqa: N802 (http.server method name)
            time.sleep(delay)
            match = route.match(self.path)
            if not match or match["name"] != "clustr":
                return self._answer(404, {"error": f"Servable not found for request: {self.path}"})
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            name = request.get("signature_name", "serving_default")
            images = request["inputs"]["images"] if "inputs" in request else request["instances"]
            outputs, error = _run_signature(loaded, name, np.asarray(images, np.float32))
            if error is not None:
                return self._answer(400 if "not found" not in error else 404, {"error": error})
            listed = {k: v.tolist() for k, v in outputs.items()}
            # Columnar answer; a single output is given without its name, as TF Serving does.
            return self._answer(200, {"outputs": listed if len(listed) > 1 else next(iter(listed.values()))})

    return Handler


class _Servers:
    """A gRPC and a REST stand-in on free localhost ports."""

    def __init__(self, loaded, delay=0.0):
        self.grpc = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2))
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(_Predictions(loaded, delay), self.grpc)
        self.grpc_target = f"127.0.0.1:{self.grpc.add_insecure_port('127.0.0.1:0')}"
        self.grpc.start()
        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _rest_handler(loaded, delay))
        self.http.daemon_threads = True
        self.rest_url = f"http://127.0.0.1:{self.http.server_address[1]}"
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.http.shutdown()
        self.http.server_close()
        self.grpc.stop(None)


# ------------------------------------------------------------------------ tests


class RequestBuildingTest(absltest.TestCase):
    def test_rest_url(self):
        self.assertEqual(client.rest_url("http://localhost:8501"), "http://localhost:8501/v1/models/clustr:predict")
        self.assertEqual(client.rest_url("localhost:8501/", "cifar", version=3),
                         "http://localhost:8501/v1/models/cifar/versions/3:predict")

    def test_rest_body_is_tf_serving_columnar_json_and_keeps_float32_exactly(self):
        images = _images(3)
        body = client.rest_request_body(images, "certify")
        decoded = json.loads(json.dumps(body))
        self.assertEqual(set(decoded), {"signature_name", "inputs"})
        self.assertEqual(decoded["signature_name"], "certify")
        self.assertEqual(list(decoded["inputs"]), ["images"])
        np.testing.assert_array_equal(np.asarray(decoded["inputs"]["images"], np.float32), images)
        self.assertEqual(client.rest_request_body(images[0], "predict")["signature_name"], "serving_default")
        self.assertLen(client.rest_request_body(images[0])["inputs"]["images"], 1)  # one image -> a batch of 1
        with self.assertRaisesRegex(ValueError, "Received shape: \\(8, 8\\)"):
            client.rest_request_body(images[0, :, :, 0])
        with self.assertRaisesRegex(ValueError, "Unknown signature.*'classify'"):
            client.rest_request_body(images, "classify")
        with self.assertRaisesRegex(ValueError, "empty batch cannot be sent over REST"):
            client.rest_request_body(images[:0])

    def test_grpc_request_is_a_predict_request_with_a_float_tensor(self):
        images = _images(2)
        request = client.grpc_request(images, "cifar", "certify", version=4)
        parsed = predict_pb2.PredictRequest.FromString(request.SerializeToString())
        self.assertEqual(parsed.model_spec.name, "cifar")
        self.assertEqual(parsed.model_spec.signature_name, "certify")
        self.assertEqual(parsed.model_spec.version.value, 4)
        self.assertEqual(list(parsed.inputs), ["images"])
        tensor = parsed.inputs["images"]
        self.assertEqual(tensor.dtype, tf.float32.as_datatype_enum)
        self.assertEqual([d.size for d in tensor.tensor_shape.dim], [2, 8, 8, 1])
        np.testing.assert_array_equal(tf.make_ndarray(tensor), images)
        default = client.grpc_request(np.asarray(images, np.float64))
        self.assertEqual(default.model_spec.signature_name, "serving_default")
        self.assertFalse(default.model_spec.HasField("version"))
        self.assertEqual(default.inputs["images"].dtype, tf.float32.as_datatype_enum)


class ResponseParsingTest(absltest.TestCase):
    def test_columnar_answer_with_several_outputs(self):
        text = ('{"outputs": {"classes": [2, 0], "radius": [0.0125, 0.5], "feature_radius": [1.0, 40.0], '
                '"lipschitz_bound": [80.0, 80.0], "runner_up": [1, 2]}}')
        out = client.parse_rest_response(text, "certify")
        self.assertEqual(out["classes"].dtype, np.int64)
        self.assertEqual(out["radius"].dtype, np.float32)
        np.testing.assert_array_equal(out["runner_up"], [1, 2])
        np.testing.assert_allclose(out["radius"], [0.0125, 0.5])

    def test_columnar_answer_with_one_unnamed_output(self):
        out = client.parse_rest_response(b'{"outputs": [[0.5, NaN], [1.0, -2.0]]}', "embed")
        self.assertEqual(list(out), ["embeddings"])
        self.assertEqual(out["embeddings"].shape, (2, 2))
        self.assertTrue(np.isnan(out["embeddings"][0, 1]))

    def test_row_answer(self):
        text = ('{"predictions": [{"probabilities": [0.9, 0.1], "classes": 0},'
                ' {"probabilities": [0.2, 0.8], "classes": 1}]}')
        out = client.parse_rest_response(text, "predict")
        np.testing.assert_array_equal(out["classes"], [0, 1])
        self.assertEqual(out["probabilities"].shape, (2, 2))

    def test_error_answers(self):
        with self.assertRaisesRegex(client.ServingError, "must be pixels in"):
            client.parse_rest_response('{"error": "assertion failed: [`images` must be pixels in [0, 1]"}')
        with self.assertRaisesRegex(client.ServingError, "not JSON"):
            client.parse_rest_response("<html>502 Bad Gateway</html>")
        with self.assertRaisesRegex(client.ServingError, "outputs probabilities, classes"):
            client.parse_rest_response('{"outputs": [1, 2]}', "serving_default")

    def test_grpc_answer(self):
        response = predict_pb2.PredictResponse()
        response.outputs["classes"].CopyFrom(tf.make_tensor_proto(np.array([1, 2], np.int64)))
        response.outputs["probabilities"].CopyFrom(tf.make_tensor_proto(np.eye(2, 3, dtype=np.float32)))
        out = client.parse_grpc_response(predict_pb2.PredictResponse.FromString(response.SerializeToString()))
        self.assertEqual(out["classes"].dtype, np.int64)
        np.testing.assert_array_equal(out["probabilities"], np.eye(2, 3))


class ServedModelTest(parameterized.TestCase):
    """The client against stand-ins that run the exported tiny model."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp()
        cls.path = _tiny_export(os.path.join(cls.tmp, "clustr"))
        cls.loaded = tf.saved_model.load(cls.path)
        cls.servers = _Servers(cls.loaded)
        cls.images = _images(5)

    @classmethod
    def tearDownClass(cls):
        cls.servers.stop()
        shutil.rmtree(cls.tmp, True)
        super().tearDownClass()

    def _client(self, protocol, **kwargs):
        if protocol == "rest":
            return client.ClusTRClient(rest_url=self.servers.rest_url, **kwargs)
        return client.ClusTRClient(grpc_target=self.servers.grpc_target, **kwargs)

    @parameterized.parameters("rest", "grpc")
    def test_predict_certify_embed_match_the_saved_model(self, protocol):
        with self._client(protocol) as c:
            answers = {"serving_default": c.predict(self.images), "certify": c.certify(self.images),
                       "embed": c.embed(self.images)}
        for name, outputs in answers.items():
            expected, _ = _run_signature(self.loaded, name, self.images)
            self.assertEqual(set(outputs), set(expected), name)
            for key, value in expected.items():
                self.assertEqual(outputs[key].dtype, value.dtype, f"{name}/{key}")
                np.testing.assert_allclose(outputs[key], value, rtol=1e-6, err_msg=f"{name}/{key}")

    @parameterized.parameters("rest", "grpc")
    def test_bad_images_come_back_as_invalid_argument(self, protocol):
        with self._client(protocol) as c:
            with self.assertRaises(client.ServingError) as cm:
                c.certify(self.images * 255)
        self.assertEqual(cm.exception.code, 400 if protocol == "rest" else "INVALID_ARGUMENT")
        self.assertIn("must be pixels in [0, 1]", str(cm.exception))
        self.assertNotIsInstance(cm.exception, client.ServerUnreachableError)

    @parameterized.parameters("rest", "grpc")
    def test_unknown_model_is_not_found(self, protocol):
        with self._client(protocol, model_name="other") as c:
            with self.assertRaisesRegex(client.ServingError, "Servable not found") as cm:
                c.predict(self.images)
        self.assertEqual(cm.exception.code, 404 if protocol == "rest" else "NOT_FOUND")

    def test_grpc_batches_of_zero_and_one(self):
        with self._client("grpc") as c:
            for batch in (0, 1):
                out = c.certify(self.images[:batch])
                self.assertEqual({k: v.shape for k, v in out.items()},
                                 {k: (batch,) for k in ("classes", "radius", "feature_radius", "lipschitz_bound",
                                                        "runner_up")})
            self.assertEqual(c.predict(self.images[:0])["probabilities"].shape, (0, 3))

    def test_version_is_part_of_the_rest_route(self):
        with self._client("rest", version=1) as c:
            self.assertEqual(c.embed(self.images)["embeddings"].shape, (5, 16))

    @parameterized.parameters("rest", "grpc")
    def test_unreachable_server(self, protocol):
        port = _free_port()
        start = time.perf_counter()
        pattern = f"Cannot reach TF Serving's (REST|gRPC) endpoint .*127.0.0.1:{port}"
        with self.assertRaisesRegex(client.ServerUnreachableError, pattern):
            if protocol == "rest":
                client.rest_predict(self.images, f"http://127.0.0.1:{port}", timeout=5)
            else:
                client.grpc_predict(self.images, f"127.0.0.1:{port}", timeout=5)
        self.assertLess(time.perf_counter() - start, 5)

    def test_cli_prints_the_outputs_as_json(self):
        work = self.create_tempdir().full_path
        np.save(os.path.join(work, "x.npy"), (self.images * 255).round().astype(np.uint8))  # uint8 is scaled
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        out = subprocess.run([sys.executable, CLIENT, f"--rest={self.servers.rest_url}", "--signature=certify",
                              f"--images={work}/x.npy"], capture_output=True, text=True, timeout=300, cwd=work,
                             env=env)
        self.assertEqual(out.returncode, 0, out.stderr[-2000:])
        printed = json.loads(out.stdout.strip().splitlines()[-1])
        expected, _ = _run_signature(self.loaded, "certify", (self.images * 255).round().astype(np.float32) / 255)
        np.testing.assert_array_equal(printed["classes"], expected["classes"])
        np.testing.assert_allclose(printed["radius"], expected["radius"], rtol=1e-6)

        unreachable = subprocess.run(
            [sys.executable, CLIENT, f"--grpc=127.0.0.1:{_free_port()}", "--signature=predict",
             f"--images={work}/x.npy", "--timeout=5"], capture_output=True, text=True, timeout=300, cwd=work, env=env)
        self.assertEqual(unreachable.returncode, 1)
        self.assertIn("client.py: error: Cannot reach TF Serving's gRPC endpoint",
                      unreachable.stderr.strip().splitlines()[-1])

    def test_large_batches_go_as_several_requests(self):
        images = _images(7)
        for protocol in ("rest", "grpc"):
            with self._client(protocol) as whole, self._client(protocol, max_batch_size=3) as split:
                expected, got = whole.certify(images), split.certify(images)
                self.assertEqual(set(got), set(expected))
                for name in expected:  # (batch-size-dependent float rounding aside)
                    np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6)
                    self.assertEqual(got[name].dtype, expected[name].dtype)
        with self.assertRaisesRegex(ValueError, "`max_batch_size` must be an int >= 1. Received: 0"):
            client.ClusTRClient(rest_url=self.servers.rest_url, max_batch_size=0)

    def test_works_without_tensorflow(self):
        """The library and the command, with TensorFlow and Keras made unimportable: REST
        requests on .npy images need NumPy only."""
        work = self.create_tempdir().full_path
        np.save(os.path.join(work, "x.npy"), self.images)
        blocked = "import sys; sys.modules.update(tensorflow=None, keras=None, tensorflow_serving=None); "
        program = (blocked + f"sys.path.insert(0, {ROOT!r}); import numpy as np; "
                   "from clustr_tf.serving import client; "
                   f"c = client.ClusTRClient(rest_url={self.servers.rest_url!r}, max_batch_size=2); "
                   f"out = c.certify(np.load({work!r} + '/x.npy')); "
                   "assert not [m for m in sys.modules if m.startswith(('tensorflow', 'keras')) and sys.modules[m]]; "
                   "print(out['classes'].tolist())")
        out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120, cwd=work)
        self.assertEqual(out.returncode, 0, out.stderr[-2000:])
        expected, _ = _run_signature(self.loaded, "certify", self.images)
        self.assertEqual(json.loads(out.stdout.strip().splitlines()[-1]), expected["classes"].tolist())
        command = (blocked + f"sys.path.insert(0, {ROOT!r}); sys.argv = ['clustr-client', "
                   f"'--rest={self.servers.rest_url}', '--images={work}/x.npy']; "
                   "from export import client as command; command.console_main()")
        out = subprocess.run([sys.executable, "-c", command], capture_output=True, text=True, timeout=120, cwd=work)
        self.assertEqual(out.returncode, 0, out.stderr[-2000:])
        self.assertEqual(json.loads(out.stdout.strip().splitlines()[-1])["classes"], expected["classes"].tolist())

    def test_cli_bad_usage(self):
        work = self.create_tempdir().full_path
        np.save(os.path.join(work, "x.npy"), self.images)
        cases = [
            ([f"--images={work}/x.npy"], "exactly one of --rest"),
            ([f"--rest={self.servers.rest_url}", "--grpc=localhost:1", f"--images={work}/x.npy"], "exactly one of"),
            ([f"--rest={self.servers.rest_url}"], "--images is required"),
            ([f"--rest={self.servers.rest_url}", f"--images={work}/none.npy"], "--images is not a file"),
            ([f"--rest={self.servers.rest_url}", f"--images={work}/x.npy", "--signature=classify"], "'classify'"),
            ([f"--rest={self.servers.rest_url}", f"--images={work}/x.npy", "--version=abc"], "--version"),
            ([f"--rest={self.servers.rest_url}", f"--images={work}/empty.npy"], "--images holds no image"),
            ([f"--rest={self.servers.rest_url}", f"--images={work}/x.npy", "--max_batch_size=0"], "--max_batch_size"),
            ([f"--rest={self.servers.rest_url}", "--imagess=x.npy"], "Did you mean: images"),
        ]
        np.save(os.path.join(work, "empty.npy"), self.images[:0])
        for args, message in cases:
            out = subprocess.run([sys.executable, CLIENT, *args], capture_output=True, text=True, timeout=300)
            self.assertEqual(out.returncode, 2, (args, out.stderr[-1000:]))
            last = out.stderr.strip().splitlines()[-1]
            self.assertTrue(last.startswith("client.py: error: "), last)
            self.assertIn(message, last)


class TimeoutTest(parameterized.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp()
        cls.servers = _Servers(tf.saved_model.load(_tiny_export(os.path.join(cls.tmp, "clustr"))), delay=2.0)

    @classmethod
    def tearDownClass(cls):
        cls.servers.stop()
        shutil.rmtree(cls.tmp, True)
        super().tearDownClass()

    @parameterized.parameters("rest", "grpc")
    def test_slow_server_times_out(self, protocol):
        start = time.perf_counter()
        with self.assertRaisesRegex(client.ServingTimeoutError, "within 0.3 s"):
            if protocol == "rest":
                client.rest_predict(_images(1), self.servers.rest_url, signature="certify", timeout=0.3)
            else:
                client.grpc_predict(_images(1), self.servers.grpc_target, signature="certify", timeout=0.3)
        self.assertLess(time.perf_counter() - start, 1.9)


if __name__ == "__main__":
    absltest.main()
