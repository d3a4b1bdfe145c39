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

With `--export_dir=BASE` it also exports the final model as a SavedModel for TF Serving
into BASE/<next version>/ (see export/export_model.py).
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
# Datasets whose classes are read from --data_dir (the sorted class folders).
FOLDER_DATASETS = ("image_folder",)
BACKBONES = ("auto", "convnet", "resnet18")
STRATEGIES = ("auto", "default", "mirrored", "multi_worker", "tpu")
METHODS = ("clustr", "cross_entropy", "pgd_at")
CONSISTENCY_FORMS = ("official", "kl")


def define_flags():
    """Defines the binary's flags (official ClusTR defaults where they apply)."""
    flags.DEFINE_string(
        "dataset", "digits", f"One of {sorted(DATASET_CLASSES) + list(FOLDER_DATASETS)}."
    )
    flags.DEFINE_string("data_dir", None, "Where datasets live (TFDS data_dir).")
    flags.DEFINE_bool("download", True, "Download a TFDS dataset missing from --data_dir.")
    flags.DEFINE_string("data_mirror", None, "Download the original release files from this URL (URL/<file name>) "
                        "instead of their publishers' sites; each must match TFDS's registered checksum.")
    flags.DEFINE_string("model_dir", None, "Run directory. Default: runs/<dataset>-<time>.")
    flags.DEFINE_string("backbone", "auto", "convnet, resnet18, or auto (convnet for digits).")
    flags.DEFINE_float("width_multiplier", 1.0, "ResNet-18 width multiplier.")
    flags.DEFINE_integer("k", 2, "Clusters per class K.")
    flags.DEFINE_integer("m", 12, "Clusters per neighbourhood batch.")
    flags.DEFINE_integer("d", 20, "Examples drawn from each cluster of a batch.")
    flags.DEFINE_float("alpha", 12.5, "Magnet loss margin.")
    flags.DEFINE_integer("L", 10, "Nearest clusters of the soft-kNC rule in training.")
    flags.DEFINE_integer("eval_L", None, "Nearest clusters at evaluation. Default: min(20, C*K).")
    flags.DEFINE_float("lr", 1e-4, "Learning rate.")
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
    flags.DEFINE_bool("mixed_precision", False, "mixed_float16 compute (for GPUs).")
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


class ConfigError(ValueError):
    """A flag value that cannot work; the message names it and what was received."""


@dataclasses.dataclass(frozen=True)
class Config:
    """The run's configuration, made once from the flags."""

    dataset: str
    data_dir: str | None
    download: bool
    data_mirror: str | None
    model_dir: str
    backbone: str
    width_multiplier: float
    k: int
    m: int
    d: int
    alpha: float
    magnet_cap: bool
    L: int
    eval_L: int
    lr: float
    epochs: int | None
    steps_per_epoch: int | None
    refresh_every: int
    eval_batch_size: int
    seed: int
    strategy: str
    tpu: str | None
    lr_milestones: tuple
    lr_decay: float
    xent_lambda: float
    logits_xent_lambda: float
    consistency_lambda: float
    consistency: str
    consistency_eps: float
    consistency_step: float
    init_checkpoint: str | None
    mixed_precision: bool
    jit_compile: bool
    checkpoint_every_steps: int
    augment: bool
    export_dir: str | None = None
    method: str = "clustr"
    batch_size: int | None = None
    pgd_eps: float = 8.0 / 255.0
    pgd_step: float = 2.0 / 255.0
    pgd_iterations: int = 10
    time_budget_minutes: float | None = None
    cpu_budget_minutes: float | None = None
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0


def _folder_classes(name, data_dir):
    """The number of class folders of an image-folder dataset (imports TensorFlow)."""
    if not data_dir:
        raise ConfigError(f"--dataset={name} needs --data_dir (a folder or .tar.gz of split/class/image).")
    from clustr_tf import data

    try:
        return len(data.class_names(name, data_dir=data_dir))
    except (ValueError, data.DatasetNotFoundError) as e:
        raise ConfigError(f"{e}") from None


def _parse_milestones(text, epochs):
    if text == "auto":
        return tuple(sorted({max(1, round(epochs / 3)), max(1, round(2 * epochs / 3))}))
    if text in ("", "none"):
        return ()
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(
            f"--lr_milestones must be 'auto', 'none' or comma-separated epochs. Received: {text!r}"
        ) from None
    if any(v < 1 for v in values) or list(values) != sorted(set(values)):
        raise ConfigError(
            f"--lr_milestones must be increasing epochs >= 1. Received: {text!r}"
        )
    return values


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


def _check_export_dir(path):
    if not path:
        raise ConfigError("--export_dir must name a folder. Received: ''")
    from clustr_tf import serving

    try:
        serving.check_export_dir(path)
    except serving.ExportError as e:
        raise ConfigError(str(e)) from None


def config_from_flags(f):
    """Validates the flags and returns a frozen `Config`; raises `ConfigError`."""
    if f.dataset not in DATASET_CLASSES and f.dataset not in FOLDER_DATASETS:
        raise ConfigError(
            "Unknown --dataset. Expected one of "
            f"{', '.join(sorted(DATASET_CLASSES) + list(FOLDER_DATASETS))}. Received: {f.dataset!r}"
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
    if f.strategy not in STRATEGIES:
        raise ConfigError(
            f"Unknown --strategy. Expected one of {', '.join(STRATEGIES)}. Received: {f.strategy!r}"
        )
    for name in ("xent_lambda", "logits_xent_lambda", "consistency_lambda", "consistency_eps", "consistency_step"):
        if not getattr(f, name) >= 0:
            raise ConfigError(f"--{name} must be >= 0. Received: {getattr(f, name)}")
    if f.consistency not in CONSISTENCY_FORMS:
        raise ConfigError(f"Unknown --consistency. Expected one of {', '.join(CONSISTENCY_FORMS)}. "
                          f"Received: {f.consistency!r}")
    if f.method not in METHODS:
        raise ConfigError(f"Unknown --method. Expected one of {', '.join(METHODS)}. Received: {f.method!r}")
    if f.method != "clustr":
        for name in ("xent_lambda", "logits_xent_lambda", "consistency_lambda"):
            if getattr(f, name):
                raise ConfigError(f"--{name} applies to --method=clustr only. Received: --method={f.method} "
                                  f"--{name}={getattr(f, name)}")
        if f.export_dir is not None:
            raise ConfigError(f"--export_dir exports ClusTR models only (the signatures need centers). "
                              f"Received: --method={f.method}")
    if f.optimizer not in ("adam", "sgd"):
        raise ConfigError(f"Unknown --optimizer. Expected adam or sgd. Received: {f.optimizer!r}")
    if not 0 <= f.momentum < 1 or not f.weight_decay >= 0:
        raise ConfigError(f"--momentum must be in [0, 1) and --weight_decay >= 0. Received: {f.momentum}, "
                          f"{f.weight_decay}")
    for name in ("time_budget_minutes", "cpu_budget_minutes"):
        if getattr(f, name) is not None and not getattr(f, name) > 0:
            raise ConfigError(f"--{name} must be > 0. Received: {getattr(f, name)}")
    if f.data_mirror is not None and not f.data_mirror.startswith(("http://", "https://", "ftp://")):
        raise ConfigError(f"--data_mirror must be an http, https or ftp URL. Received: {f.data_mirror!r}")
    if f.batch_size is not None and f.batch_size < 1:
        raise ConfigError(f"--batch_size must be >= 1. Received: {f.batch_size}")
    if not 0 < f.pgd_step <= f.pgd_eps <= 255 or f.pgd_iterations < 1:
        raise ConfigError("--pgd_eps, --pgd_step must satisfy 0 < step <= eps <= 255 (1/255 units) and "
                          f"--pgd_iterations >= 1. Received: {f.pgd_eps}, {f.pgd_step}, {f.pgd_iterations}")
    if f.checkpoint_every_steps < 0:
        raise ConfigError(f"--checkpoint_every_steps must be >= 0. Received: {f.checkpoint_every_steps}")
    if not 0 < f.lr_decay <= 1:
        raise ConfigError(f"--lr_decay must be in (0, 1]. Received: {f.lr_decay}")
    if f.init_checkpoint is not None and not os.path.exists(f.init_checkpoint):
        raise ConfigError(f"--init_checkpoint does not exist. Received: {f.init_checkpoint}")
    epochs = f.epochs or (40 if f.dataset == "digits" else 90)
    milestones = _parse_milestones(
        f.lr_milestones or ("none" if f.dataset == "digits" else "auto"), epochs
    )
    if not f.lr > 0:
        raise ConfigError(f"--lr must be > 0. Received: {f.lr}")
    if not f.alpha >= 0:
        raise ConfigError(f"--alpha must be >= 0. Received: {f.alpha}")
    if not f.width_multiplier > 0:
        raise ConfigError(f"--width_multiplier must be > 0. Received: {f.width_multiplier}")
    classes = DATASET_CLASSES.get(f.dataset) or _folder_classes(f.dataset, f.data_dir)
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
    if f.export_dir is not None:
        _check_export_dir(f.export_dir)
    return Config(
        dataset=f.dataset,
        data_dir=f.data_dir,
        download=f.download,
        data_mirror=f.data_mirror,
        model_dir=model_dir,
        backbone=f.backbone,
        width_multiplier=f.width_multiplier,
        k=f.k,
        m=f.m,
        d=f.d,
        alpha=f.alpha,
        magnet_cap=f.magnet_cap,
        L=f.L,
        eval_L=eval_l,
        lr=f.lr,
        epochs=epochs,
        steps_per_epoch=f.steps_per_epoch,
        refresh_every=f.refresh_every,
        eval_batch_size=f.eval_batch_size,
        seed=f.seed,
        strategy=f.strategy,
        tpu=f.tpu,
        lr_milestones=milestones,
        lr_decay=f.lr_decay,
        xent_lambda=f.xent_lambda,
        logits_xent_lambda=f.logits_xent_lambda,
        consistency_lambda=f.consistency_lambda,
        consistency=f.consistency,
        consistency_eps=f.consistency_eps / 255.0,
        consistency_step=f.consistency_step / 255.0,
        init_checkpoint=f.init_checkpoint,
        mixed_precision=f.mixed_precision,
        jit_compile=f.jit_compile,
        checkpoint_every_steps=f.checkpoint_every_steps,
        augment=f.augment,
        export_dir=f.export_dir,
        method=f.method,
        batch_size=f.batch_size or f.m * f.d,
        pgd_eps=f.pgd_eps / 255.0,
        pgd_step=f.pgd_step / 255.0,
        pgd_iterations=f.pgd_iterations,
        time_budget_minutes=f.time_budget_minutes,
        cpu_budget_minutes=f.cpu_budget_minutes,
        optimizer=f.optimizer,
        momentum=f.momentum,
        weight_decay=f.weight_decay,
    )


def build_backbone(config, info):
    """The feature extractor for a config and a `clustr_tf.data.DatasetInfo`."""
    from clustr_tf import backbones

    name = config.backbone
    if name == "auto":
        name = "convnet" if config.dataset == "digits" else "resnet18"
    kwargs = {"width_multiplier": config.width_multiplier} if name == "resnet18" else {}
    return backbones.get_backbone(name, info.image_shape, mean=info.mean, std=info.std, **kwargs)


def train_config(config, steps_per_epoch=1):
    """The `training.TrainConfig` of a config (the loop's settings and the method's)."""
    from clustr_tf import losses
    from clustr_tf import training

    return training.TrainConfig(
        epochs=config.epochs,
        steps_per_epoch=steps_per_epoch,
        alpha=config.alpha,
        magnet_epsilon=losses.OFFICIAL_EPSILON if config.magnet_cap else None,
        xent_lambda=config.xent_lambda,
        logits_xent_lambda=config.logits_xent_lambda,
        consistency_lambda=config.consistency_lambda,
        consistency=config.consistency,
        consistency_eps=config.consistency_eps,
        consistency_step=config.consistency_step,
        refresh_every=config.refresh_every,
        eval_neighbours=config.eval_L,
        eval_batch_size=config.eval_batch_size,
        checkpoint_every_steps=config.checkpoint_every_steps,
        jit_compile=config.jit_compile,
        seed=config.seed,
        method=config.method,
        pgd_eps=config.pgd_eps,
        pgd_step=config.pgd_step,
        pgd_iterations=config.pgd_iterations,
        time_budget_seconds=config.time_budget_minutes * 60 if config.time_budget_minutes else None,
        cpu_budget_seconds=config.cpu_budget_minutes * 60 if config.cpu_budget_minutes else None,
    )


def _load_init_checkpoint(model, path):
    """Starts `model` from a saved model: a .keras file, or a run directory's model.keras.

    The backbone's weights (batch-norm statistics included) carry over from a ClusTR model
    or a softmax classifier (cross-entropy, PGD-AT). Cluster centers and variance are not
    copied: the cluster refresh before the first step computes them on the copied
    backbone's features. A linear head carries over to a softmax classifier of the same
    shape and is dropped otherwise (a ClusTR run from a cross-entropy network, as the
    official ClusTR+QTRADES recipe starts).
    """
    import keras

    if os.path.isdir(path):
        path = os.path.join(path, "model.keras")
    if not os.path.isfile(path):
        raise ConfigError(f"--init_checkpoint must be a .keras model or a run directory holding model.keras "
                          f"(a finished run). Received: {path}")
    try:
        source = keras.saving.load_model(path)
    except Exception as e:  # noqa: BLE001: any load failure becomes one clear message
        raise ConfigError(f"--init_checkpoint cannot be loaded ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}). Received: {path}") from None
    backbone = getattr(source, "backbone", None)
    if not isinstance(backbone, keras.layers.Layer):
        raise ConfigError(f"--init_checkpoint must be a ClusTR model or a softmax classifier (a model with a "
                          f"backbone). Received: {type(source).__name__} from {path}")
    ours, theirs = model.backbone.weights, backbone.weights
    mismatch = next((f"{a.path} is {tuple(a.shape)} here and {tuple(b.shape)} there"
                     for a, b in zip(ours, theirs) if tuple(a.shape) != tuple(b.shape)), None)
    if mismatch is None and len(ours) != len(theirs):
        mismatch = f"{len(ours)} backbone weights here, {len(theirs)} there"
    if mismatch:
        raise ConfigError(f"--init_checkpoint's backbone does not fit this run's ({mismatch}; check --backbone, "
                          f"--width_multiplier, --dataset). Received: {path}")
    model.backbone.set_weights(backbone.get_weights())
    head, source_head = getattr(model, "head", None), getattr(source, "head", None)
    copied = "backbone"
    if head is not None and source_head is not None and [tuple(w.shape) for w in head.weights] == [
            tuple(w.shape) for w in source_head.weights]:
        head.set_weights(source_head.get_weights())
        copied = "backbone and linear head"
    logging.info("Initialised the %s from %s (%s)", copied, path, type(source).__name__)


def train_and_evaluate(config):
    """Runs training and evaluation; returns the metrics dict written to metrics.json."""
    import keras
    import tensorflow as tf

    from clustr_tf import data
    from clustr_tf import distribute
    from clustr_tf import models
    from clustr_tf import objectives
    from clustr_tf import training

    keras.utils.set_random_seed(config.seed)
    if config.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    start = time.time()
    strategy = distribute.get_strategy(config.strategy, config.tpu)
    logging.info("Strategy %s with %d replicas", type(strategy).__name__, strategy.num_replicas_in_sync)
    info = data.info(config.dataset, data_dir=config.data_dir)
    images, labels = data.load_arrays(
        config.dataset, "train", data_dir=config.data_dir, download=config.download,
        dtype="float32" if config.dataset == "digits" else "uint8", mirror=config.data_mirror,
    )
    logging.info("%s: %d training images of shape %s", config.dataset, len(images), images.shape[1:])
    loop = train_config(config)
    objective = objectives.from_train_config(loop, clusters_per_class=config.k, neighbours=config.L, m=config.m,
                                             d=config.d)
    sampler = objective.batches(images, labels, info.num_classes, seed=config.seed, batch_size=config.batch_size)
    del images
    replicas = strategy.num_replicas_in_sync
    steps = config.steps_per_epoch or max(1, math.ceil(len(labels) / (sampler.batch_size * replicas)))
    with strategy.scope():
        model = objective.build_model(build_backbone(config, info), info.num_classes)
        if config.init_checkpoint:
            _load_init_checkpoint(model, config.init_checkpoint)
        learning_rate = config.lr
        if config.lr_milestones:
            learning_rate = keras.optimizers.schedules.PiecewiseConstantDecay(
                [m * steps for m in config.lr_milestones],
                [config.lr * config.lr_decay**i for i in range(len(config.lr_milestones) + 1)],
            )
        decay = {"weight_decay": config.weight_decay} if config.weight_decay else {}
        if config.optimizer == "sgd":
            optimizer = keras.optimizers.SGD(learning_rate, momentum=config.momentum, **decay)
        else:
            optimizer = keras.optimizers.Adam(learning_rate, **decay)
        if config.mixed_precision:
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    test = data.load(config.dataset, "test", data_dir=config.data_dir, download=config.download,
                     mirror=config.data_mirror)
    trainer = training.Trainer(
        model, optimizer, sampler, strategy, config.model_dir,
        dataclasses.replace(loop, steps_per_epoch=steps),
        test_dataset=test,
        augment=data.augmentation(config.dataset) if config.augment else None,
        objective=objective,
    )
    trainer.train()
    train_seconds = time.time() - start
    metrics = models.evaluate_accuracy(
        model, test, neighbours=config.eval_L, batch_size=config.eval_batch_size,
        predict_fn=trainer.predict_fn,
    )
    if model.certified_rule != "nearest center":  # a linear head: one decision rule
        metrics.update({"nearest_center_accuracy": None, "agreement": None})
    metrics.update(
        {
            "split": "test",
            "dataset": config.dataset,
            "method": config.method,
            "eval_L": config.eval_L,
            "epochs": config.epochs,
            "epochs_trained": int(trainer.epoch.numpy()),
            "train_time_seconds": round(float(trainer.elapsed.numpy()), 2),
            "train_cpu_seconds": round(float(trainer.elapsed_cpu.numpy()), 2),
            "steps_per_epoch": steps,
            "replicas": replicas,
            "train_seconds": round(train_seconds, 2),
            "total_seconds": round(time.time() - start, 2),
        }
    )
    if trainer.is_chief:
        model.save(os.path.join(config.model_dir, "model.keras"))
        with open(os.path.join(config.model_dir, "metrics.json"), "w") as fh:
            json.dump(metrics, fh, indent=2)
        if config.export_dir:
            from clustr_tf import serving

            try:
                path = serving.export(model, config.export_dir, neighbours=config.eval_L)
            except serving.ExportError as e:
                raise ConfigError(f"--export_dir: {e}") from None
            logging.info("Exported the SavedModel for TF Serving to %s", path)
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
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    from clustr_tf import data
    from clustr_tf import training

    try:
        metrics = train_and_evaluate(config)
    except ConfigError as e:  # a flag value that cannot work (e.g. --init_checkpoint)
        sys.stderr.write(f"main.py: error: {e}\n")
        sys.exit(2)
    except (data.DatasetNotFoundError, data.CorruptDatasetError, training.RestoreError) as e:
        sys.stderr.write(f"main.py: error: {e}\n")
        sys.exit(1)
    logging.info("Run directory: %s", config.model_dir)
    logging.info("Test metrics: %s", json.dumps(metrics))


def console_main():
    """The `clustr-train` command of the pip package (pyproject.toml)."""
    from clustr_tf import cli

    cli.start(main, define_flags, __name__)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    define_flags()
    app.run(main)
