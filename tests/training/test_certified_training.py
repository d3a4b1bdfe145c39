"""Certified training: the certified-margin magnet loss and Lipschitz-margin cross-entropy
are the formulas they claim, they need a backbone whose bound is exact by construction, bad
settings fail with one clear error, and a short digits run certifies what it trained for."""

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
from clustr_tf import config as config_lib
from clustr_tf import lipschitz
from clustr_tf import losses
from clustr_tf import objectives

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tempdir(test):
    path = tempfile.mkdtemp()
    test.addCleanup(shutil.rmtree, path, True)
    return path


def _direct_margin_magnet(features, clusters, k, alpha, margin):
    """The certified-margin magnet loss written out in float64: the magnet loss with every
    other-class squared distance d_j replaced by d_j - 2 margin ||mu_own - mu_j||."""
    features = np.asarray(features, np.float64)
    unique = np.unique(clusters)
    means = {c: features[clusters == c].mean(0) for c in unique}
    own = np.array([((r - means[c]) ** 2).sum() for r, c in zip(features, clusters)])
    variance = own.sum() / (len(features) - 1)
    out = []
    for r, c, o in zip(features, clusters, own):
        numerator = np.exp(-o / (2 * variance) - alpha)
        denominator = sum(
            np.exp(-(((r - means[u]) ** 2).sum() - 2 * margin * np.linalg.norm(means[c] - means[u]))
                   / (2 * variance))
            for u in unique if u // k != c // k)
        out.append(max(0.0, -np.log(numerator / denominator)))
    return np.array(out)


class MarginLossTest(parameterized.TestCase):
    @parameterized.parameters((0, 1, 1.0, 0.0), (1, 2, 1.0, 0.3), (2, 2, 4.0, 1.0), (3, 3, 0.5, 0.05))
    def test_magnet_loss_with_a_feature_margin_is_the_formula(self, seed, k, alpha, margin):
        rng = np.random.default_rng(seed)
        m, d, dim = 4, 5, 6
        clusters = np.repeat(rng.choice(4 * k, size=m, replace=False), d)
        centers = rng.normal(size=(4 * k, dim)) * 2
        features = (centers[clusters] + rng.normal(size=(m * d, dim))).astype("float32")
        expected = _direct_margin_magnet(features, clusters, k, alpha, margin)
        for num_clusters in (None, 4 * k):  # tf.unique and the static-shape (XLA) form
            got = losses.magnet_loss(clusters, features, k, alpha, num_clusters=num_clusters,
                                     feature_margin=margin).numpy()
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
        if margin:  # a margin can only make the loss larger, and its gradient is finite
            plain = losses.magnet_loss(clusters, features, k, alpha).numpy()
            self.assertTrue((expected >= plain - 1e-4).all())
            x = tf.constant(features)
            with tf.GradientTape() as tape:
                tape.watch(x)
                value = tf.reduce_sum(losses.magnet_loss(clusters, x, k, alpha, feature_margin=margin))
            self.assertTrue(np.isfinite(tape.gradient(value, x).numpy()).all())
        with self.assertRaisesRegex(ValueError, r"`feature_margin` must be >= 0. Received: -1"):
            losses.magnet_loss(clusters, features, k, alpha, feature_margin=-1)

    def test_zero_margin_loss_certifies_the_batch_means(self):
        """Where the certified-margin magnet loss is 0 (alpha 0), every example is certified
        at the margin against the batch means: the loss asks exactly for the certificate."""
        rng = np.random.default_rng(0)
        clusters = np.repeat(np.arange(4), 6)  # K = 1: 4 classes
        features = (rng.normal(size=(4, 3))[clusters] * 6 + 0.1 * rng.normal(size=(24, 3))).astype("float32")
        margin = 0.5
        loss = losses.magnet_loss(clusters, features, 1, alpha=0.0, feature_margin=margin).numpy()
        means = np.stack([features[clusters == c].mean(0) for c in range(4)]).astype(np.float64)
        radius, classes, _ = certify.feature_radius(features.astype(np.float64), means, 1)
        zero = loss < 1e-6
        self.assertGreater(zero.sum(), 0)
        self.assertTrue((radius.numpy()[zero] >= margin).all())
        self.assertTrue((classes.numpy()[zero] == clusters[zero]).all())

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


class NeedsAnExactBoundTest(absltest.TestCase):
    def test_objectives_refuse_a_backbone_without_a_bound_by_construction(self):
        backbone = backbones.small_convnet((8, 8, 1), width=8, embedding_dim=8)
        for objective in (objectives.ClusTR(certified_margin=0.5), objectives.CrossEntropy(certified_margin=0.5)):
            with self.assertRaises(lipschitz.NotLipschitzByConstructionError):
                objective.build_model(backbone, 10)
        # Without a margin nothing is asked of the backbone.
        objectives.ClusTR().build_model(backbone, 10)
        for bad in (-0.1, float("nan"), float("inf"), "0.5", True):
            with self.assertRaisesRegex(ValueError, "`certified_margin` must be a finite l2 radius >= 0"):
                objectives.ClusTR(certified_margin=bad)

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
                                     runtime=config_lib.Runtime(model_dir=_tempdir(self)))

    def test_binary_says_what_to_pass(self):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        main = os.path.join(ROOT, "training", "main.py")
        for args, message in (
                (["--certified_margin=0.5"], "needs a backbone whose Lipschitz bound is exact by construction"),
                (["--certified_margin=-1", "--backbone=lipschitz"], "--certified_margin must be a finite l2 radius"),
                (["--certified_margin=nan", "--backbone=lipschitz"], "--certified_margin must be a finite l2 radius")):
            out = subprocess.run([sys.executable, main, *args, f"--model_dir={_tempdir(self)}"],
                                 capture_output=True, text=True, env=env, timeout=120)
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
            run_dir = _tempdir(self)
            cfg = config_lib.RunConfig(model=config_lib.Model(backbone="lipschitz"),
                                       objective=config_lib.Objective(method=method, certified_margin=0.5),
                                       runtime=config_lib.Runtime(epochs=20, model_dir=run_dir))
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
            path = serving.export(model, _tempdir(self))
            out = tf.saved_model.load(path).signatures["certify"](images=tf.constant(images[:64]))
            np.testing.assert_allclose(out["radius"].numpy(), radius_f[:64], rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(out["classes"].numpy(), classes[:64])
            self.assertTrue(np.all(out["lipschitz_bound"].numpy() == 1.0))


if __name__ == "__main__":
    absltest.main()
