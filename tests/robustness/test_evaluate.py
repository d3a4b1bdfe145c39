"""Tests of the robustness evaluation: the library checks and training/evaluate.py."""

import csv
import json
import os
import subprocess
import sys

import pytest
from absl.testing import absltest
from absl.testing import parameterized

from clustr_tf import evaluation
from tests import binaries

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EVALUATE = os.path.join(ROOT, "training", "evaluate.py")


def _result(worst, per_loss, stronger=(0.3, 0.3), square=(0.31, 0.3, 0.3), certified=(0.2, 0.4, 0)):
    """A result dict: `stronger` = worst case at 8/255 before and after the 5x run;
    `square` = (Square's accuracy, gradient worst case, worst case with Square);
    `certified` = (certified accuracy at l2 0.5, the certified rule's empirical accuracy
    there, certificate violations)."""
    attacks = [{"norm": "inf", "eps": float(e.split("/")[0]) / 255, "loss": loss, "accuracy": acc,
                "iterations": 20, "restarts": 1, "scope": "all"}
               for e, losses in per_loss.items() for loss, acc in losses.items()]
    # Runs that must not enter the per-loss comparison: a survivors-only margin run and Square.
    attacks.append({"norm": "inf", "eps": 8 / 255, "loss": "margin", "accuracy": 0.0, "iterations": 100,
                    "restarts": 1, "scope": "survivors"})
    attacks.append({"norm": "inf", "eps": 8 / 255, "loss": "square", "accuracy": 0.9, "iterations": 5000,
                    "restarts": 1, "scope": "all"})
    return {
        "robust_accuracy": worst, "attacks": attacks,
        "stronger_attack": {"8/255": {"loss": "margin", "iterations": 100, "restarts": 1,
                                      "accuracy_before": stronger[0], "accuracy_after": stronger[1]}},
        "gradient_free": {"8/255": {"attack": "square", "queries": 5000, "accuracy": square[0],
                                    "gradient_worst_case": square[1], "worst_case_with_square": square[2],
                                    "broken_only_by_square": square[1] - square[2]}},
        "certified_accuracy": {"0.0": 0.9, "0.5": certified[0]},
        "empirical_l2_certified_rule": {"0.5": certified[1]},
        "certificate_violations": {"0.5": certified[2]},
    }


class MaskingChecksTest(absltest.TestCase):
    def test_healthy_result_passes(self):
        result = _result({"2/255": 0.6, "8/255": 0.3, "255/255": 0.0},
                         {"2/255": {"official": 0.62, "margin": 0.6}, "8/255": {"official": 0.31, "margin": 0.3},
                          "255/255": {"margin": 0.0}})
        checks = evaluation.masking_checks(result, num_classes=10)
        self.assertTrue(all(c["passed"] for c in checks.values()), checks)
        self.assertLen(checks, 7)

    def test_checks_not_run_fail_and_say_so(self):
        result = _result({"8/255": 0.3}, {"8/255": {"margin": 0.3}})
        del result["stronger_attack"], result["gradient_free"], result["empirical_l2_certified_rule"]
        checks = evaluation.masking_checks(result, num_classes=10)
        for name in ("unbounded_eps_breaks_all", "stronger_attack_converged", "gradient_free_no_better",
                     "certified_below_empirical"):
            self.assertFalse(checks[name]["passed"])
            self.assertFalse(checks[name]["ran"])
            self.assertIn("not run", checks[name]["detail"])
            self.assertEqual(evaluation.check_outcome(checks[name]), "not run")
        # One l_inf eps, one loss per eps, no official loss: nothing to compare, so these are not
        # run either (before, they passed on an empty comparison).
        for name in ("monotone_in_eps", "losses_agree", "official_gap"):
            self.assertEqual((checks[name]["passed"], checks[name]["ran"]), (False, False), checks[name])
            self.assertTrue(checks[name]["detail"].startswith("not run: "), checks[name])

    def test_summary_tells_failed_from_not_run(self):
        """The line evaluate.py ends with: a check that failed is FAILED, one whose attacks were
        not asked for is "not run", and an older robustness.json (no `ran`) reads the same."""
        healthy = _result({"2/255": 0.6, "8/255": 0.3, "255/255": 0.0},
                          {"2/255": {"official": 0.62, "margin": 0.6}, "8/255": {"official": 0.31, "margin": 0.3},
                           "255/255": {"margin": 0.0}})
        self.assertEqual(evaluation.checks_summary(evaluation.masking_checks(healthy, 10)), "all 7 passed")
        partial = _result({"8/255": 0.3}, {"8/255": {"margin": 0.3}}, certified=(0.5, 0.4, 0))
        del partial["stronger_attack"], partial["gradient_free"]
        checks = evaluation.masking_checks(partial, 10)
        self.assertEqual(evaluation.check_outcome(checks["certified_below_empirical"]), "FAILED")
        self.assertEqual(
            evaluation.checks_summary(checks),
            "FAILED: certified_below_empirical; 0 passed; not run (their attacks were not asked for): "
            "monotone_in_eps, losses_agree, unbounded_eps_breaks_all, stronger_attack_converged, "
            "gradient_free_no_better, official_gap")
        older = {name: {k: v for k, v in c.items() if k != "ran"} for name, c in checks.items()}
        self.assertEqual(evaluation.checks_summary(older), evaluation.checks_summary(checks))

    def test_monotone_check_compares_the_same_pgd_runs(self):
        """Square at 8/255 only may put the 8/255 worst case under 16/255's: that is not
        a rise in accuracy with eps; a rise among the PGD-only worst cases is."""
        per_loss = {"8/255": {"margin": 0.3}, "16/255": {"margin": 0.25}, "255/255": {"margin": 0.0}}
        result = _result({"8/255": 0.2, "16/255": 0.25, "255/255": 0.0}, per_loss, square=(0.2, 0.3, 0.2))
        result["robust_accuracy_pgd"] = {"8/255": 0.3, "16/255": 0.25, "255/255": 0.0}
        self.assertTrue(evaluation.masking_checks(result, 10)["monotone_in_eps"]["passed"])
        result["robust_accuracy_pgd"]["16/255"] = 0.35
        self.assertFalse(evaluation.masking_checks(result, 10)["monotone_in_eps"]["passed"])

    def test_masking_signs_fail(self):
        """Accuracy rising with eps, losses 30 points apart, the official loss 30 points
        above the worst case, 50% left at eps 255/255, 5x iterations breaking 3 more
        points, Square breaking 5 points PGD left standing, and 2 certified examples broken
        under the certified rule: every check fails."""
        result = _result({"8/255": 0.3, "16/255": 0.4, "255/255": 0.5},
                         {"8/255": {"official": 0.6, "margin": 0.3}, "16/255": {"official": 0.7, "margin": 0.4},
                          "255/255": {"official": 0.8, "margin": 0.5}},
                         stronger=(0.33, 0.3), square=(0.28, 0.3, 0.25), certified=(0.4, 0.38, 2))
        checks = evaluation.masking_checks(result, num_classes=10)
        self.assertEqual({k: c["passed"] for k, c in checks.items()},
                         {"monotone_in_eps": False, "losses_agree": False,
                          "unbounded_eps_breaks_all": False, "official_gap": False,
                          "stronger_attack_converged": False, "gradient_free_no_better": False,
                          "certified_below_empirical": False})

    def test_stronger_and_square_within_tolerance_pass(self):
        per_loss = {"8/255": {"margin": 0.3}, "255/255": {"margin": 0.0}}
        result = _result({"8/255": 0.29, "255/255": 0.0}, per_loss, stronger=(0.305, 0.3), square=(0.35, 0.3, 0.29))
        checks = evaluation.masking_checks(result, num_classes=10)
        self.assertTrue(checks["stronger_attack_converged"]["passed"], checks)
        self.assertTrue(checks["gradient_free_no_better"]["passed"], checks)


class EvaluateRobustnessTest(absltest.TestCase):
    def setUp(self):
        super().setUp()
        import keras
        import numpy as np

        from clustr_tf import backbones
        from clustr_tf import models

        keras.utils.set_random_seed(0)
        backbone = backbones.small_convnet((8, 8, 1), width=4, embedding_dim=4)
        self.model = models.ClusTRModel(backbone, num_classes=3, clusters_per_class=1, neighbours=3)
        rng = np.random.default_rng(0)
        self.images = rng.random((12, 8, 8, 1)).astype("float32")
        self.model(self.images[:1])
        layer = self.model.cluster_centers
        features = self.model.embed(self.images).numpy()
        layer.centers.assign(features[:3])  # example i is nearest to center i: 3 classes present
        self.labels = np.argmax(self.model(self.images).numpy(), 1)  # all clean-correct

    def test_every_run_and_the_unbounded_check(self):
        config = evaluation.EvalConfig(linf_eps=(0.0, 8 / 255), l2_eps=(), losses=("margin", "logits"), iterations=3,
                                       restarts=1, square_queries=20, batch_size=5, radii=(0.0,))
        statuses = []
        result = evaluation.evaluate_robustness(self.model, self.images, self.labels, config, status=statuses.append)
        runs = [(a["eps"], a["loss"], a["iterations"], a["scope"]) for a in result["attacks"]]
        # What runs is told as it starts and after each batch of 5 (for the console's heartbeat).
        self.assertEqual(statuses[:4], ["clean pass on 12 images", "l_inf PGD (margin loss) eps 0/255: 0/12 images attacked",
                                        "l_inf PGD (margin loss) eps 0/255: 5/12 images attacked",
                                        "l_inf PGD (margin loss) eps 0/255: 10/12 images attacked"])
        stronger = result["stronger_attack"]["8/255"]
        self.assertIn(f"l_inf PGD ({stronger['loss']} loss) eps 8/255 on the survivors: "
                      f"0/{int(round(12 * stronger['accuracy_before']))} images attacked", statuses)
        self.assertIn("l_inf Square eps 8/255: 12 images, 20 queries each", statuses)
        self.assertEqual(runs, [(0.0, "margin", 3, "all"), (0.0, "logits", 3, "all"),
                                (8 / 255, "margin", 3, "all"), (8 / 255, "logits", 3, "all"),
                                (1.0, "margin", 3, "all"),  # the unbounded check, added
                                (8 / 255, result["stronger_attack"]["8/255"]["loss"], 15, "survivors"),
                                (8 / 255, "square", 20, "all")])
        self.assertEqual(list(result["robust_accuracy"]), ["0/255", "8/255", "255/255"])
        self.assertEqual(result["robust_accuracy"]["0/255"], 1.0)
        self.assertEqual(result["robust_accuracy"]["255/255"], 0.0)  # any input is reachable
        self.assertLessEqual(result["robust_accuracy"]["8/255"], result["robust_accuracy_pgd"]["8/255"])
        checks = evaluation.masking_checks(result, num_classes=3)
        self.assertTrue(checks["unbounded_eps_breaks_all"]["passed"], checks)

    def test_extra_runs_must_be_at_attacked_eps(self):
        config = evaluation.EvalConfig(linf_eps=(2 / 255,), square_eps=(8 / 255,))
        with self.assertRaisesRegex(ValueError, "square_eps"):
            evaluation.evaluate_robustness(self.model, self.images, self.labels, config)



@pytest.mark.usefixtures("tiny_run")  # self.run_dir: the tests' shared tiny run (tests/conftest.py)
class EvaluateBinaryTest(parameterized.TestCase):
    def _evaluate(self, *args):
        """The binary in a process of its own."""
        return subprocess.run([sys.executable, EVALUATE, *args], capture_output=True, text=True, timeout=600)

    def test_writes_robustness_json_csv_and_plots(self):
        out = binaries.run(binaries.EVALUATE, f"--model_dir={self.run_dir}", "--num_examples=60", "--iterations=5",
                           "--restarts=2", "--eps=0,8,255", "--l2_eps=0.5", "--square_queries=100")
        self.assertEqual(out.returncode, 0, out.stderr[-3000:])
        with open(os.path.join(self.run_dir, "robustness.json")) as fh:
            result = json.load(fh)
        for key in ("split", "num_examples", "clean_accuracy", "attacks", "robust_accuracy",
                    "certified_accuracy", "masking_checks", "lipschitz_bound"):
            self.assertIn(key, result)
        self.assertEqual(result["num_examples"], 60)
        self.assertEqual(result["neighbours"], 20)  # the run's eval_L, not the training L
        self.assertEqual((result["precision"], result["trained_precision"]), ("float32", "float32"))
        # (3 l_inf + 1 l2 eps) x 3 losses, the 5x run, Square at 8/255, and the certified rule at
        # the 4 `auto` radii > 0 of this ConvNet (not Lipschitz by construction: today's defaults).
        self.assertLen(result["attacks"], 4 * 3 + 2 + 4)
        self.assertEqual(result["config"]["radii"], [0.0, 0.05, 0.1, 0.25, 0.5])
        self.assertEqual(result["config"]["l2_eps"], [0.5])
        choice = result["config"]["radii_choice"]
        self.assertEqual(choice["flags"], {"radii": "auto", "l2_eps": "0.5"})
        self.assertIsNone(choice["construction_bound"])
        certified_rule = [a for a in result["attacks"] if a["scope"] == "certified_rule"]
        self.assertEqual([(a["norm"], a["eps"], a["loss"]) for a in certified_rule],
                         [("2", r, "margin") for r in (0.05, 0.1, 0.25, 0.5)])
        keys = ["0.05", "0.1", "0.25", "0.5"]
        self.assertEqual(result["certificate_violations"], {k: 0 for k in keys})
        for k in keys:
            self.assertLessEqual(result["certified_accuracy"][k], result["empirical_l2_certified_rule"][k])
        self.assertTrue(result["masking_checks"]["certified_below_empirical"]["passed"],
                        result["masking_checks"]["certified_below_empirical"])
        # The certificate on the whole test split, beside the attacked subset.
        self.assertGreater(result["certified_test_examples"], 60)
        # Progress: one labelled line per attack run, each printed once, then the summary table.
        lines = out.stdout.strip().splitlines()
        runs = [line for line in lines if line.startswith("[")]
        self.assertLen(runs, len(result["attacks"]))
        self.assertEqual(len(set(lines)), len(lines))  # no line twice
        self.assertRegex(runs[0], r"^\[1/18\] l_inf PGD \(\w+ loss\) eps 0/255: [\d.]+% robust \(5 steps, \d+ s\)$")
        self.assertTrue(any("Square eps 8/255" in line for line in runs), runs)
        self.assertTrue(any("on the certified rule" in line for line in runs), runs)
        table = lines[lines.index(next(l for l in lines if l.startswith("Results ("))):]
        self.assertIn("certificate violations", "\n".join(table))
        # Every check's attacks were asked for here: the line names none "not run".
        masking = next(line for line in table if "gradient-masking checks" in line)
        self.assertEqual(masking.split("checks", 1)[1].strip(), evaluation.checks_summary(result["masking_checks"]))
        self.assertNotIn("not run", masking)
        self.assertTrue(all(c["ran"] for c in result["masking_checks"].values()), result["masking_checks"])
        self.assertRegex("\n".join(table), r"certified accuracy, l2 0.5 \(\d+ test images\)\s+[\d.]+%")
        self.assertEqual(set(result["certified_accuracy_test_split"]), set(result["certified_accuracy"]))
        self.assertAlmostEqual(result["certified_accuracy_test_split"]["0.0"], result["clean_accuracy_test_split"],
                               delta=0.05)  # radius 0 only at exact ties
        self.assertGreater(result["clean_accuracy_test_split"], 0.5)
        square = [a for a in result["attacks"] if a["loss"] == "square"]
        self.assertEqual([(a["eps"] * 255, a["iterations"], a["scope"]) for a in square], [(8.0, 100, "all")])
        stronger = [a for a in result["attacks"] if a["scope"] == "survivors"]
        self.assertEqual([(a["eps"] * 255, a["iterations"]) for a in stronger], [(8.0, 25)])
        self.assertEqual(set(result["masking_checks"]),
                         {"monotone_in_eps", "losses_agree", "unbounded_eps_breaks_all", "official_gap",
                          "stronger_attack_converged", "gradient_free_no_better", "certified_below_empirical"})
        free = result["gradient_free"]["8/255"]
        self.assertAlmostEqual(free["worst_case_with_square"], result["robust_accuracy"]["8/255"])
        self.assertLessEqual(free["worst_case_with_square"], min(free["accuracy"], free["gradient_worst_case"]))
        worst = result["robust_accuracy"]
        self.assertAlmostEqual(worst["0/255"], result["clean_accuracy"])  # eps 0 changes nothing
        self.assertLessEqual(worst["8/255"], worst["0/255"])
        self.assertLessEqual(worst["255/255"], 0.1 + 1e-9)  # the whole box: at most chance
        for a in result["attacks"]:  # the worst case is below every single attack
            if a["norm"] == "inf":
                self.assertLessEqual(worst[f"{a['eps'] * 255:g}/255"], a["accuracy"] + 1e-9)
        self.assertLessEqual(result["certified_accuracy"]["0.5"], result["certified_accuracy"]["0.0"])
        with open(os.path.join(self.run_dir, "attacks.csv")) as fh:
            self.assertLen(list(csv.DictReader(fh)), 18)
        for name in ("robustness_attacks.png", "robustness_certified.png", "robustness_features.png"):
            self.assertGreater(os.path.getsize(os.path.join(self.run_dir, name)), 1000)

    @parameterized.named_parameters(
        ("no_model_dir", [], "--model_dir is required"),
        ("missing_dir", ["--model_dir=/nonexistent/run"], "not a directory"),
        ("bad_eps", ["--eps=8,abc"], "--eps must be comma-separated"),
        ("eps_too_large", ["--eps=300"], "at most 255"),
        ("bad_loss", ["--losses=margin,dlr"], "--losses"),
        ("bad_step", ["--step=0"], "--step"),
        ("square_eps_not_attacked", ["--eps=2,8", "--square_eps=16"], "--square_eps values must be among --eps"),
        ("stronger_eps_not_attacked", ["--eps=2", "--square_eps=2", "--stronger_eps=8"], "--stronger_eps values must be among"),
        ("bad_queries", ["--square_queries=0"], "--square_queries must be >= 1"),
        ("bad_radii", ["--radii=0,abc"], "--radii must be comma-separated numbers or auto. Received: '0,abc'"),
        ("negative_l2_eps", ["--l2_eps=-0.5"], "--l2_eps values must be >= 0"),
        ("bad_precision", ["--precision=half"], "--precision must be float32 or trained. Received: 'half'"),
    )
    def test_bad_input(self, args, message):
        if args and args[0].startswith("--model_dir") or not args and message.startswith("--model_dir"):
            full = args
        else:
            full = [f"--model_dir={self.run_dir}", *args]
        out = self._evaluate(*full)
        self.assertEqual(out.returncode, 2, out.stderr[-1000:])
        # One line and nothing else: every flag is checked before TensorFlow loads.
        (line,) = out.stderr.strip().splitlines()
        self.assertTrue(line.startswith("evaluate.py: error:"), out.stderr[-1000:])
        self.assertIn(message, line)

    def test_run_without_model_and_corrupt_model(self):
        """Each broken run folder is one EvalError naming the file (in-process, as the binary's
        load_run), and the binary (a process) prints it as one line with exit status 2."""
        binary = binaries.load(binaries.EVALUATE)
        empty = self.create_tempdir().full_path
        with self.assertRaisesRegex(binary.EvalError, "No model.keras"):
            binary.load_run(empty)
        with open(os.path.join(empty, "model.keras"), "wb") as fh:
            fh.write(b"not a zip file")
        with self.assertRaisesRegex(binary.EvalError, r"is not a .keras model archive \(14 bytes"):
            binary.load_run(empty)
        with open(os.path.join(self.run_dir, "model.keras"), "rb") as fh:
            whole = fh.read()
        with open(os.path.join(empty, "model.keras"), "wb") as fh:
            fh.write(whole)
        with open(os.path.join(empty, "config.json"), "w") as fh:
            fh.write('{"dataset": "dig')
        with self.assertRaisesRegex(binary.EvalError, r"config.json \(JSONDecodeError"):
            binary.load_run(empty)
        # A truncated copy of a real model, through the binary: one line, status 2, nothing deleted.
        os.remove(os.path.join(empty, "config.json"))
        with open(os.path.join(empty, "model.keras"), "wb") as fh:
            fh.write(whole[: len(whole) // 2])
        out = self._evaluate(f"--model_dir={empty}")
        self.assertEqual(out.returncode, 2, out.stderr[-2000:])
        self.assertNotIn("Traceback", out.stderr)
        self.assertRegex(out.stderr.strip().splitlines()[-1], r"^evaluate.py: error: .*model.keras is (not a|a "
                                                                r"damaged) .keras model archive.*truncated")
        self.assertEqual(os.path.getsize(os.path.join(empty, "model.keras")), len(whole) // 2)


class StagesTest(absltest.TestCase):
    """Each stage of `evaluate_robustness` on its own."""

    def test_plan(self):
        config = evaluation.EvalConfig(linf_eps=(2 / 255, 8 / 255), l2_eps=(0.5,), losses=("margin", "official"),
                                       square_eps=(8 / 255,), stronger_eps=())
        runs = evaluation.plan(config)
        self.assertEqual([(r[0], r[2]) for r in runs],
                         [("inf", "margin"), ("inf", "official")] * 2 + [("2", "margin"), ("2", "official"),
                                                                         ("inf", "margin")])
        self.assertEqual(runs[4][4], 0.5 / 4)  # l2 step: eps / 4
        self.assertEqual(runs[-1][1:], (1.0, "margin", 20, 0.1))  # the unbounded check
        with self.assertRaisesRegex(ValueError, "`square_eps` must be a subset of `linf_eps`"):
            evaluation.plan(evaluation.EvalConfig(square_eps=(3 / 255,)))


if __name__ == "__main__":
    absltest.main()
