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
        texts = {}
        for path in update_readme.documents():
            with open(path) as fh:
                texts[path] = fh.read()
        everything = "\n".join(texts.values())
        for marker, (name, _) in update_readme.BLOCKS.items():
            self.assertIn(f"<!-- {marker} -->", everything, marker)
            if os.path.exists(os.path.join(update_readme.RESULTS, name)):
                block = everything.split(f"<!-- {marker} -->")[1].split(f"<!-- end {marker} -->")[0]
                self.assertGreater(len(block.strip()), 20, marker)
        for path, text in texts.items():
            rendered = update_readme.render(text)
            # The committed documents are current: their numbers and flag tables are what
            # the results files and the binaries' flag definitions give today.
            self.assertEqual(rendered, text, f"{path} is stale: run python benchmarks/update_readme.py")
            self.assertEqual(update_readme.render(rendered), rendered)  # idempotent

    def test_robustness_table_tells_failed_from_not_run(self):
        with open(os.path.join(update_readme.RESULTS, "robustness_digits.json")) as fh:
            result = json.load(fh)
        result["masking_checks"] = {
            "losses_agree": {"passed": True, "ran": True, "detail": "largest difference {8/255: 0.01}"},
            "official_gap": {"passed": False, "ran": True, "detail": "official-loss accuracy minus worst case 0.3"},
            "gradient_free_no_better": {"passed": False, "ran": False, "detail": "not run: no gradient-free attack"},
            # An older robustness.json has no `ran`: its detail says "not run".
            "stronger_attack_converged": {"passed": False, "detail": "not run: no stronger attack was made"},
        }
        rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1]
                for line in update_readme.robustness(result) if line.count(" | ") >= 2}
        self.assertEqual([rows[k] for k in result["masking_checks"]], ["passed", "**FAILED**", "not run", "not run"])

    def test_certified_tables_name_clustr_soft_knc_accuracy(self):
        """The certified tables' clean column is the certified decision (nearest center); the
        accuracy ClusTR serves with (soft kNC) is printed beside it, with its rule."""
        rule = {"nearest_center_accuracy": 0.6, "held_variance": {"variance": 11.8, "accuracy": 0.55,
                                                                  "agreement_with_nearest_center": 0.8},
                "temperature": {"variance": 0.125, "accuracy": 0.59, "agreement_with_nearest_center": 0.92}}
        older = update_readme._soft_knc_note({"certified_clustr": {"soft_knc_clean_accuracy": 0.55,
                                                                   "serving_rule": rule}})[1]
        self.assertIn("reaches 59.0% with 2 sigma^2 = T, this version's rule (it agrees with the nearest center on "
                      "92.0%", older)
        self.assertIn("holds sigma^2 = 11.8, the squared distance to the own center, with which it reaches 55.0% "
                      "(agreement 80.0%)", older)
        same = {**rule, "held_variance": rule["temperature"]}  # a run of this version: one rule
        newer = update_readme._soft_knc_note({"certified_clustr": {"serving_rule": same}})[1]
        self.assertIn("reaches 59.0% with 2 sigma^2 = T", newer)
        self.assertNotIn("trained before", newer)
        unmeasured = update_readme._soft_knc_note({"certified_clustr": {"soft_knc_clean_accuracy": 0.95}})[1]
        self.assertIn("reached 95.0% (the run's metrics.json) with the variance estimated", unmeasured)
        self.assertEqual(update_readme._soft_knc_note({"lipschitz_margin_xent": {}}), [])

    def test_flag_tables_list_every_flag_of_each_binary(self):
        for marker, path in update_readme.BINARIES.items():
            table = "\n".join(update_readme.flag_table(path))
            names = [row[0] for row in update_readme.binary_flags(path)]
            self.assertGreater(len(names), 3, path)
            for name, _, _, kind in update_readme.binary_flags(path):
                self.assertIn(f"`--[no]{name}`" if kind == "bool" else f"`--{name}`", table)
        main_flags = {row[0] for row in update_readme.binary_flags("training/main.py")}
        self.assertTrue({"consistency", "init_checkpoint", "data_mirror", "magnet_cap"} <= main_flags)

    def test_reproduce_table_marks_missing_methods_and_failed_checks(self):
        method = {
            "clean_accuracy": 0.5, "robust_accuracy_8_255": 0.1,
            "robust_accuracy": {"2/255": 0.3, "8/255": 0.1, "16/255": 0.0},
            "official_loss_8_255": 0.4, "certified_accuracy": {"0.1": 0.0},
            "masking_checks": {"losses_agree": True, "official_gap": False},
            "per_loss": {"8/255 margin": 0.12, "8/255 square": 0.2},
            "train": [{"epochs_trained": 3, "steps": 627, "train_cpu_seconds": 1850.0},
                      {"epochs_trained": 2, "steps": 418, "train_cpu_seconds": 1795.0}],
            "start": "cross-entropy, 10 epochs",
            "measured": {"date": "2026-12-01", "machine": {"cpu_model": "Zen 5"}},
        }
        older = {**method, "official_loss_exact": False, "start": "ClusTR, 8 epochs", "measured": {
            "date": "2026-11-25", "machine": {"cpu_model": "the reference"}}}
        result = {"settings": {"width_multiplier": 0.25, "budget": "reference epochs",
                               "optimizer": "Adam", "batch_size": 240, "num_examples": 1000},
                  "machine": {"cpus": 2}, "data": "CIFAR-10", "date": "2026-12-01", "dataset": "cifar10",
                  "methods": {"clustr_qtrades": method, "clustr_qtrades_kl": older}}
        text = "\n".join(update_readme.reproduce(result))
        self.assertIn("| **ClusTR+QTRADES, the paper's term** | cross-entropy, 10 epochs | 2026-12-01 | 31 + 30 | "
                      "627 + 418 | 50.0% | 30.0% | **10.0%** | 0.0% | n/a | 40.0% | 20.0% | 0.0% | failed: official_gap |",
                      text)
        self.assertIn("| ClusTR+QTRADES, KL term (not the paper's) | ClusTR, 8 epochs | 2026-11-25 | 31 + 30 | "
                      "627 + 418 | 50.0% | 30.0% | **10.0%** | 0.0% | n/a | 40.0% (†) |", text)
        self.assertIn("| PGD-AT (Madry) | not run yet |", text)
        self.assertIn("Measured on: 2026-11-25, the reference; 2026-12-01, Zen 5.", text)
        self.assertIn("(†) evaluated before `official`", text)
        self.assertIn("ResNet-18 x0.25; budget: reference epochs", text)

    def test_collect_writes_and_prints_the_result(self):
        import subprocess
        import sys
        import tempfile

        for dataset in ("cifar10", "digits"):
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "reproduce.json")
                run = subprocess.run(
                    [sys.executable, os.path.join(ROOT, "benchmarks", "reproduce.py"), "--only=collect",
                     f"--dataset={dataset}", f"--runs_dir={tmp}/runs", f"--out={out}"],
                    capture_output=True, text=True, timeout=120)
                self.assertEqual(run.returncode, 0, run.stderr[-2000:])
                with open(out) as fh:
                    written = json.load(fh)
            self.assertEqual(json.loads(run.stdout.strip().splitlines()[-1]), written)
            self.assertEqual(written["methods"], {})  # nothing trained in an empty runs_dir
            self.assertEqual(written["dataset"], dataset)
            lines = update_readme.reproduce(written)
            self.assertTrue(any("| ClusTR | not run yet |" in line for line in lines))
            self.assertIn("reference machine" if dataset == "cifar10" else "40 epochs", written["settings"]["budget"])

    def test_reproduce_keeps_rows_it_has_no_runs_for(self):
        """A method whose runs are not in --runs_dir keeps its row (and when it was measured)
        from the result file; the recipe's stages start the fine-tuned methods from the
        cross-entropy model."""
        import subprocess
        import sys
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "reproduce.json")
            with open(out, "w") as fh:
                json.dump({"methods": {"pgd_at": {"clean_accuracy": 0.45, "measured": {"date": "2026-11-25"}}}}, fh)
            run = subprocess.run(
                [sys.executable, os.path.join(ROOT, "benchmarks", "reproduce.py"), "--only=collect",
                 f"--runs_dir={tmp}/runs", f"--out={out}"], capture_output=True, text=True, timeout=120)
            self.assertEqual(run.returncode, 0, run.stderr[-2000:])
            with open(out) as fh:
                self.assertEqual(json.load(fh)["methods"], {"pgd_at": {"clean_accuracy": 0.45,
                                                                        "measured": {"date": "2026-11-25"}}})
        spec = importlib.util.spec_from_file_location("reproduce", os.path.join(ROOT, "benchmarks", "reproduce.py"))
        reproduce = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(reproduce)
        args = reproduce.argparse.Namespace(dataset="cifar10", data_dir="d", width_multiplier=0.25, seed=0,
                                            runs_dir="runs/r", budget_minutes=None)
        stages = reproduce._stages(args)
        half = stages["cross_entropy"][0]
        for method in ("clustr_from_ce", "clustr_qtrades"):
            first, second = stages[method]
            self.assertEqual(first, half)
            argv = reproduce._train_argv(args, second)
            self.assertIn("--init_checkpoint=runs/r/cross_entropy_half", argv)
            self.assertIn("--lr=1e-4", argv)
        self.assertIn("--consistency_lambda=8", reproduce._train_argv(args, stages["clustr_qtrades"][1]))
        self.assertIn("--consistency=kl", reproduce._train_argv(args, stages["clustr_qtrades_kl"][1]))
        self.assertEqual(stages["cross_entropy"][1].continues, half)
        self.assertEqual([reproduce._train_argv(args, s)[-2] for s in stages["cross_entropy"]],
                         ["--epochs=10", "--epochs=20"])
        args.budget_minutes = 60.0
        self.assertIn("--cpu_budget_minutes=30", reproduce._train_argv(args, half))


if __name__ == "__main__":
    absltest.main()

