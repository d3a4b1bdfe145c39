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
others (epochs, the learning-rate milestones, the evaluation L, the baselines' batch size,
the run directory).

Setting names are those of `training/main.py`'s flags (`k`, `m`, `L`, ...; perturbation
sizes here in pixel units, the flags' in 1/255). A setting that cannot work raises
`ConfigError`, whose message names it in backticks and says what was received
(`` `m` must be >= 1. Received: 0``); the binary prints the same message with `--m`.
`RunConfig.flat()` is the flat dict a run directory's config.json holds.
"""

import dataclasses
import datetime
import os
import re

from clustr_tf import checks

DATASET_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "svhn": 10}
# Datasets whose classes are read from data_dir (the sorted class folders).
FOLDER_DATASETS = ("image_folder",)
BACKBONES = ("auto", "convnet", "resnet18", "lipschitz")
# Backbones whose l2 Lipschitz bound is exact by construction (`lipschitz.construction_bound`).
EXACT_BOUND_BACKBONES = ("lipschitz",)
STRATEGIES = ("auto", "default", "mirrored", "multi_worker", "tpu")
METHODS = ("clustr", "cross_entropy", "pgd_at")
CONSISTENCY_FORMS = ("official", "kl")
OPTIMIZERS = ("adam", "sgd")
MIXED_PRECISIONS = ("float16", "bfloat16")


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


@dataclasses.dataclass(frozen=True)
class Data:
    """What to train on.

    Attributes:
        dataset: one of `DATASET_CLASSES` or `FOLDER_DATASETS`.
        data_dir: where the data lives (`clustr_tf.data.load`'s `data_dir`); required by
            image folders.
        download: let TFDS download a missing dataset.
        data_mirror: an http(s)/ftp URL TFDS downloads the original files from.
        augment: the official crop + flip for CIFAR and image folders.
    """

    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = True
    data_mirror: str | None = None
    augment: bool = True

    def __post_init__(self):
        _choice("dataset", self.dataset, sorted(DATASET_CLASSES) + list(FOLDER_DATASETS))
        if self.dataset in FOLDER_DATASETS and not self.data_dir:
            _fail(f"`dataset`={self.dataset} needs `data_dir` (a folder or .tar.gz of split/class/image).")
        if self.data_mirror is not None and not str(self.data_mirror).startswith(("http://", "https://", "ftp://")):
            _fail(f"`data_mirror` must be an http, https or ftp URL. Received: {self.data_mirror!r}")


@dataclasses.dataclass(frozen=True)
class Model:
    """The feature extractor and the ClusTR head.

    Attributes:
        backbone: "convnet", "resnet18", "lipschitz" (1-Lipschitz by construction, for
            certified training: `backbones.lipschitz_convnet`), or "auto" (convnet for
            digits, else resnet18).
        width_multiplier: the width of ResNet-18 or of the Lipschitz network.
        k: clusters per class K (official 2).
        L: nearest clusters of the soft-kNC rule in training (official 10).
        eval_L: nearest clusters at evaluation; None: min(20, C*K).
    """

    backbone: str = "auto"
    width_multiplier: float = 1.0
    k: int = 2
    L: int = 10
    eval_L: int | None = None

    def __post_init__(self):
        _choice("backbone", self.backbone, BACKBONES)
        if not self.width_multiplier > 0:
            _fail(f"`width_multiplier` must be > 0. Received: {self.width_multiplier!r}")
        _positive_int("k", self.k)
        _positive_int("L", self.L)
        _positive_int("eval_L", self.eval_L, optional=True)


@dataclasses.dataclass(frozen=True)
class Objective:
    """The training method (`clustr_tf.objectives`) and its settings.

    Attributes:
        method: "clustr", or a baseline with a linear head: "cross_entropy", "pgd_at".
        m, d: clusters per neighbourhood batch and examples per cluster (official 12, 20).
        alpha: the magnet loss margin (official 12.5).
        magnet_cap: the official magnet loss, capped at 18.42 nats per example.
        xent_lambda: the official cross-entropy term (raw scores S as logits).
        logits_xent_lambda: a cross-entropy on log S.
        consistency_lambda: the QTRADES term's weight (official 8).
        consistency: its form, "official" (the paper's) or "kl" (TRADES-style).
        consistency_eps, consistency_step: its perturbation, pixel units (8/255, 10/255).
        refresh_every: re-cluster after every this many epochs.
        batch_size: the baselines' batch per replica; None: m * d.
        pgd_eps, pgd_step, pgd_iterations: the pgd_at training attack (pixel units).
        certified_margin: an l2 radius in pixels that clustr (certified ClusTR) or
            cross_entropy (the Lipschitz-margin baseline) trains to certify; needs
            `backbone`=lipschitz. 0: off.
    """

    method: str = "clustr"
    m: int = 12
    d: int = 20
    alpha: float = 12.5
    magnet_cap: bool = False
    xent_lambda: float = 0.0
    logits_xent_lambda: float = 0.0
    consistency_lambda: float = 0.0
    consistency: str = "official"
    consistency_eps: float = 8.0 / 255.0
    consistency_step: float = 10.0 / 255.0
    refresh_every: int = 1
    batch_size: int | None = None
    pgd_eps: float = 8.0 / 255.0
    pgd_step: float = 2.0 / 255.0
    pgd_iterations: int = 10
    certified_margin: float = 0.0

    def __post_init__(self):
        _choice("method", self.method, METHODS)
        margin = checks.l2_radius("certified_margin", self.certified_margin, ConfigError)
        if margin and self.method == "pgd_at":
            _fail("`certified_margin` applies to `method`=clustr (certified ClusTR) or cross_entropy (the "
                  f"Lipschitz-margin baseline). Received: `method`=pgd_at `certified_margin`={margin}")
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
    """The optimizer and its learning-rate schedule.

    Attributes:
        optimizer: "adam" (the official ClusTR optimizer) or "sgd".
        lr: the learning rate; None: 1e-4 (the official ClusTR rate), or 1e-3 for
            `backbone`=lipschitz on digits (its small network trains slowly at 1e-4; on
            CIFAR-10 1e-3 can collapse it, so 1e-4 there).
        momentum: SGD's momentum.
        weight_decay: decoupled weight decay.
        lr_milestones: epochs where the rate is multiplied by `lr_decay`: a tuple, "auto"
            (1/3 and 2/3 of the epochs), "none", or None (none for digits, else auto).
        lr_decay: the factor at each milestone.
    """

    optimizer: str = "adam"
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_milestones: object = None
    lr_decay: float = 0.1

    def __post_init__(self):
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.lr is not None and not self.lr > 0:
            _fail(f"`lr` must be > 0. Received: {self.lr!r}")
        if not 0 <= self.momentum < 1 or not self.weight_decay >= 0:
            _fail(f"`momentum` must be in [0, 1) and `weight_decay` >= 0. Received: {self.momentum!r}, "
                  f"{self.weight_decay!r}")
        if not 0 < self.lr_decay <= 1:
            _fail(f"`lr_decay` must be in (0, 1]. Received: {self.lr_decay!r}")
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
        """The milestone epochs (a tuple) of a run of `epochs` on `dataset`."""
        value = self.lr_milestones
        if value is None:
            value = "none" if dataset == "digits" else "auto"
        if value == "auto":
            return tuple(sorted({max(1, round(epochs / 3)), max(1, round(2 * epochs / 3))}))
        return () if value in ("none", "") else tuple(value)


@dataclasses.dataclass(frozen=True)
class Runtime:
    """How long, where and on what the run goes.

    Attributes:
        model_dir: the run directory; None: runs/<dataset>-<time>.
        epochs: epochs; None: 40 for digits, 90 otherwise.
        steps_per_epoch: batches per epoch; None: training examples / (replicas x batch).
        eval_batch_size: batch size of embedding and evaluation passes.
        seed: the random seed.
        strategy: "auto", "default", "mirrored", "multi_worker" (TF_CONFIG) or "tpu".
        tpu: the TPU for `strategy`="tpu".
        mixed_precision: None (float32), "float16" (mixed_float16 with loss scaling, for
            GPUs) or "bfloat16" (mixed_bfloat16: recent GPUs, TPUs, CPUs with AVX512-BF16
            or AMX); the backbone only, the heads and losses stay float32
            (`clustr_tf.precision`). True means "float16" (the former boolean).
        jit_compile: compile the step with XLA.
        checkpoint_every_steps: save the training state this often (and every epoch).
        time_budget_minutes, cpu_budget_minutes: stop after the epoch in which training wall
            (or process CPU) time, over restarts, reaches it.
        init_checkpoint: a run directory or .keras model whose backbone to start from.
        export_dir: export the final model for TF Serving into <export_dir>/<version>/.
    """

    model_dir: str | None = None
    epochs: int | None = None
    steps_per_epoch: int | None = None
    eval_batch_size: int = 256
    seed: int = 0
    strategy: str = "auto"
    tpu: str | None = None
    mixed_precision: str | None = None
    jit_compile: bool = False
    checkpoint_every_steps: int = 100
    time_budget_minutes: float | None = None
    cpu_budget_minutes: float | None = None
    init_checkpoint: str | None = None
    export_dir: str | None = None

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
        eval_l = model.eval_L if model.eval_L is not None else min(20, clusters)
        if eval_l > clusters:
            _fail(f"`eval_L` must be at most the number of clusters, {clusters}. Received: {eval_l}")
        if objective.certified_margin and model.backbone not in EXACT_BOUND_BACKBONES:
            _fail(f"`certified_margin` needs a backbone whose Lipschitz bound is exact by construction, or the "
                  f"margin it trains for certifies nothing: pass `backbone`=lipschitz. (The bound of "
                  f"{model.backbone if model.backbone != 'auto' else 'the default backbone'} is a product of "
                  f"per-layer norms, 1e2 to 1e10 times too large.) Received: `backbone`={model.backbone}")
        if objective.method != "clustr" and runtime.export_dir is not None:
            _fail(f"`export_dir` exports ClusTR models only (the signatures need centers). Received: "
                  f"`method`={objective.method}")
        epochs = runtime.epochs or (40 if data.dataset == "digits" else 90)
        model_dir = runtime.model_dir or os.path.join(
            "runs", f"{data.dataset}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
        object.__setattr__(self, "model", dataclasses.replace(model, eval_L=eval_l))
        object.__setattr__(self, "objective", dataclasses.replace(
            objective, batch_size=objective.batch_size or objective.m * objective.d))
        lr = self.optimizer.lr
        if lr is None:
            lr = 1e-3 if data.dataset == "digits" and model.backbone == "lipschitz" else 1e-4
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
        """Checks what the run will read and write, before anything is: the run directory is
        writable (it is made), `init_checkpoint` exists, `export_dir` can take a version."""
        path = self.runtime.model_dir
        try:
            os.makedirs(path, exist_ok=True)
            probe = os.path.join(path, ".write_test")
            with open(probe, "w"):
                pass
            os.remove(probe)
        except OSError as e:
            _fail(f"`model_dir` is not a writable directory: {e.strerror or e}. Received: {path}")
        if self.runtime.init_checkpoint is not None and not os.path.exists(self.runtime.init_checkpoint):
            _fail(f"`init_checkpoint` does not exist. Received: {self.runtime.init_checkpoint}")
        if self.runtime.export_dir is not None:
            from clustr_tf import serving

            try:
                serving.check_export_dir(self.runtime.export_dir)
            except serving.ExportError as e:  # its message names --export_dir
                raise ConfigError(str(e)) from None

    def flat(self):
        """The run directory's config.json: every setting under its flag's name."""
        flat = {}
        for section in (self.data, self.model, self.objective, self.optimizer, self.runtime):
            flat.update(dataclasses.asdict(section))
        return flat
