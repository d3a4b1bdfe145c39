"""Certified training: certified ClusTR's loss and the Lipschitz-margin cross-entropy are the
formulas they claim, they need a backbone whose bound is exact by construction, bad
settings fail with one clear error, and a short digits run certifies what it trained for."""

import os

import keras
import numpy as np
import tensorflow as tf
from absl.testing import absltest
from absl.testing import parameterized

from clustr_tf import backbones
from clustr_tf import certify
from clustr_tf import config as config_lib
from clustr_tf import lipschitz
from clustr_tf import objectives
from clustr_tf.core import ops
from tests import binaries




class MarginLossTest(parameterized.TestCase):
    def test_margin_logits(self):
        rng = np.random.default_rng(1)
        kernel = rng.normal(size=(5, 4)).astype("float32")
        logits = rng.normal(size=(3, 4)).astype("float32")
        labels = np.array([0, 2, 3])
        got = objectives.margin_logits(tf.constant(logits), tf.constant(labels, tf.int64), kernel, 0.7).numpy()
        expected = logits.astype(np.float64).copy()
        for n, y in enumerate(labels):
            for j in range(4):
                if j != y:
                    expected[n, j] += 0.7 * np.linalg.norm(kernel[:, y] - kernel[:, j])
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _direct_certificate_loss(features, centers, labels, k, margin, temperature):
    """Certified ClusTR's loss written out in float64: cross-entropy over logits / T with
    logit_y = -||z - mu_i||^2 (i the nearest center of y) and, for c != y,
    max over c's centers k of -||z - mu_k||^2 + 2 margin ||mu_i - mu_k||."""
    features, centers = np.asarray(features, np.float64), np.asarray(centers, np.float64)
    out, certified = [], []
    for z, y in zip(features, labels):
        d = ((z - centers) ** 2).sum(-1)
        i = y * k + int(np.argmin(d[y * k:(y + 1) * k]))
        logits = []
        for c in range(len(centers) // k):
            if c == y:
                logits.append(-d[i])
            else:
                logits.append(max(-d[j] + 2 * margin * np.linalg.norm(centers[i] - centers[j])
                                  for j in range(c * k, (c + 1) * k)))
        logits = np.array(logits) / temperature
        out.append(np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[y])
        certified.append(all(logits[y] > logits[c] for c in range(len(logits)) if c != y))
    return np.array(out), np.array(certified)


def _lipschitz_backbone(shape=(8, 8, 1)):
    return backbones.get_backbone("lipschitz", shape, mean=0.5)


class CertifiedClusTRTest(parameterized.TestCase):
    @parameterized.parameters((0, 1, 0.0, 1.0), (1, 2, 0.3, 0.25), (2, 3, 1.0, 4.0))
    def test_loss_is_the_formula_and_its_certified_examples_are_certified(self, seed, k, margin, temperature):
        from clustr_tf.training import certified

        rng = np.random.default_rng(seed)
        classes, dim, n = 4, 5, 40
        centers = rng.normal(size=(classes * k, dim)) * 2
        labels = rng.integers(0, classes, size=n)
        features = centers[labels * k + rng.integers(0, k, size=n)] + rng.normal(size=(n, dim)) * 0.7
        expected, expected_certified = _direct_certificate_loss(features, centers, labels, k, margin, temperature)
        c32, f32 = tf.constant(centers, tf.float32), tf.constant(features, tf.float32)
        distances = ops.pairwise_squared_distances(f32, c32)
        logits, own = certified.certificate_logits(distances, c32, tf.constant(labels), k, margin)
        loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits / temperature).numpy()
        np.testing.assert_allclose(loss, expected, rtol=1e-4, atol=1e-4)
        got_certified = np.argmax(logits.numpy(), -1) == labels
        np.testing.assert_array_equal(got_certified, expected_certified)
        # Certified by the logits <=> the float64 certificate says correct with radius > margin.
        radius, predicted, _ = certify.feature_radius(features, centers, k)
        by_certificate = (predicted.numpy() == labels) & (radius.numpy() > margin)
        np.testing.assert_array_equal(got_certified, by_certificate)
        self.assertGreater(by_certificate.sum(), 0)
        if margin:
            self.assertLess(by_certificate.sum(), n)
        self.assertEqual(own.shape, (n,))

    def test_a_zero_loss_certifies_the_batch_at_the_training_radius(self):
        """Features near centers far apart, a small temperature: the loss is ~0, and the
        float64 certificate certifies every example at the training radius."""
        from clustr_tf.training import certified

        rng = np.random.default_rng(3)
        k, margin = 2, 0.5
        centers = rng.normal(size=(6, 4)) * 10
        labels = np.repeat(np.arange(3), 8)
        features = centers[labels * k + np.tile([0, 1], 12)] + rng.normal(size=(24, 4)) * 0.05
        c32, f32 = tf.constant(centers, tf.float32), tf.constant(features, tf.float32)
        logits, _ = certified.certificate_logits(ops.pairwise_squared_distances(f32, c32), c32, labels, k, margin)
        loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits / 0.05).numpy()
        self.assertLess(loss.max(), 1e-6)
        radius, predicted, _ = certify.feature_radius(features, centers, k)
        self.assertTrue(np.all(predicted.numpy() == labels))
        self.assertTrue(np.all(radius.numpy() > margin))

    def test_gradients_reach_backbone_and_centers_and_the_variance_stays_half_the_temperature(self):
        objective = objectives.CertifiedClusTR(0.5, clusters_per_class=2, neighbours=4, temperature=0.3)
        model = objective.build_model(_lipschitz_backbone(), 3)
        self.assertAlmostEqual(float(model.cluster_centers.variance.numpy()), 0.15, places=6)
        self.assertTrue(model.cluster_centers.trainable_centers)
        self.assertIn(model.cluster_centers.centers.path, [v.path for v in model.trainable_variables])
        rng = np.random.default_rng(0)
        images = tf.constant(rng.uniform(size=(12, 8, 8, 1)), tf.float32)
        targets = {"labels": tf.constant(np.arange(12) % 3, tf.int64)}
        with tf.GradientTape() as tape:
            result = objective.losses(model, images, targets, None)
            loss = tf.reduce_mean(result.losses)
        center_grad, backbone_grads = tape.gradient(
            loss, [model.cluster_centers.centers, model.backbone.trainable_variables])
        self.assertGreater(float(tf.norm(center_grad)), 0)
        self.assertTrue(backbone_grads and all(g is not None for g in backbone_grads))
        self.assertTrue(any(float(tf.norm(g)) > 0 for g in backbone_grads))
        # The soft-kNC rule keeps 2 sigma^2 = T: no step moves it.
        self.assertAlmostEqual(float(model.cluster_centers.variance.numpy()), 0.15, places=6)
        self.assertEqual(set(result.metrics), set(objective.metric_names))

    def test_soft_knc_logits_are_the_training_logits_over_t(self):
        """With 2 sigma^2 = T, a class's soft-kNC log-score over all its clusters is
        logsumexp_k(-||z - mu_k||^2 / T) (float64 here), so its decision is, up to how the
        K centers of a class add up, the training softmax's."""
        objective = objectives.CertifiedClusTR(0.5, clusters_per_class=2, neighbours=6, temperature=0.25)
        model = objective.build_model(_lipschitz_backbone(), 3)
        rng = np.random.default_rng(1)
        centers = rng.normal(size=model.cluster_centers.centers.shape)
        model.cluster_centers.centers.assign(centers.astype(np.float32))
        centers = model.cluster_centers.centers.numpy().astype(np.float64)
        features = (centers[[0, 2, 4, 1, 3]] + 0.3 * rng.normal(size=(5, centers.shape[1]))).astype(np.float32)
        d = ((features[:, None, :].astype(np.float64) - centers[None]) ** 2).sum(-1).reshape(5, 3, 2)
        expected = np.logaddexp(-d[..., 0] / 0.25, -d[..., 1] / 0.25)
        got = model.logits_from_features(tf.constant(features)).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)

    def test_bfloat16_keeps_the_head_and_loss_in_float32(self):
        from clustr_tf import precision

        with precision.policy_scope("bfloat16"):
            backbone = _lipschitz_backbone()
        objective = objectives.CertifiedClusTR(0.5, clusters_per_class=2, neighbours=4)
        model = objective.build_model(backbone, 3)
        images = tf.constant(np.random.default_rng(0).uniform(size=(6, 8, 8, 1)), tf.float32)
        result = objective.losses(model, images, {"labels": tf.constant([0, 1, 2, 0, 1, 2], tf.int64)}, None)
        self.assertEqual(result.losses.dtype, tf.float32)
        self.assertEqual(model.cluster_centers.centers.dtype, "float32")
        self.assertEqual(model.cluster_centers.compute_dtype, "float32")

    def test_fit_starts_the_centers_on_the_data_and_saves_them_trainable(self):
        from clustr_tf import data

        images, labels = data.load_arrays("digits", "train")
        images, labels = images[:240], labels[:240]
        objective = objectives.CertifiedClusTR(0.5, clusters_per_class=2, neighbours=4)
        model = objective.build_model(backbones.get_backbone("lipschitz", images.shape[1:], mean=0.5), 10)
        batches = objective.batches(images, labels, 10, seed=0, batch_size=60)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), objective=objective)
        initial = model.cluster_centers.centers.numpy().copy()
        init = objective.callbacks(batches)[0]
        init.set_model(model)
        init.on_train_begin()
        started = model.cluster_centers.centers.numpy().copy()
        self.assertFalse(np.allclose(initial, started))
        self.assertAlmostEqual(float(model.cluster_centers.variance.numpy()), objective.temperature / 2, places=6)
        # Each center is the mean of examples of its class: the nearest-center rule is good at once.
        features = model.embed(images).numpy()
        self.assertGreater(np.mean(model.certify_features(features)[1] == labels), 0.5)
        history = model.fit(batches.dataset(), steps_per_epoch=4, epochs=2, verbose=0)
        self.assertIn("certified_accuracy", history.history)
        self.assertAlmostEqual(float(model.cluster_centers.variance.numpy()), objective.temperature / 2, places=6)
        self.assertFalse(np.allclose(model.cluster_centers.centers.numpy(), started))
        self.assertEqual(objective.callbacks(batches, resumed=True), [])
        path = os.path.join(self.create_tempdir().full_path, "model.keras")
        model.save(path)
        loaded = keras.saving.load_model(path)
        self.assertTrue(loaded.cluster_centers.trainable_centers)
        np.testing.assert_array_equal(loaded.cluster_centers.centers.numpy(), model.cluster_centers.centers.numpy())

    def test_settings_are_checked(self):
        for bad in (0.0, -1.0, float("nan")):
            with self.assertRaisesRegex(ValueError, "certified_margin"):
                objectives.CertifiedClusTR(bad)
        for bad in (0, -1, float("inf"), "1"):
            with self.assertRaisesRegex(ValueError, "`temperature` must be a finite number > 0"):
                objectives.CertifiedClusTR(0.5, temperature=bad)
        model = objectives.ClusTR(neighbours=4).build_model(_lipschitz_backbone(), 3)
        with self.assertRaisesRegex(ValueError, "trainable_centers=True"):
            objectives.CertifiedClusTR(0.5).check_model(model)
        with self.assertRaisesRegex(config_lib.ConfigError, "`temperature` applies to certified training only"):
            config_lib.Objective(temperature=0.5)
        with self.assertRaisesRegex(config_lib.ConfigError, "`consistency_lambda` applies to ClusTR's magnet loss"):
            config_lib.Objective(certified_margin=0.5, consistency_lambda=8.0)
        chosen = objectives.from_config(config_lib.Objective(certified_margin=0.5, temperature=0.5),
                                        config_lib.Model(backbone="lipschitz", k=3))
        self.assertIsInstance(chosen, objectives.CertifiedClusTR)
        self.assertEqual((chosen.temperature, chosen.clusters_per_class), (0.5, 3))
        self.assertEqual(objectives.from_config(config_lib.Objective(certified_margin=0.5),
                                                config_lib.Model()).temperature, config_lib.CERTIFIED_TEMPERATURE)
        baseline = objectives.from_config(config_lib.Objective(method="cross_entropy", certified_margin=0.5),
                                          config_lib.Model())
        self.assertEqual(baseline.temperature, 1.0)


class ServingRuleBenchmarkTest(absltest.TestCase):
    def test_measures_the_held_variance_and_half_the_temperature_against_the_nearest_center(self):
        """benchmarks/certified.py's `serving_rule`: soft-kNC accuracy and agreement with the
        nearest center under the model's variance and under T / 2, on the saved model."""
        import importlib.util
        import json

        spec = importlib.util.spec_from_file_location(
            "certified_benchmark", os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
                os.path.abspath(__file__)))), "benchmarks", "certified.py"))
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        objective = objectives.CertifiedClusTR(0.5, clusters_per_class=2, neighbours=6, temperature=0.25)
        model = objective.build_model(_lipschitz_backbone(), 3)
        rng = np.random.default_rng(2)
        images = rng.uniform(size=(40, 8, 8, 1)).astype(np.float32)
        labels = rng.integers(0, 3, size=40)
        model.cluster_centers.centers.assign(rng.normal(size=model.cluster_centers.centers.shape) * 0.1)
        model.cluster_centers.variance.assign(7.0)  # a run of the former rule
        run_dir = self.create_tempdir().full_path
        model.save(os.path.join(run_dir, "model.keras"))
        with open(os.path.join(run_dir, "config.json"), "w") as fh:
            json.dump({"eval_L": 20}, fh)
        rule = bench.serving_rule(run_dir, images, labels, 0.25, batch_size=16)
        d = model.cluster_centers.squared_distances(model.embed(tf.constant(images))).numpy()
        nearest = d.argmin(1) // 2
        self.assertEqual(rule["nearest_center_accuracy"], round(float(np.mean(nearest == labels)), 4))
        self.assertEqual((rule["neighbours"], rule["test_examples"]), (6, 40))  # eval_L capped at C*K
        self.assertEqual((rule["held_variance"]["variance"], rule["temperature"]["variance"]), (7.0, 0.125))
        for name, two_var in (("held_variance", 14.0), ("temperature", 0.25)):
            grouped = (-d / two_var).reshape(40, 3, 2)
            soft = np.logaddexp(grouped[..., 0], grouped[..., 1]).argmax(1)
            self.assertEqual(rule[name]["accuracy"], round(float(np.mean(soft == labels)), 4), name)
            self.assertEqual(rule[name]["agreement_with_nearest_center"], round(float(np.mean(soft == nearest)), 4))


class RecipeTest(absltest.TestCase):
    def test_cosine_learning_rate_falls_to_zero_over_steps_cpu_or_wall_time(self):
        from clustr_tf.training import callbacks

        class State:
            elapsed = tf.Variable(0.0, dtype=tf.float64)
            elapsed_cpu = tf.Variable(0.0, dtype=tf.float64)

        model = keras.Sequential([keras.layers.Dense(1)])
        model.optimizer = keras.optimizers.Adam(0.1)
        model.optimizer.build(model.trainable_variables)
        schedule = callbacks.CosineLearningRate(0.1, State(), total_steps=10)
        schedule.set_model(model)
        rates = []
        for step in range(12):
            model.optimizer.iterations.assign(step)
            schedule.on_train_batch_begin(step)
            rates.append(float(model.optimizer.learning_rate.numpy()))
        np.testing.assert_allclose(rates[:11], [0.05 * (1 + np.cos(np.pi * s / 10)) for s in range(11)], atol=1e-7)
        self.assertEqual(rates[11], 0.0)  # past the end it stays 0
        state = State()
        state.elapsed_cpu.assign(30.0)  # half of the CPU horizon spent in earlier epochs
        by_cpu = callbacks.CosineLearningRate(0.1, state, total_steps=10, cpu_seconds=60.0)
        by_cpu.set_model(model)
        by_cpu.on_epoch_begin(0)
        self.assertAlmostEqual(by_cpu.fraction(), 0.5, delta=0.01)
        state.elapsed.assign(100.0)
        by_wall = callbacks.CosineLearningRate(0.1, state, total_steps=10, wall_seconds=50.0)
        by_wall.set_model(model)
        self.assertEqual(by_wall.fraction(), 1.0)

    def test_lr_schedule_settings(self):
        cfg = config_lib.RunConfig(optimizer=config_lib.Optimizer(lr_schedule="cosine"),
                                   runtime=config_lib.Runtime(model_dir=self.create_tempdir().full_path))
        self.assertEqual(cfg.optimizer.lr_milestones, ())
        with self.assertRaisesRegex(config_lib.ConfigError, "`lr_milestones` applies to `lr_schedule`=milestones"):
            config_lib.RunConfig(optimizer=config_lib.Optimizer(lr_schedule="cosine", lr_milestones="3,6"),
                                 runtime=config_lib.Runtime(model_dir=self.create_tempdir().full_path))
        with self.assertRaisesRegex(config_lib.ConfigError, "lr_schedule"):
            config_lib.Optimizer(lr_schedule="linear")
        with self.assertRaisesRegex(config_lib.ConfigError, "`lr_horizon_cpu_minutes` must be > 0"):
            config_lib.Optimizer(lr_horizon_cpu_minutes=0)

    def test_holdout_is_one_fixed_choice_and_is_checked(self):
        from clustr_tf import data

        labels = np.arange(100) % 10
        train, held = data.split_holdout(labels, 20)
        again, held_again = data.split_holdout(labels, 20)
        np.testing.assert_array_equal(held, held_again)
        np.testing.assert_array_equal(train, again)
        self.assertEqual(len(held), 20)
        self.assertEqual(sorted(np.concatenate([train, held])), list(range(100)))
        for bad in (-1, 100, 2.0, True):
            with self.assertRaisesRegex(ValueError, r"`holdout_examples` must be an int in \[0, 100\)"):
                data.split_holdout(labels, bad)
        with self.assertRaisesRegex(config_lib.ConfigError, "`holdout_examples` must be an int >= 0"):
            config_lib.Data(holdout_examples=-3)


class NeedsAnExactBoundTest(absltest.TestCase):
    def test_objectives_refuse_a_backbone_without_a_bound_by_construction(self):
        backbone = backbones.small_convnet((8, 8, 1), width=8, embedding_dim=8)
        for objective in (objectives.CrossEntropy(certified_margin=0.5), objectives.CertifiedClusTR(0.5)):
            with self.assertRaises(lipschitz.NotLipschitzByConstructionError):
                objective.build_model(backbone, 10)
        # Without a margin nothing is asked of the backbone.
        objectives.ClusTR().build_model(backbone, 10)
        for bad in (-0.1, float("nan"), float("inf"), "0.5", True):
            with self.assertRaisesRegex(ValueError, "`certified_margin` must be a finite l2 radius >= 0"):
                objectives.CrossEntropy(certified_margin=bad)

    def test_config_errors(self):
        for bad in (-0.5, float("nan"), float("inf")):
            with self.assertRaisesRegex(config_lib.ConfigError, "`certified_margin` must be a finite l2 radius"):
                config_lib.Objective(certified_margin=bad)
        with self.assertRaisesRegex(config_lib.ConfigError, "applies to `method`=clustr .* Received: `method`=pgd_at"):
            config_lib.Objective(method="pgd_at", certified_margin=0.5)
        for backbone in ("auto", "convnet", "resnet18"):
            with self.assertRaisesRegex(config_lib.ConfigError, "exact by construction.*pass `backbone`=lipschitz"):
                config_lib.RunConfig(model=config_lib.Model(backbone=backbone),
                                     objective=config_lib.Objective(certified_margin=0.5),
                                     runtime=config_lib.Runtime(model_dir=self.create_tempdir().full_path))

    def test_binary_says_what_to_pass(self):
        for args, message in (
                (["--certified_margin=0.5"], "needs a backbone whose Lipschitz bound is exact by construction"),
                (["--certified_margin=-1", "--backbone=lipschitz"], "--certified_margin must be a finite l2 radius"),
                (["--certified_margin=nan", "--backbone=lipschitz"], "--certified_margin must be a finite l2 radius")):
            out = binaries.run(binaries.MAIN, *args, f"--model_dir={self.create_tempdir().full_path}")
            self.assertEqual(out.returncode, 2, out.stderr)
            self.assertIn(message, out.stderr)
            self.assertEqual(len([l for l in out.stderr.splitlines() if l.startswith("main.py: error")]), 1)


class CertifiedRunTest(absltest.TestCase):
    def test_short_digits_runs_certify_and_the_export_serves_the_same_radii(self):
        """`--backbone=lipschitz --certified_margin=0.5` on digits, a few epochs: the model's
        bound is 1, it certifies a good part of the test split at 0.25 and some at 0.5, an
        l2 attack on the certified rule breaks no certified example, and the exported
        `certify` signature returns the evaluation's radii; the linear-head baseline
        certifies too."""
        from clustr_tf import data
        from clustr_tf import evaluation
        from clustr_tf import serving

        images, labels = data.load_arrays("digits", "test")
        for method in ("clustr", "cross_entropy"):
            run_dir = self.create_tempdir().full_path
            cfg = config_lib.RunConfig(model=config_lib.Model(backbone="lipschitz"),
                                       objective=config_lib.Objective(method=method, certified_margin=0.5),
                                       runtime=config_lib.Runtime(epochs=10, model_dir=run_dir))
            self.assertEqual(cfg.optimizer.lr, 1e-3)
            from clustr_tf import training

            training.run(cfg)
            model = keras.saving.load_model(os.path.join(run_dir, "model.keras"))
            self.assertEqual(lipschitz.construction_bound(model.backbone), 1.0)
            split = evaluation.certify_split(model, images, labels, (0.25, 0.5))
            self.assertGreater(split["certified_accuracy"]["0.25"], 0.4, (method, split))
            self.assertGreater(split["certified_accuracy"]["0.5"], 0.0, (method, split))
            # The certified examples at 0.25 survive l2 PGD at 0.25 on the certified rule.
            from clustr_tf import attacks

            features = model.embed(images, training=False).numpy()
            radius_f, classes, _ = model.certify_features(features)
            certified = (classes == labels) & (radius_f > 0.25)
            _, robust = attacks.pgd(attacks.certified_rule_logits_function(model), images[certified],
                                    labels[certified], 0.25, 0.25 / 4, 20, norm=2,
                                    loss=attacks.loss_function("margin", model), restarts=2, seed=0)
            self.assertTrue(np.all(robust), f"{method}: {np.sum(~robust)} certified examples broken")
            if method != "clustr":
                continue
            path = serving.export(model, self.create_tempdir().full_path)
            out = tf.saved_model.load(path).signatures["certify"](images=tf.constant(images[:64]))
            np.testing.assert_allclose(out["radius"].numpy(), radius_f[:64], rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(out["classes"].numpy(), classes[:64])
            self.assertTrue(np.all(out["lipschitz_bound"].numpy() == 1.0))


if __name__ == "__main__":
    absltest.main()
