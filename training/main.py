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

With `--export_dir=BASE` it also exports the final model as a SavedModel for TF Serving
into BASE/<next version>/ (`clustr_tf.serving`).

A bad flag stops the binary with one line naming it and what was received (exit status
2); a dataset that cannot be had or a training state that cannot be restored, exit 1.
"""

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging


def define_flags():
    """Defines the binary's flags (official ClusTR defaults where they apply)."""
    from clustr_tf import config as config_lib

    flags.DEFINE_string(
        "dataset", "digits", f"One of {sorted(config_lib.DATASET_CLASSES) + list(config_lib.FOLDER_DATASETS)}."
    )
    flags.DEFINE_string("data_dir", None, "Where the data is: an original release (CIFAR's python or binary tarball "
                        "or folder, SVHN's .mat files), an image folder or .tar.gz (split/class/image), or a TFDS "
                        "data_dir (docs/training.md, Data).")
    flags.DEFINE_bool("download", True, "Download a TFDS dataset missing from --data_dir.")
    flags.DEFINE_string("data_mirror", None, "Download the original release files from this URL (URL/<file name>) "
                        "instead of their publishers' sites; each must match TFDS's registered checksum.")
    flags.DEFINE_string("model_dir", None, "Run directory. Default: runs/<dataset>-<time>.")
    flags.DEFINE_string("backbone", "auto", "convnet, resnet18, lipschitz (1-Lipschitz by construction: AOL "
                        "convolutions, MaxMin; for --certified_margin), or auto (convnet for digits, else resnet18).")
    flags.DEFINE_float("width_multiplier", 1.0, "Width multiplier of resnet18 or lipschitz.")
    flags.DEFINE_float("certified_margin", 0.0, "Certified training: the l2 radius (pixel units) to certify. "
                       "clustr: the magnet loss at the worst case of that radius (certified ClusTR); "
                       "cross_entropy: Lipschitz-margin cross-entropy. Needs --backbone=lipschitz. 0: off.")
    flags.DEFINE_integer("k", 2, "Clusters per class K.")
    flags.DEFINE_integer("m", 12, "Clusters per neighbourhood batch.")
    flags.DEFINE_integer("d", 20, "Examples drawn from each cluster of a batch.")
    flags.DEFINE_float("alpha", 12.5, "Magnet loss margin.")
    flags.DEFINE_integer("L", 10, "Nearest clusters of the soft-kNC rule in training.")
    flags.DEFINE_integer("eval_L", None, "Nearest clusters at evaluation. Default: min(20, C*K).")
    flags.DEFINE_float("lr", None, "Learning rate. Default: 1e-4 (the official ClusTR rate); 1e-3 for "
                       "--backbone=lipschitz on digits.")
    flags.DEFINE_string("optimizer", "adam", "adam (the official ClusTR optimizer) or sgd (with --momentum, "
                        "Nesterov off; the usual recipe for the cross-entropy and PGD-AT baselines).")
    flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
    flags.DEFINE_float("weight_decay", 0.0, "Decoupled weight decay (Keras `weight_decay`), e.g. 5e-4 with sgd.")
    flags.DEFINE_integer("epochs", None, "Epochs. Default: 40 for digits, 90 otherwise.")
    flags.DEFINE_integer(
        "steps_per_epoch", None, "Batches per epoch. Default: training examples / (m*d)."
    )
    flags.DEFINE_integer("refresh_every", 1, "Re-cluster after every this many epochs.")
    flags.DEFINE_integer("eval_batch_size", 256, "Batch size of embedding and evaluation.")
    flags.DEFINE_integer("seed", 0, "Random seed.")
    flags.DEFINE_string(
        "strategy", "auto", "auto, default, mirrored, multi_worker (TF_CONFIG) or tpu."
    )
    flags.DEFINE_string("tpu", None, "TPU name or address for --strategy=tpu.")
    flags.DEFINE_string(
        "lr_milestones", None,
        "Comma-separated epochs where the learning rate is multiplied by --lr_decay; "
        "auto = at 1/3 and 2/3 of --epochs (official: 30,60 of 90); none = constant. "
        "Default: none for digits, auto otherwise.",
    )
    flags.DEFINE_float("lr_decay", 0.1, "Learning-rate factor at each milestone.")
    flags.DEFINE_bool("magnet_cap", False, "The official magnet loss, capped at -log(1e-8) = 18.42 per example "
                      "(relu(-log(num / (den + 1e-8) + 1e-8))); default: uncapped.")
    flags.DEFINE_float("xent_lambda", 0.0, "Weight of the official cross-entropy term: cross-entropy with the raw "
                       "soft-kNC scores S as logits.")
    flags.DEFINE_float("logits_xent_lambda", 0.0, "Weight of a cross-entropy on the log-scores log S (-log p of "
                       "the label; not the official term).")
    flags.DEFINE_float(
        "consistency_lambda", 0.0, "ClusTR+QTRADES: weight of the consistency term (official 8)."
    )
    flags.DEFINE_string(
        "consistency", "official", "Form of the consistency term: official (the paper's: cross-entropy between "
        "the clean soft-kNC probabilities and softmax(S(x_adv)), S the raw scores) or kl (TRADES-style "
        "KL(p(x) || p(x_adv)), not the paper's)."
    )
    flags.DEFINE_float("consistency_eps", 8.0, "QTRADES l_inf radius, in 1/255 units.")
    flags.DEFINE_float("consistency_step", 10.0, "QTRADES step size, in 1/255 units.")
    flags.DEFINE_string(
        "init_checkpoint", None, "A run directory (its model.keras) or a .keras model, ClusTR or cross-entropy, "
        "to start from: its backbone's weights carry over (the official ClusTR+QTRADES recipe starts from a "
        "cross-entropy network); the clusters are refreshed on them before the first step."
    )
    flags.DEFINE_string(
        "mixed_precision", None, "Backbone compute precision: float16 (mixed_float16 with loss scaling, for GPUs) "
        "or bfloat16 (mixed_bfloat16: A100/H100-class GPUs, TPUs, CPUs with AVX512-BF16 or AMX). The heads, "
        "losses and distances stay float32. Default: float32. The bare flag means float16 (as when it was "
        "a boolean)."
    )
    flags.DEFINE_bool("jit_compile", False, "Compile the training step with XLA (accelerators).")
    flags.DEFINE_integer(
        "checkpoint_every_steps", 100, "Save the training state this often (and every epoch)."
    )
    flags.DEFINE_bool("augment", True, "Official augmentation (crop + flip) for CIFAR.")
    flags.DEFINE_string(
        "method", "clustr", "clustr (magnet loss; add --consistency_lambda=8 for ClusTR+QTRADES), or a "
        "baseline with a linear head: cross_entropy, or pgd_at (Madry et al. adversarial training)."
    )
    flags.DEFINE_integer("batch_size", None, "Baselines' batch size per replica. Default: m * d (240).")
    flags.DEFINE_float("pgd_eps", 8.0, "pgd_at training attack l_inf radius, in 1/255 units.")
    flags.DEFINE_float("pgd_step", 2.0, "pgd_at training attack step, in 1/255 units.")
    flags.DEFINE_integer("pgd_iterations", 10, "pgd_at training attack steps.")
    flags.DEFINE_float(
        "time_budget_minutes", None, "Stop after the epoch in which training time (summed over restarts) "
        "reaches this, even before --epochs."
    )
    flags.DEFINE_float(
        "cpu_budget_minutes", None, "The same in CPU time of the process (all threads): one CPU budget for "
        "several methods, whatever else the machine runs."
    )
    flags.DEFINE_string(
        "export_dir", None,
        "Export the final model for TF Serving into <export_dir>/<next version>/ "
        "(export/export_model.py).",
    )


def _pixels(name, value, low=0.0):
    """A perturbation flag in 1/255 units -> pixel units, checked in the flag's units."""
    from clustr_tf.config import ConfigError

    if not low <= value <= 255:
        raise ConfigError(f"`{name}` must be in [{low:g}, 255] (1/255 units). Received: {value}")
    return value / 255.0


def config_from_flags(f):
    """The flags as a `clustr_tf.config.RunConfig` (checked); raises `config.ConfigError`."""
    from clustr_tf import config as c

    if not 0 < f.pgd_step <= f.pgd_eps:
        raise c.ConfigError(f"`pgd_eps`, `pgd_step` must satisfy 0 < step <= eps <= 255 (1/255 units). "
                            f"Received: {f.pgd_eps}, {f.pgd_step}")
    return c.RunConfig(
        data=c.Data(dataset=f.dataset, data_dir=f.data_dir, download=f.download, data_mirror=f.data_mirror,
                    augment=f.augment),
        model=c.Model(backbone=f.backbone, width_multiplier=f.width_multiplier, k=f.k, L=f.L, eval_L=f.eval_L),
        objective=c.Objective(
            method=f.method, m=f.m, d=f.d, alpha=f.alpha, magnet_cap=f.magnet_cap, xent_lambda=f.xent_lambda,
            logits_xent_lambda=f.logits_xent_lambda, consistency_lambda=f.consistency_lambda,
            consistency=f.consistency, consistency_eps=_pixels("consistency_eps", f.consistency_eps),
            consistency_step=_pixels("consistency_step", f.consistency_step), refresh_every=f.refresh_every,
            batch_size=f.batch_size, pgd_eps=_pixels("pgd_eps", f.pgd_eps), pgd_step=_pixels("pgd_step", f.pgd_step),
            pgd_iterations=f.pgd_iterations, certified_margin=f.certified_margin),
        optimizer=c.Optimizer(optimizer=f.optimizer, lr=f.lr, momentum=f.momentum, weight_decay=f.weight_decay,
                              lr_milestones=f.lr_milestones, lr_decay=f.lr_decay),
        runtime=c.Runtime(
            model_dir=f.model_dir, epochs=f.epochs, steps_per_epoch=f.steps_per_epoch,
            eval_batch_size=f.eval_batch_size, seed=f.seed, strategy=f.strategy, tpu=f.tpu,
            mixed_precision=f.mixed_precision, jit_compile=f.jit_compile,
            checkpoint_every_steps=f.checkpoint_every_steps, time_budget_minutes=f.time_budget_minutes,
            cpu_budget_minutes=f.cpu_budget_minutes, init_checkpoint=f.init_checkpoint, export_dir=f.export_dir),
    )


def parse_flags(argv):
    """absl's flag parsing, with the former boolean `--[no]mixed_precision` still accepted:
    the bare flag means float16, `--nomixed_precision` float32."""
    legacy = {"--mixed_precision": "--mixed_precision=float16", "--nomixed_precision": "--mixed_precision=float32"}
    return app.parse_flags_with_usage([legacy.get(arg, arg) for arg in argv])


def _fail(message, status):
    sys.stderr.write(f"main.py: error: {message}\n")
    sys.exit(status)


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}", 2)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    from clustr_tf import config as config_lib
    from clustr_tf import data
    from clustr_tf import training

    try:
        config = config_from_flags(flags.FLAGS)
        config.check_paths()  # before anything is written
        metrics = training.run(config)
    except config_lib.ConfigError as e:  # a flag value that cannot work
        _fail(e.as_flags(), 2)
    except (data.DatasetNotFoundError, data.CorruptDatasetError, training.RestoreError) as e:
        _fail(str(e), 1)
    logging.info("Run directory: %s", config.runtime.model_dir)
    logging.info("Test metrics: %s", json.dumps(metrics))


def console_main():
    """The `clustr-train` command of the pip package (pyproject.toml)."""
    from clustr_tf import cli

    cli.start(main, define_flags, __name__, flags_parser=parse_flags)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    define_flags()
    app.run(main, flags_parser=parse_flags)
