"""benchmarks/update_readme.py renders every saved result, and the reproduce table."""

import importlib.util
import json
import os

from absl.testing import absltest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("update_readme", os.path.join(ROOT, "benchmarks", "update_readme.py"))
update_readme = importlib.util.module_from_spec(spec)
spec.loader.exec_module(update_readme)


class UpdateReadmeTest(absltest.TestCase):
    def test_every_saved_result_renders_between_its_markers(self):
        with open(os.path.join(ROOT, "README.md")) as fh:
            readme = fh.read()
        rendered = update_readme.render(readme)
        for marker, (name, _) in update_readme.BLOCKS.items():
            self.assertIn(f"<!-- {marker} -->", readme, marker)
            if os.path.exists(os.path.join(update_readme.RESULTS, name)):
                block = rendered.split(f"<!-- {marker} -->")[1].split(f"<!-- end {marker} -->")[0]
                self.assertGreater(len(block.strip()), 20, marker)
        self.assertEqual(update_readme.render(rendered), rendered)  # idempotent

    def test_reproduce_table_marks_missing_methods_and_failed_checks(self):
        method = {
            "clean_accuracy": 0.5, "robust_accuracy_8_255": 0.1,
            "robust_accuracy": {"2/255": 0.3, "8/255": 0.1, "16/255": 0.0},
            "official_loss_8_255": 0.4, "certified_accuracy": {"0.1": 0.0},
            "masking_checks": {"losses_agree": True, "official_gap": False},
            "per_loss": {"8/255 margin": 0.12, "8/255 square": 0.2},
            "train": [{"epochs_trained": 3, "steps": 627, "train_cpu_seconds": 1850.0},
                      {"epochs_trained": 2, "steps": 418, "train_cpu_seconds": 1795.0}],
        }
        result = {"settings": {"width_multiplier": 0.25, "cpu_budget_minutes_per_method": 60,
                               "optimizer": "Adam", "batch_size": 240, "num_examples": 1000},
                  "machine": {"cpus": 2}, "data": "CIFAR-10", "date": "2026-11-25",
                  "methods": {"clustr_qtrades": method}}
        text = "\n".join(update_readme.reproduce(result))
        self.assertIn("| ClusTR+QTRADES | 31 + 30 | 627 + 418 | 50.0% | 30.0% | **10.0%** | 0.0% | 40.0% | 20.0% | "
                      "0.0% | failed: official_gap |", text)
        self.assertIn("| PGD-AT (Madry) | not run yet |", text)


if __name__ == "__main__":
    absltest.main()


class ReproduceCollectTest(absltest.TestCase):
    def test_collect_writes_and_prints_the_result(self):
        import subprocess
        import sys
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "reproduce.json")
            run = subprocess.run(
                [sys.executable, os.path.join(ROOT, "benchmarks", "reproduce.py"), "--only=collect",
                 f"--runs_dir={tmp}/runs", f"--out={out}"],
                capture_output=True, text=True, timeout=120)
            self.assertEqual(run.returncode, 0, run.stderr[-2000:])
            with open(out) as fh:
                written = json.load(fh)
        self.assertEqual(json.loads(run.stdout.strip().splitlines()[-1]), written)
        self.assertEqual(written["methods"], {})  # nothing trained in an empty runs_dir
        self.assertEqual(written["settings"]["cpu_budget_minutes_per_method"], 60.0)
        lines = update_readme.reproduce(written)
        self.assertTrue(any("| ClusTR | not run yet |" in line for line in lines))
