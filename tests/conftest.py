"""pytest set-up shared by every test file (also under Bazel, which adds this file to each
test target): absl's flags count as parsed, so that absltest's `create_tempdir` (which
reads --test_tmpdir: TEST_TMPDIR or the system's temporary folder) works under pytest."""

from absl import flags


def pytest_configure(config):
    del config
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
