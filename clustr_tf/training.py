"""The training loop on `strategy.run`: one code path from one CPU to many workers.

`Trainer` trains a model with a training objective (`clustr_tf.objectives`: ClusTR with
its optional consistency and cross-entropy terms, cross-entropy, PGD-AT) under any
`tf.distribute` strategy. The objective gives per-example losses and metrics for a batch;
the loop is the same for every objective:

- every replica trains on its own whole batch (for ClusTR a neighbourhood batch of m
  clusters x d examples), fed by `strategy.distribute_datasets_from_function`;
- the loss of each replica is divided by the global batch size
  (`tf.nn.compute_average_loss`), and Keras's optimizer sums the gradients over replicas,
  so R replicas on R batches make the update one replica makes on all of them;
- variables a replica assigns itself (batch-norm moving statistics, aggregation NONE)
  are averaged over replicas after each step, so every replica holds the same model;
- a `tf.train.CheckpointManager` saves model, optimizer, epoch and the batch source's
  state every `checkpoint_every_steps` steps and at the end of each epoch; a new `Trainer`
  on the same directory continues from there (after a kill, at most the steps since the
  last save are lost). Workers other than the chief save into their own folders.

What happens around the steps is Keras callbacks, in this order: the objective's own
(ClusTR's cluster refresh, which embeds the training set under the strategy so centers
agree everywhere), the test-split accuracy, the epoch timer, and on the chief the CSV log
(one row per epoch, each epoch exactly once across restarts), TensorBoard scalars and the
progress bar.

`run(config)` is a whole run from a `clustr_tf.config.RunConfig` (data, model, objective,
optimizer, runtime): the data, the objective's model and batches, the optimizer, the
`Trainer`, then the run directory's model.keras, metrics.json and, if asked, the export;
`training/main.py` is flags -> config -> `run`.

Reference:
    Alfarra et al., "Rethinking Clustering for Robustness", BMVC 2021 (ClusTR+QTRADES);
    Zhang et al., "Theoretically Principled Trade-off between Robustness and Accuracy",
    ICML 2019 (TRADES).
"""

import csv
import dataclasses
import json
import math
import os
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from clustr_tf import backbones
from clustr_tf import data
from clustr_tf import distribute
from clustr_tf import losses
from clustr_tf import models
from clustr_tf import objectives
from clustr_tf import precision
from clustr_tf import serving
from clustr_tf import config as config_lib
from clustr_tf.config import ConfigError
from clustr_tf.config import RunConfig

CSV_NAME = "training_log.csv"
STATE_DIR = "checkpoints"


class RestoreError(RuntimeError):
    """The run directory holds a training state that cannot be restored (corrupt, or of
    another configuration)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What the loop needs to know (the model, data and optimizer come separately).

    Attributes:
        epochs: int, epochs to train in total (a resumed run stops at the same epoch).
        steps_per_epoch: int, steps per epoch (each step: one batch per replica).
        alpha: float, the magnet loss margin.
        magnet_epsilon: None (the uncapped magnet loss, the default), or the official
            code's epsilon, `losses.OFFICIAL_EPSILON` (each example's loss capped at 18.42).
        xent_lambda: float, weight of the official cross-entropy term: cross-entropy with
            the raw soft-kNC scores S (training L) as logits.
        logits_xent_lambda: float, weight of a cross-entropy on the log-scores log S (=
            -log p_y, the soft-kNC probability of the label): not the official term.
        consistency_lambda: float, weight of the QTRADES term (0: off; official 8).
        consistency: the form of that term, one of `objectives.CONSISTENCY_FORMS`: "official" (the
            paper's: cross-entropy between the clean soft-kNC probabilities p and
            softmax(S(x')), bounded) or "kl" (TRADES-style KL(p(x) || p(x')) between
            soft-kNC probabilities, not the paper's, unbounded).
        consistency_eps: float, l_inf radius of its perturbation (official 8/255).
        consistency_step: float, its signed-gradient step (official 10/255).
        refresh_every: int, re-cluster after every this many epochs.
        eval_neighbours: int or None, L of the soft-kNC rule in evaluation.
        eval_batch_size: int, batch size of embedding and evaluation passes.
        checkpoint_every_steps: int, save the training state this often (and at epoch
            ends); 0 saves at epoch ends only.
        jit_compile: bool, compile the step with XLA (for accelerators).
        seed: int.
        method: "clustr" (a `ClusTRModel` on neighbourhood batches), or a baseline on a
            `baselines.SoftmaxClassifier` and `baselines.BatchSource` batches:
            "cross_entropy", or "pgd_at" (Madry et al.: cross-entropy on PGD inputs).
        pgd_eps, pgd_step, pgd_iterations: the "pgd_at" training attack (Madry et al. on
            CIFAR-10: 8/255, 2/255, 7 to 10 steps).
        certified_margin: float, the l2 radius (pixels) certified training aims at, for
            "clustr" and "cross_entropy" on a Lipschitz-by-construction backbone; 0: off.
        time_budget_seconds: float or None; stop after the epoch in which the training time
            (wall clock, summed over restarts, saved in the checkpoint) reaches it, even
            before `epochs`.
        cpu_budget_seconds: float or None; the same in CPU time of this process (all its
            threads): the way to give several methods one CPU budget on a machine that
            also runs other work, since contention does not count against a method.
    """

    epochs: int
    steps_per_epoch: int
    alpha: float = 12.5
    magnet_epsilon: float | None = None
    xent_lambda: float = 0.0
    logits_xent_lambda: float = 0.0
    consistency_lambda: float = 0.0
    consistency: str = "official"
    consistency_eps: float = 8.0 / 255.0
    consistency_step: float = 10.0 / 255.0
    refresh_every: int = 1
    eval_neighbours: int | None = None
    eval_batch_size: int = 256
    checkpoint_every_steps: int = 100
    jit_compile: bool = False
    seed: int = 0
    method: str = "clustr"
    pgd_eps: float = 8.0 / 255.0
    pgd_step: float = 2.0 / 255.0
    pgd_iterations: int = 10
    certified_margin: float = 0.0
    time_budget_seconds: float | None = None
    cpu_budget_seconds: float | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"`method` must be one of {', '.join(METHODS)}. Received: {self.method!r}")
        if self.consistency not in objectives.CONSISTENCY_FORMS:
            raise ValueError(f"`consistency` must be one of {', '.join(objectives.CONSISTENCY_FORMS)}. "
                             f"Received: {self.consistency!r}")
        for name in ("xent_lambda", "logits_xent_lambda", "consistency_lambda"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"`{name}` must be >= 0. Received: {getattr(self, name)!r}")


METHODS = config_lib.METHODS


class ResumableCSVLogger(keras.callbacks.CSVLogger):
    """Keras's CSV logger, appending, that first drops the rows of the epochs a resumed
    run redoes, so that every epoch is in the file exactly once.

    Args:
        filename: the CSV file.
        first_epoch: the epoch the run starts (or resumes) at; rows of it and later go.
    """

    def __init__(self, filename, first_epoch=0):
        super().__init__(filename, append=True)
        self.first_epoch = first_epoch

    def on_train_begin(self, logs=None):
        if os.path.exists(self.filename):
            with open(self.filename, newline="") as fh:
                reader = csv.DictReader(fh)
                fieldnames = reader.fieldnames
                rows = [r for r in reader if int(r["epoch"]) < self.first_epoch]
            with open(self.filename, "w", newline="") as fh:
                if fieldnames and rows:
                    writer = csv.DictWriter(fh, fieldnames=fieldnames)
                    writer.writeheader()
                    writer.writerows(rows)
        super().on_train_begin(logs)


class TestAccuracy(keras.callbacks.Callback):
    """After each epoch, the accuracy of the model on a test dataset, under the names the
    objective gives (`objective.validation_metrics`)."""

    def __init__(self, dataset, predict_fn, names, neighbours=None, batch_size=256):
        super().__init__()
        self.dataset, self.predict_fn, self.names = dataset, predict_fn, names
        self.neighbours, self.batch_size = neighbours, batch_size

    def on_epoch_end(self, epoch, logs=None):
        result = models.evaluate_accuracy(self.model, self.dataset, self.neighbours, self.batch_size,
                                          predict_fn=self.predict_fn)
        logs.update({name: result[key] for name, key in self.names.items()})


class TensorBoardScalars(keras.callbacks.Callback):
    """Writes every epoch log as a TensorBoard scalar under `log_dir` (Keras's TensorBoard
    callback needs a compiled model's optimizer; this loop's model is not compiled)."""

    def __init__(self, log_dir):
        super().__init__()
        self.log_dir = log_dir
        self._writer = None

    def on_train_begin(self, logs=None):
        self._writer = tf.summary.create_file_writer(self.log_dir)

    def on_epoch_end(self, epoch, logs=None):
        with self._writer.as_default(step=epoch):
            for name, value in (logs or {}).items():
                tf.summary.scalar(name, value)
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()


class EpochTimer(keras.callbacks.Callback):
    """Adds the learning rate and the epoch's wall and CPU seconds (this process, all
    threads; the callbacks before it included) to the epoch's logs."""

    def __init__(self, optimizer):
        super().__init__()
        self.optimizer = optimizer

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._start_cpu = time.time(), time.process_time()

    def on_epoch_end(self, epoch, logs=None):
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.optimizer.learning_rate))
        logs["seconds"] = time.time() - self._start
        logs["cpu_seconds"] = time.process_time() - self._start_cpu


class _Callbacks:
    """Calls a hook on each callback in order, all on the same logs dict (so that what one
    adds, such as the refresh's variance, the next ones see and the loop gets back)."""

    def __init__(self, callbacks):
        self.callbacks = callbacks

    def __getattr__(self, hook):
        def call(*args, **kwargs):
            for callback in self.callbacks:
                getattr(callback, hook)(*args, **kwargs)
        return call


class Trainer:
    """Trains a model with a training objective under a `tf.distribute` strategy; see the
    module docstring.

    Build the model and the optimizer inside `strategy.scope()`; create the batch source
    outside it (its variables are plain CPU variables that each worker keeps).

    Args:
        model: the model, built: an instance of `objective.model_class`.
        optimizer: a Keras optimizer (a `LossScaleOptimizer` for a float16 backbone).
        sampler: the batch source `objective.batches` makes (a `NeighbourhoodSampler` for
            ClusTR, a `baselines.BatchSource` for the baselines).
        strategy: the `tf.distribute.Strategy` the model was built under.
        model_dir: the run directory (checkpoints, logs).
        config: a `TrainConfig`.
        test_dataset: optional unbatched `(image, label)` dataset evaluated after each
            epoch (`objective.validation_metrics`).
        augment: optional batch augmentation `augment(images, seed)`.
        verbose: 1 shows "Epoch i/n" and a Keras progress bar on the chief's stdout.
        objective: an `objectives.Objective`; default: the one `config.method` names.
        callbacks: more Keras callbacks, run after the objective's and the test accuracy.
    """

    def __init__(self, model, optimizer, sampler, strategy, model_dir, config,
                 test_dataset=None, augment=None, verbose=1, objective=None, callbacks=()):
        self.model = model
        self.optimizer = optimizer
        self.sampler = sampler
        self.strategy = strategy
        self.model_dir = model_dir
        self.config = config
        self.test_dataset = test_dataset
        self.augment = augment
        self.verbose = verbose
        self.objective = objective or objectives.from_train_config(config)
        self.extra_callbacks = list(callbacks)
        if not isinstance(model, self.objective.model_class):
            raise TypeError(f"{type(self.objective).__name__} trains a {self.objective.model_class.__name__}. "
                            f"Received: {type(model).__name__}")
        self.is_chief, self.worker_index, self.num_workers = distribute.worker_info(strategy)
        self.replicas = strategy.num_replicas_in_sync
        self.local_replicas = max(self.replicas // self.num_workers, 1)
        with strategy.scope():
            self.optimizer.build(model.trainable_variables)
            self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
            self.elapsed = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="elapsed")
            self.elapsed_cpu = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="elapsed_cpu")
        self._synced = [
            v for v in model.backbone.non_trainable_variables
            if getattr(v.value, "aggregation", None) == tf.VariableAggregation.NONE
        ]
        checkpoint = tf.train.Checkpoint(
            model=model, optimizer=optimizer, epoch=self.epoch, elapsed=self.elapsed,
            elapsed_cpu=self.elapsed_cpu,
            sampler=tf.train.Checkpoint(**sampler.state_variables()),
        )
        state_dir = os.path.join(model_dir, STATE_DIR)
        if not self.is_chief:  # each worker its own folder: no two writers collide
            state_dir = os.path.join(model_dir, "workers", f"worker_{self.worker_index}", STATE_DIR)
        self.checkpoint = checkpoint
        self.manager = tf.train.CheckpointManager(checkpoint, state_dir, max_to_keep=2)
        # Every worker restores from the chief's folder (a shared file system).
        self.restore_manager = tf.train.CheckpointManager(
            checkpoint, os.path.join(model_dir, STATE_DIR), max_to_keep=2
        )
        self._step_fn = None
        self._compute_fn = None
        self.predict_fn = model.prediction_function(config.eval_neighbours)

    # ---- state -------------------------------------------------------------------------

    def restore(self):
        """Restores the latest saved state, if any; returns True when it did."""
        path = self.restore_manager.latest_checkpoint
        if not path:
            return False
        try:
            self.checkpoint.restore(path).assert_existing_objects_matched()
        except (tf.errors.OpError, AssertionError, ValueError) as e:
            raise RestoreError(
                f"Cannot restore the training state from {path}: {type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}. The checkpoint is corrupt or "
                "belongs to another configuration; move it away or use another --model_dir."
            ) from None
        logging.info("Restored %s: epoch %d, step %d", path, int(self.epoch.numpy()),
                     int(self.optimizer.iterations.numpy()))
        return True

    def save(self):
        self.manager.save(checkpoint_number=int(self.optimizer.iterations.numpy()))

    # ---- the step ----------------------------------------------------------------------

    def _replica_step(self, images, targets):
        """One replica's training step; returns sums for the epoch's metrics."""
        if self._compute_fn is None:
            self._compute_fn = (
                tf.function(self._compute_step, jit_compile=True)
                if self.config.jit_compile else self._compute_step
            )
        sums, record = self._compute_fn(images, targets)
        # Outside the (possibly XLA-compiled) computation: the sampler's state is a
        # host variable.
        self.objective.record(self.sampler, targets, record)
        return sums

    def _attack_seed(self, ctx):
        """A stateless seed for this step's training attack, distinct per replica."""
        return tf.stack([
            tf.cast(self.config.seed, tf.int64),
            tf.cast(self.optimizer.iterations, tf.int64) * self.replicas
            + tf.cast(ctx.replica_id_in_sync_group, tf.int64),
        ])

    def _sync_replicas(self, ctx):
        """Averages the variables replicas assign themselves (BN moving statistics)."""
        if self.replicas > 1:
            for v in self._synced:
                v.assign(ctx.all_reduce(tf.distribute.ReduceOp.MEAN, tf.identity(v.value)))

    def _compute_step(self, images, targets):
        """The one gradient step of every objective: returns the batch's metric sums and
        the objective's per-example record."""
        model = self.model
        ctx = tf.distribute.get_replica_context()
        with tf.GradientTape() as tape:
            result = self.objective.losses(model, images, targets, self._attack_seed(ctx))
            loss = tf.nn.compute_average_loss(result.losses)
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
            scaled = self.optimizer.scale_loss(loss)
        variables = model.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(scaled, variables), variables))
        self._sync_replicas(ctx)
        sums = {"loss": tf.reduce_sum(result.losses),
                **{name: tf.reduce_sum(value) for name, value in result.metrics.items()},
                "count": tf.cast(tf.shape(result.losses)[0], tf.float32)}
        return sums, result.record

    def _distributed_step(self):
        if self._step_fn is None:
            def step(iterator):
                images, targets = next(iterator)
                out = self.strategy.run(self._replica_step, args=(images, targets))
                return {k: self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
                        for k, v in out.items()}
            self._step_fn = tf.function(step)
        return self._step_fn

    def _dataset(self, start_batch):
        def dataset_fn(context):
            return self.sampler.dataset(
                start=start_batch, stream=context.input_pipeline_id, augment=self.augment
            )
        return self.strategy.distribute_datasets_from_function(dataset_fn)

    # ---- callbacks ---------------------------------------------------------------------

    def _callbacks(self, resumed, first_epoch):
        """The objective's callbacks, the test accuracy, the timer, then the chief's loggers."""
        callbacks = list(self.objective.callbacks(self, resumed))
        if self.test_dataset is not None:
            callbacks.append(TestAccuracy(self.test_dataset, self.predict_fn, self.objective.validation_metrics,
                                          self.config.eval_neighbours, self.config.eval_batch_size))
        callbacks += self.extra_callbacks
        callbacks.append(EpochTimer(self.optimizer))
        if self.is_chief:
            callbacks.append(ResumableCSVLogger(os.path.join(self.model_dir, CSV_NAME), first_epoch))
            callbacks.append(TensorBoardScalars(os.path.join(self.model_dir, "logs", "train")))
            if self.verbose:
                callbacks.append(keras.callbacks.ProgbarLogger())
        params = {"verbose": self.verbose, "epochs": self.config.epochs, "steps": self.config.steps_per_epoch}
        for callback in callbacks:
            callback.set_model(self.model)
            callback.set_params(params)
        return _Callbacks(callbacks)

    # ---- the loop ----------------------------------------------------------------------

    def train(self):
        """Trains until `config.epochs`; returns the list of per-epoch logs of this call."""
        config = self.config
        resumed = self.restore()
        epoch = int(self.epoch.numpy())
        if (epoch >= config.epochs or self._budget_spent()) and resumed:
            logging.info("Training already finished at epoch %d", epoch)
            return []
        os.makedirs(self.model_dir, exist_ok=True)
        callbacks = self._callbacks(resumed, epoch)
        callbacks.on_train_begin({})
        if not resumed:
            self.save()  # the state after the objective's start (ClusTR: the first refresh)
        step = int(self.optimizer.iterations.numpy()) - epoch * config.steps_per_epoch
        iterator = iter(self._dataset(int(self.optimizer.iterations.numpy()) * self.local_replicas))
        step_fn = self._distributed_step()
        history = []
        try:
            while epoch < config.epochs:
                logging.info("Epoch %d/%d (from step %d)", epoch + 1, config.epochs, step)
                callbacks.on_epoch_begin(epoch)
                sums = {}
                while step < config.steps_per_epoch:
                    callbacks.on_train_batch_begin(step)
                    out = step_fn(iterator)
                    for k, v in out.items():
                        sums[k] = sums.get(k, 0.0) + float(v)
                    callbacks.on_train_batch_end(step, self._means(sums))
                    step += 1
                    if (config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0
                            and step < config.steps_per_epoch):
                        self.save()
                logs = self._means(sums)
                if not np.isfinite(logs.get("loss", 0.0)):
                    raise FloatingPointError(f"The training loss is {logs['loss']} at epoch {epoch + 1}")
                callbacks.on_epoch_end(epoch, logs)  # refresh, test accuracy, timer, loggers
                epoch += 1
                step = 0
                self.epoch.assign(epoch)
                self.elapsed.assign_add(logs["seconds"])
                self.elapsed_cpu.assign_add(logs["cpu_seconds"])
                self.save()
                logging.info("Epoch %d: %s", epoch, " - ".join(f"{k}: {v:.4g}" for k, v in logs.items()))
                history.append(logs)
                if self._budget_spent():
                    logging.info("Budget spent after %d epochs (%.0f s wall, %.0f s CPU)",
                                 epoch, float(self.elapsed.numpy()), float(self.elapsed_cpu.numpy()))
                    break
        finally:
            callbacks.on_train_end()
        return history

    @staticmethod
    def _means(sums):
        n = max(sums.get("count", 0.0), 1.0)
        return {k: v / n for k, v in sums.items() if k != "count"}

    def _budget_spent(self):
        wall, cpu = self.config.time_budget_seconds, self.config.cpu_budget_seconds
        return ((wall is not None and float(self.elapsed.numpy()) >= wall)
                or (cpu is not None and float(self.elapsed_cpu.numpy()) >= cpu))


# ---- a whole run from a config ---------------------------------------------------------------


def _init_from(model, path):
    """Starts `model` from a saved model: a .keras file, or a run directory's model.keras.

    The backbone's weights (batch-norm statistics included) carry over from a ClusTR model
    or a softmax classifier (cross-entropy, PGD-AT). Cluster centers and variance are not
    copied: the cluster refresh before the first step computes them on the copied
    backbone's features. A linear head carries over to a softmax classifier of the same
    shape and is dropped otherwise (a ClusTR run from a cross-entropy network, as the
    official ClusTR+QTRADES recipe starts). Raises `config.ConfigError`.
    """
    if os.path.isdir(path):
        path = os.path.join(path, "model.keras")
    if not os.path.isfile(path):
        raise ConfigError(f"`init_checkpoint` must be a .keras model or a run directory holding model.keras "
                          f"(a finished run). Received: {path}")
    try:
        source = keras.saving.load_model(path)
    except Exception as e:  # noqa: BLE001: any load failure becomes one clear message
        raise ConfigError(f"`init_checkpoint` cannot be loaded ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}). Received: {path}") from None
    if not isinstance(source, models.Classifier):
        raise ConfigError(f"`init_checkpoint` must be a ClusTR model or a softmax classifier. Received: "
                          f"{type(source).__name__} from {path}")
    ours, theirs = model.backbone.weights, source.backbone.weights
    mismatch = next((f"{a.path} is {tuple(a.shape)} here and {tuple(b.shape)} there"
                     for a, b in zip(ours, theirs) if tuple(a.shape) != tuple(b.shape)), None)
    if mismatch is None and len(ours) != len(theirs):
        mismatch = f"{len(ours)} backbone weights here, {len(theirs)} there"
    if mismatch:
        raise ConfigError(f"`init_checkpoint`'s backbone does not fit this run's ({mismatch}; check `backbone`, "
                          f"`width_multiplier`, `dataset`). Received: {path}")
    model.backbone.set_weights(source.backbone.get_weights())
    head, source_head = getattr(model, "head", None), getattr(source, "head", None)
    copied = "backbone"
    if head is not None and source_head is not None and [tuple(w.shape) for w in head.weights] == [
            tuple(w.shape) for w in source_head.weights]:
        head.set_weights(source_head.get_weights())
        copied = "backbone and linear head"
    logging.info("Initialised the %s from %s (%s)", copied, path, type(source).__name__)


def _optimizer(config, steps):
    """The Keras optimizer of `config.optimizer` (milestones in epochs of `steps` steps)."""
    opt, runtime = config.optimizer, config.runtime
    learning_rate = opt.lr
    if opt.lr_milestones:
        learning_rate = keras.optimizers.schedules.PiecewiseConstantDecay(
            [m * steps for m in opt.lr_milestones], [opt.lr * opt.lr_decay**i for i in range(len(opt.lr_milestones) + 1)])
    decay = {"weight_decay": opt.weight_decay} if opt.weight_decay else {}
    if opt.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(learning_rate, momentum=opt.momentum, **decay)
    else:
        optimizer = keras.optimizers.Adam(learning_rate, **decay)
    if runtime.mixed_precision and precision.uses_loss_scaling(runtime.mixed_precision):
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def loop_config(config, steps_per_epoch=1):
    """The `TrainConfig` (the loop's settings) of a `config.RunConfig`."""
    o, r = config.objective, config.runtime
    return TrainConfig(
        epochs=r.epochs, steps_per_epoch=steps_per_epoch, alpha=o.alpha,
        magnet_epsilon=losses.OFFICIAL_EPSILON if o.magnet_cap else None, xent_lambda=o.xent_lambda,
        logits_xent_lambda=o.logits_xent_lambda, consistency_lambda=o.consistency_lambda, consistency=o.consistency,
        consistency_eps=o.consistency_eps, consistency_step=o.consistency_step, refresh_every=o.refresh_every,
        eval_neighbours=config.model.eval_L, eval_batch_size=r.eval_batch_size,
        checkpoint_every_steps=r.checkpoint_every_steps, jit_compile=r.jit_compile, seed=r.seed, method=o.method,
        pgd_eps=o.pgd_eps, pgd_step=o.pgd_step, pgd_iterations=o.pgd_iterations,
        certified_margin=o.certified_margin,
        time_budget_seconds=r.time_budget_minutes * 60 if r.time_budget_minutes else None,
        cpu_budget_seconds=r.cpu_budget_minutes * 60 if r.cpu_budget_minutes else None,
    )


def run(config):
    """Trains and evaluates a `config.RunConfig`; returns the metrics it writes.

    Checks the paths (`RunConfig.check_paths`), writes the run directory's config.json,
    trains with the config's objective (resuming a run already there), then writes
    model.keras and metrics.json (clean and nearest-center accuracy on the test split,
    times, epochs) and, with `runtime.export_dir`, the SavedModel for TF Serving.

    Raises:
        config.ConfigError: a setting that cannot work (a path, `init_checkpoint`,
            `export_dir`).
        data.DatasetNotFoundError, data.CorruptDatasetError: the data cannot be had.
        RestoreError: the run directory's training state cannot be restored.
    """
    if not isinstance(config, RunConfig):
        raise TypeError(f"`config` must be a clustr_tf.config.RunConfig. Received: {type(config).__name__}")
    d, m, o, r = config.data, config.model, config.objective, config.runtime
    config.check_paths()
    with open(os.path.join(r.model_dir, "config.json"), "w") as fh:
        json.dump(config.flat(), fh, indent=2)
    keras.utils.set_random_seed(r.seed)
    trained_precision = r.mixed_precision or "float32"
    start = time.time()
    strategy = distribute.get_strategy(r.strategy, r.tpu)
    logging.info("Strategy %s with %d replicas", type(strategy).__name__, strategy.num_replicas_in_sync)
    info = data.info(d.dataset, data_dir=d.data_dir)
    images, labels = data.load_arrays(d.dataset, "train", data_dir=d.data_dir, download=d.download,
                                      dtype="float32" if d.dataset == "digits" else "uint8", mirror=d.data_mirror)
    logging.info("%s: %d training images of shape %s", d.dataset, len(images), images.shape[1:])
    loop = loop_config(config)
    objective = objectives.from_train_config(loop, clusters_per_class=m.k, neighbours=m.L, m=o.m, d=o.d)
    sampler = objective.batches(images, labels, info.num_classes, seed=r.seed, batch_size=o.batch_size)
    del images
    replicas = strategy.num_replicas_in_sync
    steps = r.steps_per_epoch or max(1, math.ceil(len(labels) / (sampler.batch_size * replicas)))
    name = m.backbone if m.backbone != "auto" else ("convnet" if d.dataset == "digits" else "resnet18")
    with strategy.scope():
        with precision.policy_scope(trained_precision):  # the backbone only: heads are float32
            # The Lipschitz network subtracts the mean only: dividing by std would multiply
            # its bound (and shrink every certified radius) by 1 / min(std).
            backbone = backbones.get_backbone(
                name, info.image_shape, mean=info.mean, std=None if name == "lipschitz" else info.std,
                **({"width_multiplier": m.width_multiplier} if name in ("resnet18", "lipschitz") else {}))
        model = objective.build_model(backbone, info.num_classes)
        if r.init_checkpoint:
            _init_from(model, r.init_checkpoint)
        optimizer = _optimizer(config, steps)
    test = data.load(d.dataset, "test", data_dir=d.data_dir, download=d.download, mirror=d.data_mirror)
    trainer = Trainer(model, optimizer, sampler, strategy, r.model_dir,
                      dataclasses.replace(loop, steps_per_epoch=steps), test_dataset=test,
                      augment=data.augmentation(d.dataset) if d.augment else None, objective=objective)
    trainer.train()
    train_seconds = time.time() - start
    # Test accuracy in float32, as training/evaluate.py and the export compute by default.
    precision.set_precision(model, "float32")
    metrics = models.evaluate_accuracy(model, test, neighbours=m.eval_L, batch_size=r.eval_batch_size,
                                       predict_fn=trainer.predict_fn if trained_precision == "float32" else None)
    precision.set_precision(model, trained_precision)  # model.keras keeps the training precision
    if model.certified_rule != "nearest center":  # a linear head: one decision rule
        metrics.update({"nearest_center_accuracy": None, "agreement": None})
    metrics.update({
        "split": "test", "mixed_precision": r.mixed_precision, "eval_precision": "float32", "dataset": d.dataset, "method": o.method, "eval_L": m.eval_L, "epochs": r.epochs,
        "epochs_trained": int(trainer.epoch.numpy()),
        "train_time_seconds": round(float(trainer.elapsed.numpy()), 2),
        "train_cpu_seconds": round(float(trainer.elapsed_cpu.numpy()), 2),
        "steps_per_epoch": steps, "replicas": replicas, "train_seconds": round(train_seconds, 2),
        "total_seconds": round(time.time() - start, 2),
    })
    if trainer.is_chief:
        model.save(os.path.join(r.model_dir, "model.keras"))
        with open(os.path.join(r.model_dir, "metrics.json"), "w") as fh:
            json.dump(metrics, fh, indent=2)
        if r.export_dir:
            try:
                path = serving.export(model, r.export_dir, neighbours=m.eval_L)
            except serving.ExportError as e:
                raise ConfigError(f"`export_dir`: {e}") from None
            logging.info("Exported the SavedModel for TF Serving to %s", path)
    return metrics
