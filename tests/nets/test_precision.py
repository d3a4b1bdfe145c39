"""bfloat16 (and float16) training: the backbone computes in low precision, the heads, the
losses and the certificate do not; evaluation and export compute in float32 unless told
otherwise; a bfloat16 run learns as well as a float32 one."""

import json
import os

import keras
import numpy as np
import tensorflow as tf
from absl.testing import absltest
from absl.testing import parameterized

from clustr_tf import backbones
from clustr_tf import config as config_lib
from clustr_tf import consistency
from clustr_tf import data
from clustr_tf import objectives
from clustr_tf import precision
from clustr_tf import serving
from clustr_tf import training
from tests import binaries

# |bfloat16 loss - float32 loss| <= LOSS_RTOL * |float32 loss| + LOSS_ATOL, same weights and batch.
# bfloat16 keeps 8 significant bits (relative rounding 2^-9 = 0.2% per operation); measured
# on these batches the losses differ by 0.006% (cross-entropy) to 0.11% (PGD-AT), and the
# gradients' cosine is 0.991-0.998: the bounds are ten times what was measured.
LOSS_RTOL, LOSS_ATOL = 0.01, 0.005
GRADIENT_COSINE = 0.9



def _restore_policy(test):
    test.addCleanup(keras.mixed_precision.set_global_policy, keras.mixed_precision.global_policy())


def _objective(name):
    if name == "cross_entropy":
        return objectives.CrossEntropy()
    if name == "pgd_at":
        return objectives.PGDAT(eps=8 / 255, step=2 / 255, iterations=3)
    return objectives.ClusTR(clusters_per_class=2, neighbours=4, m=4, d=8,
                             consistency_lambda=8.0 if name == "clustr_qtrades" else 0.0)


def _model_and_batch(name, seed=0):
    """A digits model of objective `name` (centers refreshed for ClusTR) and one of its batches."""
    keras.utils.set_random_seed(seed)
    images, labels = data.load_arrays("digits", "train")
    images, labels = images[:480], labels[:480]
    objective = _objective(name)
    model = objective.build_model(backbones.small_convnet((8, 8, 1), width=16, embedding_dim=16), 10)
    source = objective.batches(images, labels, 10, seed=seed, batch_size=32)
    if name.startswith("clustr"):
        refresh = objective.cluster_refresh(source)
        refresh.set_model(model)
        refresh.refresh()
    batch = next(iter(source.dataset()))
    return objective, model, batch


def _loss_and_gradients(objective, model, batch):
    images, targets = batch

    @tf.function
    def compute():
        with tf.GradientTape() as tape:
            result = objective.losses(model, images, targets, tf.constant([0, 1], tf.int64))
            loss = tf.reduce_mean(result.losses)
        return loss, tape.gradient(loss, model.trainable_variables)

    loss, grads = compute()
    return float(loss), [g.numpy() for g in grads]


class PrecisionTest(parameterized.TestCase):
    @parameterized.parameters("clustr", "clustr_qtrades", "cross_entropy", "pgd_at")
    def test_bfloat16_step_is_finite_and_close_to_float32(self, name):
        """The same weights and batch: the bfloat16 loss and gradient agree with float32's
        within the stated tolerance; the heads and the losses are float32 throughout."""
        objective, model, batch = _model_and_batch(name)
        loss32, grads32 = _loss_and_gradients(objective, model, batch)
        precision.set_precision(model, "bfloat16")
        self.assertEqual(precision.of(model), "bfloat16")
        self.assertEqual(model.backbone.compute_dtype, "bfloat16")
        head = getattr(model, "cluster_centers", None) or model.head
        self.assertEqual(head.compute_dtype, "float32")
        loss16, grads16 = _loss_and_gradients(objective, model, batch)
        self.assertTrue(np.isfinite(loss16))
        self.assertLessEqual(abs(loss16 - loss32), LOSS_RTOL * abs(loss32) + LOSS_ATOL, (loss16, loss32))
        flat32 = np.concatenate([g.ravel() for g in grads32])
        flat16 = np.concatenate([g.ravel() for g in grads16])
        self.assertTrue(np.isfinite(flat16).all())
        self.assertTrue(all(g.dtype == np.float32 for g in grads16))  # the variables stay float32
        cosine = flat16 @ flat32 / (np.linalg.norm(flat16) * np.linalg.norm(flat32))
        self.assertGreater(cosine, GRADIENT_COSINE)
        self.assertNotEqual(loss16, loss32)  # it did compute in bfloat16

    def test_bfloat16_training_attack_stays_in_the_ball(self):
        objective, model, (images, targets) = _model_and_batch("clustr_qtrades")
        precision.set_precision(model, "bfloat16")
        clean = model(images, training=False)
        adv = consistency.perturbation(model, images, clean, "official", 8 / 255, 10 / 255,
                                                  tf.constant([0, 1], tf.int64))
        self.assertEqual(adv.dtype, tf.float32)
        self.assertLessEqual(float(tf.reduce_max(tf.abs(adv - images))), 8 / 255 + 1e-6)
        self.assertGreater(float(tf.reduce_max(tf.abs(adv - images))), 4 / 255)  # its gradient moved it

    def test_set_precision_round_trip_keeps_the_float32_function(self):
        _, model, (images, _) = _model_and_batch("clustr")
        before = model.backbone(images).numpy()
        weights = [w.copy() for w in model.get_weights()]
        precision.set_precision(model, "bfloat16")
        low = model.backbone(images)
        self.assertEqual(low.dtype, tf.bfloat16)
        precision.set_precision(model, "float32")
        np.testing.assert_array_equal(model.backbone(images).numpy(), before)
        for a, b in zip(weights, model.get_weights()):
            np.testing.assert_array_equal(a, b)
        with self.assertRaisesRegex(ValueError, r"`precision` must be one of float32, float16, bfloat16. "
                                                r"Received: 'half'"):
            precision.set_precision(model, "half")

    def test_policy_scope_restores_the_global_policy(self):
        _restore_policy(self)
        keras.mixed_precision.set_global_policy("float32")
        with precision.policy_scope("bfloat16"):
            backbone = backbones.small_convnet((8, 8, 1), width=8, embedding_dim=8)
        self.assertEqual(keras.mixed_precision.global_policy().name, "float32")
        self.assertEqual(backbone.compute_dtype, "bfloat16")
        self.assertTrue(precision.uses_loss_scaling("float16"))
        self.assertFalse(precision.uses_loss_scaling("bfloat16"))


class ConfigTest(absltest.TestCase):
    def test_values_and_the_former_boolean(self):
        self.assertEqual(config_lib.Runtime(mixed_precision="bfloat16").mixed_precision, "bfloat16")
        self.assertEqual(config_lib.Runtime(mixed_precision=True).mixed_precision, "float16")
        self.assertIsNone(config_lib.Runtime(mixed_precision=False).mixed_precision)
        self.assertIsNone(config_lib.Runtime(mixed_precision="float32").mixed_precision)
        with self.assertRaisesRegex(config_lib.ConfigError, "Unknown `mixed_precision`. Expected one of "
                                                            "float16, bfloat16. Received: 'bf16'"):
            config_lib.Runtime(mixed_precision="bf16")

    def test_optimizer_scales_the_loss_for_float16_only(self):
        for mixed, scaled in ((None, False), ("float16", True), ("bfloat16", False)):
            config = config_lib.RunConfig(runtime=config_lib.Runtime(model_dir=self.create_tempdir().full_path, mixed_precision=mixed))
            optimizer = training.optimizer_of(config, steps=10)
            self.assertEqual(isinstance(optimizer, keras.optimizers.LossScaleOptimizer), scaled, mixed)

    def test_binary_flag(self):
        """`--mixed_precision=bfloat16`; the bare flag (the former boolean) still means float16;
        a bad value is one line and exit status 2."""
        from clustr_tf import config_flags

        for flag, expected in (("--mixed_precision", "float16"), ("--mixed_precision=bfloat16", "bfloat16"),
                               ("--nomixed_precision", None)):
            _, flag_values = binaries.parse(binaries.MAIN, flag, f"--model_dir={self.create_tempdir().full_path}/run")
            config = config_flags.config_from_flags(flag_values)
            self.assertEqual(config.runtime.mixed_precision, expected, flag)
            self.assertEqual(config.flat()["mixed_precision"], expected, flag)  # what config.json records
        out = binaries.run(binaries.MAIN, "--mixed_precision=int8", f"--model_dir={self.create_tempdir().full_path}")
        self.assertEqual(out.returncode, 2, out.stderr)
        self.assertEqual(out.stderr.strip().splitlines(), [
            "main.py: error: Unknown --mixed_precision. Expected one of float16, bfloat16. Received: 'int8'"])


class RunTest(absltest.TestCase):
    def test_bfloat16_run_keeps_its_precision_through_save_export_and_evaluate(self):
        """A short digits run in bfloat16: config.json and metrics.json say so, model.keras keeps
        its bfloat16 backbone (head float32), the SavedModel keeps the signature dtypes in
        float32 and in bfloat16 compute, and evaluate.py computes in what --precision says.
        (That the default run reaches float32's accuracy in bfloat16 is measured by
        benchmarks/default_run.py, not here.)"""
        _restore_policy(self)
        cfg16 = config_lib.RunConfig(runtime=config_lib.Runtime(model_dir=self.create_tempdir().full_path,
                                                                mixed_precision="bfloat16", epochs=4))
        m16 = training.run(cfg16)
        self.assertEqual(keras.mixed_precision.global_policy().name, "float32")  # the run restored it
        self.assertGreater(m16["clean_accuracy"], 0.5)  # it learns (chance is 0.1)
        self.assertEqual((m16["mixed_precision"], m16["eval_precision"]), ("bfloat16", "float32"))
        with open(os.path.join(cfg16.runtime.model_dir, "config.json")) as fh:
            self.assertEqual(json.load(fh)["mixed_precision"], "bfloat16")

        model = keras.saving.load_model(os.path.join(cfg16.runtime.model_dir, "model.keras"))
        self.assertEqual(precision.of(model), "bfloat16")
        self.assertEqual(model.cluster_centers.compute_dtype, "float32")
        export_dir = self.create_tempdir().full_path
        images = data.load_arrays("digits", "test")[0][:5]
        outputs = {}
        for compute in ("float32", None):
            path = serving.export(model, export_dir, compute_precision=compute)
            self.assertEqual(precision.of(model), "bfloat16")  # the caller's model is left as it was
            loaded = tf.saved_model.load(path)
            for name in serving.SIGNATURES:
                fn = loaded.signatures[name]
                (spec,) = fn.structured_input_signature[1].values()
                self.assertEqual(spec.dtype, tf.float32, name)
                for key, out in fn.structured_outputs.items():
                    self.assertIn(out.dtype, (tf.float32, tf.int64), (name, key))
            with open(os.path.join(path, "assets.extra", serving.METADATA_FILE)) as fh:
                meta = json.load(fh)
            self.assertEqual((meta["compute_precision"], meta["trained_precision"]),
                             (compute or "bfloat16", "bfloat16"))
            outputs[compute] = loaded.signatures["serving_default"](tf.constant(images))
        out = binaries.run(binaries.EVALUATE, f"--model_dir={cfg16.runtime.model_dir}", "--num_examples=16", "--eps=8",
                           "--l2_eps=", "--iterations=2", "--restarts=1", "--square_queries=10",
                           "--nounbounded_check", "--precision=trained")
        self.assertEqual(out.returncode, 0, out.stderr[-2000:])
        with open(os.path.join(cfg16.runtime.model_dir, "robustness.json")) as fh:
            result = json.load(fh)
        self.assertEqual((result["precision"], result["trained_precision"]), ("bfloat16", "bfloat16"))
        # float32 compute is the float32 network: its classes are those of the float32 model.
        precision.set_precision(model, "float32")
        expected = model.prediction_function(20)(tf.constant(images))[0].numpy()
        classes = [v for k, v in outputs["float32"].items() if v.dtype == tf.int64][0].numpy()
        np.testing.assert_array_equal(classes, expected)


if __name__ == "__main__":
    absltest.main()
