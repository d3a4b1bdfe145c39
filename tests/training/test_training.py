"""Tests of the training step (`Classifier.train_step`) and of resumable training
(`training.train`) on one device: objective, QTRADES, XLA, state, resume, budgets."""

import fcntl
import json
import os
from unittest import mock

import keras
import numpy as np
import tensorflow as tf
from absl.testing import absltest

from clustr_tf import consistency
from clustr_tf import layers
from clustr_tf import losses
from clustr_tf import models
from clustr_tf import objectives
from clustr_tf import sampler as sampler_lib
from clustr_tf import training



def _data(seed=0, n_per_class=24):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), n_per_class)
    images = 0.2 * rng.random((len(labels), 4, 4, 1))
    for c in range(3):
        r, q = divmod(c, 2)
        images[labels == c, 2 * r : 2 * r + 2, 2 * q : 2 * q + 2, 0] += 0.7
    return images.astype("float32"), labels


class _Run:
    """A tiny compiled ClusTR model on 3 classes of 4x4 images, its sampler and run folder."""

    def __init__(self, test, objective=None, optimizer=None, seed=0, jit_compile=False):
        keras.utils.set_random_seed(seed)
        self.images, self.labels = _data()
        backbone = keras.Sequential(
            [keras.Input((4, 4, 1)), keras.layers.Flatten(), keras.layers.Dense(16, activation="relu"),
             keras.layers.BatchNormalization(), keras.layers.Dense(4)]
        )
        self.objective = objective or objectives.ClusTR(clusters_per_class=2, neighbours=4, m=3, d=4)
        self.model = self.objective.build_model(backbone, 3)
        self.model.compile(optimizer=optimizer or keras.optimizers.Adam(1e-2), objective=self.objective,
                           jit_compile=jit_compile)
        self.sampler = self.objective.batches(self.images, self.labels, 3, seed=seed)
        self.model_dir = test.create_tempdir().full_path
        self.test = tf.data.Dataset.from_tensor_slices((self.images, self.labels))

    def refresh(self):
        """The cluster refresh before the first step."""
        refresh = self.objective.cluster_refresh(self.sampler)
        refresh.set_model(self.model)
        refresh.on_train_begin()

    def step(self, images, targets):
        """One traced training step; returns the step's logs (metric means)."""
        return tf.function(self.model.train_step)((images, targets))

    def train(self, epochs, steps, **kwargs):
        return training.train(self.model, self.sampler, self.model_dir, epochs, steps, test=self.test,
                              verbose=0, **kwargs)


def _clustr(**settings):
    return objectives.ClusTR(clusters_per_class=2, neighbours=4, m=3, d=4, **settings)


class ObjectiveTest(absltest.TestCase):
    def test_kl_divergence_by_hand(self):
        """p = (1/2, 1/2), q = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3)."""
        p = tf.math.log([[0.5, 0.5]])
        q = tf.math.log([[0.25, 0.75]])
        expected = 0.5 * np.log(2) + 0.5 * np.log(2 / 3)
        self.assertAlmostEqual(float(consistency.kl_divergence(p, q)[0]), expected, places=6)
        self.assertAlmostEqual(float(consistency.kl_divergence(p, p)[0]), 0.0, places=6)

    def test_qtrades_perturbation_in_ball_and_deterministic(self):
        run = _Run(self)
        run.refresh()
        images = run.images
        x = tf.constant(images[:8])
        eps, step = 8 / 255, 10 / 255
        adv = consistency.qtrades_perturbation(run.model, x, eps, step, tf.constant([1, 2], tf.int64))
        again = consistency.qtrades_perturbation(run.model, x, eps, step, tf.constant([1, 2], tf.int64))
        np.testing.assert_array_equal(adv.numpy(), again.numpy())
        self.assertLessEqual(float(tf.reduce_max(tf.abs(adv - x))), eps + 1e-6)
        self.assertGreaterEqual(float(tf.reduce_min(adv)), 0.0)
        self.assertLessEqual(float(tf.reduce_max(adv)), 1.0)
        self.assertGreater(float(tf.reduce_max(tf.abs(adv - x))), 0.5 * eps)  # it moved

    def test_attack_gradient_does_not_reach_the_weights(self):
        run = _Run(self)
        run.refresh()
        images = run.images
        model = run.model
        with tf.GradientTape() as tape:
            adv = consistency.qtrades_perturbation(
                model, tf.constant(images[:8]), 8 / 255, 10 / 255, tf.constant([0, 0], tf.int64)
            )
            total = tf.reduce_sum(adv)
        grads = tape.gradient(total, model.trainable_variables)
        self.assertTrue(all(g is None for g in grads))

    def test_official_consistency_by_hand(self):
        """p = (1, 0), S = (2, 0): -log(e^2 / (e^2 + 1)); soft p mixes both classes' terms."""
        p = tf.constant([[1.0, 0.0], [0.25, 0.75]])
        scores = tf.constant([[2.0, 0.0], [0.5, 1.5]])
        got = consistency.official(p, scores).numpy()
        log_q = np.log(np.exp([[2.0, 0.0], [0.5, 1.5]]) / np.exp([[2.0, 0.0], [0.5, 1.5]]).sum(1, keepdims=True))
        np.testing.assert_allclose(got, -(np.array([[1.0, 0.0], [0.25, 0.75]]) * log_q).sum(1), rtol=1e-6)
        self.assertAlmostEqual(float(got[0]), np.log1p(np.exp(-2.0)), places=6)

    def test_official_term_is_bounded_where_the_kl_is_not(self):
        """A perturbed input whose prediction left the clean class's clusters: the KL between
        soft-kNC probabilities is about 100 nats, the official term at most K + log C."""
        layer = layers.ClusterCenters(num_classes=3, clusters_per_class=2, neighbours=2)
        layer.build((None, 2))
        centers = np.array([[0, 0], [0, 1], [10, 0], [10, 1], [20, 0], [20, 1]], np.float32)
        layer.centers.assign(centers)
        layer.variance.assign(1.0)
        clean = layer(tf.constant(centers[:1]))  # at a center of class 0: its two clusters are the L nearest
        far = tf.constant(centers[4:5])  # at a center of class 2: class 0 leaves the L nearest
        kl = float(consistency.kl_divergence(clean, layer(far))[0])
        official = float(consistency.official(tf.nn.softmax(clean), layer.scores_from_distances(
            layer.squared_distances(far)))[0])
        self.assertGreater(kl, 10.0)
        self.assertLess(official, 2 + np.log(3) + 1e-6)
        self.assertGreater(official, np.log1p(2 * np.exp(-2)) - 1e-6)

    def test_official_attack_moves_and_stays_in_the_ball(self):
        run = _Run(self)
        run.refresh()
        images = run.images
        x = tf.constant(images[:8])
        target = run.model(x, training=False)
        adv = consistency.perturbation(run.model, x, target, "official", 8 / 255, 10 / 255,
                                                tf.constant([1, 2], tf.int64))
        self.assertLessEqual(float(tf.reduce_max(tf.abs(adv - x))), 8 / 255 + 1e-6)
        self.assertGreaterEqual(float(tf.reduce_min(adv)), 0.0)
        self.assertGreater(float(tf.reduce_max(tf.abs(adv - x))), 4 / 255)
        # One signed step raises the official term against the clean prediction.
        layer = run.model.cluster_centers

        def term(images):
            scores = layer.scores_from_distances(layer.squared_distances(run.model.embed(images)))
            return float(tf.reduce_sum(consistency.official(tf.nn.softmax(target), scores)))

        start = tf.clip_by_value(x + tf.random.stateless_uniform(tf.shape(x), [1, 2], -8 / 255, 8 / 255), 0.0, 1.0)
        self.assertGreater(term(adv), term(start))
        with self.assertRaisesRegex(ValueError, "`form` must be one of official, kl. Received: 'mse'"):
            consistency.perturbation(run.model, x, target, "mse", 0.1, 0.1, tf.constant([0, 0]))

    def test_unknown_consistency_form_is_refused(self):
        with self.assertRaisesRegex(ValueError, "Unknown `consistency`. Expected one of official, kl. Received: 'trades'"):
            _clustr(consistency="trades")

    def _one_step(self, objective):
        """(run, images, targets, weights and moving statistics before the step)."""
        run = _Run(self, objective, optimizer=keras.optimizers.SGD(0.1))
        run.refresh()
        images, targets = next(iter(run.sampler.dataset()))
        model = run.model
        before = [v.numpy().copy() for v in model.trainable_variables]
        moving = [v.numpy().copy() for v in model.non_trainable_variables]
        return run, images, targets, before, moving

    def test_step_applies_the_gradient_of_the_objective(self):
        """One step with SGD(lr) moves the weights by -lr * grad of the mean objective,
        the QTRADES input being made with the step's seed, for both forms of the term."""
        for form in consistency.CONSISTENCY_FORMS:
            config = _clustr(xent_lambda=0.5, logits_xent_lambda=0.25, consistency_lambda=8.0, consistency=form)
            run, images, targets, before, moving = self._one_step(config)
            model = run.model
            with tf.GradientTape() as tape:
                total, _, _, _, extras = objectives.per_example_objective(
                    model, images, targets, config, seed=tf.constant([0, 0], tf.int64))
                loss = tf.reduce_mean(total)
            self.assertEqual(sorted(extras), ["adversarial", "consistency"])
            expected = [b - 0.1 * g.numpy() for b, g in zip(before, tape.gradient(loss, model.trainable_variables))]
            for v, m in zip(model.non_trainable_variables, moving):  # undo the BN update above
                v.assign(m)
            logs = run.step(images, targets)
            self.assertAlmostEqual(float(logs["consistency_loss"]), float(tf.reduce_mean(extras["consistency"])),
                                   places=3)
            for v, e in zip(model.trainable_variables, expected):
                np.testing.assert_allclose(v.numpy(), e, rtol=1e-4, atol=1e-5, err_msg=form)

    def test_update_equals_the_update_with_the_attack_input_as_a_constant(self):
        """The attack's weight gradients never reach the update (the official code adds them):
        the training step equals an SGD step on the objective with x' given as a constant."""
        for form in consistency.CONSISTENCY_FORMS:
            config = _clustr(consistency_lambda=8.0, consistency=form)
            run, images, targets, before, moving = self._one_step(config)
            model = run.model
            _, _, _, _, extras = objectives.per_example_objective(
                model, images, targets, config, seed=tf.constant([0, 0], tf.int64))
            adversarial = tf.constant(extras["adversarial"].numpy())
            self.assertGreater(float(tf.reduce_max(tf.abs(adversarial - images))), 4 / 255)
            with tf.GradientTape() as tape:
                total, _, _, _, _ = objectives.per_example_objective(model, images, targets, config,
                                                                   adversarial=adversarial)
                loss = tf.reduce_mean(total)
            expected = [b - 0.1 * g.numpy() for b, g in zip(before, tape.gradient(loss, model.trainable_variables))]
            for v, m in zip(model.non_trainable_variables, moving):
                v.assign(m)
            run.step(images, targets)
            for v, e in zip(model.trainable_variables, expected):
                np.testing.assert_allclose(v.numpy(), e, rtol=1e-5, atol=1e-6, err_msg=form)

    def test_official_term_lets_the_gradient_of_p_flow(self):
        """p is not held constant in the loss (as in the official code): its gradient differs
        from the one with p stopped."""
        config = _clustr(consistency_lambda=1.0)
        run, images, targets, _, _ = self._one_step(config)
        model = run.model
        layer = model.cluster_centers
        layer.variance.assign(50.0 * layer.variance)  # soft probabilities: p has a gradient to give
        _, _, _, _, extras = objectives.per_example_objective(
            model, images, targets, config, seed=tf.constant([0, 0], tf.int64))
        adversarial = extras["adversarial"]
        with tf.GradientTape(persistent=True) as tape:
            _, _, logits, _, extras = objectives.per_example_objective(model, images, targets, config,
                                                                     adversarial=adversarial)
            flowing = tf.reduce_sum(extras["consistency"])
            adv_scores = layer.scores_from_distances(layer.squared_distances(model.embed(adversarial, training=True)))
            stopped = tf.reduce_sum(consistency.official(tf.stop_gradient(tf.nn.softmax(logits)), adv_scores))
        self.assertAlmostEqual(float(flowing), float(stopped), places=4)
        a = tape.gradient(flowing, model.trainable_variables)
        b = tape.gradient(stopped, model.trainable_variables)
        self.assertGreater(max(float(tf.reduce_max(tf.abs(x - y))) for x, y in zip(a, b)), 1e-6)

    def test_records_magnet_losses_in_the_sampler(self):
        run = _Run(self, _clustr(xent_lambda=1.0))
        run.refresh()
        images, targets = next(iter(run.sampler.dataset()))
        magnet = losses.magnet_loss(targets["clusters"], run.model.embed(images, training=True), 2)
        run.step(images, targets)
        recorded = run.sampler.example_losses.numpy()[targets["indices"].numpy()]
        np.testing.assert_allclose(recorded, magnet.numpy(), rtol=1e-4, atol=1e-4)


class CompiledStepTest(absltest.TestCase):
    def test_xla_step_matches_the_plain_step(self):
        results = []
        for jit in (False, True):
            run = _Run(self, _clustr(xent_lambda=0.5), optimizer=keras.optimizers.SGD(0.1), jit_compile=jit)
            run.refresh()
            images, targets = next(iter(run.sampler.dataset()))
            logs = run.step(images, targets)
            results.append((float(logs["loss"]), [v.numpy() for v in run.model.trainable_variables],
                            run.sampler.example_losses.numpy()))
        (loss_a, weights_a, rec_a), (loss_b, weights_b, rec_b) = results
        self.assertAlmostEqual(loss_a, loss_b, places=3)
        for a, b in zip(weights_a, weights_b):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(rec_a, rec_b, rtol=1e-3, atol=1e-4)


class MixedPrecisionTest(absltest.TestCase):
    def test_mixed_float16_step_is_finite_with_a_float32_head(self):
        keras.mixed_precision.set_global_policy("mixed_float16")
        try:
            run = _Run(self, optimizer=keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(1e-3)))
            self.assertEqual(run.model.backbone.compute_dtype, "float16")
            self.assertEqual(run.model.cluster_centers.compute_dtype, "float32")
            history, _ = run.train(1, 2)
        finally:
            keras.mixed_precision.set_global_policy("float32")
        self.assertTrue(np.isfinite(history[0]["loss"]))
        self.assertEqual(run.model.cluster_centers.centers.dtype, "float32")


def _state(run):
    return {
        "weights": [w.numpy().copy() for w in run.model.weights],
        "optimizer": [v.numpy().copy() for v in run.model.optimizer.variables],
        "losses": run.sampler.example_losses.numpy().copy(),
        "assignments": run.sampler.assignments.numpy().copy(),
    }


class LoopTest(absltest.TestCase):
    def test_trains_logs_and_checkpoints(self):
        run = _Run(self)
        history, state = run.train(4, 6, checkpoint_every_steps=4)
        self.assertLen(history, 4)
        self.assertLess(history[-1]["magnet_loss"], history[0]["magnet_loss"])
        self.assertGreaterEqual(history[-1]["val_nearest_center_accuracy"], 0.9)
        for key in ("loss", "accuracy", "nearest_center_accuracy", "variance", "center_separation",
                    "val_accuracy", "learning_rate", "seconds", "cpu_seconds"):
            self.assertIn(key, history[0])
        with open(os.path.join(run.model_dir, training.CSV_NAME)) as fh:
            rows = fh.read().splitlines()
        self.assertEqual([r.split(",")[0] for r in rows], ["epoch", "0", "1", "2", "3"])
        self.assertTrue(os.listdir(os.path.join(run.model_dir, "logs", "train")))
        self.assertEqual(int(state.epoch.numpy()), 4)
        self.assertEqual(int(run.model.optimizer.iterations.numpy()), 24)
        # A second call on a finished run does nothing.
        self.assertEqual(run.train(4, 6)[0], [])

    def test_resumes_inside_an_epoch_where_the_state_was_saved(self):
        """A run stopped after 5 of 6 steps of epoch 0 (saved at step 4) goes on from step 4:
        the rest of epoch 0, then epoch 1, each logged once."""

        class Stop(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                if batch == 4:
                    raise KeyboardInterrupt  # a kill between two saves

        run = _Run(self)
        with self.assertRaises(KeyboardInterrupt):
            run.train(2, 6, checkpoint_every_steps=4, callbacks=[Stop()])
        again = _Run(self, seed=1)
        again.model_dir = run.model_dir
        history, state = again.train(2, 6, checkpoint_every_steps=4)
        self.assertLen(history, 2)
        self.assertEqual(int(again.model.optimizer.iterations.numpy()), 12)
        self.assertEqual(int(state.epoch.numpy()), 2)
        with open(os.path.join(run.model_dir, training.CSV_NAME)) as fh:
            self.assertEqual([r.split(",")[0] for r in fh.read().splitlines()], ["epoch", "0", "1"])

    def test_budget_stops_after_the_epoch_that_spends_it(self):
        run = _Run(self)
        history, state = run.train(5, 2, cpu_budget_seconds=1e-6)
        self.assertLen(history, 1)
        self.assertEqual(int(state.epoch.numpy()), 1)
        self.assertEqual(run.train(5, 2, cpu_budget_seconds=1e-6)[0], [])  # spent: nothing more

    def test_diverged_loss_is_a_clear_error_and_keeps_the_last_good_state(self):
        run = _Run(self, optimizer=keras.optimizers.SGD(1e30))
        with self.assertRaisesRegex(training.TrainingDivergedError, "The training loss is nan at epoch 1"):
            run.train(3, 4, checkpoint_every_steps=0)
        state = training.TrainingState(run.model, run.sampler, run.model_dir)
        self.assertTrue(state.restore())  # the state saved before the first step
        self.assertTrue(all(np.isfinite(w.numpy()).all() for w in run.model.trainable_weights))

    def test_restore_brings_back_every_piece_of_state(self):
        run = _Run(self)
        run.train(1, 3)
        saved = _state(run)
        # A new process would start from scratch: emulate it with a fresh model and sampler.
        fresh = _Run(self, seed=1)
        state = training.TrainingState(fresh.model, fresh.sampler, run.model_dir)
        self.assertTrue(state.restore())
        restored = _state(fresh)
        for key in ("weights", "optimizer"):
            for a, b in zip(saved[key], restored[key]):
                np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(saved["losses"], restored["losses"])
        np.testing.assert_array_equal(saved["assignments"], restored["assignments"])
        self.assertEqual(int(state.epoch.numpy()), 1)

    def test_corrupt_checkpoint_is_a_clear_error(self):
        run = _Run(self)
        run.train(1, 2)
        folder = os.path.join(run.model_dir, training.STATE_DIR)
        for name in os.listdir(folder):
            if name.endswith(".index"):
                with open(os.path.join(folder, name), "wb") as fh:
                    fh.write(b"not a checkpoint")
        fresh = _Run(self)
        state = training.TrainingState(fresh.model, fresh.sampler, run.model_dir)
        with self.assertRaisesRegex(training.RestoreError, "Cannot restore the training state from .*corrupt"):
            state.restore()
        self.assertTrue(os.listdir(folder))  # nothing was deleted

    def test_truncated_latest_checkpoint_names_the_one_before_it_which_resumes(self):
        """A data file cut in half (a full disk): one message that says truncated, deletes
        nothing and names the earlier checkpoint; `restore("ckpt-N")` resumes from it."""
        run = _Run(self)
        run.train(1, 2, checkpoint_every_steps=1)
        folder = os.path.join(run.model_dir, training.STATE_DIR)
        latest = tf.train.latest_checkpoint(folder)
        data_file = latest + ".data-00000-of-00001"
        with open(data_file, "r+b") as fh:
            fh.truncate(os.path.getsize(data_file) // 2)
        files = sorted(os.listdir(folder))
        fresh = _Run(self)
        state = training.TrainingState(fresh.model, fresh.sampler, run.model_dir)
        with self.assertRaises(training.RestoreError) as cm:
            state.restore()
        message = str(cm.exception)
        self.assertIn("it is truncated or corrupt", message)
        self.assertIn("Nothing was deleted; pass --resume_checkpoint=ckpt-1 to resume from the one saved before it",
                      message)
        self.assertEqual(len(message.splitlines()), 1)
        self.assertEqual(sorted(os.listdir(folder)), files)
        self.assertTrue(state.restore("ckpt-1"))
        self.assertEqual(state.iterations, 1)
        with self.assertRaisesRegex(training.RestoreError, r"No checkpoint ckpt-7 in .* \(saved there: ckpt-1, ckpt-2"):
            state.restore("ckpt-7")

    def test_checkpoint_of_another_configuration_says_so(self):
        run = _Run(self)
        run.train(1, 1)
        other = _Run(self, objective=objectives.ClusTR(clusters_per_class=3, neighbours=4, m=3, d=4))  # other centers
        state = training.TrainingState(other.model, other.sampler, run.model_dir)
        with self.assertRaisesRegex(training.RestoreError, "belongs to another configuration.*start over in a new "
                                                           "--model_dir"):
            state.restore()

    def test_train_holds_the_run_directory_and_a_held_one_fails_unchanged(self):
        """`train` takes the run directory's lock (re-entrant: `run` holds it already); a
        folder whose lock is held elsewhere (another open file here, as another process
        holds it) fails before the state is read or anything written; its task of a
        multi-worker run locks its own file."""
        run = _Run(self)
        with training.state.run_dir_lock(run.model_dir):
            run.train(1, 1)  # the same process: re-entrant
        lock = os.path.join(run.model_dir, training.state.LOCK_NAME)
        files = sorted(os.listdir(run.model_dir))
        with open(lock, "a+") as other:
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with self.assertRaisesRegex(training.RunDirInUseError,
                                        r"Another training is running in this run directory \(pid \d+ on "):
                run.train(2, 1)
            self.assertEqual(sorted(os.listdir(run.model_dir)), files)
            worker = json.dumps({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}})
            with mock.patch.dict(os.environ, {"TF_CONFIG": worker}):
                with training.state.run_dir_lock(run.model_dir):
                    self.assertTrue(os.path.exists(lock + "-worker-1"))


if __name__ == "__main__":
    absltest.main()
