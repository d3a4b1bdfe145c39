"""Tests of export/export_model.py: the SavedModel that TF Serving loads.

No TF Serving binary can run here, so everything up to it is tested with TensorFlow's own
loaders: `tf.saved_model.load` (in this process and in a fresh one without the project),
the TF1 session loader that restores variables the way TF Serving's C++ loader does,
`saved_model_cli`, and the warmup records parsed with tensorflow-serving-api's protos.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import keras
import numpy as np
import tensorflow as tf
from absl.testing import absltest
from absl.testing import parameterized

from clustr_tf import backbones
from clustr_tf import certify
from clustr_tf import lipschitz
from clustr_tf import models
from clustr_tf import serving
from tests import binaries

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXPORT = os.path.join(ROOT, "export", "export_model.py")
SAVED_MODEL_CLI = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
SHAPE = (8, 8, 1)
OUTPUT_DTYPES = {
    "serving_default": {"probabilities": tf.float32, "classes": tf.int64},
    "certify": {"classes": tf.int64, "radius": tf.float32, "feature_radius": tf.float32,
                "lipschitz_bound": tf.float32, "runner_up": tf.int64},
    "embed": {"embeddings": tf.float32},
}



def _images(n, seed=1):
    return np.random.default_rng(seed).random((n, *SHAPE)).astype("float32")


def tiny_model(seed=0):
    """A small ConvNet ClusTR model on 8x8x1 images: 3 classes x K=2, D=16.

    The centers are features of random images plus noise, so decisions and radii vary
    from image to image as they do in a trained model.
    """
    keras.utils.set_random_seed(seed)
    model = models.ClusTRModel(
        backbones.small_convnet(SHAPE, width=8, embedding_dim=16), num_classes=3,
        clusters_per_class=2, neighbours=4,
    )
    rng = np.random.default_rng(seed)
    features = model.embed(_images(6, seed=seed + 10)).numpy()
    model.cluster_centers.centers.assign(features + 0.2 * features.std() * rng.standard_normal(features.shape))
    model.cluster_centers.variance.assign(float(features.var()))
    return model


def _env_without_project():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return env


class ExportedSavedModelTest(parameterized.TestCase):
    """One export of the tiny model, checked against the Keras model and the library."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp()
        cls.base = os.path.join(cls.tmp, "clustr")
        cls.model = tiny_model()
        cls.path = serving.export(cls.model, cls.base, neighbours=5)
        cls.loaded = tf.saved_model.load(cls.path)
        cls.images = _images(16)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, True)
        super().tearDownClass()

    def _call(self, name, images):
        return {k: v.numpy() for k, v in self.loaded.signatures[name](images=tf.constant(images)).items()}

    def test_tf_serving_layout(self):
        self.assertEqual(self.path, os.path.join(self.base, "1"))
        self.assertEqual(os.listdir(self.base), ["1"])  # no temporary folder left behind
        for name in ("saved_model.pb", "variables", os.path.join("assets.extra", "tf_serving_warmup_requests"),
                     os.path.join("assets.extra", "clustr_export.json")):
            self.assertTrue(os.path.exists(os.path.join(self.path, name)), name)
        with open(os.path.join(self.path, "assets.extra", "clustr_export.json")) as fh:
            metadata = json.load(fh)
        self.assertEqual(metadata["neighbours"], 5)
        self.assertEqual(metadata["input"]["shape"], [None, 8, 8, 1])
        self.assertEqual(metadata["input"]["max_batch_size"], 1024)
        self.assertEqual(metadata["embedding_dim"], 16)

    def test_signatures_have_the_contract_names_dtypes_and_shapes(self):
        self.assertContainsSubset(["serving_default", "certify", "embed"], list(self.loaded.signatures))
        for name, dtypes in OUTPUT_DTYPES.items():
            fn = self.loaded.signatures[name]
            _, kwargs = fn.structured_input_signature
            self.assertEqual(list(kwargs), ["images"])
            self.assertEqual(kwargs["images"].dtype, tf.float32)
            self.assertEqual(kwargs["images"].shape.as_list(), [None, 8, 8, 1])
            outputs = fn.structured_outputs
            self.assertEqual({k: v.dtype for k, v in outputs.items()}, dtypes, name)
            for key, spec in outputs.items():
                self.assertIsNone(spec.shape[0], f"{name}/{key} has no batch dimension")
        self.assertEqual(self.loaded.signatures["serving_default"].structured_outputs["probabilities"].shape.as_list(),
                         [None, 3])
        self.assertEqual(self.loaded.signatures["embed"].structured_outputs["embeddings"].shape.as_list(), [None, 16])

    def test_certify_computes_what_clustr_tf_certify_computes(self):
        """The signature runs `certify.feature_radius` in float64 on its own features: the
        library on the `embed` signature's features gives the same numbers. Against the Keras
        model's features the radius may move by at most the features' own difference (it is
        1-Lipschitz in the features)."""
        out = self._call("certify", self.images)
        centers = self.model.cluster_centers.centers.numpy().astype(np.float64)
        bound = lipschitz.model_bound(self.model.backbone)
        for features in (self._call("embed", self.images)["embeddings"],
                         self.model.embed(self.images, training=False).numpy()):
            radius_f, classes, runner_up = (t.numpy() for t in certify.feature_radius(
                features.astype(np.float64), centers, 2))
            slack = np.linalg.norm(features - self._call("embed", self.images)["embeddings"], axis=1).max()
            np.testing.assert_array_equal(out["classes"], classes)
            np.testing.assert_array_equal(out["runner_up"], runner_up)
            np.testing.assert_allclose(out["feature_radius"], radius_f, rtol=1e-5, atol=slack + 1e-9)
            np.testing.assert_allclose(out["radius"], certify.certified_radius(radius_f, bound), rtol=1e-5,
                                       atol=(slack + 1e-9) / bound)
        np.testing.assert_allclose(out["lipschitz_bound"], np.full(16, bound), rtol=1e-7)
        self.assertEqual(float(self.loaded.lipschitz_bound.numpy()), bound)  # stored exactly (float64)
        # A non-trivial certificate: radii differ and the runner-up is another class.
        self.assertGreater(out["radius"].max(), 0.0)
        self.assertGreater(len(set(np.round(out["radius"], 8))), 4)
        self.assertTrue(np.all(out["runner_up"] != out["classes"]))
        self.assertGreater(len(set(out["classes"])), 1)

    def test_serving_default_is_the_soft_knc_rule_with_the_export_L(self):
        out = self._call("serving_default", self.images)
        layer = self.model.cluster_centers
        logits = layer.logits_from_distances(layer.squared_distances(self.model.embed(self.images)), 5)
        np.testing.assert_allclose(out["probabilities"], tf.nn.softmax(logits).numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, rtol=1e-5)
        np.testing.assert_array_equal(out["classes"], np.argmax(out["probabilities"], axis=1))
        soft, _ = models.prediction_function(self.model, 5)(tf.constant(self.images))
        np.testing.assert_array_equal(out["classes"], soft.numpy())

    def test_embed_is_the_backbone(self):
        out = self._call("embed", self.images)
        np.testing.assert_allclose(out["embeddings"], self.model.embed(self.images).numpy(), rtol=1e-5, atol=1e-5)

    @parameterized.parameters("serving_default", "certify", "embed")
    def test_batches_of_zero_and_one(self, name):
        for batch in (0, 1):
            out = self._call(name, self.images[:batch])
            self.assertEqual(set(out), set(OUTPUT_DTYPES[name]))
            for key, value in out.items():
                self.assertEqual(value.shape[0], batch, key)
        one = self._call(name, self.images[:1])
        many = self._call(name, self.images)
        for key in one:
            np.testing.assert_allclose(one[key], many[key][:1], rtol=1e-5, atol=1e-6)

    @parameterized.product(
        name=["serving_default", "certify", "embed"],
        case=[
            ("rank_3", np.zeros((8, 8, 1)), "Received shape:] [8 8 1]"),
            ("rank_5", np.zeros((1, 2, 8, 8, 1)), "Received shape:] [1 2 8 8 1]"),
            ("image_size", np.zeros((2, 9, 8, 1)), "[batch, 8, 8, 1]"),
            ("channels", np.zeros((2, 8, 8, 3)), "Received shape:] [2 8 8 3]"),
            ("nan", np.where(np.eye(8)[None, :, :, None] > 0, np.nan, 0.5), "NaN or Inf values received:] [8]"),
            ("inf", np.full((1, 8, 8, 1), np.inf), "must be finite"),
            ("above_one", np.full((1, 8, 8, 1), 255.0), "must be pixels in [0, 1]"),
            ("negative", np.full((2, 8, 8, 1), -0.5), "Received min and max:] [-0.5] [-0.5]"),
        ],
    )
    def test_bad_request_is_an_invalid_argument_with_a_readable_message(self, name, case):
        _, images, expected = case
        with self.assertRaises(tf.errors.InvalidArgumentError) as cm:
            self.loaded.signatures[name](images=tf.constant(images, tf.float32))
        message = str(cm.exception)
        self.assertIn("assertion failed: [`images` must", message)
        self.assertIn(expected, message)

    def test_a_batch_over_the_limit_is_an_invalid_argument_naming_it(self):
        from clustr_tf.serving import client

        self.assertEqual(serving.DEFAULT_MAX_BATCH_SIZE, 1024)
        self.assertEqual(client.DEFAULT_MAX_BATCH_SIZE, serving.DEFAULT_MAX_BATCH_SIZE)
        images = np.full((1025, 8, 8, 1), 0.5, np.float32)
        for name in serving.SIGNATURES:
            with self.assertRaises(tf.errors.InvalidArgumentError) as cm:
                self.loaded.signatures[name](images=tf.constant(images))
            self.assertIn("holds at most 1024 images per request", str(cm.exception))
            self.assertIn("Received batch size:] [1025]", str(cm.exception))
        self.assertEqual(self._call("certify", images[:1024])["classes"].shape, (1024,))

    def test_warmup_requests_parse_and_run(self):
        from tensorflow_serving.apis import prediction_log_pb2

        path = os.path.join(self.path, "assets.extra", "tf_serving_warmup_requests")
        logs = []
        for record in tf.data.TFRecordDataset(path):
            log = prediction_log_pb2.PredictionLog()
            log.ParseFromString(record.numpy())
            logs.append(log)
        self.assertEqual([log.predict_log.request.model_spec.signature_name for log in logs],
                         ["serving_default", "certify", "embed"])
        for log in logs:
            request = log.predict_log.request
            self.assertEqual(request.model_spec.name, "clustr")
            self.assertEqual(list(request.inputs), ["images"])
            tensor = request.inputs["images"]
            self.assertEqual(tensor.dtype, tf.float32.as_datatype_enum)  # a wrong dtype stops TF Serving
            images = tf.make_ndarray(tensor)
            self.assertEqual(images.shape, (1, 8, 8, 1))
            out = self.loaded.signatures[request.model_spec.signature_name](images=tf.constant(images))
            self.assertEqual(set(out), set(OUTPUT_DTYPES[request.model_spec.signature_name]))

    def test_session_loader_restores_the_variables_as_tf_serving_does(self):
        """TF Serving loads a SavedModel as a graph, restores variables through its saver
        and runs signature tensors by name: the TF1 loader does the same."""
        expected = self._call("certify", self.images)
        graph = tf.Graph()
        with graph.as_default(), tf.compat.v1.Session(graph=graph) as sess:
            meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], self.path)
            signature = meta.signature_def["certify"]
            self.assertEqual(signature.method_name, "tensorflow/serving/predict")
            fetches = {k: v.name for k, v in signature.outputs.items()}
            out = sess.run(fetches, {signature.inputs["images"].name: self.images})
            with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "pixels in \\[0, 1\\]"):
                sess.run(fetches, {signature.inputs["images"].name: self.images * 255})
        for key, value in expected.items():
            np.testing.assert_allclose(out[key], value, rtol=1e-6, err_msg=key)

    def test_loads_and_runs_in_a_fresh_process_without_the_project(self):
        work = self.create_tempdir().full_path
        np.save(os.path.join(work, "images.npy"), self.images)
        script = (
            "import importlib.util, json, sys\n"
            "assert importlib.util.find_spec('clustr_tf') is None, 'clustr_tf is importable'\n"
            "assert importlib.util.find_spec('export') is None, 'export is importable'\n"
            "import numpy as np, tensorflow as tf\n"
            f"m = tf.saved_model.load({self.path!r})\n"
            "x = tf.constant(np.load('images.npy'))\n"
            "out = {n: {k: v.numpy().tolist() for k, v in m.signatures[n](images=x).items()}\n"
            "       for n in ('serving_default', 'certify', 'embed')}\n"
            "print(json.dumps(out))\n"
        )
        run = subprocess.run([sys.executable, "-I", "-c", script], cwd=work, env=_env_without_project(),
                             capture_output=True, text=True, timeout=300)
        self.assertEqual(run.returncode, 0, run.stderr[-3000:])
        result = json.loads(run.stdout.strip().splitlines()[-1])
        for name in ("serving_default", "certify", "embed"):
            expected = self._call(name, self.images)
            for key, value in expected.items():
                np.testing.assert_allclose(np.asarray(result[name][key]), value, rtol=1e-5, atol=1e-6,
                                           err_msg=f"{name}/{key}")

    def test_saved_model_cli_show_and_run(self):
        env = _env_without_project()
        show = subprocess.run([SAVED_MODEL_CLI, "show", "--dir", self.path, "--all"], capture_output=True,
                              text=True, timeout=300, env=env, cwd=self.create_tempdir().full_path)
        self.assertEqual(show.returncode, 0, show.stderr[-3000:])
        text = show.stdout
        blocks = {b.split("']", 1)[0]: b for b in text.split("signature_def['")[1:]}
        self.assertContainsSubset(["serving_default", "certify", "embed"], list(blocks))
        for name, dtypes in OUTPUT_DTYPES.items():
            block = blocks[name].split("Concrete Functions")[0]
            self.assertIn("inputs['images'] tensor_info:\n        dtype: DT_FLOAT\n        shape: (-1, 8, 8, 1)", block)
            self.assertIn("Method name is: tensorflow/serving/predict", block)
            for key, dtype in dtypes.items():
                enum = {tf.float32: "DT_FLOAT", tf.int64: "DT_INT64"}[dtype]
                self.assertIn(f"outputs['{key}'] tensor_info:\n        dtype: {enum}\n", block)
        self.assertIn("shape: (-1, 3)", blocks["serving_default"])
        self.assertIn("shape: (-1, 16)", blocks["embed"])

        work = self.create_tempdir().full_path
        np.save(os.path.join(work, "images.npy"), self.images[:5])
        out_dir = os.path.join(work, "out")
        run = subprocess.run(
            [SAVED_MODEL_CLI, "run", "--dir", self.path, "--tag_set", "serve", "--signature_def", "certify",
             "--inputs", f"images={os.path.join(work, 'images.npy')}", "--outdir", out_dir],
            capture_output=True, text=True, timeout=300, env=env, cwd=work,
        )
        self.assertEqual(run.returncode, 0, run.stderr[-3000:])
        expected = self._call("certify", self.images[:5])
        for key, value in expected.items():
            np.testing.assert_allclose(np.load(os.path.join(out_dir, f"{key}.npy")), value, rtol=1e-6, err_msg=key)


class ExportFunctionTest(absltest.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.model = tiny_model(seed=3)

    def test_versions_are_never_overwritten(self):
        base = os.path.join(self.create_tempdir().full_path, "m")
        first = serving.export(self.model, base, verify=False)
        self.assertEqual(first, os.path.join(base, "1"))
        stamp = os.path.getmtime(os.path.join(first, "saved_model.pb"))
        with self.assertRaisesRegex(serving.ExportError, "Version 1 already exists"):
            serving.export(self.model, base, version=1, verify=False)
        self.assertEqual(os.path.getmtime(os.path.join(first, "saved_model.pb")), stamp)
        self.assertEqual(serving.export(self.model, base, version=7, verify=False), os.path.join(base, "7"))
        os.makedirs(os.path.join(base, "not_a_version"))
        self.assertEqual(serving.export(self.model, base, verify=False), os.path.join(base, "8"))
        self.assertEqual(sorted(os.listdir(base)), ["1", "7", "8", "not_a_version"])

    def test_bad_arguments(self):
        tmp = self.create_tempdir().full_path
        blocker = os.path.join(tmp, "file")
        with open(blocker, "w") as fh:
            fh.write("keep")
        cases = [
            (dict(export_dir=blocker), "not a directory"),
            (dict(export_dir=os.path.join(tmp, "a"), neighbours=0),
             "`neighbours` \\(L\\) must be an integer in \\[1, 6\\]"),
            (dict(export_dir=os.path.join(tmp, "a"), neighbours=7), "Received: 7"),
            (dict(export_dir=os.path.join(tmp, "a"), version=0), "`version` must be an integer >= 1"),
            (dict(export_dir=os.path.join(tmp, "a"), lipschitz_bound=float("nan")), "`lipschitz_bound`"),
        ]
        for kwargs, pattern in cases:
            with self.assertRaisesRegex(serving.ExportError, pattern):
                serving.export(self.model, **kwargs)
        with self.assertRaisesRegex(serving.ExportError, "built classifier of this library"):
            serving.export(self.model.backbone, os.path.join(tmp, "a"))
        self.assertEqual(serving.existing_versions(os.path.join(tmp, "a")), [])

    def test_a_linear_head_exports_with_its_own_certificate(self):
        """The Lipschitz-margin baseline serves too: softmax of its head, and `certify` the
        exact margin certificate of its head (`certify_features`), as evaluation computes."""
        from clustr_tf import baselines

        keras.utils.set_random_seed(1)
        model = baselines.SoftmaxClassifier(backbones.get_backbone("lipschitz", SHAPE, mean=0.5), 3)
        images = _images(16)
        path = serving.export(model, os.path.join(self.create_tempdir().full_path, "linear"))
        loaded = tf.saved_model.load(path)
        out = {k: v.numpy() for k, v in loaded.signatures["certify"](images=tf.constant(images)).items()}
        radius, classes, runner_up = model.certify_features(model.embed(images).numpy())
        np.testing.assert_array_equal(out["classes"], classes)
        np.testing.assert_array_equal(out["runner_up"], runner_up)
        np.testing.assert_allclose(out["feature_radius"], radius, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(out["lipschitz_bound"], 1.0)
        np.testing.assert_allclose(out["radius"], radius, rtol=1e-5, atol=1e-7)
        predict = loaded.signatures["serving_default"](images=tf.constant(images))
        np.testing.assert_allclose(predict["probabilities"].numpy(), tf.nn.softmax(model(images)).numpy(), atol=1e-5)
        with open(os.path.join(path, "assets.extra", serving.METADATA_FILE)) as fh:
            metadata = json.load(fh)
        self.assertEqual((metadata["certified_rule"], metadata["clusters_per_class"], metadata["neighbours"]),
                         ("linear head", None, None))
        with self.assertRaisesRegex(serving.ExportError, "`neighbours` \\(L\\) applies to ClusTR models only"):
            serving.export(model, os.path.join(self.create_tempdir().full_path, "linear"), neighbours=5)

    def test_a_failed_export_leaves_no_folder_it_made(self):
        from unittest import mock

        from clustr_tf.serving import export_files

        tmp = self.create_tempdir().full_path
        with mock.patch.object(export_files, "verify", side_effect=serving.ExportError("broken signature")):
            with self.assertRaisesRegex(serving.ExportError, "broken signature"):
                serving.export(self.model, os.path.join(tmp, "new", "clustr"))
            self.assertEqual(os.listdir(tmp), [])
            os.makedirs(os.path.join(tmp, "kept"))  # a base folder that existed stays, without the version
            with self.assertRaisesRegex(serving.ExportError, "broken signature"):
                serving.export(self.model, os.path.join(tmp, "kept"))
            self.assertEqual(os.listdir(os.path.join(tmp, "kept")), [])

    def test_backbone_without_a_bound_is_refused(self):
        backbone = keras.Sequential([keras.Input(SHAPE), keras.layers.Flatten(),
                                     keras.layers.Dense(4, activation="tanh")])
        model = models.ClusTRModel(backbone, num_classes=2, clusters_per_class=1, neighbours=2)
        with self.assertRaisesRegex(serving.ExportError, "No Lipschitz bound .* 'tanh'"):
            serving.export(model, os.path.join(self.create_tempdir().full_path, "m"))


def _save_run(run_dir, model, eval_l=4):
    os.makedirs(run_dir)
    model.save(os.path.join(run_dir, "model.keras"))
    with open(os.path.join(run_dir, "config.json"), "w") as fh:
        json.dump({"eval_L": eval_l, "dataset": "digits"}, fh)


class ServingAssetsTest(absltest.TestCase):
    def test_example_models_config_is_a_model_server_config(self):
        from google.protobuf import text_format
        from tensorflow_serving.config import model_server_config_pb2

        with open(os.path.join(ROOT, "export", "models.config")) as fh:
            config = text_format.Parse(fh.read(), model_server_config_pb2.ModelServerConfig())
        (model,) = config.model_config_list.config
        self.assertEqual(model.name, serving.DEFAULT_MODEL_NAME)  # the warmup requests' model name
        self.assertEqual(model.base_path, "/models/clustr")
        self.assertEqual(model.model_platform, "tensorflow")
        self.assertEqual(model.model_version_policy.latest.num_versions, 1)


class CorruptExportTest(absltest.TestCase):
    """`serving.check_export` on an export damaged each way a full disk or a partial copy
    damages one: one ExportError line naming the file and what to do; nothing deleted."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp()
        cls.path = serving.export(tiny_model(), os.path.join(cls.tmp, "clustr"))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, True)
        super().tearDownClass()

    def _copy(self):
        copy = os.path.join(self.create_tempdir().full_path, "clustr", "1")
        shutil.copytree(self.path, copy)
        return copy

    def _truncate(self, path):
        size = os.path.getsize(path)
        with open(path, "r+b") as fh:
            fh.truncate(size // 2)
        return size // 2

    def test_an_intact_export_passes_from_its_version_or_base_folder(self):
        folder, metadata = serving.check_export(os.path.dirname(self.path))
        self.assertEqual(folder, self.path)
        self.assertEqual(metadata["input"]["shape"], [None, 8, 8, 1])
        self.assertEqual(serving.check_export(self.path)[0], self.path)

    def test_each_damage_is_one_line_naming_the_file(self):
        copy = self._copy()
        self._truncate(os.path.join(copy, "saved_model.pb"))
        with self.assertRaisesRegex(serving.ExportError, r"saved_model.pb is truncated or not a SavedModel \(\d+ "
                                                         r"bytes; .*\): export the run again") as ctx:
            serving.check_export(copy)
        self.assertNotIn("\n", str(ctx.exception))
        self.assertTrue(os.path.exists(os.path.join(copy, "saved_model.pb")))  # nothing deleted

        copy = self._copy()
        data = [f for f in os.listdir(os.path.join(copy, "variables")) if f.startswith("variables.data")]
        for name in data:
            self._truncate(os.path.join(copy, "variables", name))
        with self.assertRaisesRegex(serving.ExportError, r"The variables of .*/clustr/1 \(variables/\) are truncated "
                                                         r"or damaged \(.*\): export the run again") as ctx:
            serving.check_export(copy)
        self.assertNotIn("\n", str(ctx.exception))

        copy = self._copy()
        self._truncate(os.path.join(copy, "assets.extra", "clustr_export.json"))
        with self.assertRaisesRegex(serving.ExportError, r"clustr_export.json is truncated or not JSON"):
            serving.check_export(copy)

        copy = self._copy()
        with open(os.path.join(copy, "assets.extra", "clustr_export.json"), "w") as fh:
            json.dump({"format": "something else"}, fh)
        with self.assertRaisesRegex(serving.ExportError, r"written by an incompatible version of clustr_tf"):
            serving.check_export(copy)

        empty = self.create_tempdir().full_path
        with self.assertRaisesRegex(serving.ExportError, r"is not an export: it holds no saved_model.pb"):
            serving.check_export(empty)
        with self.assertRaisesRegex(serving.ExportError, r"No export at .*/missing: not a directory"):
            serving.check_export(os.path.join(empty, "missing"))


class ExportBinaryTest(parameterized.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp()
        cls.run_dir = os.path.join(cls.tmp, "run")
        _save_run(cls.run_dir, tiny_model(seed=5))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, True)
        super().tearDownClass()

    def _export(self, *args):
        """The binary in a process of its own, from another folder, without this project on the path."""
        return subprocess.run([sys.executable, EXPORT, *args], capture_output=True, text=True, timeout=300,
                              cwd=self.create_tempdir().full_path, env=_env_without_project())

    def test_check_export_reads_an_export_back(self):
        base = os.path.join(self.create_tempdir().full_path, "clustr")
        serving.export(tiny_model(), base)
        self.assertRegex(self._run_in_process(check_export=base), r"/clustr/1: a sound export \(signatures serving_default, "
                         r"certify, embed; input \[None, 8, 8, 1\], at most 1024 images per request")
        with open(os.path.join(base, "1", "saved_model.pb"), "r+b") as fh:
            fh.truncate(100)
        out = self._export(f"--check_export={base}")
        self.assertEqual(out.returncode, 2)
        errors = [line for line in out.stderr.splitlines() if line.startswith("export_model.py")]
        self.assertEqual(len(errors), 1, out.stderr)  # TensorFlow's start-up lines aside
        self.assertRegex(errors[0], r"^export_model.py: error: .*/clustr/1/saved_model.pb is truncated or not a "
                         r"SavedModel \(100 bytes")
        self.assertEqual(os.path.getsize(os.path.join(base, "1", "saved_model.pb")), 100)  # nothing deleted

    def test_exports_the_next_version_with_the_run_eval_L(self):
        base = os.path.join(self.create_tempdir().full_path, "serving", "clustr")
        out = binaries.run(binaries.EXPORT, f"--model_dir={self.run_dir}", f"--export_dir={base}")
        self.assertEqual(out.returncode, 0, out.stderr[-3000:])
        self.assertEqual(out.stdout.strip().splitlines()[-1], os.path.join(base, "1"))
        with open(os.path.join(base, "1", "assets.extra", "clustr_export.json")) as fh:
            self.assertEqual(json.load(fh)["neighbours"], 4)  # config.json's eval_L
        out = binaries.run(binaries.EXPORT, f"--model_dir={self.run_dir}", f"--export_dir={base}", "--version=12",
                           "--eval_L=6", "--max_batch_size=3")
        self.assertEqual(out.returncode, 0, out.stderr[-3000:])
        with open(os.path.join(base, "12", "assets.extra", "clustr_export.json")) as fh:
            metadata = json.load(fh)
        self.assertEqual((metadata["neighbours"], metadata["input"]["max_batch_size"]), (6, 3))
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "holds at most 3 images per request"):
            tf.saved_model.load(os.path.join(base, "12")).signatures["embed"](images=tf.zeros([4, 8, 8, 1]))
        self.assertEqual(serving.next_version(base), 13)

    @parameterized.named_parameters(
        ("no_model_dir", ["--export_dir={tmp}/b"], "--model_dir is required"),
        ("no_export_dir", ["--model_dir={run}"], "--export_dir is required"),
        ("missing_run", ["--model_dir={tmp}/nothing", "--export_dir={tmp}/b"], "--model_dir is not a directory"),
        ("version_text", ["--model_dir={run}", "--export_dir={tmp}/b", "--version=abc"], "Received: 'abc'"),
        ("version_zero", ["--model_dir={run}", "--export_dir={tmp}/b", "--version=0"], "integer >= 1"),
        ("version_negative", ["--model_dir={run}", "--export_dir={tmp}/b", "--version=-3"], "Received: '-3'"),
        ("existing_version", ["--model_dir={run}", "--export_dir={tmp}/b", "--version=2"],
         "Version 2 already exists; it is never overwritten"),
        ("export_dir_is_a_file", ["--model_dir={run}", "--export_dir={tmp}/file"], "not a directory"),
        ("unexpected_argument", ["now"], "unexpected arguments: now"),
        ("max_batch_size_zero", ["--model_dir={run}", "--export_dir={tmp}/b", "--max_batch_size=0"],
         "--max_batch_size must be >= 1. Received: 0"),
    )
    def test_bad_input_fails_with_one_line(self, args, message):
        tmp = self.create_tempdir().full_path
        os.makedirs(os.path.join(tmp, "b", "2"))
        with open(os.path.join(tmp, "b", "2", "keep"), "w") as fh:
            fh.write("keep me")
        with open(os.path.join(tmp, "file"), "w") as fh:
            fh.write("keep me")
        out = self._export(*[a.format(tmp=tmp, run=self.run_dir) for a in args])
        self.assertEqual(out.returncode, 2, out.stderr[-2000:])
        self.assertNotIn("Traceback", out.stderr)
        last = out.stderr.strip().splitlines()[-1]
        self.assertTrue(last.startswith("export_model.py: error: "), out.stderr[-2000:])
        self.assertIn(message, last)
        self.assertEqual(sorted(os.listdir(os.path.join(tmp, "b"))), ["2"])
        with open(os.path.join(tmp, "b", "2", "keep")) as fh:
            self.assertEqual(fh.read(), "keep me")

    def _run_in_process(self, **flags):
        """export_model.py's `run` on these flag values (its defaults otherwise), in this process:
        its errors raise."""
        _, flag_values = binaries.parse(binaries.EXPORT, *[f"--{name}={value}" for name, value in flags.items()])
        return binaries.load(binaries.EXPORT).run(flag_values)

    def test_bad_run_folders_in_process(self):
        """What needs the model loaded (TensorFlow): each an ExportError line, nothing created."""
        tmp = self.create_tempdir().full_path
        for flags, message in (
                ({"model_dir": tmp}, "No model.keras in --model_dir"),
                ({"model_dir": self.run_dir, "eval_L": 7}, "at most the number of clusters, 6")):
            with self.assertRaisesRegex(serving.ExportError, message):
                self._run_in_process(export_dir=os.path.join(tmp, "b"), **flags)
            self.assertFalse(os.path.exists(os.path.join(tmp, "b")))

    def test_corrupt_model_file(self):
        run = self.create_tempdir().full_path
        with open(os.path.join(run, "model.keras"), "wb") as fh:
            fh.write(b"not a zip")
        with self.assertRaisesRegex(serving.ExportError, r"model.keras is not a .keras model archive \(9 bytes"):
            self._run_in_process(model_dir=run, export_dir=os.path.join(run, "b"))
        self.assertFalse(os.path.exists(os.path.join(run, "b")))  # nothing created
        out = binaries.run(binaries.EXPORT, f"--model_dir={run}", f"--export_dir={run}/b")  # one line, status 2
        self.assertEqual(out.returncode, 2)
        self.assertNotIn("Traceback", out.stderr)
        self.assertIn("export_model.py: error: ", out.stderr.strip().splitlines()[-1])
        self.assertIn("model.keras is not a .keras model archive (9 bytes", out.stderr.strip().splitlines()[-1])
        self.assertFalse(os.path.exists(os.path.join(run, "b")))


class TrainingBinaryExportTest(absltest.TestCase):
    def test_main_exports_at_the_end_and_the_run_goes_back_to_keras(self):
        tmp = self.create_tempdir().full_path
        run_dir, base = os.path.join(tmp, "run"), os.path.join(tmp, "serving")
        out = binaries.run(binaries.MAIN, "--epochs=1", "--steps_per_epoch=2", f"--model_dir={run_dir}",
                           f"--export_dir={base}")
        self.assertEqual(out.returncode, 0, out.stderr[-3000:])
        self.assertEqual(serving.existing_versions(base), [1])
        with open(os.path.join(base, "1", "assets.extra", "clustr_export.json")) as fh:
            self.assertEqual(json.load(fh)["neighbours"], 20)  # the run's eval_L

        # 7: the run's .keras model loads with clustr_tf and trains further.
        from clustr_tf import data
        from clustr_tf import objectives
        from clustr_tf import sampler as sampler_lib

        model = keras.saving.load_model(os.path.join(run_dir, "model.keras"))
        loaded = tf.saved_model.load(os.path.join(base, "1"))
        images, labels = data.load_arrays("digits", "test")
        served = loaded.signatures["certify"](images=tf.constant(images[:64]))
        features = loaded.signatures["embed"](images=tf.constant(images[:64]))["embeddings"].numpy()
        radius_f, classes, _ = certify.feature_radius(
            features.astype(np.float64), model.cluster_centers.centers.numpy().astype(np.float64), 2)
        np.testing.assert_array_equal(served["classes"].numpy(), classes.numpy())
        np.testing.assert_allclose(served["feature_radius"].numpy(), radius_f.numpy(), rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(features, model.embed(images[:64]).numpy(), rtol=1e-5, atol=1e-5)

        model.compile(optimizer=keras.optimizers.Adam(1e-3), objective=objectives.ClusTR())
        train_x, train_y = data.load_arrays("digits", "train")
        batches = sampler_lib.NeighbourhoodSampler(train_x, train_y, num_classes=10, clusters_per_class=2,
                                                   m=12, d=20, seed=0)
        kernel = model.backbone.get_layer("embedding").kernel.numpy().copy()
        history = model.fit(batches.dataset(), steps_per_epoch=2, epochs=1, verbose=0)
        self.assertTrue(np.isfinite(history.history["loss"][-1]))
        self.assertFalse(np.allclose(kernel, model.backbone.get_layer("embedding").kernel.numpy()))
        self.assertEqual(serving.export(model, base, verify=False), os.path.join(base, "2"))

    def test_main_refuses_a_bad_export_dir_before_training(self):
        tmp = self.create_tempdir().full_path
        blocker = os.path.join(tmp, "file")
        with open(blocker, "w") as fh:
            fh.write("keep me")
        out = binaries.run(binaries.MAIN, f"--model_dir={tmp}/run", f"--export_dir={blocker}")
        self.assertEqual(out.returncode, 2)
        last = out.stderr.strip().splitlines()[-1]
        self.assertTrue(last.startswith("main.py: error: --export_dir"), out.stderr[-2000:])
        self.assertIn(blocker, last)
        self.assertFalse(os.path.exists(os.path.join(tmp, "run", "config.json")))


class ServingLatencyBenchmarkSmokeTest(absltest.TestCase):
    def test_tiny_run_prints_and_writes_the_result(self):
        out_path = os.path.join(self.create_tempdir().full_path, "result.json")
        run = subprocess.run(
            [sys.executable, os.path.join(ROOT, "benchmarks", "serving_latency.py"), "--width_multiplier=0.0625",
             "--latency_calls=5", "--throughput_batches=1", "--throughput_batch=16", f"--out={out_path}"],
            capture_output=True, text=True, cwd=ROOT, timeout=300,
        )
        self.assertEqual(run.returncode, 0, run.stderr[-3000:])
        printed = json.loads(run.stdout.strip().splitlines()[-1])
        with open(out_path) as fh:
            self.assertEqual(json.load(fh), printed)
        for key in ("serving_default_ms", "certify_ms"):
            self.assertGreater(printed["latency_batch_1"][key]["median"], 0.0)
        self.assertGreater(printed["latency_batch_1"]["certify_over_serving_default"], 0.0)
        self.assertGreater(printed["latency_batch_1"]["certify_over_serving_default_cpu"], 0.0)
        self.assertIsInstance(printed["target"]["met"], bool)
        self.assertGreater(printed["throughput"]["certify_images_per_s"], 0.0)


if __name__ == "__main__":
    absltest.main()
