"""The certificate under attack: the certified rule's logits, the empirical check that no
certified example is broken, certification of a whole split, and the `auto` radii.

Attacks here use a linear backbone (Flatten + Dense): its Lipschitz bound (the kernel's
spectral norm) is tight enough that examples are certified at radii > 0, so the attack
really meets certified examples and the check can fail when the bound is wrong.
"""

import dataclasses
from unittest import mock

import keras
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from clustr_tf import attacks
from clustr_tf import backbones
from clustr_tf import baselines
from clustr_tf import evaluation
from clustr_tf import lipschitz
from clustr_tf import models

# No l_inf, Square, stronger or unbounded run: the stages under test only.
_CONFIG = evaluation.EvalConfig(linf_eps=(), l2_eps=(), losses=("margin",), square_eps=(), stronger_eps=(),
                                unbounded_check=False, iterations=10, restarts=2, batch_size=16, radii=(0.0,))


def _linear_backbone():
    return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(8)])


def _images(n, seed=0):
    # Away from the box's faces, so the [0, 1] clip does not shelter an example.
    return (0.25 + 0.5 * np.random.default_rng(seed).random((n, 8, 8, 1))).astype("float32")


def _clustr(backbone, images, num_classes=3, k=2):
    """A ClusTR model whose centers are the features of the first C*K images."""
    model = models.ClusTRModel(backbone, num_classes=num_classes, clusters_per_class=k, neighbours=num_classes)
    model(images[:1])
    model.cluster_centers.centers.assign(model.embed(images[: num_classes * k]).numpy())
    return model


def _softmax(backbone, images, num_classes=3):
    model = baselines.SoftmaxClassifier(backbone, num_classes=num_classes)
    model(images[:1])
    return model


def _certified_labels(model, images):
    """Labels = the certified rule's classes: every example is certified-correct."""
    return model.certify_features(model.embed(images).numpy())[1]


class CertifiedRuleLogitsTest(parameterized.TestCase):
    @parameterized.named_parameters(("clustr", _clustr), ("softmax", _softmax))
    def test_argmax_is_the_certified_class(self, build):
        """On a small ConvNet (random weights) the scores' argmax equals the class
        `certify_features` certifies, example by example."""
        keras.utils.set_random_seed(0)
        images = _images(32)
        model = build(backbones.small_convnet((8, 8, 1), width=8, embedding_dim=8), images)
        scores = attacks.certified_rule_logits_function(model)(images).numpy()
        self.assertEqual(scores.shape, (32, 3))
        np.testing.assert_array_equal(scores.argmax(1), _certified_labels(model, images))

    def test_clustr_scores_are_minus_the_nearest_squared_distance_per_class(self):
        """Score of class c = -min over its K centers of ||z - mu_j||^2 (numpy, by hand)."""
        keras.utils.set_random_seed(1)
        images = _images(10)
        model = _clustr(_linear_backbone(), images, num_classes=2, k=3)
        z = model.embed(images).numpy().astype(np.float64)
        centers = model.cluster_centers.centers.numpy().astype(np.float64)
        distances = ((z[:, None] - centers[None]) ** 2).sum(-1).reshape(10, 2, 3)
        scores = attacks.certified_rule_logits_function(model)(images).numpy()
        np.testing.assert_allclose(scores, -distances.min(-1), rtol=1e-4, atol=1e-4)

    def test_a_model_without_certified_rule_is_refused(self):
        plain = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(3)])
        with self.assertRaisesRegex(ValueError, "certified rule.*Received: Sequential with certified_rule=None"):
            attacks.certified_rule_logits_function(plain)


class CertificateUnderAttackTest(parameterized.TestCase):
    def _setup(self, build):
        keras.utils.set_random_seed(0)
        images = _images(40)
        model = build(_linear_backbone(), images)
        labels = _certified_labels(model, images)
        radii = evaluation.clean_pass(model, images, labels, _CONFIG)["radii"]
        # Radii at the quartiles of the certified radii: some examples are certified at
        # each, some are not.
        config = dataclasses.replace(_CONFIG, radii=(0.0, *(float(r) for r in np.quantile(radii, [0.25, 0.5, 0.75]))))
        return model, images, labels, config

    @parameterized.named_parameters(("clustr", _clustr), ("softmax", _softmax))
    def test_sound_certificate_is_below_the_attack(self, build):
        """With the true bound: certified <= empirical at every radius, 0 violations, the
        check passes; the runs are recorded with scope `certified_rule`."""
        model, images, labels, config = self._setup(build)
        result = evaluation.evaluate_robustness(model, images, labels, config)
        keys = [str(r) for r in config.radii[1:]]
        self.assertEqual(list(result["empirical_l2_certified_rule"]), keys)  # certified_accuracy's keys
        self.assertEqual(result["certificate_violations"], {k: 0 for k in keys})
        for k in keys:
            self.assertGreater(result["certified_accuracy"][k], 0.0)  # the attack meets certified examples
            self.assertLessEqual(result["certified_accuracy"][k], result["empirical_l2_certified_rule"][k])
        runs = [(a["norm"], a["eps"], a["loss"], a["scope"]) for a in result["attacks"]]
        self.assertEqual(runs, [("2", r, "margin", "certified_rule") for r in config.radii[1:]])
        check = evaluation.masking_checks(result, num_classes=3)["certified_below_empirical"]
        self.assertTrue(check["passed"], check)
        self.assertIn(f"at {keys[0]}: certified", check["detail"])

    @parameterized.named_parameters(("clustr", _clustr), ("softmax", _softmax))
    def test_wrong_bound_is_caught(self, build):
        """A Lipschitz bound 1e6 too small certifies every example at every radius; l2 PGD
        breaks some of them: violations > 0 and the check fails, loudly."""
        model, images, labels, config = self._setup(build)
        true_bound = lipschitz.model_bound
        with mock.patch.object(lipschitz, "model_bound", lambda backbone: true_bound(backbone) / 1e6):
            result = evaluation.evaluate_robustness(model, images, labels, config)
        self.assertEqual(set(result["certified_accuracy"].values()), {1.0})
        self.assertGreater(sum(result["certificate_violations"].values()), 0)
        check = evaluation.masking_checks(result, num_classes=3)["certified_below_empirical"]
        self.assertFalse(check["passed"])
        self.assertIn("CERTIFICATE VIOLATED", check["detail"])

    def test_attacks_only_certified_correct_examples(self):
        """Wrong labels: nothing is certified-correct, accuracy 0, no violation."""
        model, images, labels, config = self._setup(_clustr)
        result = evaluation.evaluate_robustness(model, images, (labels + 1) % 3, config)
        self.assertEqual(set(result["empirical_l2_certified_rule"].values()), {0.0})
        self.assertEqual(set(result["certificate_violations"].values()), {0})


def _check_result(certified, empirical, violations):
    return {"robust_accuracy": {}, "attacks": [], "certified_accuracy": certified,
            "empirical_l2_certified_rule": empirical, "certificate_violations": violations}


class CertifiedBelowEmpiricalCheckTest(absltest.TestCase):
    def _check(self, *args):
        return evaluation.masking_checks(_check_result(*args), num_classes=10)["certified_below_empirical"]

    def test_passes_when_below_without_violations(self):
        check = self._check({"0.0": 0.9, "0.5": 0.4}, {"0.5": 0.6}, {"0.5": 0})
        self.assertTrue(check["passed"], check)
        self.assertEqual(check["detail"], "at 0.5: certified 0.4000 vs empirical 0.6000, violations 0")

    def test_fails_on_a_violation_or_certified_above_empirical(self):
        self.assertFalse(self._check({"0.5": 0.4}, {"0.5": 0.6}, {"0.5": 1})["passed"])
        self.assertFalse(self._check({"0.5": 0.7}, {"0.5": 0.6}, {"0.5": 0})["passed"])
        # Violations not counted (a result from elsewhere): not a pass.
        self.assertFalse(self._check({"0.5": 0.4}, {"0.5": 0.6}, {})["passed"])

    def test_not_run_fails_and_says_so(self):
        for empirical in ({}, {"0.25": 0.5}):  # nothing attacked, or no certified accuracy at the radius
            check = self._check({"0.0": 0.9, "0.5": 0.4}, empirical, {})
            self.assertFalse(check["passed"])
            self.assertIn("not run", check["detail"])
        check = evaluation.masking_checks({"robust_accuracy": {}, "attacks": []}, 10)["certified_below_empirical"]
        self.assertIn("not run", check["detail"])


class CertifySplitTest(absltest.TestCase):
    def test_equals_the_evaluation_on_the_same_examples(self):
        keras.utils.set_random_seed(0)
        images = _images(37)
        model = _clustr(backbones.small_convnet((8, 8, 1), width=8, embedding_dim=8), images)
        labels = np.random.default_rng(1).integers(0, 3, 37)  # some wrong: accuracy < 1
        radii = (0.0, 1e-4, 1e-3, 1e-2)
        config = dataclasses.replace(_CONFIG, radii=radii, batch_size=8)
        split = evaluation.certify_split(model, images, labels, radii, batch_size=8)
        clean = evaluation.clean_pass(model, images, labels, config)
        result = evaluation.evaluate_robustness(model, images, labels, dataclasses.replace(config, restarts=1,
                                                                                           iterations=1))
        self.assertEqual(split["num_examples"], 37)
        self.assertEqual(split["certified_accuracy"], result["certified_accuracy"])
        self.assertEqual(split["median_certified_radius"], result["median_certified_radius"])
        self.assertEqual(split["lipschitz_bound"], result["lipschitz_bound"])
        self.assertAlmostEqual(split["clean_accuracy"], float(clean["certified_correct"].mean()))
        self.assertLess(split["clean_accuracy"], 1.0)
        # The batch size does not change the certificate.
        other = evaluation.certify_split(model, images, labels, radii, batch_size=37)
        self.assertEqual(other["certified_accuracy"], split["certified_accuracy"])

    def test_bad_input(self):
        keras.utils.set_random_seed(0)
        images = _images(4)
        model = _clustr(_linear_backbone(), images, num_classes=2, k=1)
        with self.assertRaisesRegex(ValueError, "`batch_size` must be >= 1. Received: 0"):
            evaluation.certify_split(model, images, [0, 1, 0, 1], (0.0,), batch_size=0)
        with self.assertRaisesRegex(ValueError, "same length. Received: 4 and 3"):
            evaluation.certify_split(model, images, [0, 1, 0], (0.0,))


class AutoRadiiTest(parameterized.TestCase):
    def test_defaults_for_a_backbone_not_lipschitz_by_construction(self):
        """A ConvNet with batch normalization: today's radii and l2 eps on every dataset."""
        self.assertEqual(evaluation.DEFAULT_RADII, (0.0, 0.05, 0.1, 0.25, 0.5))
        self.assertEqual(evaluation.DEFAULT_L2_EPS, (0.5,))
        self.assertEqual((evaluation.EvalConfig().radii, evaluation.EvalConfig().l2_eps),
                         (evaluation.DEFAULT_RADII, evaluation.DEFAULT_L2_EPS))
        backbone = backbones.small_convnet((8, 8, 1), width=4, embedding_dim=4)
        for dataset in ("digits", "cifar10"):
            choice = evaluation.auto_radii(backbone, dataset)
            self.assertEqual((choice["radii"], choice["l2_eps"], choice["construction_bound"]),
                             (evaluation.DEFAULT_RADII, evaluation.DEFAULT_L2_EPS, None))
            self.assertIn("not exact by construction", choice["basis"])

    @parameterized.parameters(("digits", (0.25, 0.5, 1.0)), ("cifar10", (36 / 255, 72 / 255, 108 / 255)),
                              ("svhn", (36 / 255, 72 / 255, 108 / 255)))
    def test_lipschitz_radii_when_bound_by_construction(self, dataset, radii):
        """A (patched) construction bound: 0 and the literature's radii, l2 eps the same."""
        backbone = _linear_backbone()
        with mock.patch.object(lipschitz, "construction_bound", lambda model: 1.0, create=True):
            choice = evaluation.auto_radii(backbone, dataset)
        self.assertEqual(choice["radii"], (0.0, *radii))
        self.assertEqual(choice["l2_eps"], radii)
        self.assertEqual(choice["construction_bound"], 1.0)

    def test_a_refused_construction_bound_gives_the_defaults(self):
        def refuse(model):
            raise ValueError("Model 'x' is not Lipschitz by construction. More.")

        with mock.patch.object(lipschitz, "construction_bound", refuse, create=True):
            choice = evaluation.auto_radii(_linear_backbone(), "digits")
        self.assertEqual(choice["radii"], evaluation.DEFAULT_RADII)
        self.assertIn("Model 'x' is not Lipschitz by construction", choice["basis"])

    def test_the_lipschitz_backbone(self):
        choice = evaluation.auto_radii(backbones.get_backbone("lipschitz", (8, 8, 1)), "digits")
        self.assertEqual(choice["radii"], (0.0, 0.25, 0.5, 1.0))
        self.assertEqual(choice["l2_eps"], (0.25, 0.5, 1.0))
        self.assertAlmostEqual(choice["construction_bound"], 1.0)


if __name__ == "__main__":
    absltest.main()
