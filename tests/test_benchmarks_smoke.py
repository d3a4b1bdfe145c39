"""Smoke test of benchmarks/train_throughput.py: a tiny run that writes its JSON result.

The small ConvNet in float32 only: each step variant traces a ResNet-18 in about 10 s on 2
cores, and the bfloat16 variants are the same code under another policy."""

import json
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "train_throughput.py")
REQUIRED = (
    "clustr_images_per_s", "xent_images_per_s", "ratio", "qtrades_ratio",
    "sampler_to_step_ratio", "refresh_to_inference_ratio", "xent_step_s", "clustr_step_s",
    "qtrades_step_s", "settings", "device", "targets",
)


class TrainThroughputSmokeTest(absltest.TestCase):
    def test_tiny_run_prints_and_writes_the_result(self):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.json")
            run = subprocess.run(
                [sys.executable, SCRIPT, "--width_multiplier=0.125", "--steps=1", "--train_images=400",
                 "--sampler_batches=5", "--refresh_repeats=1", "--nobreakdown", "--precisions=float32",
                 "--backbone=convnet",
                 f"--out={out}"],
                capture_output=True, text=True, cwd=ROOT, timeout=300,
                env={**os.environ, "PYTHONPATH": ROOT},
            )
            self.assertEqual(run.returncode, 0, run.stderr[-3000:])
            printed = json.loads(run.stdout.strip().splitlines()[-1])
            with open(out) as fh:
                written = json.load(fh)
        self.assertEqual(printed, written)
        for key in REQUIRED:
            self.assertIn(key, printed)
        self.assertEqual(printed["settings"]["batch"], 240)
        self.assertEqual(printed["settings"]["backbone"], "convnet")
        for key in ("ratio", "qtrades_ratio", "sampler_to_step_ratio",
                    "refresh_to_inference_ratio"):
            self.assertGreater(printed[key], 0.0, key)
            self.assertIsInstance(printed["targets"][key]["met"], bool)
        self.assertGreater(printed["xent_step_s"], 0.0)
        self.assertGreater(printed["clustr_images_per_s"], 0.0)
        self.assertEqual(printed["settings"]["precisions"], ["float32"])
        for name in ("xent", "clustr", "clustr_qtrades"):
            self.assertEqual(printed["precisions"]["float32"][name], printed[name])
        self.assertEqual(printed["precision_ratios"], {})
        device = printed["device"]
        self.assertIn("avx512_bf16", device["cpu_features"])
        self.assertIn("amx_bf16", device["cpu_features"])
        self.assertIn(device["native_bfloat16"], (True, False, None))
        self.assertNotIn("bfloat16_note", printed)  # no bfloat16 step was timed


if __name__ == "__main__":
    absltest.main()
