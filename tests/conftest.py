"""pytest set-up shared by every test file (also under Bazel, which adds this file to each
test target):

- absl's flags count as parsed, so that absltest's `create_tempdir` (which reads
  --test_tmpdir: TEST_TMPDIR or the system's temporary folder) works under pytest;
- `tiny_run`: the one tiny trained run the tests share (the default digits run, 3 epochs),
  trained once per test process; each test class that uses it gets its own copy, as
  `self.run_dir` (`@pytest.mark.usefixtures("tiny_run")`), or a test gets it as an argument.
"""

import os
import shutil

import pytest
from absl import flags


def pytest_configure(config):
    del config
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session")
def tiny_run_source(tmp_path_factory):
    """The run folder of `training.run` on the default digits config for 3 epochs: config.json,
    model.keras, metrics.json, checkpoints. Not to be written into: use `tiny_run`."""
    from clustr_tf import config
    from clustr_tf import training

    run_dir = os.path.join(tmp_path_factory.mktemp("tiny_run"), "run")
    training.run(config.RunConfig(runtime=config.Runtime(model_dir=run_dir, epochs=3)))
    return run_dir


@pytest.fixture(scope="class")
def tiny_run(request, tiny_run_source, tmp_path_factory):
    """A copy of the tiny run for one test class (its tests may write into it)."""
    copy = os.path.join(tmp_path_factory.mktemp("tiny_run_copy"), "run")
    shutil.copytree(tiny_run_source, copy)
    if request.cls is not None:
        request.cls.run_dir = copy
    return copy
