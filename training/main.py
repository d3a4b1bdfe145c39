"""Trains a ClusTR model, evaluates it on the test split and writes a run directory.

    python training/main.py                      # digits (embedded), a few minutes on a CPU
    python training/main.py --dataset=cifar10    # the paper's setting (TFDS download)

The run directory (`--model_dir`, default runs/<dataset>-<time>) receives:
    config.json           the run's configuration
    checkpoints/          a .keras checkpoint after every epoch (last.keras)
    model.keras           the final model (loads with `import clustr_tf`)
    logs/                 TensorBoard logs
    training_log.csv      one row per epoch (CSVLogger)
    metrics.json          clean_accuracy, nearest_center_accuracy, agreement, wall time
"""

import dataclasses
import datetime
import json
import math
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging

# Number of classes of each dataset the binary accepts: flags are checked against it
# before TensorFlow is imported, so that a bad flag fails fast with one line.
DATASET_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "svhn": 10}
BACKBONES = ("auto", "convnet", "resnet18")


def define_flags():
    """Defines the binary's flags (official ClusTR defaults where they apply)."""
    flags.DEFINE_string("dataset", "digits", f"One of {sorted(DATASET_CLASSES)}.")
    flags.DEFINE_string("data_dir", None, "Where datasets live (TFDS data_dir).")
    flags.DEFINE_bool("download", True, "Download a TFDS dataset missing from --data_dir.")
    flags.DEFINE_string("model_dir", None, "Run directory. Default: runs/<dataset>-<time>.")
    flags.DEFINE_string("backbone", "auto", "convnet, resnet18, or auto (convnet for digits).")
    flags.DEFINE_float("width_multiplier", 1.0, "ResNet-18 width multiplier.")
    flags.DEFINE_integer("k", 2, "Clusters per class K.")
    flags.DEFINE_integer("m", 12, "Clusters per neighbourhood batch.")
    flags.DEFINE_integer("d", 20, "Examples drawn from each cluster of a batch.")
    flags.DEFINE_float("alpha", 12.5, "Magnet loss margin.")
    flags.DEFINE_integer("L", 10, "Nearest clusters of the soft-kNC rule in training.")
    flags.DEFINE_integer("eval_L", None, "Nearest clusters at evaluation. Default: min(20, C*K).")
    flags.DEFINE_float("lr", 1e-4, "Adam learning rate.")
    flags.DEFINE_integer("epochs", None, "Epochs. Default: 40 for digits, 90 otherwise.")
    flags.DEFINE_integer(
        "steps_per_epoch", None, "Batches per epoch. Default: training examples / (m*d)."
    )
    flags.DEFINE_integer("refresh_every", 1, "Re-cluster after every this many epochs.")
    flags.DEFINE_integer("eval_batch_size", 256, "Batch size of embedding and evaluation.")
    flags.DEFINE_integer("seed", 0, "Random seed.")


class ConfigError(ValueError):
    """A flag value that cannot work; the message names it and what was received."""


@dataclasses.dataclass(frozen=True)
class Config:
    """The run's configuration, made once from the flags."""

    dataset: str
    data_dir: str | None
    download: bool
    model_dir: str
    backbone: str
    width_multiplier: float
    k: int
    m: int
    d: int
    alpha: float
    L: int
    eval_L: int
    lr: float
    epochs: int | None
    steps_per_epoch: int | None
    refresh_every: int
    eval_batch_size: int
    seed: int


def _check_model_dir(path):
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write_test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ConfigError(
            f"--model_dir is not a writable directory: {e.strerror or e}. Received: {path}"
        ) from None


def config_from_flags(f):
    """Validates the flags and returns a frozen `Config`; raises `ConfigError`."""
    if f.dataset not in DATASET_CLASSES:
        raise ConfigError(
            f"Unknown --dataset. Expected one of {', '.join(sorted(DATASET_CLASSES))}. "
            f"Received: {f.dataset!r}"
        )
    if f.backbone not in BACKBONES:
        raise ConfigError(
            f"Unknown --backbone. Expected one of {', '.join(BACKBONES)}. Received: {f.backbone!r}"
        )
    for name in ("k", "m", "d", "L", "refresh_every", "eval_batch_size"):
        if getattr(f, name) < 1:
            raise ConfigError(f"--{name} must be >= 1. Received: {getattr(f, name)}")
    for name in ("epochs", "steps_per_epoch", "eval_L"):
        if getattr(f, name) is not None and getattr(f, name) < 1:
            raise ConfigError(f"--{name} must be >= 1. Received: {getattr(f, name)}")
    if not f.lr > 0:
        raise ConfigError(f"--lr must be > 0. Received: {f.lr}")
    if not f.alpha >= 0:
        raise ConfigError(f"--alpha must be >= 0. Received: {f.alpha}")
    if not f.width_multiplier > 0:
        raise ConfigError(f"--width_multiplier must be > 0. Received: {f.width_multiplier}")
    classes = DATASET_CLASSES[f.dataset]
    clusters = classes * f.k
    if f.m > (classes - 1) * f.k + 1:
        raise ConfigError(
            f"--m must be at most {(classes - 1) * f.k + 1}: a batch holds a seed cluster and "
            f"m-1 clusters of other classes, and {f.dataset} with --k={f.k} has "
            f"{(classes - 1) * f.k} clusters of other classes. Received: --m={f.m}"
        )
    if f.L > clusters:
        raise ConfigError(
            f"--L must be at most the number of clusters, {clusters} ({classes} classes x "
            f"--k={f.k}). Received: --L={f.L}"
        )
    eval_l = f.eval_L if f.eval_L is not None else min(20, clusters)
    if eval_l > clusters:
        raise ConfigError(
            f"--eval_L must be at most the number of clusters, {clusters}. Received: {eval_l}"
        )
    model_dir = f.model_dir or os.path.join(
        "runs", f"{f.dataset}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    )
    _check_model_dir(model_dir)
    return Config(
        dataset=f.dataset,
        data_dir=f.data_dir,
        download=f.download,
        model_dir=model_dir,
        backbone=f.backbone,
        width_multiplier=f.width_multiplier,
        k=f.k,
        m=f.m,
        d=f.d,
        alpha=f.alpha,
        L=f.L,
        eval_L=eval_l,
        lr=f.lr,
        epochs=f.epochs,
        steps_per_epoch=f.steps_per_epoch,
        refresh_every=f.refresh_every,
        eval_batch_size=f.eval_batch_size,
        seed=f.seed,
    )


def build_model(config, info):
    """The ClusTR model for a config and a `clustr_tf.data.DatasetInfo`."""
    from clustr_tf import backbones
    from clustr_tf import models

    name = config.backbone
    if name == "auto":
        name = "convnet" if config.dataset == "digits" else "resnet18"
    kwargs = {"width_multiplier": config.width_multiplier} if name == "resnet18" else {}
    backbone = backbones.get_backbone(
        name, info.image_shape, mean=info.mean, std=info.std, **kwargs
    )
    return models.ClusTRModel(
        backbone, num_classes=info.num_classes, clusters_per_class=config.k, neighbours=config.L
    )


def train_and_evaluate(config):
    """Runs training and evaluation; returns the metrics dict written to metrics.json."""
    import keras

    from clustr_tf import clustering
    from clustr_tf import data
    from clustr_tf import losses
    from clustr_tf import models
    from clustr_tf import sampler as sampler_lib

    keras.utils.set_random_seed(config.seed)
    start = time.time()
    info = data.info(config.dataset)
    images, labels = data.load_arrays(
        config.dataset, "train", data_dir=config.data_dir, download=config.download
    )
    logging.info("%s: %d training images of shape %s", config.dataset, len(images), images.shape[1:])
    sampler = sampler_lib.NeighbourhoodSampler(
        images,
        labels,
        num_classes=info.num_classes,
        clusters_per_class=config.k,
        m=config.m,
        d=config.d,
        seed=config.seed,
    )
    model = build_model(config, info)
    model.compile(
        optimizer=keras.optimizers.Adam(config.lr),
        loss=losses.MagnetLoss(clusters_per_class=config.k, alpha=config.alpha),
        metrics=["accuracy"],
    )
    epochs = config.epochs or (40 if config.dataset == "digits" else 90)
    steps = config.steps_per_epoch or math.ceil(len(images) / sampler.batch_size)
    test = data.load(config.dataset, "test", data_dir=config.data_dir, download=config.download)
    checkpoints = os.path.join(config.model_dir, "checkpoints")
    os.makedirs(checkpoints, exist_ok=True)
    callbacks = [
        # First, so that later callbacks see its variance and center_separation logs.
        clustering.ClusterRefresh(
            sampler,
            frequency=config.refresh_every,
            batch_size=config.eval_batch_size,
            seed=config.seed,
        ),
        keras.callbacks.ModelCheckpoint(os.path.join(checkpoints, "last.keras")),
        keras.callbacks.TensorBoard(os.path.join(config.model_dir, "logs")),
        keras.callbacks.CSVLogger(os.path.join(config.model_dir, "training_log.csv")),
    ]
    model.fit(
        sampler.dataset(),
        epochs=epochs,
        steps_per_epoch=steps,
        validation_data=test.batch(config.eval_batch_size),
        callbacks=callbacks,
        shuffle=False,
        verbose=1,
    )
    train_seconds = time.time() - start
    model.save(os.path.join(config.model_dir, "model.keras"))
    metrics = models.evaluate_accuracy(
        model, test, neighbours=config.eval_L, batch_size=config.eval_batch_size
    )
    metrics.update(
        {
            "split": "test",
            "dataset": config.dataset,
            "eval_L": config.eval_L,
            "epochs": epochs,
            "steps_per_epoch": steps,
            "train_seconds": round(train_seconds, 2),
            "total_seconds": round(time.time() - start, 2),
        }
    )
    with open(os.path.join(config.model_dir, "metrics.json"), "w") as fh:
        json.dump(metrics, fh, indent=2)
    return metrics


def main(argv):
    if len(argv) > 1:
        sys.stderr.write(f"main.py: error: unexpected arguments: {' '.join(argv[1:])}\n")
        sys.exit(2)
    try:
        config = config_from_flags(flags.FLAGS)
    except ConfigError as e:
        sys.stderr.write(f"main.py: error: {e}\n")
        sys.exit(2)
    with open(os.path.join(config.model_dir, "config.json"), "w") as fh:
        json.dump(dataclasses.asdict(config), fh, indent=2)
    from clustr_tf import data

    try:
        metrics = train_and_evaluate(config)
    except data.DatasetNotFoundError as e:
        sys.stderr.write(f"main.py: error: {e}\n")
        sys.exit(1)
    logging.info("Run directory: %s", config.model_dir)
    logging.info("Test metrics: %s", json.dumps(metrics))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    define_flags()
    app.run(main)
