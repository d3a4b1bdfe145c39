"""Packaging: `pip install .` (pyproject.toml) and the Bazel BUILD files.

- The pip package is built and installed offline from a copy of the sources (`--no-deps
  --no-build-isolation --no-index --target`, with the virtualenv's setuptools): `clustr_tf`
  imports from the install in another folder, the three commands run, and only the project's
  own top-level names land in site-packages.
- pyproject.toml's dependencies and requirements.txt name the same packages, and every pin in
  requirements.txt satisfies the range in pyproject.toml.
- The BUILD files mirror the imports: every module a target's sources import (clustr_tf and
  export, including imports inside functions) comes from its deps, and every dep is imported;
  every library module and every test file has its target.
"""

import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib

from absl.testing import absltest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What `pip install .` reads: the project file, the README (long description) and the packages.
SOURCES = ("pyproject.toml", "README.md", "clustr_tf", "training", "export")
COMMANDS = {
    "clustr-train": "clustr_tf_cli.training.main:console_main",
    "clustr-evaluate": "clustr_tf_cli.training.evaluate:console_main",
    "clustr-export": "clustr_tf_cli.export.export_model:console_main",
    "clustr-client": "clustr_tf_cli.export.client:console_main",
}
# Packages of this project that other code imports, and the folders they live in.
PROJECT_PACKAGES = ("clustr_tf", "export")
BAZEL_PACKAGES = ("clustr_tf", "training", "export", "benchmarks", "tests")
PY_RULES = ("py_library", "py_binary", "py_test", "pytest_test")


def _env(**extra):
    """The environment for pip and the installed commands: offline, no user pip config."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
               TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", **extra)
    return env


class PipInstallTest(absltest.TestCase):
    """`pip install .` from a copy of the sources, into a --target folder."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        import setuptools  # pylint: disable=g-import-not-at-top

        major = int(setuptools.__version__.split(".")[0])
        if major < 61:
            raise AssertionError(
                "Building the package offline needs setuptools >= 61 in the virtualenv (pyproject.toml's "
                f"[project] table). Received: setuptools {setuptools.__version__}"
            )
        cls.tmp = tempfile.mkdtemp()
        src = os.path.join(cls.tmp, "src")
        os.makedirs(src)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        for name in SOURCES:
            path = os.path.join(ROOT, name)
            if os.path.isdir(path):
                shutil.copytree(path, os.path.join(src, name), ignore=ignore)
            else:
                shutil.copyfile(path, os.path.join(src, name))
        cls.site = os.path.join(cls.tmp, "site")
        install = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
             "--no-cache-dir", "--quiet", "--target", cls.site, src],
            capture_output=True, text=True, cwd=cls.tmp, env=_env(), timeout=300,
        )
        if install.returncode != 0:
            shutil.rmtree(cls.tmp, ignore_errors=True)
            raise AssertionError(f"pip install failed:\n{install.stdout[-3000:]}\n{install.stderr[-3000:]}")
        cls.work = os.path.join(cls.tmp, "elsewhere")  # not the repository, not the install
        os.makedirs(cls.work)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)
        super().tearDownClass()

    def _run(self, args):
        return subprocess.run(args, capture_output=True, text=True, cwd=self.work,
                              env=_env(PYTHONPATH=self.site), timeout=300)

    def _dist_info(self, name):
        (info,) = [d for d in os.listdir(self.site) if d.startswith("clustr_tf-") and d.endswith(".dist-info")]
        with open(os.path.join(self.site, info, name)) as fh:
            return fh.read()

    def test_installs_only_the_project_top_level_names(self):
        top = {n for n in os.listdir(self.site) if n != "bin" and not n.endswith(".dist-info")}
        self.assertEqual(top, {"clustr_tf", "clustr_tf_cli"})
        self.assertCountEqual(os.listdir(os.path.join(self.site, "clustr_tf_cli")), ["training", "export"])
        for module in ("training/main.py", "training/evaluate.py", "export/export_model.py", "export/client.py"):
            self.assertTrue(os.path.isfile(os.path.join(self.site, "clustr_tf_cli", module)), module)

    def test_library_imports_from_the_install(self):
        script = ("import clustr_tf, clustr_tf.core, clustr_tf.nets, clustr_tf.robustness.evaluation, clustr_tf.serving, "
                  "clustr_tf.training, clustr_tf.data\n"
                  "from clustr_tf_cli.export import client, export_model\n"
                  "print(clustr_tf.__file__); print(export_model.__file__)\n"
                  "print(clustr_tf.ClusTRModel.__name__, clustr_tf.MagnetLoss.__name__)\n")
        run = self._run([sys.executable, "-c", script])
        self.assertEqual(run.returncode, 0, run.stderr[-3000:])
        lines = run.stdout.strip().splitlines()
        self.assertEqual(lines[0], os.path.join(self.site, "clustr_tf", "__init__.py"))
        self.assertEqual(lines[1], os.path.join(self.site, "clustr_tf_cli", "export", "export_model.py"))
        self.assertEqual(lines[2], "ClusTRModel MagnetLoss")

    def test_entry_points(self):
        entry_points = self._dist_info("entry_points.txt")
        for command, target in COMMANDS.items():
            self.assertIn(f"{command} = {target}", entry_points)

    def test_commands_show_their_flags(self):
        for command, flag in (("clustr-train", "--model_dir"), ("clustr-evaluate", "--num_examples"),
                              ("clustr-export", "--export_dir"), ("clustr-client", "--max_batch_size")):
            run = self._run([os.path.join(self.site, "bin", command), "--help"])
            self.assertEqual(run.returncode, 0, run.stderr[-3000:])
            self.assertNotIn("Traceback", run.stderr)
            self.assertIn(f"USAGE: {os.path.join(self.site, 'bin', command)}", run.stdout)
            self.assertIn(flag, run.stdout, command)

    def test_train_command_reaches_the_installed_export_module(self):
        """clustr-train checks --export_dir with clustr_tf_cli.export (no `export` package installed)."""
        blocker = os.path.join(self.tmp, "a_file")
        with open(blocker, "w") as fh:
            fh.write("keep me")
        run = self._run([os.path.join(self.site, "bin", "clustr-train"), f"--model_dir={self.tmp}/run",
                         f"--export_dir={blocker}"])
        self.assertEqual(run.returncode, 2, run.stderr[-3000:])
        self.assertNotIn("Traceback", run.stderr)
        # One line under the command's own name, before TensorFlow loads (none of its log lines).
        self.assertEqual(run.stderr.strip().splitlines(),
                         [f"clustr-train: error: --export_dir exists and is not a directory. Received: {blocker}"])
        run = self._run([os.path.join(self.site, "bin", "clustr-evaluate"), "--num_exampels=3"])
        self.assertEqual(run.returncode, 2, run.stderr[-3000:])
        self.assertEqual(run.stderr.strip().splitlines(), ["clustr-evaluate: error: Unknown command line flag "
                                                           "'num_exampels'. Did you mean: num_examples ?"])

    def test_metadata_lists_the_dependencies(self):
        metadata = self._dist_info("METADATA")
        requires = {canonicalize_name(Requirement(line.split(":", 1)[1]).name)
                    for line in metadata.splitlines() if line.startswith("Requires-Dist:")}
        with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
            project = tomllib.load(fh)["project"]
        declared = {canonicalize_name(Requirement(r).name)
                    for r in project["dependencies"] + project["optional-dependencies"]["test"]}
        self.assertEqual(requires, declared)


class DependenciesTest(absltest.TestCase):
    def test_pyproject_agrees_with_requirements_txt(self):
        pins = {}
        with open(os.path.join(ROOT, "requirements.txt")) as fh:
            for line in fh:
                line = line.split("#", 1)[0].strip()
                if line:
                    req = Requirement(line)
                    (spec,) = req.specifier
                    self.assertEqual(spec.operator, "==", f"requirements.txt pins exact versions: {line}")
                    pins[canonicalize_name(req.name)] = spec.version
        with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
            project = tomllib.load(fh)["project"]
        declared = {}
        for text in project["dependencies"] + project["optional-dependencies"]["test"]:
            req = Requirement(text)
            declared[canonicalize_name(req.name)] = req.specifier
        self.assertEqual(sorted(declared), sorted(pins))
        for name, specifier in declared.items():
            self.assertTrue(specifier.contains(pins[name], prereleases=True),
                            f"requirements.txt pins {name}=={pins[name]}, outside pyproject.toml's {specifier}")


# --------------------------------------------------------------------------
# BUILD files (Starlark is Python syntax: read them with ast).
# --------------------------------------------------------------------------


def _label(package, label):
    """(package, name) of a label written in `package`'s BUILD file."""
    if label.startswith(":"):
        return package, label[1:]
    path, _, name = label[2:].partition(":")
    return path, name or os.path.basename(path)


def _targets():
    """{(package, name): {"rule", "srcs", "deps", "size"}} of the py rules in BAZEL_PACKAGES."""
    targets = {}
    for package in BAZEL_PACKAGES:
        with open(os.path.join(ROOT, package, "BUILD")) as fh:
            tree = ast.parse(fh.read(), filename=f"{package}/BUILD")
        for node in tree.body:
            call = node.value if isinstance(node, ast.Expr) else None
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id in PY_RULES):
                continue
            kw = {}
            for keyword in call.keywords:
                try:
                    kw[keyword.arg] = ast.literal_eval(keyword.value)
                except ValueError:
                    kw[keyword.arg] = None
            srcs = [kw.get("src") or kw["name"] + ".py"] if call.func.id == "pytest_test" else kw.get("srcs", [])
            targets[(package, kw["name"])] = {
                "rule": call.func.id,
                "srcs": {f"{package}/{s}" for s in srcs},
                "deps": [_label(package, d) for d in kw.get("deps") or []],
                "size": kw.get("size"),
            }
    return targets


def _imported_files(path):
    """Project files that `path` imports (clustr_tf and export modules, and their __init__.py)."""
    with open(os.path.join(ROOT, path)) as fh:
        tree = ast.parse(fh.read(), filename=path)
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    files = set()
    for module in modules:
        parts = module.split(".")
        if parts[0] == "tests" and len(parts) > 1:  # a test helper (tests/binaries.py), no package
            files.add(f"tests/{parts[1]}.py")
            continue
        if parts[0] not in PROJECT_PACKAGES:
            continue
        if not path.startswith(parts[0] + "/"):
            files.add(f"{parts[0]}/__init__.py")  # importing a package runs its __init__.py
        if len(parts) > 1 and os.path.isfile(os.path.join(ROOT, *parts[:2]) + ".py"):
            files.add("/".join(parts[:2]) + ".py")
        elif len(parts) > 1 and os.path.isfile(os.path.join(ROOT, *parts[:2], "__init__.py")):
            files.add("/".join(parts[:2]) + "/__init__.py")  # a subpackage (clustr_tf/data/)
    return {f for f in files if os.path.isfile(os.path.join(ROOT, f))}


class BazelBuildFilesTest(absltest.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.targets = _targets()

    def _provided(self, key, seen=None):
        seen = set() if seen is None else seen
        if key in seen or key not in self.targets:
            return set()
        seen.add(key)
        files = set(self.targets[key]["srcs"])
        for dep in self.targets[key]["deps"]:
            files |= self._provided(dep, seen)
        return files

    def test_deps_mirror_the_imports(self):
        for key, target in self.targets.items():
            label = f"//{key[0]}:{key[1]}"
            needed = set().union(*(_imported_files(src) for src in target["srcs"])) - target["srcs"]
            missing = needed - self._provided(key)
            self.assertFalse(missing, f"{label} imports {sorted(missing)}: add their targets to deps")
            # A module's own package's __init__.py runs whenever the module is imported.
            own_inits = {os.path.dirname(src) + "/__init__.py" for src in target["srcs"]}
            for dep in target["deps"]:
                if dep in self.targets:
                    self.assertTrue(self.targets[dep]["srcs"] & (needed | target["srcs"] | own_inits),
                                    f"{label} depends on //{dep[0]}:{dep[1]}, which its sources do not import")

    def test_every_library_module_has_one_target(self):
        owners = {}
        for key, target in self.targets.items():
            if target["rule"] == "py_library":
                for src in target["srcs"]:
                    owners.setdefault(src, []).append(key)
        for package in PROJECT_PACKAGES:
            for folder, _, names in os.walk(os.path.join(ROOT, package)):
                for name in sorted(names):
                    if name.endswith(".py"):
                        path = os.path.relpath(os.path.join(folder, name), ROOT)
                        self.assertLen(owners.get(path, []), 1, path)

    def test_every_test_file_has_a_pytest_target(self):
        tests = {src for target in self.targets.values() if target["rule"] == "pytest_test"
                 for src in target["srcs"]}
        files = {os.path.relpath(os.path.join(folder, n), ROOT)
                 for folder, _, names in os.walk(os.path.join(ROOT, "tests")) for n in names
                 if re.fullmatch(r"test_.*\.py", n)}
        self.assertEqual(sorted(files - tests), [], "test files without a pytest_test target in tests/BUILD")
        self.assertEqual(sorted(tests - files), [])

    def test_tensorflow_tests_are_not_small(self):
        for key, target in self.targets.items():
            if target["rule"] != "pytest_test":
                continue
            (src,) = target["srcs"]
            with open(os.path.join(ROOT, src)) as fh:
                text = fh.read()
            if re.search(r"^\s*(import tensorflow|from (clustr_tf|export)\b|import clustr_tf)", text, re.M) or \
                    "subprocess" in text:
                self.assertIn(target["size"], ("medium", "large", "enormous"), f"//{key[0]}:{key[1]}")


if __name__ == "__main__":
    absltest.main()
