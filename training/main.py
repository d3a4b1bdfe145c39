"""Trains a ClusTR model (or a baseline), evaluates it on the test split and writes a run
directory: flags -> a validated `clustr_tf.config.RunConfig` -> `clustr_tf.training.run`.

    python training/main.py                      # digits (embedded), a few minutes on a CPU
    python training/main.py --dataset=cifar10    # the paper's setting (TFDS download)

The run directory (`--model_dir`, default runs/<dataset>-<time>) receives:
    config.json           the run's configuration (every flag, resolved)
    checkpoints/          the training state (resumed by running the same command again)
    model.keras           the final model (loads with `import clustr_tf`)
    logs/                 TensorBoard logs
    training_log.csv      one row per epoch
    metrics.json          clean_accuracy, nearest_center_accuracy, agreement, wall time
    .training.lock        held while a training runs there: a second one fails at once

With `--export_dir=BASE` it also exports the final model as a SavedModel for TF Serving
into BASE/<next version>/ (`clustr_tf.serving`).

A bad flag stops the binary with one line naming it and what was received (exit status
2); a dataset that cannot be had, a training state that cannot be restored or a run
directory another training is using, exit 1.
"""

import json
import os
import sys

from absl import flags
from absl import logging


def define_flags(flag_values=flags.FLAGS):
    """Defines the binary's flags: one per setting of `clustr_tf.config.RunConfig`, with its
    default (the official ClusTR one where it applies) and help text (`clustr_tf.config_flags`)."""
    from clustr_tf import config_flags

    config_flags.define_flags(flag_values)  # flags of this module


def config_from_flags(f):
    """The flags as a `clustr_tf.config.RunConfig` (checked); raises `config.ConfigError`."""
    from clustr_tf import config_flags

    return config_flags.config_from_flags(f)


def legacy_argv(argv):
    """`argv` with the former boolean `--[no]mixed_precision` rewritten: the bare flag means
    float16, `--nomixed_precision` float32."""
    legacy = {"--mixed_precision": "--mixed_precision=float16", "--nomixed_precision": "--mixed_precision=float32"}
    return [legacy.get(arg, arg) for arg in argv]


def parse_flags(argv):
    """The flags of `argv` (`cli.parse_flags`: one error line, exit status 2), with the former
    boolean `--[no]mixed_precision` still accepted."""
    from clustr_tf import cli

    return cli.parse_flags(argv, legacy_argv)


def _fail(message, status):
    from clustr_tf import cli

    cli.fail(message, status)


def main(argv, flag_values=flags.FLAGS):
    """Runs the parsed flags (`flag_values`); exits 2 on a bad flag, 1 on data or state that cannot be had."""
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}", 2)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    from clustr_tf import config as config_lib

    try:  # the flags, checked before TensorFlow loads
        config = config_from_flags(flag_values)
        config.check_paths()  # before anything is written
    except config_lib.ConfigError as e:  # a flag value that cannot work
        _fail(e.as_flags(), 2)
    from clustr_tf import data
    from clustr_tf import training

    try:
        metrics = training.run(config)
    except config_lib.ConfigError as e:  # a setting found wrong on the way (init_checkpoint, ...)
        _fail(e.as_flags(), 2)
    except (data.DatasetNotFoundError, data.CorruptDatasetError, training.RestoreError,
            training.RunDirInUseError, training.TrainingDivergedError) as e:
        _fail(str(e), 1)
    logging.info("Run directory: %s", config.runtime.model_dir)
    logging.info("Test metrics: %s", json.dumps(metrics))


def console_main():
    """The `clustr-train` command of the pip package (pyproject.toml)."""
    os.environ["CLUSTR_TF_DEFER_IMPORTS"] = "1"  # flags parsed and checked before TensorFlow loads
    from clustr_tf import cli

    cli.start(main, define_flags, __name__, rewrite=legacy_argv)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    console_main()
