"""The library's run configuration: checked when built, resolved, and run by training.run."""

import ast
import dataclasses
import json
import os
import shutil
import tempfile

from absl.testing import absltest
from absl.testing import parameterized

from clustr_tf import config as c
from clustr_tf import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tempdir(test):
    path = tempfile.mkdtemp()
    test.addCleanup(shutil.rmtree, path, True)
    return path


class RunConfigTest(parameterized.TestCase):
    def test_defaults_resolve(self):
        digits = c.RunConfig(runtime=c.Runtime(model_dir="r"))
        self.assertEqual((digits.runtime.epochs, digits.model.eval_L, digits.objective.batch_size), (40, 20, 240))
        self.assertEqual(digits.optimizer.lr_milestones, ())
        cifar = c.RunConfig(data=c.Data(dataset="cifar10"), runtime=c.Runtime(model_dir="r"))
        self.assertEqual((cifar.runtime.epochs, cifar.optimizer.lr_milestones), (90, (30, 60)))
        custom = c.RunConfig(optimizer=c.Optimizer(lr_milestones="5,7"), objective=c.Objective(m=4, d=5),
                             runtime=c.Runtime(model_dir="r", epochs=9))
        self.assertEqual((custom.optimizer.lr_milestones, custom.objective.batch_size), ((5, 7), 20))
        self.assertTrue(c.RunConfig().runtime.model_dir.startswith(os.path.join("runs", "digits-")))
        with self.assertRaises(dataclasses.FrozenInstanceError):
            digits.runtime = c.Runtime()

    @parameterized.named_parameters(
        ("dataset", lambda: c.Data(dataset="mnist"), "Unknown `dataset`", "Received: 'mnist'"),
        ("folder_without_dir", lambda: c.Data(dataset="image_folder"), "`dataset`=image_folder needs `data_dir`"),
        ("mirror", lambda: c.Data(data_mirror="ftpx://x"), "`data_mirror` must be an http", "'ftpx://x'"),
        ("backbone", lambda: c.Model(backbone="vgg"), "Unknown `backbone`", "'vgg'"),
        ("k", lambda: c.Model(k=0), "`k` must be an integer >= 1. Received: 0"),
        ("bool_is_not_int", lambda: c.Model(L=True), "`L` must be an integer >= 1. Received: True"),
        ("method", lambda: c.Objective(method="trades"), "Unknown `method`"),
        ("consistency", lambda: c.Objective(consistency="mse"), "Unknown `consistency`", "official, kl"),
        ("lambda", lambda: c.Objective(xent_lambda=-1.0), "`xent_lambda` must be >= 0. Received: -1.0"),
        ("baseline_terms", lambda: c.Objective(method="pgd_at", consistency_lambda=8.0),
         "`consistency_lambda` applies to `method`=clustr only"),
        ("pgd", lambda: c.Objective(pgd_eps=0.01, pgd_step=0.02), "0 < step <= eps <= 1"),
        ("lr", lambda: c.Optimizer(lr=0.0), "`lr` must be > 0. Received: 0.0"),
        ("milestones", lambda: c.Optimizer(lr_milestones="7,5"), "`lr_milestones` must be increasing"),
        ("milestones_text", lambda: c.Optimizer(lr_milestones="soon"), "'auto', 'none' or comma-separated"),
        ("strategy", lambda: c.Runtime(strategy="horovod"), "Unknown `strategy`"),
        ("budget", lambda: c.Runtime(cpu_budget_minutes=0), "`cpu_budget_minutes` must be > 0"),
        ("m_too_large", lambda: c.RunConfig(objective=c.Objective(m=20)), "`m` must be at most 19",
         "Received: `m`=20"),
        ("L_too_large", lambda: c.RunConfig(model=c.Model(L=21)), "`L` must be at most the number of clusters, 20"),
        ("eval_L", lambda: c.RunConfig(model=c.Model(eval_L=30)), "`eval_L` must be at most"),
        ("export_baseline", lambda: c.RunConfig(objective=c.Objective(method="cross_entropy"),
                                                runtime=c.Runtime(export_dir="e")), "exports ClusTR models only"),
        ("section_type", lambda: c.RunConfig(data="cifar10"), "`data` must be a config.Data"),
    )
    def test_bad_settings_name_what_and_what_was_received(self, build, *expected):
        with self.assertRaises(c.ConfigError) as ctx:
            build()
        for text in expected:
            self.assertIn(text, str(ctx.exception))
        self.assertNotIn("`", ctx.exception.as_flags())  # the binary's form: --name

    def test_paths_are_checked_before_anything_is_written(self):
        tmp = _tempdir(self)
        blocker = os.path.join(tmp, "file")
        with open(blocker, "w") as fh:
            fh.write("keep")
        for runtime, text in ((c.Runtime(model_dir=f"{blocker}/run"), "`model_dir` is not a writable directory"),
                              (c.Runtime(model_dir=f"{tmp}/r", init_checkpoint=f"{tmp}/none"),
                               "`init_checkpoint` does not exist"),
                              (c.Runtime(model_dir=f"{tmp}/r", export_dir=blocker), "export_dir exists and is not")):
            with self.assertRaisesRegex(c.ConfigError, text):
                c.RunConfig(runtime=runtime).check_paths()
        with open(blocker) as fh:
            self.assertEqual(fh.read(), "keep")

    def test_every_flag_of_the_binary_is_a_setting(self):
        """config.json (`flat()`) holds every flag of training/main.py under its name."""
        with open(os.path.join(ROOT, "training", "main.py")) as fh:
            tree = ast.parse(fh.read())
        defined = {node.args[0].value for node in ast.walk(tree)
                   if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                   and node.func.attr.startswith("DEFINE_") and node.args and isinstance(node.args[0], ast.Constant)}
        self.assertEqual(sorted(defined), sorted(c.RunConfig(runtime=c.Runtime(model_dir="r")).flat()))


class RunTest(absltest.TestCase):
    def test_run_writes_the_run_directory(self):
        run = os.path.join(_tempdir(self), "run")
        config = c.RunConfig(runtime=c.Runtime(model_dir=run, epochs=1, steps_per_epoch=2))
        metrics = training.run(config)
        for name in ("config.json", "metrics.json", "model.keras", "training_log.csv"):
            self.assertTrue(os.path.exists(os.path.join(run, name)), name)
        with open(os.path.join(run, "config.json")) as fh:
            self.assertEqual(json.load(fh), json.loads(json.dumps(config.flat())))
        self.assertEqual((metrics["epochs_trained"], metrics["method"], metrics["eval_L"]), (1, "clustr", 20))
        with self.assertRaisesRegex(TypeError, "RunConfig"):
            training.run({"epochs": 1})


if __name__ == "__main__":
    absltest.main()
