"""End-to-end tests of training/main.py: a tiny run, and every bad input."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, "training", "main.py")


def _run(*args, cwd=None):
    return subprocess.run(
        [sys.executable, MAIN, *args], capture_output=True, text=True, cwd=cwd or ROOT, timeout=600
    )


def _tempdir(test):
    path = tempfile.mkdtemp()
    test.addCleanup(shutil.rmtree, path, True)
    return path


class EndToEndTest(absltest.TestCase):
    def test_tiny_run_writes_the_run_directory(self):
        run = os.path.join(_tempdir(self), "run")
        out = _run("--epochs=2", "--steps_per_epoch=2", f"--model_dir={run}", "--seed=3")
        self.assertEqual(out.returncode, 0, out.stderr[-3000:])
        for name in ("config.json", "metrics.json", "model.keras", "training_log.csv",
                     os.path.join("checkpoints", "checkpoint")):
            self.assertTrue(os.path.exists(os.path.join(run, name)), name)
        self.assertTrue(os.listdir(os.path.join(run, "logs")))
        with open(os.path.join(run, "metrics.json")) as fh:
            metrics = json.load(fh)
        for key in ("clean_accuracy", "nearest_center_accuracy", "agreement"):
            self.assertBetween(metrics[key], 0.0, 1.0)
        self.assertEqual(metrics["num_examples"], 360)
        self.assertEqual(metrics["epochs"], 2)
        with open(os.path.join(run, "training_log.csv")) as fh:
            rows = list(csv.DictReader(fh))
        self.assertEqual([r["epoch"] for r in rows], ["0", "1"])
        for key in ("loss", "nearest_center_accuracy", "val_accuracy", "variance", "center_separation"):
            self.assertIn(key, rows[0])
        with open(os.path.join(run, "config.json")) as fh:
            config = json.load(fh)
        self.assertEqual((config["k"], config["m"], config["d"], config["alpha"], config["L"], config["lr"]),
                         (2, 12, 20, 12.5, 10, 1e-4))
        self.assertEqual(config["seed"], 3)
        self.assertIn("Epoch 1/2", out.stdout)  # Keras progress output is on


class ResumeAfterKillTest(absltest.TestCase):
    def test_sigkill_then_rerun_continues_and_logs_each_epoch_once(self):
        run = os.path.join(_tempdir(self), "run")
        args = [sys.executable, MAIN, "--epochs=5", "--steps_per_epoch=6", "--checkpoint_every_steps=2",
                f"--model_dir={run}", "--seed=1"]
        csv_path = os.path.join(run, "training_log.csv")
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        try:
            while time.time() < deadline and proc.poll() is None:
                if os.path.exists(csv_path):
                    with open(csv_path) as fh:
                        if len(fh.read().splitlines()) >= 3:  # header + epochs 0 and 1
                            break
                time.sleep(0.05)
            self.assertIsNone(proc.poll(), "training finished before it could be killed")
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.communicate()
        self.assertFalse(os.path.exists(os.path.join(run, "metrics.json")))
        out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
        self.assertEqual(out.returncode, 0, out.stderr[-3000:])
        self.assertIn("Restored", out.stderr)
        restored_epoch = int(out.stderr.split("Restored")[1].split("epoch ")[1].split(",")[0])
        # Killed after epoch 1 was logged: the state saved at or after its last
        # mid-epoch checkpoint comes back, never the start.
        self.assertGreaterEqual(restored_epoch, 1)
        self.assertNotIn("Epoch 1/5", out.stdout)  # it did not start over
        self.assertIn(f"Epoch {restored_epoch + 1}/5", out.stdout)
        with open(csv_path) as fh:
            rows = list(csv.DictReader(fh))
        self.assertEqual([r["epoch"] for r in rows], ["0", "1", "2", "3", "4"])
        self.assertTrue(os.path.exists(os.path.join(run, "metrics.json")))


class BadInputTest(parameterized.TestCase):
    def _fails_with_one_line(self, args, *expected, status=None):
        out = _run(*args)
        self.assertNotEqual(out.returncode, 0)
        if status is not None:
            self.assertEqual(out.returncode, status, out.stderr[-2000:])
        self.assertNotIn("Traceback", out.stderr)
        last = out.stderr.strip().splitlines()[-1]
        self.assertTrue(last.startswith("main.py: error: "), out.stderr[-2000:])
        for text in expected:
            self.assertIn(text, last)
        return last

    @parameterized.named_parameters(
        ("unknown_dataset", ["--dataset=mnist"], "--dataset", "'mnist'"),
        ("m_too_large", ["--m=20"], "--m", "Received: --m=20"),
        ("L_too_large", ["--L=21"], "--L", "20", "Received: --L=21"),
        ("k_zero", ["--k=0"], "--k", "Received: 0"),
        ("unknown_backbone", ["--backbone=vgg"], "--backbone", "'vgg'"),
        ("lr_negative", ["--lr=-1"], "--lr", "Received: -1"),
    )
    def test_bad_flag(self, args, *expected):
        tmp = _tempdir(self)
        self._fails_with_one_line(args + [f"--model_dir={tmp}/run"], *expected)
        self.assertFalse(os.path.exists(os.path.join(tmp, "run", "config.json")))

    def test_unwritable_model_dir(self):
        blocker = os.path.join(_tempdir(self), "a_file")
        with open(blocker, "w") as fh:
            fh.write("keep me")
        self._fails_with_one_line([f"--model_dir={blocker}/run"], "--model_dir", blocker)
        with open(blocker) as fh:
            self.assertEqual(fh.read(), "keep me")

    def test_missing_dataset(self):
        tmp = _tempdir(self)
        last = self._fails_with_one_line(
            ["--dataset=cifar10", f"--data_dir={tmp}/nothing", "--nodownload", f"--model_dir={tmp}/run"],
            "cifar10", "--data_dir",
        )
        self.assertIn("could not be found", last)

    def test_unexpected_argument(self):
        self._fails_with_one_line(["train"], "unexpected arguments: train")

    def test_unknown_consistency_form(self):
        tmp = _tempdir(self)
        last = self._fails_with_one_line(["--consistency=trades", "--consistency_lambda=8", f"--model_dir={tmp}/run"],
                                         "--consistency", "Received: 'trades'", status=2)
        self.assertIn("official, kl", last)


class InitCheckpointTest(absltest.TestCase):
    """--init_checkpoint from a cross-entropy run, as the official ClusTR+QTRADES recipe starts."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp()
        cls.source = os.path.join(cls.tmp, "xent")
        out = _run("--method=cross_entropy", "--epochs=10", f"--model_dir={cls.source}", "--lr=1e-3")
        assert out.returncode == 0, out.stderr[-3000:]

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, True)
        super().tearDownClass()

    _fails_with_one_line = BadInputTest._fails_with_one_line

    def test_starts_from_the_backbone_and_refreshes_the_clusters_first(self):
        import keras

        import clustr_tf  # noqa: F401: registers the models

        run = os.path.join(_tempdir(self), "qtrades")
        out = _run(f"--init_checkpoint={self.source}", "--consistency_lambda=8", "--epochs=1",
                   "--steps_per_epoch=1", "--lr=1e-9", f"--model_dir={run}")
        self.assertEqual(out.returncode, 0, out.stderr[-3000:])
        self.assertIn(f"Initialised the backbone from {self.source}/model.keras (SoftmaxClassifier)", out.stderr)
        with open(os.path.join(run, "training_log.csv")) as fh:
            first = next(csv.DictReader(fh))
        # The first step already classifies its batch by centers of the copied features: the
        # clusters were refreshed on them before it (random centers give about 10%).
        self.assertGreater(float(first["nearest_center_accuracy"]), 0.8)
        self.assertGreater(float(first["consistency_loss"]), 0.0)
        source = keras.saving.load_model(os.path.join(self.source, "model.keras"))
        model = keras.saving.load_model(os.path.join(run, "model.keras"))
        self.assertEqual(type(model).__name__, "ClusTRModel")
        # The trained weights carried over (lr 1e-9 barely moves them; batch-norm moving
        # statistics move with every training pass, whatever the rate).
        self.assertTrue(source.backbone.trainable_weights)
        for a, b in zip(source.backbone.trainable_weights, model.backbone.trainable_weights):
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
        with open(os.path.join(run, "config.json")) as fh:
            self.assertEqual(json.load(fh)["consistency"], "official")

    def test_a_backbone_that_does_not_fit(self):
        tmp = _tempdir(self)
        path = os.path.join(self.source, "model.keras")
        last = self._fails_with_one_line(
            [f"--init_checkpoint={path}", "--backbone=resnet18", "--width_multiplier=0.125", f"--model_dir={tmp}/r"],
            "--init_checkpoint's backbone does not fit", f"Received: {path}", status=2)
        self.assertIn("--width_multiplier", last)
        self.assertTrue(os.path.exists(path))  # nothing was touched

    def test_a_corrupt_or_missing_model(self):
        tmp = _tempdir(self)
        corrupt = os.path.join(tmp, "broken.keras")
        with open(corrupt, "wb") as fh:
            fh.write(b"not a zip")
        self._fails_with_one_line([f"--init_checkpoint={corrupt}", f"--model_dir={tmp}/r"],
                                  "--init_checkpoint cannot be loaded", f"Received: {corrupt}", status=2)
        self.assertTrue(os.path.exists(corrupt))
        empty = os.path.join(tmp, "unfinished_run")
        os.makedirs(empty)
        self._fails_with_one_line([f"--init_checkpoint={empty}", f"--model_dir={tmp}/r3"],
                                  "--init_checkpoint must be a .keras model or a run directory holding model.keras",
                                  status=2)
        self._fails_with_one_line([f"--init_checkpoint={tmp}/nothing", f"--model_dir={tmp}/r5"],
                                  "--init_checkpoint does not exist", status=2)


class FlagTableTest(absltest.TestCase):
    def test_class_counts_match_the_datasets(self):
        from clustr_tf import config
        from clustr_tf import data

        self.assertEqual(sorted(config.DATASET_CLASSES), sorted(data.DATASETS))
        for name, classes in config.DATASET_CLASSES.items():
            self.assertEqual(data.info(name).num_classes, classes)


if __name__ == "__main__":
    absltest.main()
