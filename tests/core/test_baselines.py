"""Tests of the baselines: the softmax classifier, its PGD training attack, its batches,
its training through `fit` and the binary, and its evaluation."""

import json
import os

import keras
import numpy as np
import tensorflow as tf
from absl.testing import absltest

from clustr_tf import backbones
from clustr_tf import baselines
from clustr_tf import data
from clustr_tf import distribute
from clustr_tf import objectives
from clustr_tf import training
from tests import binaries




def _model(seed=0):
    keras.utils.set_random_seed(seed)
    return baselines.SoftmaxClassifier(backbones.small_convnet((8, 8, 1), width=8, embedding_dim=16), 10)


class SoftmaxClassifierTest(absltest.TestCase):
    def test_saves_and_loads(self):
        model = _model()
        x = np.random.default_rng(0).random((3, 8, 8, 1)).astype("float32")
        path = os.path.join(self.create_tempdir().full_path, "model.keras")
        model.save(path)
        loaded = keras.saving.load_model(path)
        np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-6)
        self.assertEqual(loaded.num_classes, 10)

    def test_rejects_bad_arguments(self):
        with self.assertRaisesRegex(TypeError, "backbone"):
            baselines.SoftmaxClassifier("resnet", 10)
        with self.assertRaisesRegex(ValueError, "num_classes"):
            baselines.SoftmaxClassifier(backbones.small_convnet((8, 8, 1)), 1)


class PgdPerturbationTest(absltest.TestCase):
    def test_in_the_ball_and_the_box_and_raises_the_loss(self):
        model = _model()
        images, labels = data.load_arrays("digits", "test")
        images, labels = images[:64], labels[:64]
        eps = 8 / 255
        adv = baselines.pgd_perturbation(model, tf.constant(images), tf.constant(labels), eps, 2 / 255, 10,
                                         tf.constant([0, 1], tf.int64)).numpy()
        self.assertLessEqual(np.abs(adv - images).max(), eps + 1e-6)
        self.assertGreaterEqual(adv.min(), 0.0)
        self.assertLessEqual(adv.max(), 1.0)
        loss = lambda x: float(tf.reduce_mean(  # noqa: E731
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels.astype("int64"), model(x))))
        self.assertGreater(loss(adv), loss(images))


class BatchSourceTest(absltest.TestCase):
    def setUp(self):
        super().setUp()
        self.images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1) * 20
        self.labels = np.arange(10)

    def _labels(self, source, start=0, stream=0, count=6):
        return [b[1]["labels"].numpy().tolist() for b in source.dataset(start, stream).take(count)]

    def test_each_epoch_is_a_permutation_and_resuming_is_exact(self):
        source = baselines.BatchSource(self.images, self.labels, batch_size=5, seed=3)
        batches = self._labels(source)
        self.assertEqual(sorted(batches[0] + batches[1]), list(range(10)))  # epoch 1
        self.assertEqual(sorted(batches[2] + batches[3]), list(range(10)))  # epoch 2
        self.assertNotEqual(batches[0] + batches[1], batches[2] + batches[3])  # reshuffled
        self.assertEqual(self._labels(source, start=3, count=3), batches[3:])
        self.assertNotEqual(self._labels(source, stream=1), batches)
        images, _ = next(iter(source.dataset()))
        self.assertEqual(images.dtype, tf.float32)
        self.assertLessEqual(float(tf.reduce_max(images)), 1.0)

    def test_rejects_a_batch_larger_than_the_data(self):
        with self.assertRaisesRegex(ValueError, "batch_size"):
            baselines.BatchSource(self.images, self.labels, batch_size=11)


class TrainTest(absltest.TestCase):
    def _train(self, method, model_dir, epochs=3, budget=None, cpu_budget=None):
        images, labels = data.load_arrays("digits", "train")
        objective = objectives.CrossEntropy() if method == "cross_entropy" else objectives.PGDAT(iterations=3)
        strategy = distribute.get_strategy("default")
        with strategy.scope():
            model = _model()
            model.compile(optimizer=keras.optimizers.Adam(3e-3), objective=objective)
        source = objective.batches(images, labels, 10, seed=0, batch_size=128)
        history, _ = training.train(model, source, model_dir, epochs, source.steps_per_epoch,
                                    test=data.load("digits", "test"), time_budget_seconds=budget,
                                    cpu_budget_seconds=cpu_budget, verbose=0)
        return history, model

    def test_cross_entropy_and_pgd_at_learn(self):
        for method in ("cross_entropy", "pgd_at"):
            history, _ = self._train(method, self.create_tempdir().full_path)
            self.assertGreater(history[-1]["val_accuracy"], 0.6, (method, history))
            self.assertLess(history[-1]["loss"], history[0]["loss"])
            self.assertNotIn("val_nearest_center_accuracy", history[-1])

    def test_resumes_from_its_checkpoint(self):
        model_dir = self.create_tempdir().full_path
        self._train("cross_entropy", model_dir, epochs=1)
        history, model = self._train("cross_entropy", model_dir, epochs=2)
        self.assertLen(history, 1)  # only epoch 2 ran: epoch 1 was restored

    def test_time_budget_stops_training_and_survives_a_restart(self):
        model_dir = self.create_tempdir().full_path
        history, _ = self._train("cross_entropy", model_dir, epochs=50, budget=1e-3)
        self.assertLen(history, 1)  # the first epoch spends the budget
        self.assertGreater(history[0]["cpu_seconds"], 0.0)
        history, _ = self._train("cross_entropy", model_dir, epochs=50, budget=1e-3)
        self.assertEqual(history, [])  # the spent time was restored with the checkpoint
        history, _ = self._train("cross_entropy", self.create_tempdir().full_path, epochs=50, cpu_budget=1e-3)
        self.assertLen(history, 1)  # likewise in CPU time

    def test_objective_and_model_must_match(self):
        from clustr_tf import models

        model = models.ClusTRModel(backbones.small_convnet((8, 8, 1)), 10)
        with self.assertRaisesRegex(TypeError, "PGDAT trains a SoftmaxClassifier. Received: ClusTRModel"):
            model.compile(optimizer=keras.optimizers.Adam(), objective=objectives.PGDAT())
        with self.assertRaisesRegex(TypeError, r"SoftmaxClassifier.compile takes an `objective` .* Received: objective=str"):
            _model().compile(optimizer=keras.optimizers.Adam(), objective="trades")


class BinaryTest(absltest.TestCase):
    """The binaries in this process (tests/binaries.py)."""

    def _run(self, script, *args):
        return binaries.run(f"training/{script}", *args)

    def test_train_then_evaluate_a_pgd_at_baseline(self):
        run = os.path.join(self.create_tempdir().full_path, "run")
        out = self._run("main.py", "--method=pgd_at", "--pgd_iterations=2", "--epochs=2", "--lr=3e-3",
                        f"--model_dir={run}")
        self.assertEqual(out.returncode, 0, out.stderr[-3000:])
        with open(os.path.join(run, "metrics.json")) as fh:
            metrics = json.load(fh)
        self.assertEqual(metrics["method"], "pgd_at")
        self.assertIsNone(metrics["nearest_center_accuracy"])
        out = self._run("evaluate.py", f"--model_dir={run}", "--num_examples=40", "--iterations=3",
                        "--restarts=1", "--eps=8", "--l2_eps=", "--square_queries=20")
        self.assertEqual(out.returncode, 0, out.stderr[-3000:])
        with open(os.path.join(run, "robustness.json")) as fh:
            result = json.load(fh)
        self.assertEqual(result["method"], "pgd_at")
        self.assertIsNone(result["nearest_center_accuracy"])
        self.assertLessEqual(result["robust_accuracy"]["8/255"], result["clean_accuracy"])
        self.assertAlmostEqual(result["certified_accuracy"]["0.0"], result["clean_accuracy"])

    def test_bad_method_flags(self):
        for args, message in ((["--method=trades"], "Unknown --method"),
                              (["--method=pgd_at", "--consistency_lambda=8"], "--consistency_lambda applies"),
                              (["--method=pgd_at", "--pgd_step=16"], "--pgd_eps, --pgd_step"),
                              (["--optimizer=rmsprop"], "Unknown --optimizer"),
                              (["--optimizer=sgd", "--momentum=1.5"], "--momentum must be in [0, 1)")):
            out = self._run("main.py", *args, f"--model_dir={self.create_tempdir().full_path}/run")
            self.assertEqual(out.returncode, 2, out.stderr[-2000:])
            self.assertIn(message, out.stderr.strip().splitlines()[-1])


if __name__ == "__main__":
    absltest.main()
