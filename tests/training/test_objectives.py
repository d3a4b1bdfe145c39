"""Training objectives: each gives the per-example losses and metrics it promises, and a new
objective trains through the model's unchanged `train_step` and `fit`."""

import csv
import os

import keras
import numpy as np
import tensorflow as tf
from absl.testing import absltest

from clustr_tf import backbones
from clustr_tf import baselines
from clustr_tf import clustering
from clustr_tf import data
from clustr_tf import models
from clustr_tf import objectives
from clustr_tf import sampler as sampler_lib
from clustr_tf import training



def _digits(n=240):
    images, labels = data.load_arrays("digits", "train")
    return images[:n], labels[:n]


def _backbone(seed=0):
    keras.utils.set_random_seed(seed)
    return backbones.small_convnet((8, 8, 1), width=8, embedding_dim=16)


class CrossEntropyTest(absltest.TestCase):
    def test_per_example_cross_entropy_and_accuracy(self):
        objective = objectives.CrossEntropy()
        model = objective.build_model(_backbone(), 10)
        self.assertIsInstance(model, baselines.SoftmaxClassifier)
        images, labels = _digits(16)
        result = objective.losses(model, tf.constant(images), {"labels": tf.constant(labels)}, tf.constant([0, 0]))
        logits = model(images, training=True).numpy()
        shifted = logits - logits.max(1, keepdims=True)
        expected = np.log(np.exp(shifted).sum(1)) - shifted[np.arange(16), labels]
        np.testing.assert_allclose(result.losses.numpy(), expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(result.metrics["accuracy"].numpy(), (logits.argmax(1) == labels) * 1.0)
        self.assertIsNone(result.record)
        batches = objective.batches(images, labels, 10, seed=0, batch_size=8)
        self.assertIsInstance(batches, baselines.BatchSource)
        self.assertEqual(batches.batch_size, 8)

    def test_pgd_at_trains_on_perturbed_inputs_in_the_ball(self):
        objective = objectives.PGDAT(eps=8 / 255, step=2 / 255, iterations=3)
        model = objective.build_model(_backbone(), 10)
        images, labels = (tf.constant(a) for a in _digits(32))
        seed = tf.constant([0, 1], tf.int64)
        adv = objective._inputs(model, images, labels, seed)
        self.assertLessEqual(float(tf.reduce_max(tf.abs(adv - images))), 8 / 255 + 1e-6)
        pgd = objective.losses(model, images, {"labels": labels}, seed).losses
        clean = objectives.CrossEntropy().losses(model, images, {"labels": labels}, seed).losses
        self.assertGreater(float(tf.reduce_mean(pgd)), float(tf.reduce_mean(clean)))
        with self.assertRaisesRegex(ValueError, "0 < `step` <= `eps`"):
            objectives.PGDAT(eps=1 / 255, step=2 / 255)


class ClusTRObjectiveTest(absltest.TestCase):
    def test_model_batches_refresh_and_record(self):
        objective = objectives.ClusTR(clusters_per_class=2, neighbours=4, m=3, d=4, consistency_lambda=8.0)
        model = objective.build_model(_backbone(), 10)
        self.assertIsInstance(model, models.ClusTRModel)
        self.assertEqual((model.cluster_centers.clusters_per_class, model.cluster_centers.neighbours), (2, 4))
        images, labels = _digits()
        batches = objective.batches(images, labels, 10, seed=0)
        self.assertIsInstance(batches, sampler_lib.NeighbourhoodSampler)
        self.assertEqual(batches.batch_size, 12)
        for resumed in (False, True):
            (refresh,) = objective.callbacks(batches, resumed)
            self.assertIsInstance(refresh, clustering.ClusterRefresh)
            self.assertEqual(refresh.refresh_on_train_begin, not resumed)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), objective=objective)
        refresh.set_model(model)
        refresh.on_train_begin()  # connects the sampler to the model's step
        refresh.refresh()
        x, targets = next(iter(batches.dataset()))
        result = objective.losses(model, x, targets, tf.constant([0, 0], tf.int64))
        self.assertEqual(sorted(result.metrics),
                         ["accuracy", "consistency_loss", "magnet_loss", "nearest_center_accuracy"])
        model.train_step((x, targets))
        # The step's record (each example's magnet loss, before the update) went to the sampler.
        recorded = batches.example_losses.numpy()[targets["indices"].numpy()]
        np.testing.assert_allclose(recorded, result.record.numpy(), rtol=1e-4, atol=1e-4)

    def test_bad_settings(self):
        with self.assertRaisesRegex(ValueError, "Unknown `consistency`. Expected one of official, kl. Received: 'mse'"):
            objectives.ClusTR(consistency="mse")
        with self.assertRaisesRegex(ValueError, "`m` must be an integer >= 1. Received: 0"):
            objectives.ClusTR(m=0)
        with self.assertRaisesRegex(ValueError, "`xent_lambda` must be >= 0. Received: -1"):
            objectives.ClusTR(xent_lambda=-1)


class Hinge(objectives.CrossEntropy):
    """A new objective for the test: the multiclass hinge loss on the softmax classifier."""

    metric_names = ("margin_violations",)

    def losses(self, model, images, targets, seed):
        labels = tf.cast(targets["labels"], tf.int64)
        logits = tf.cast(model(images, training=True), tf.float32)
        true = tf.gather(logits, labels, axis=1, batch_dims=1)
        others = tf.where(tf.one_hot(labels, 10) > 0, -np.inf, logits)
        margin = tf.nn.relu(1.0 + tf.reduce_max(others, axis=1) - true)
        return objectives.Result(margin, {"margin_violations": tf.cast(margin > 0, tf.float32)}, None)


class NewObjectiveTest(absltest.TestCase):
    def test_a_new_objective_trains_through_the_unchanged_step(self):
        objective = Hinge()
        model = objective.build_model(_backbone(), 10)
        model.compile(optimizer=keras.optimizers.Adam(3e-3), objective=objective)
        images, labels = _digits(480)
        run = self.create_tempdir().full_path
        history, _ = training.train(model, objective.batches(images, labels, 10, seed=0), run, 3, 4,
                                    test=tf.data.Dataset.from_tensor_slices((images, labels)), verbose=0)
        self.assertLess(history[-1]["loss"], history[0]["loss"])
        with open(os.path.join(run, training.CSV_NAME)) as fh:
            rows = list(csv.DictReader(fh))
        self.assertEqual([r["epoch"] for r in rows], ["0", "1", "2"])
        self.assertIn("margin_violations", rows[0])
        self.assertIn("val_accuracy", rows[0])

    def test_compile_refuses_a_model_the_objective_does_not_train(self):
        clustr = objectives.ClusTR(m=3, d=4)
        with self.assertRaisesRegex(TypeError, "CrossEntropy trains a SoftmaxClassifier. Received: ClusTRModel"):
            clustr.build_model(_backbone(), 10).compile(optimizer=keras.optimizers.Adam(),
                                                        objective=objectives.CrossEntropy())


if __name__ == "__main__":
    absltest.main()
