"""A run's configuration: nested by concern, frozen, and checked when it is built.

    config = RunConfig(data=Data(dataset="cifar10", data_dir="cifar-10-python.tar.gz"),
                       objective=Objective(consistency_lambda=8.0),
                       runtime=Runtime(epochs=25, init_checkpoint="runs/xent"))
    metrics = clustr_tf.training.run(config)

Five sections, each a frozen dataclass that checks its own settings: `Data` (what to train
on), `Model` (the backbone and the ClusTR head), `Objective` (the training method and its
terms), `Optimizer` and `Runtime` (epochs, budgets, distribution, where the run goes).
`RunConfig` checks what they must agree on (the neighbourhood batch size m and the head's L
against the dataset's classes, the method's terms) and fills in the defaults that depend on
others (epochs, the learning rate and its milestones, the evaluation L, the baselines' batch
size, the run directory).

A field is declared once, with its flag's `help` text in its metadata: `clustr_tf.config_flags`
generates `training/main.py`'s flags from the fields (`k`, `m`, `L`, ...; perturbation sizes in
pixel units here, their flags, `flag_scale` metadata, in 1/255). A setting that cannot work
raises `ConfigError`, naming it in backticks with what was received (`` `m` must be >= 1.
Received: 0``); the binary prints it with `--m`. `RunConfig.flat()` is a run's config.json.
"""

import dataclasses
import datetime
import math
import os
import re

from clustr_tf import checks

# The defaults and choices (official ClusTR settings and the library's), written once.
from clustr_tf.defaults import *  # noqa: E402,F401,F403

def default_learning_rate(dataset, backbone):
    """The learning rate of a run that sets none."""
    return LEARNING_RATES.get((dataset, backbone), LEARNING_RATE)


def _rate(value):
    return f"{value:.0e}".replace("e-0", "e-")  # 0.0001 -> "1e-4"


class ConfigError(ValueError):
    """A setting that cannot work; the message names it (in backticks) and what was received."""

    def as_flags(self):
        """The message with each `name` written as the flag --name."""
        return re.sub(r"`([A-Za-z_]\w*)`", r"--\1", str(self))


def _fail(message):
    raise ConfigError(message)


def _positive_int(name, value, optional=False):
    checks.positive_int(name, value, ConfigError, optional)


def _non_negative(name, value):
    checks.non_negative(name, value, ConfigError)


def _choice(name, value, choices):
    checks.one_of(name, value, choices, ConfigError)


def setting(default, help_text, **flag):
    """A field with its flag's `help` text (and `flag_scale`, `flag_type`) in its metadata."""
    return dataclasses.field(default=default, metadata={"help": help_text, **flag})


@dataclasses.dataclass(frozen=True)
class Data:
    """What to train on (each field's meaning: its `help` metadata)."""

    dataset: str = setting("digits", f"One of {sorted(DATASET_CLASSES) + list(FOLDER_DATASETS)}.")
    data_dir: str | None = setting(
        None, "Where the data is: an original release (CIFAR's python or binary tarball or folder, SVHN's .mat files), "
        "an image folder or .tar.gz (split/class/image), or a TFDS data_dir (docs/training.md, Data).")
    download: bool = setting(True, "Download a TFDS dataset missing from --data_dir.")
    data_mirror: str | None = setting(
        None, "Download the original release files from this URL (URL/<file name>) instead of their publishers' "
        "sites; each must match TFDS's registered checksum.")
    augment: bool = setting(True, "Official augmentation (crop + flip) for CIFAR.")
    holdout_examples: int = setting(
        0, "Hold out this many training examples (one fixed seeded choice, clustr_tf.data.split_holdout) and train "
        "on the rest, to tune settings on them instead of on the test split. 0: train on all.")

    def __post_init__(self):
        _choice("dataset", self.dataset, sorted(DATASET_CLASSES) + list(FOLDER_DATASETS))
        if self.dataset in FOLDER_DATASETS and not self.data_dir:
            _fail(f"`dataset`={self.dataset} needs `data_dir` (a folder or .tar.gz of split/class/image).")
        if isinstance(self.holdout_examples, bool) or not isinstance(self.holdout_examples, int) \
                or self.holdout_examples < 0:
            _fail(f"`holdout_examples` must be an int >= 0. Received: {self.holdout_examples!r}")
        if self.data_mirror is not None and not str(self.data_mirror).startswith(("http://", "https://", "ftp://")):
            _fail(f"`data_mirror` must be an http, https or ftp URL. Received: {self.data_mirror!r}")


@dataclasses.dataclass(frozen=True)
class Model:
    """The feature extractor and the ClusTR head (each field's meaning: its `help` metadata)."""

    backbone: str = setting(
        "auto", "convnet, resnet18, lipschitz (1-Lipschitz by construction: AOL convolutions, MaxMin; for "
        "--certified_margin), or auto (convnet for digits, else resnet18).")
    width_multiplier: float = setting(1.0, "Width multiplier of resnet18 or lipschitz.")
    k: int = setting(CLUSTERS_PER_CLASS, "Clusters per class K.")
    L: int = setting(NEIGHBOURS, "Nearest clusters of the soft-kNC rule in training.")
    eval_L: int | None = setting(None, f"Nearest clusters at evaluation. Default: min({EVAL_NEIGHBOURS}, C*K).")

    def __post_init__(self):
        _choice("backbone", self.backbone, BACKBONES)
        if not self.width_multiplier > 0:
            _fail(f"`width_multiplier` must be > 0. Received: {self.width_multiplier!r}")
        _positive_int("k", self.k)
        _positive_int("L", self.L)
        _positive_int("eval_L", self.eval_L, optional=True)


@dataclasses.dataclass(frozen=True)
class Objective:
    """The training method (`clustr_tf.objectives`) and its settings (each field's meaning: its
    `help` metadata; perturbation sizes in pixel units, their flags in 1/255)."""

    method: str = setting(
        "clustr", f"clustr (magnet loss; add --consistency_lambda={QTRADES_LAMBDA:g} for ClusTR+QTRADES), or a "
        "baseline with a linear head: cross_entropy, or pgd_at (Madry et al. adversarial training).")
    m: int = setting(CLUSTERS_PER_BATCH, "Clusters per neighbourhood batch.")
    d: int = setting(EXAMPLES_PER_CLUSTER, "Examples drawn from each cluster of a batch.")
    alpha: float = setting(MAGNET_ALPHA, "Magnet loss margin.")
    magnet_cap: bool = setting(False, "The official magnet loss, capped at -log(1e-8) = 18.42 per example "
                               "(relu(-log(num / (den + 1e-8) + 1e-8))); default: uncapped.")
    xent_lambda: float = setting(0.0, "Weight of the official cross-entropy term: cross-entropy with the raw "
                                 "soft-kNC scores S as logits.")
    logits_xent_lambda: float = setting(0.0, "Weight of a cross-entropy on the log-scores log S (-log p of the "
                                        "label; not the official term).")
    consistency_lambda: float = setting(
        0.0, f"ClusTR+QTRADES: weight of the consistency term (official {QTRADES_LAMBDA:g}).")
    consistency: str = setting(
        "official", "Form of the consistency term: official (the paper's: cross-entropy between the clean soft-kNC "
        "probabilities and softmax(S(x_adv)), S the raw scores) or kl (TRADES-style KL(p(x) || p(x_adv)), not the "
        "paper's).")
    consistency_eps: float = setting(QTRADES_EPS, "QTRADES l_inf radius, in 1/255 units.", flag_scale=255)
    consistency_step: float = setting(QTRADES_STEP, "QTRADES step size, in 1/255 units.", flag_scale=255)
    refresh_every: int = setting(1, "Re-cluster after every this many epochs.")
    batch_size: int | None = setting(
        None, f"Batch size per replica of the baselines and certified ClusTR (shuffled batches). Default: m * d "
        f"({CLUSTERS_PER_BATCH * EXAMPLES_PER_CLUSTER}).")
    pgd_eps: float = setting(PGD_EPS, "pgd_at training attack l_inf radius, in 1/255 units.", flag_scale=255)
    pgd_step: float = setting(PGD_STEP, "pgd_at training attack step, in 1/255 units.", flag_scale=255)
    pgd_iterations: int = setting(PGD_ITERATIONS, "pgd_at training attack steps.")
    certified_margin: float = setting(
        0.0, "Certified training: the l2 radius (pixel units) to train for. clustr: certified ClusTR (trainable "
        "centers, cross-entropy on the certificate's logits at that radius); cross_entropy: Lipschitz-margin "
        "cross-entropy. Needs --backbone=lipschitz. 0: off.")
    temperature: float | None = setting(
        None, f"Certified training: temperature T of the cross-entropy (logits / T). Default: {CERTIFIED_TEMPERATURE:g} "
        "for clustr, 1 for cross_entropy.")

    def __post_init__(self):
        _choice("method", self.method, METHODS)
        margin = checks.l2_radius("certified_margin", self.certified_margin, ConfigError)
        if margin and self.method == "pgd_at":
            _fail("`certified_margin` applies to `method`=clustr (certified ClusTR) or cross_entropy (the "
                  f"Lipschitz-margin baseline). Received: `method`=pgd_at `certified_margin`={margin}")
        if self.temperature is not None and not (self.temperature > 0 and math.isfinite(self.temperature)):
            _fail(f"`temperature` must be a finite number > 0. Received: {self.temperature!r}")
        if self.temperature is not None and not margin:
            _fail(f"`temperature` applies to certified training only (`certified_margin` > 0). Received: "
                  f"`temperature`={self.temperature}")
        if margin and self.method == "clustr":
            for name in ("xent_lambda", "logits_xent_lambda", "consistency_lambda"):
                if getattr(self, name):
                    _fail(f"`{name}` applies to ClusTR's magnet loss, not to certified ClusTR (`certified_margin` "
                          f"> 0). Received: `{name}`={getattr(self, name)}")
        for name in ("m", "d", "refresh_every", "pgd_iterations"):
            _positive_int(name, getattr(self, name))
        _positive_int("batch_size", self.batch_size, optional=True)
        for name in ("alpha", "xent_lambda", "logits_xent_lambda", "consistency_lambda", "consistency_eps",
                     "consistency_step"):
            _non_negative(name, getattr(self, name))
        _choice("consistency", self.consistency, CONSISTENCY_FORMS)
        if not 0 < self.pgd_step <= self.pgd_eps <= 1:
            _fail(f"`pgd_eps` and `pgd_step` must satisfy 0 < step <= eps <= 1 (pixel units). Received: "
                  f"{self.pgd_eps!r}, {self.pgd_step!r}")
        if self.method != "clustr":
            for name in ("xent_lambda", "logits_xent_lambda", "consistency_lambda"):
                if getattr(self, name):
                    _fail(f"`{name}` applies to `method`=clustr only. Received: `method`={self.method} "
                          f"`{name}`={getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """The optimizer and its learning-rate schedule (each field's meaning: its `help` metadata;
    `lr_milestones` also takes a tuple of epochs)."""

    optimizer: str = setting("adam", "adam (the official ClusTR optimizer) or sgd (with --momentum, Nesterov off; "
                             "the usual recipe for the cross-entropy and PGD-AT baselines).")
    lr: float | None = setting(None, f"Learning rate. Default: {_rate(LEARNING_RATE)} (the official ClusTR rate); "
                               f"{_rate(LEARNING_RATES['digits', 'lipschitz'])} for --backbone=lipschitz on digits.")
    momentum: float = setting(0.9, "SGD momentum.")
    weight_decay: float = setting(0.0, "Decoupled weight decay (Keras `weight_decay`), e.g. 5e-4 with sgd.")
    lr_milestones: str | tuple | None = setting(
        None, "Comma-separated epochs where the learning rate is multiplied by --lr_decay; auto = at 1/3 and 2/3 of "
        "--epochs (official: 30,60 of 90); none = constant. Default: none for digits, auto otherwise.", flag_type=str)
    lr_decay: float = setting(0.1, "Learning-rate factor at each milestone.")
    lr_schedule: str = setting(
        "milestones", "milestones (--lr_milestones, --lr_decay) or cosine: from --lr down to 0 at the end of the run, "
        "the end being --cpu_budget_minutes when set (or --lr_horizon_cpu_minutes), else --time_budget_minutes, else "
        "--epochs.")
    lr_horizon_cpu_minutes: float | None = setting(
        None, "--lr_schedule=cosine: the CPU minutes it anneals over, for a run trained in parts (each part with a "
        "larger --cpu_budget_minutes). Default: --cpu_budget_minutes.")

    def __post_init__(self):
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.lr is not None and not self.lr > 0:
            _fail(f"`lr` must be > 0. Received: {self.lr!r}")
        if not 0 <= self.momentum < 1 or not self.weight_decay >= 0:
            _fail(f"`momentum` must be in [0, 1) and `weight_decay` >= 0. Received: {self.momentum!r}, "
                  f"{self.weight_decay!r}")
        if not 0 < self.lr_decay <= 1:
            _fail(f"`lr_decay` must be in (0, 1]. Received: {self.lr_decay!r}")
        _choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if self.lr_horizon_cpu_minutes is not None and not self.lr_horizon_cpu_minutes > 0:
            _fail(f"`lr_horizon_cpu_minutes` must be > 0. Received: {self.lr_horizon_cpu_minutes!r}")
        milestones = self.lr_milestones
        if isinstance(milestones, str) and milestones not in ("auto", "none", ""):
            try:
                milestones = tuple(int(v) for v in milestones.split(","))
            except ValueError:
                _fail(f"`lr_milestones` must be 'auto', 'none' or comma-separated epochs. Received: {milestones!r}")
        if isinstance(milestones, (tuple, list)):
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in milestones) \
                    or list(milestones) != sorted(set(milestones)):
                _fail(f"`lr_milestones` must be increasing epochs >= 1. Received: {self.lr_milestones!r}")
            milestones = tuple(milestones)
        object.__setattr__(self, "lr_milestones", milestones)

    def milestones(self, epochs, dataset):
        """The milestone epochs (a tuple) of a run of `epochs` on `dataset` (none with
        `lr_schedule`=cosine)."""
        value = self.lr_milestones
        if self.lr_schedule == "cosine":
            if value not in (None, "none", "", ()):
                _fail(f"`lr_milestones` applies to `lr_schedule`=milestones. Received: `lr_schedule`=cosine "
                      f"`lr_milestones`={value!r}")
            return ()
        if value is None:
            value = "none" if dataset == "digits" else "auto"
        if value == "auto":
            return tuple(sorted({max(1, round(epochs / 3)), max(1, round(2 * epochs / 3))}))
        return () if value in ("none", "") else tuple(value)


@dataclasses.dataclass(frozen=True)
class Runtime:
    """How long, where and on what the run goes (each field's meaning: its `help` metadata;
    `mixed_precision` True means "float16", the former boolean)."""

    model_dir: str | None = setting(None, "Run directory. Default: runs/<dataset>-<time>.")
    epochs: int | None = setting(None, "Epochs. Default: " + ", ".join(
        f"{epochs} for {dataset}" for dataset, epochs in DATASET_EPOCHS.items()) + f", {EPOCHS} otherwise.")
    steps_per_epoch: int | None = setting(None, "Batches per epoch. Default: training examples / (m*d).")
    eval_batch_size: int = setting(256, "Batch size of embedding and evaluation.")
    seed: int = setting(0, "Random seed.")
    strategy: str = setting("auto", "auto, default, mirrored, multi_worker (TF_CONFIG) or tpu.")
    tpu: str | None = setting(None, "TPU name or address for --strategy=tpu.")
    mixed_precision: str | None = setting(
        None, "Backbone compute precision: float16 (mixed_float16 with loss scaling, for GPUs) or bfloat16 "
        "(mixed_bfloat16: A100/H100-class GPUs, TPUs, CPUs with AVX512-BF16 or AMX). The heads, losses and "
        "distances stay float32. Default: float32. The bare flag means float16 (as when it was a boolean).")
    jit_compile: bool = setting(False, "Compile the training step with XLA (accelerators).")
    checkpoint_every_steps: int = setting(100, "Save the training state this often (and every epoch).")
    time_budget_minutes: float | None = setting(
        None, "Stop after the epoch in which training time (summed over restarts) reaches this, even before --epochs.")
    cpu_budget_minutes: float | None = setting(
        None, "The same in CPU time of the process (all threads): one CPU budget for several methods, whatever "
        "else the machine runs.")
    init_checkpoint: str | None = setting(
        None, "A run directory (its model.keras) or a .keras model, ClusTR or cross-entropy, to start from: its "
        "backbone's weights carry over (the official ClusTR+QTRADES recipe starts from a cross-entropy network); "
        "the clusters are refreshed on them before the first step.")
    resume_checkpoint: str | None = setting(
        None, "Resume from this checkpoint of <model_dir>/checkpoints (e.g. ckpt-200, the one saved before a "
        "truncated latest) instead of the latest.")
    export_dir: str | None = setting(
        None, "Export the final model for TF Serving into <export_dir>/<next version>/ (export/export_model.py).")

    def __post_init__(self):
        _positive_int("epochs", self.epochs, optional=True)
        _positive_int("steps_per_epoch", self.steps_per_epoch, optional=True)
        _positive_int("eval_batch_size", self.eval_batch_size)
        _choice("strategy", self.strategy, STRATEGIES)
        # The former boolean: True was mixed_float16; False and "float32" are no mixed precision.
        mixed = self.mixed_precision
        if isinstance(mixed, bool) or mixed == "float32":
            mixed = "float16" if mixed is True else None
        if mixed is not None:
            _choice("mixed_precision", mixed, MIXED_PRECISIONS)
        object.__setattr__(self, "mixed_precision", mixed)
        if isinstance(self.checkpoint_every_steps, bool) or not isinstance(self.checkpoint_every_steps, int) \
                or self.checkpoint_every_steps < 0:
            _fail(f"`checkpoint_every_steps` must be >= 0. Received: {self.checkpoint_every_steps!r}")
        for name in ("time_budget_minutes", "cpu_budget_minutes"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                _fail(f"`{name}` must be > 0. Received: {value!r}")
        if self.export_dir is not None and not self.export_dir:
            _fail("`export_dir` must name a folder. Received: ''")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole run: the five sections, checked together (see the module docstring).

    After construction `runtime.epochs`, `runtime.model_dir`, `model.eval_L`,
    `objective.batch_size`, `optimizer.lr` and `optimizer.lr_milestones` hold their resolved values.
    """

    data: Data = dataclasses.field(default_factory=Data)
    model: Model = dataclasses.field(default_factory=Model)
    objective: Objective = dataclasses.field(default_factory=Objective)
    optimizer: Optimizer = dataclasses.field(default_factory=Optimizer)
    runtime: Runtime = dataclasses.field(default_factory=Runtime)

    def __post_init__(self):
        for name, kind in (("data", Data), ("model", Model), ("objective", Objective), ("optimizer", Optimizer),
                           ("runtime", Runtime)):
            if not isinstance(getattr(self, name), kind):
                _fail(f"`{name}` must be a config.{kind.__name__}. Received: {type(getattr(self, name)).__name__}")
        data, model, objective, runtime = self.data, self.model, self.objective, self.runtime
        classes = self.num_classes
        clusters = classes * model.k
        if objective.m > (classes - 1) * model.k + 1:
            _fail(f"`m` must be at most {(classes - 1) * model.k + 1}: a batch holds a seed cluster and m-1 "
                  f"clusters of other classes, and {data.dataset} with `k`={model.k} has {(classes - 1) * model.k} "
                  f"clusters of other classes. Received: `m`={objective.m}")
        if model.L > clusters:
            _fail(f"`L` must be at most the number of clusters, {clusters} ({classes} classes x `k`={model.k}). "
                  f"Received: `L`={model.L}")
        eval_l = model.eval_L if model.eval_L is not None else min(EVAL_NEIGHBOURS, clusters)
        if eval_l > clusters:
            _fail(f"`eval_L` must be at most the number of clusters, {clusters}. Received: {eval_l}")
        if objective.certified_margin and model.backbone not in EXACT_BOUND_BACKBONES:
            _fail(f"`certified_margin` needs a backbone whose Lipschitz bound is exact by construction, or the "
                  f"margin it trains for certifies nothing: pass `backbone`=lipschitz. (The bound of "
                  f"{model.backbone if model.backbone != 'auto' else 'the default backbone'} is a product of "
                  f"per-layer norms, 1e2 to 1e10 times too large.) Received: `backbone`={model.backbone}")
        epochs = runtime.epochs or DATASET_EPOCHS.get(data.dataset, EPOCHS)
        model_dir = runtime.model_dir or os.path.join(
            "runs", f"{data.dataset}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
        object.__setattr__(self, "model", dataclasses.replace(model, eval_L=eval_l))
        object.__setattr__(self, "objective", dataclasses.replace(
            objective, batch_size=objective.batch_size or objective.m * objective.d))
        lr = self.optimizer.lr
        if lr is None:
            lr = default_learning_rate(data.dataset, model.backbone)
        object.__setattr__(self, "optimizer", dataclasses.replace(
            self.optimizer, lr=lr, lr_milestones=self.optimizer.milestones(epochs, data.dataset)))
        object.__setattr__(self, "runtime", dataclasses.replace(runtime, epochs=epochs, model_dir=model_dir))

    @property
    def num_classes(self):
        """The dataset's number of classes (an image folder's: its class folders)."""
        if self.data.dataset in DATASET_CLASSES:
            return DATASET_CLASSES[self.data.dataset]
        from clustr_tf import data as data_lib  # reads the folder (imports TensorFlow)

        try:
            return len(data_lib.class_names(self.data.dataset, data_dir=self.data.data_dir))
        except (ValueError, data_lib.DatasetNotFoundError) as e:
            raise ConfigError(str(e)) from None

    def check_paths(self):
        """Checks what the run will read and write, before anything is: `data_dir` exists, the
        run directory is writable or can be made (nothing is created), `init_checkpoint` exists, `export_dir` can
        take a version."""
        if self.data.data_dir is not None and not os.path.exists(self.data.data_dir):
            _fail(f"`data_dir` does not exist. It must be an original release (CIFAR's python or binary tarball or "
                  f"folder, SVHN's .mat files), an image folder or .tar.gz (split/class/image), or a TFDS data_dir "
                  f"(create an empty folder to download a TFDS dataset into). Received: {self.data.data_dir}")
        path = self.runtime.model_dir
        checks.writable_dir("`model_dir`", path, ConfigError)
        if self.runtime.init_checkpoint is not None and not os.path.exists(self.runtime.init_checkpoint):
            _fail(f"`init_checkpoint` does not exist. Received: {self.runtime.init_checkpoint}")
        if self.runtime.export_dir is not None:  # (an empty one fails when Runtime is built)
            checks.writable_dir("`export_dir`", self.runtime.export_dir, ConfigError)

    def flat(self):
        """The run directory's config.json: every setting under its flag's name."""
        flat = {}
        for section in (self.data, self.model, self.objective, self.optimizer, self.runtime):
            flat.update(dataclasses.asdict(section))
        return flat
