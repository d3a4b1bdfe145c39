"""Keras callbacks of a training run, for what Keras has no callback of its own.

Keras's `TensorBoard`, `TerminateOnNaN` and `CSVLogger` do the logging; these add the
test-split accuracy, the epoch's clocks and training budgets, the resumable training state,
a CSV log that a resumed run does not write twice, and progress as plain lines. ClusTR's cluster
refresh is `clustering.ClusterRefresh`, which its objective adds.
"""

import csv
import math
import os
import sys
import time

import keras
from absl import logging

from clustr_tf.core import models


def _finite_loss(logs):
    return math.isfinite(float((logs or {}).get("loss", 0.0)))


def _metrics_text(logs):
    parts = []
    for name, value in (logs or {}).items():
        try:
            parts.append(f"{name} {float(value):.4g}")
        except (TypeError, ValueError):
            continue
    return " - ".join(parts)


class ProgressLines(keras.callbacks.Callback):
    """A run's progress as plain lines, the same on a terminal, in a log file or a pipe.

    While an epoch runs, `Epoch 3/40: step 120/209 - loss 1.679 - accuracy 0.353 (45 s)` at
    least every `interval` seconds; at its end one line with the epoch's time and every
    metric, validation included. (Keras's progress bar redraws one line with backspaces and
    carriage returns: a log file holds every redraw on one line, and a line printed while
    it runs, such as the cluster refresh's, splits it so that the epoch's last state shows
    twice.)

    Args:
        epochs: the run's number of epochs (shown as `Epoch e/epochs`).
        steps_per_epoch: steps of a whole epoch.
        interval: seconds between the lines inside an epoch.
        stream: where to write (default: sys.stdout).
    """

    def __init__(self, epochs, steps_per_epoch, interval=10.0, stream=None):
        super().__init__()
        self.epochs, self.steps_per_epoch, self.interval = epochs, steps_per_epoch, interval
        self._stream = stream
        self._epoch, self._start, self._last, self._steps = 0, time.time(), time.time(), 0

    def _write(self, line):
        stream = self._stream or sys.stdout
        stream.write(line + "\n")
        stream.flush()
        self._last = time.time()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._steps = epoch, 0
        self._start = self._last = time.time()

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1
        now = time.time()
        if now - self._last >= self.interval:
            self._write(f"Epoch {self._epoch + 1}/{self.epochs}: step {batch + 1}/{self.steps_per_epoch} - "
                        f"{_metrics_text(logs)} ({now - self._start:.0f} s)")

    def on_epoch_end(self, epoch, logs=None):
        self._write(f"Epoch {epoch + 1}/{self.epochs}: {self._steps} steps in {time.time() - self._start:.0f} s - "
                    f"{_metrics_text(logs)}")


class TestAccuracy(keras.callbacks.Callback):
    """After each epoch (and its cluster refresh), the accuracy of the model on a labelled
    dataset, logged under the names the objective gives (`objective.validation_metrics`).

    Args:
        dataset: unbatched `(image, label)` dataset.
        names: {log name: key of `models.evaluate_accuracy`'s result}.
        neighbours: L of the soft-kNC rule (None: the model's).
        batch_size: int.
    """

    def __init__(self, dataset, names, neighbours=None, batch_size=256):
        super().__init__()
        self.dataset, self.names, self.neighbours, self.batch_size = dataset, names, neighbours, batch_size
        self.predict_fn = None

    def set_model(self, model):
        super().set_model(model)
        self.predict_fn = model.prediction_function(self.neighbours)

    def on_epoch_end(self, epoch, logs=None):
        if not _finite_loss(logs):
            return
        result = models.evaluate_accuracy(self.model, self.dataset, self.neighbours, self.batch_size,
                                          predict_fn=self.predict_fn)
        logs.update({name: result[key] for name, key in self.names.items()})


class TrainingClock(keras.callbacks.Callback):
    """Adds the learning rate and the epoch's wall and CPU seconds (this process, all
    threads; the callbacks before it included) to the epoch's logs, sums them into the
    training state, and stops training after the epoch in which a budget is reached.

    Args:
        state: the run's `state.TrainingState` (its `elapsed` and `elapsed_cpu`).
        wall_seconds, cpu_seconds: the budgets, or None.
    """

    def __init__(self, state, wall_seconds=None, cpu_seconds=None):
        super().__init__()
        self.state, self.wall_seconds, self.cpu_seconds = state, wall_seconds, cpu_seconds

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._start_cpu = time.time(), time.process_time()

    def on_epoch_end(self, epoch, logs=None):
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        logs["seconds"] = time.time() - self._start
        logs["cpu_seconds"] = time.process_time() - self._start_cpu
        self.state.elapsed.assign_add(logs["seconds"])
        self.state.elapsed_cpu.assign_add(logs["cpu_seconds"])
        if self.state.budget_spent(self.wall_seconds, self.cpu_seconds):
            logging.info("Budget spent after %d epochs (%.0f s wall, %.0f s CPU)", epoch + 1,
                         float(self.state.elapsed.numpy()), float(self.state.elapsed_cpu.numpy()))
            self.model.stop_training = True


class CosineLearningRate(keras.callbacks.Callback):
    """`--lr_schedule=cosine`: the learning rate falls from `base` to 0 along a half cosine
    over the run, set before every step from the fraction of the run done: the CPU
    seconds of training (summed over restarts, this epoch's included) over `cpu_seconds`,
    else the wall seconds over `wall_seconds`, else the optimizer's steps over
    `total_steps`. Past the end it stays 0. Place it before `TrainingClock` (which adds
    each finished epoch to the state).

    Args:
        base: float, the initial learning rate.
        state: the run's `state.TrainingState` (its `elapsed` and `elapsed_cpu`).
        total_steps: int, the steps of the whole run (epochs x steps per epoch).
        cpu_seconds, wall_seconds: the horizon in CPU or wall seconds, or None.
    """

    def __init__(self, base, state, total_steps, cpu_seconds=None, wall_seconds=None):
        super().__init__()
        self.base, self.state, self.total_steps = float(base), state, max(int(total_steps), 1)
        self.cpu_seconds, self.wall_seconds = cpu_seconds, wall_seconds
        self._start, self._start_cpu = time.time(), time.process_time()

    def fraction(self):
        """The fraction of the run done, in [0, 1]."""
        if self.cpu_seconds:
            done = float(self.state.elapsed_cpu.numpy()) + time.process_time() - self._start_cpu
            return min(done / self.cpu_seconds, 1.0)
        if self.wall_seconds:
            done = float(self.state.elapsed.numpy()) + time.time() - self._start
            return min(done / self.wall_seconds, 1.0)
        return min(int(self.model.optimizer.iterations.numpy()) / self.total_steps, 1.0)

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._start_cpu = time.time(), time.process_time()

    def on_train_batch_begin(self, batch, logs=None):
        self.model.optimizer.learning_rate = self.base * 0.5 * (1.0 + math.cos(math.pi * self.fraction()))


class StateCheckpoint(keras.callbacks.Callback):
    """Saves the `state.TrainingState`: at the start of a new run (after the objective's
    first cluster refresh), every `every_steps` steps inside an epoch, and at each epoch's
    end. A diverged epoch (non-finite loss) is not saved: the last good state stays.

    Args:
        state: the run's `TrainingState`.
        steps_per_epoch: int, the steps of a whole epoch.
        every_steps: int, 0: at epoch ends only.
    """

    def __init__(self, state, steps_per_epoch, every_steps=100):
        super().__init__()
        self.state, self.steps_per_epoch, self.every_steps = state, steps_per_epoch, every_steps

    def on_train_begin(self, logs=None):
        if not self.state.restored:
            self.state.save()
            self.state.restored = True  # a later `fit` of this run continues the same state

    def on_train_batch_end(self, batch, logs=None):
        if not self.every_steps or not _finite_loss(logs):
            return
        _, step = self.state.position(self.steps_per_epoch)
        if step % self.every_steps == 0 and step < self.steps_per_epoch:
            self.state.save()

    def on_epoch_end(self, epoch, logs=None):
        if _finite_loss(logs):
            self.state.epoch.assign(epoch + 1)
            self.state.save()


class ResumableCSVLogger(keras.callbacks.CSVLogger):
    """Keras's CSV logger, appending, that first drops the rows of the epochs a resumed
    run redoes, so that every epoch is in the file exactly once.

    Args:
        filename: the CSV file.
        first_epoch: the epoch the run starts (or resumes) at; rows of it and later go
            when training begins (once: a run continued by a second `fit` keeps its rows).
    """

    def __init__(self, filename, first_epoch=0):
        super().__init__(filename, append=True)
        self.first_epoch = first_epoch

    def on_train_begin(self, logs=None):
        if self.first_epoch is not None and os.path.exists(self.filename):
            with open(self.filename, newline="") as fh:
                reader = csv.DictReader(fh)
                fieldnames = reader.fieldnames
                rows = [r for r in reader if int(r["epoch"]) < self.first_epoch]
            with open(self.filename, "w", newline="") as fh:
                if fieldnames and rows:
                    writer = csv.DictWriter(fh, fieldnames=fieldnames)
                    writer.writeheader()
                    writer.writerows(rows)
        self.first_epoch = None
        super().on_train_begin(logs)
