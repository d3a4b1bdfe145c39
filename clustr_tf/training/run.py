"""A whole run from a `clustr_tf.config.RunConfig`: what `training/main.py` does.

The data, the objective's model and batches, the compiled model, the training state (a
run already in the directory resumes), `fit` with the run's callbacks, then the run
directory's model.keras, metrics.json and, if asked, the export.
"""

import math
import os
import shutil
import time

import keras
from absl import logging

from clustr_tf.nets import backbones
from clustr_tf import checks
from clustr_tf import data
from clustr_tf.training import distribute
from clustr_tf.core import models
from clustr_tf.training import objectives
from clustr_tf.nets import precision
from clustr_tf import serving
from clustr_tf.config import ConfigError
from clustr_tf.config import RunConfig
from clustr_tf.training import callbacks as callbacks_lib
from clustr_tf.training import fitting
from clustr_tf.training import state as state_lib

CSV_NAME = "training_log.csv"


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite; the last good state stays saved."""


def init_from(model, path):
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
        source = models.load_model(path)
    except models.ModelFileError as e:
        raise ConfigError(f"`init_checkpoint`: {e}") from None
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
    copied = "backbone"
    if type(model) is type(source) and [tuple(w.shape) for w in model.weights] == [
            tuple(w.shape) for w in source.weights] and model.certified_rule == "linear head":
        model.set_weights(source.get_weights())
        copied = "backbone and linear head"
    logging.info("Initialised the %s from %s (%s)", copied, path, type(source).__name__)


def optimizer_of(config, steps):
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


def train(model, batches, model_dir, epochs, steps_per_epoch, test=None, eval_neighbours=None,
          eval_batch_size=256, checkpoint_every_steps=100, time_budget_seconds=None, cpu_budget_seconds=None,
          augment=None, seed=0, callbacks=(), verbose=1, cosine_lr=None, lr_horizon_cpu_seconds=None,
          resume_checkpoint=None):
    """Trains a compiled model in a run directory, resuming what is saved there.

    Restores the `state.TrainingState` of `model_dir` (model, optimizer, position, clocks,
    the batch source's state), then runs `fitting.fit_run` with, in order: the objective's
    callbacks (ClusTR's cluster refresh), the test accuracy, `callbacks`, the clock and
    budgets, the state's checkpoints, and on the chief Keras's `TerminateOnNaN`, the CSV
    log and `TensorBoard` (`model_dir/logs`); the progress is `fit`'s bar or plain lines (`verbose`).

    Args:
        model: a `models.Classifier` compiled with its objective, under its strategy.
        batches: the objective's batch source.
        model_dir: the run directory.
        epochs: int, epochs of the whole run (a resumed run stops at the same epoch).
        steps_per_epoch: int, steps per epoch (each: one batch per replica).
        test: optional unbatched `(image, label)` dataset evaluated after each epoch.
        eval_neighbours: L of that evaluation (None: the model's).
        eval_batch_size: batch size of the test and cluster-refresh passes.
        checkpoint_every_steps: save the state this often inside an epoch (0: epoch ends).
        time_budget_seconds, cpu_budget_seconds: stop after the epoch in which the training
            wall (or process CPU) seconds, summed over restarts, reach it; None: no budget.
        augment: optional batch augmentation `augment(images, seed)`.
        seed: int, seeds the cluster refresh.
        callbacks: more Keras callbacks.
        cosine_lr: None, or the initial learning rate of a cosine schedule that reaches 0
            at the end of the run (`callbacks.CosineLearningRate`): at
            `lr_horizon_cpu_seconds`, else at the CPU budget, else at the wall budget, else
            after `epochs`.
        resume_checkpoint: the name of a saved checkpoint to resume from instead of the
            latest (e.g. "ckpt-200").
        verbose: Keras's verbosity on the chief (1: its progress bar, 2: a line per epoch,
            0: nothing), or "lines": `callbacks.ProgressLines`, a line at least every 10 s
            and one per epoch, with no control characters (what `run` uses).

    Returns:
        `(history, state)`: the per-epoch logs of this call, and the `TrainingState`.

    Raises:
        state.RunDirInUseError: another process is training in `model_dir`
            (`state.run_dir_lock`, held for the whole call).
        state.RestoreError: the saved state cannot be restored.
        TrainingDivergedError: the loss became NaN or infinite.
    """
    with state_lib.run_dir_lock(model_dir):
        return _train(model, batches, model_dir, epochs, steps_per_epoch, test, eval_neighbours, eval_batch_size,
                      checkpoint_every_steps, time_budget_seconds, cpu_budget_seconds, augment, seed, callbacks,
                      verbose, cosine_lr, lr_horizon_cpu_seconds, resume_checkpoint)


def _train(model, batches, model_dir, epochs, steps_per_epoch, test, eval_neighbours, eval_batch_size,
           checkpoint_every_steps, time_budget_seconds, cpu_budget_seconds, augment, seed, callbacks, verbose,
           cosine_lr, lr_horizon_cpu_seconds, resume_checkpoint):
    strategy = model.distribute_strategy
    state = state_lib.TrainingState(model, batches, model_dir, strategy)
    state.restore(resume_checkpoint)
    if state.restored and (int(state.epoch.numpy()) >= epochs
                           or state.budget_spent(time_budget_seconds, cpu_budget_seconds)):
        logging.info("Training already finished at epoch %d", int(state.epoch.numpy()))
        return [], state
    os.makedirs(model_dir, exist_ok=True)
    run_callbacks = list(model.objective.callbacks(batches, resumed=state.restored, strategy=strategy,
                                                   batch_size=eval_batch_size, seed=seed))
    if test is not None:
        run_callbacks.append(callbacks_lib.TestAccuracy(test, model.objective.validation_metrics, eval_neighbours,
                                                        eval_batch_size))
    run_callbacks += list(callbacks)
    if cosine_lr:
        run_callbacks.append(callbacks_lib.CosineLearningRate(
            cosine_lr, state, epochs * steps_per_epoch, cpu_seconds=lr_horizon_cpu_seconds or cpu_budget_seconds,
            wall_seconds=time_budget_seconds))
    run_callbacks.append(callbacks_lib.TrainingClock(state, time_budget_seconds, cpu_budget_seconds))
    run_callbacks.append(callbacks_lib.StateCheckpoint(state, steps_per_epoch, checkpoint_every_steps))
    run_callbacks.append(keras.callbacks.TerminateOnNaN())
    if state.is_chief:
        run_callbacks.append(callbacks_lib.ResumableCSVLogger(os.path.join(model_dir, CSV_NAME),
                                                              int(state.epoch.numpy())))
        run_callbacks.append(keras.callbacks.TensorBoard(os.path.join(model_dir, "logs"), write_graph=False,
                                                         profile_batch=0))
    if verbose == "lines" and state.is_chief:
        run_callbacks.append(callbacks_lib.ProgressLines(epochs, steps_per_epoch))
    history = fitting.fit_run(model, batches, state, epochs, steps_per_epoch, run_callbacks, augment=augment,
                              verbose=verbose if state.is_chief and verbose != "lines" else 0)
    if history and not math.isfinite(history[-1].get("loss", 0.0)):
        raise TrainingDivergedError(
            f"The training loss is {history[-1]['loss']} at epoch {int(state.epoch.numpy()) + 1}; the last good "
            f"state is in {os.path.join(model_dir, state_lib.STATE_DIR)}. Try a lower learning rate.")
    return history, state


def _backbone(config, info):
    m = config.model
    name = m.backbone if m.backbone != "auto" else ("convnet" if config.data.dataset == "digits" else "resnet18")
    with precision.policy_scope(config.runtime.mixed_precision or "float32"):  # the backbone only
        # The Lipschitz network subtracts the mean only: dividing by std would multiply
        # its bound (and shrink every certified radius) by 1 / min(std).
        return backbones.get_backbone(
            name, info.image_shape, mean=info.mean, std=None if name == "lipschitz" else info.std,
            **({"width_multiplier": m.width_multiplier} if name in ("resnet18", "lipschitz") else {}))


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
        state.RunDirInUseError: another process is training in the run directory
            (`state.run_dir_lock`, held from before config.json is written to the end).
        state.RestoreError: the run directory's training state cannot be restored.
        TrainingDivergedError: the loss became NaN or infinite.
    """
    if not isinstance(config, RunConfig):
        raise TypeError(f"`config` must be a clustr_tf.config.RunConfig. Received: {type(config).__name__}")
    created = not os.path.exists(config.runtime.model_dir)
    config.check_paths()
    with state_lib.run_dir_lock(config.runtime.model_dir):  # (one in use: raised before anything is written)
        try:
            return _run(config)
        except BaseException:
            # A run that fails before its first checkpoint (no data, a bad setting, an
            # interruption) leaves no folder it created behind; one with a saved state keeps it.
            if created and not os.path.exists(os.path.join(config.runtime.model_dir, state_lib.STATE_DIR)):
                shutil.rmtree(config.runtime.model_dir, ignore_errors=True)
            raise


def _run(config):
    d, m, o, r = config.data, config.model, config.objective, config.runtime
    os.makedirs(r.model_dir, exist_ok=True)
    checks.write_json(os.path.join(r.model_dir, "config.json"), config.flat())
    keras.utils.set_random_seed(r.seed)
    trained_precision = r.mixed_precision or "float32"
    start = time.time()
    strategy = distribute.get_strategy(r.strategy, r.tpu)
    logging.info("Strategy %s with %d replicas", type(strategy).__name__, strategy.num_replicas_in_sync)
    info = data.info(d.dataset, data_dir=d.data_dir)
    images, labels = data.load_arrays(d.dataset, "train", data_dir=d.data_dir, download=d.download,
                                      dtype="float32" if d.dataset == "digits" else "uint8", mirror=d.data_mirror)
    if d.holdout_examples:
        try:
            keep, _ = data.split_holdout(labels, d.holdout_examples)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        images, labels = images[keep], labels[keep]
    logging.info("%s: %d training images of shape %s", d.dataset, len(images), images.shape[1:])
    objective = objectives.from_config(o, m)
    batches = objective.batches(images, labels, info.num_classes, seed=r.seed, batch_size=o.batch_size)
    del images
    replicas = strategy.num_replicas_in_sync
    steps = r.steps_per_epoch or max(1, math.ceil(len(labels) / (batches.batch_size * replicas)))
    with strategy.scope():
        model = objective.build_model(_backbone(config, info), info.num_classes)
        if r.init_checkpoint:
            init_from(model, r.init_checkpoint)
        model.compile(optimizer=optimizer_of(config, steps), objective=objective, seed=r.seed,
                      jit_compile=r.jit_compile)
    test = data.load(d.dataset, "test", data_dir=d.data_dir, download=d.download, mirror=d.data_mirror)
    _, state = train(
        model, batches, r.model_dir, r.epochs, steps, test=test, eval_neighbours=m.eval_L,
        eval_batch_size=r.eval_batch_size, checkpoint_every_steps=r.checkpoint_every_steps,
        time_budget_seconds=r.time_budget_minutes * 60 if r.time_budget_minutes else None,
        cpu_budget_seconds=r.cpu_budget_minutes * 60 if r.cpu_budget_minutes else None,
        augment=data.augmentation(d.dataset) if d.augment else None, seed=r.seed,
        cosine_lr=config.optimizer.lr if config.optimizer.lr_schedule == "cosine" else None,
        lr_horizon_cpu_seconds=config.optimizer.lr_horizon_cpu_minutes * 60
        if config.optimizer.lr_horizon_cpu_minutes else None, resume_checkpoint=r.resume_checkpoint,
        verbose="lines")
    train_seconds = time.time() - start
    # Test accuracy in float32, as training/evaluate.py and the export compute by default.
    precision.set_precision(model, "float32")
    metrics = models.evaluate_accuracy(model, test, neighbours=m.eval_L, batch_size=r.eval_batch_size)
    precision.set_precision(model, trained_precision)  # model.keras keeps the training precision
    if model.certified_rule != "nearest center":  # a linear head: one decision rule
        metrics.update({"nearest_center_accuracy": None, "agreement": None})
    metrics.update({
        "split": "test", "mixed_precision": r.mixed_precision, "eval_precision": "float32", "dataset": d.dataset,
        "method": o.method, "eval_L": m.eval_L, "epochs": r.epochs, "holdout_examples": d.holdout_examples,
        "epochs_trained": int(state.epoch.numpy()),
        "train_time_seconds": round(float(state.elapsed.numpy()), 2),
        "train_cpu_seconds": round(float(state.elapsed_cpu.numpy()), 2),
        "steps_per_epoch": steps, "replicas": replicas, "train_seconds": round(train_seconds, 2),
        "total_seconds": round(time.time() - start, 2),
    })
    if state.is_chief:
        model.save(os.path.join(r.model_dir, "model.keras"))
        checks.write_json(os.path.join(r.model_dir, "metrics.json"), metrics)
        if r.export_dir:
            try:
                path = serving.export(model, r.export_dir, neighbours=m.eval_L)
            except serving.ExportError as e:
                raise ConfigError(f"`export_dir`: {e}") from None
            logging.info("Exported the SavedModel for TF Serving to %s", path)
    return metrics
