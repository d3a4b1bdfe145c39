"""Tests of the robustness evaluation: the library checks and training/evaluate.py."""

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest
from absl.testing import parameterized

from clustr_tf import evaluation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, "training", "main.py")
EVALUATE = os.path.join(ROOT, "training", "evaluate.py")


def _result(worst, per_loss):
    attacks = [{"norm": "inf", "eps": float(e.split("/")[0]) / 255, "loss": loss, "accuracy": acc,
                "iterations": 20, "restarts": 1}
               for e, losses in per_loss.items() for loss, acc in losses.items()]
    return {"robust_accuracy": worst, "attacks": attacks}


class MaskingChecksTest(absltest.TestCase):
    def test_healthy_result_passes(self):
        result = _result({"2/255": 0.6, "8/255": 0.3},
                         {"2/255": {"official": 0.62, "margin": 0.6}, "8/255": {"official": 0.31, "margin": 0.3}})
        checks = evaluation.masking_checks(result, num_classes=10)
        self.assertTrue(all(c["passed"] for c in checks.values()), checks)

    def test_masking_signs_fail(self):
        """Accuracy rising with eps, losses 30 points apart, the official loss 30 points
        above the worst case, and 50% left at eps 255/255: every check fails."""
        result = _result({"8/255": 0.3, "16/255": 0.4, "255/255": 0.5},
                         {"8/255": {"official": 0.6, "margin": 0.3}, "16/255": {"official": 0.7, "margin": 0.4},
                          "255/255": {"official": 0.8, "margin": 0.5}})
        checks = evaluation.masking_checks(result, num_classes=10)
        self.assertEqual({k: c["passed"] for k, c in checks.items()},
                         {"monotone_in_eps": False, "losses_agree": False,
                          "unbounded_eps_breaks_all": False, "official_gap": False})


def _tempdir(test):
    path = tempfile.mkdtemp()
    test.addCleanup(shutil.rmtree, path, True)
    return path


class EvaluateBinaryTest(parameterized.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp()
        cls.run_dir = os.path.join(cls.tmp, "run")
        out = subprocess.run([sys.executable, MAIN, "--epochs=3", f"--model_dir={cls.run_dir}"],
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, True)
        super().tearDownClass()

    def _evaluate(self, *args):
        return subprocess.run([sys.executable, EVALUATE, *args], capture_output=True, text=True, timeout=600)

    def test_writes_robustness_json_csv_and_plots(self):
        out = self._evaluate(f"--model_dir={self.run_dir}", "--num_examples=60", "--iterations=5",
                             "--restarts=2", "--eps=0,8,255", "--l2_eps=0.5")
        self.assertEqual(out.returncode, 0, out.stderr[-3000:])
        with open(os.path.join(self.run_dir, "robustness.json")) as fh:
            result = json.load(fh)
        for key in ("split", "num_examples", "clean_accuracy", "attacks", "robust_accuracy",
                    "certified_accuracy", "masking_checks", "lipschitz_bound"):
            self.assertIn(key, result)
        self.assertEqual(result["num_examples"], 60)
        self.assertEqual(result["neighbours"], 20)  # the run's eval_L, not the training L
        self.assertLen(result["attacks"], 4 * 3)  # (3 l_inf + 1 l2 eps) x 3 losses
        worst = result["robust_accuracy"]
        self.assertAlmostEqual(worst["0/255"], result["clean_accuracy"])  # eps 0 changes nothing
        self.assertLessEqual(worst["8/255"], worst["0/255"])
        self.assertLessEqual(worst["255/255"], 0.1 + 1e-9)  # the whole box: at most chance
        for a in result["attacks"]:  # the worst case is below every single attack
            if a["norm"] == "inf":
                self.assertLessEqual(worst[f"{a['eps'] * 255:g}/255"], a["accuracy"] + 1e-9)
        self.assertLessEqual(result["certified_accuracy"]["0.5"], result["certified_accuracy"]["0.0"])
        with open(os.path.join(self.run_dir, "attacks.csv")) as fh:
            self.assertLen(list(csv.DictReader(fh)), 12)
        for name in ("robustness_attacks.png", "robustness_certified.png", "robustness_features.png"):
            self.assertGreater(os.path.getsize(os.path.join(self.run_dir, name)), 1000)

    @parameterized.named_parameters(
        ("no_model_dir", [], "--model_dir is required"),
        ("missing_dir", ["--model_dir=/nonexistent/run"], "not a directory"),
        ("bad_eps", ["--eps=8,abc"], "--eps must be comma-separated"),
        ("eps_too_large", ["--eps=300"], "at most 255"),
        ("bad_loss", ["--losses=margin,dlr"], "--losses"),
        ("bad_step", ["--step=0"], "--step"),
    )
    def test_bad_input(self, args, message):
        if args and args[0].startswith("--model_dir") or not args and message.startswith("--model_dir"):
            full = args
        else:
            full = [f"--model_dir={self.run_dir}", *args]
        out = self._evaluate(*full)
        self.assertNotEqual(out.returncode, 0)
        self.assertNotIn("Traceback", out.stderr)
        last = out.stderr.strip().splitlines()[-1]
        self.assertTrue(last.startswith("evaluate.py: error:"), out.stderr[-1000:])
        self.assertIn(message, last)

    def test_run_without_model_and_corrupt_model(self):
        empty = _tempdir(self)
        out = self._evaluate(f"--model_dir={empty}")
        self.assertIn("No model.keras", out.stderr.strip().splitlines()[-1])
        with open(os.path.join(empty, "model.keras"), "wb") as fh:
            fh.write(b"not a zip file")
        out = self._evaluate(f"--model_dir={empty}")
        self.assertNotEqual(out.returncode, 0)
        self.assertNotIn("Traceback", out.stderr)
        self.assertIn("Cannot load", out.stderr.strip().splitlines()[-1])


if __name__ == "__main__":
    absltest.main()
