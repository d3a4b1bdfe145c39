"""The training state that a run saves and resumes: model, optimizer, position and clocks;
and the lock that keeps one training per run directory."""

import contextlib
import os
import socket
import time

import tensorflow as tf
from absl import logging

from clustr_tf.training import distribute

STATE_DIR = "checkpoints"
LOCK_NAME = ".training.lock"

try:
    import fcntl
except ImportError:  # not POSIX: no lock
    fcntl = None

_held = {}  # lock path -> [open file, depth]: the locks this process holds


class RunDirInUseError(RuntimeError):
    """Another process is training in the run directory."""


@contextlib.contextmanager
def run_dir_lock(model_dir):
    """Holds `model_dir` for this process's training while the block runs.

    An exclusive `flock` on `model_dir/.training.lock` (`.training.lock-worker-1`, ... for
    the other tasks of a multi-worker run, which share the folder): a second training in the
    same folder (the same command started twice, a benchmark rerun beside one still going)
    fails at once instead of interleaving its checkpoints, log rows and config.json with the
    first's. The operating system releases it when the process ends, however it ends, so a
    killed run leaves no stale lock. Re-entrant within a process (`run` holds it, `train`
    takes it again). The file stays (it names the last holder); where the file system has
    no locks, nothing is held. Makes `model_dir` if needed.

    Raises:
        RunDirInUseError: another process holds it; the message names that process. Nothing
            in the folder was changed.
    """
    os.makedirs(model_dir, exist_ok=True)
    path = os.path.join(os.path.realpath(model_dir), LOCK_NAME + distribute.task_tag())
    if path in _held:
        _held[path][1] += 1
        try:
            yield
        finally:
            _held[path][1] -= 1
        return
    fh = open(path, "a+")
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "a process that has not written its name yet"
                raise RunDirInUseError(
                    f"Another training is running in this run directory ({holder}; it holds {path}). Wait for it "
                    f"to end or stop it, then rerun to resume; or pass another model_dir. Nothing was changed. "
                    f"Received: model_dir={model_dir}") from None
            except OSError as e:  # a file system without locks
                logging.warning("Cannot lock %s (%s): the run directory is not protected from a second "
                                "training.", path, e.strerror or e)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        _held[path] = [fh, 1]
        try:
            yield
        finally:
            del _held[path]
    finally:
        fh.close()  # releases the lock


class RestoreError(RuntimeError):
    """The run directory holds a training state that cannot be restored (corrupt, or of
    another configuration)."""


class TrainingState:
    """Everything a resumed run needs, saved by a `tf.train.CheckpointManager`.

    The model (its optimizer included: compile it first), the epoch reached, the training
    wall and CPU seconds summed over restarts, and the batch source's state (ClusTR's
    cluster assignments and recorded losses). The position inside an epoch is the
    optimizer's step count, so a state saved mid-epoch resumes there.

    The chief saves into `model_dir/checkpoints`; other workers of a multi-worker run
    into `model_dir/workers/worker_<i>/checkpoints` (no two writers collide), and every
    worker restores from the chief's folder (a shared file system).

    Args:
        model: a compiled `models.Classifier`, built under `strategy`.
        batches: the batch source (a `clustr_tf.interfaces.Batches`).
        model_dir: the run directory.
        strategy: the `tf.distribute.Strategy` the model was built under; default: the
            current one.
    """

    def __init__(self, model, batches, model_dir, strategy=None):
        strategy = strategy or tf.distribute.get_strategy()
        self.model = model
        self.is_chief, self.worker_index, self.num_workers = distribute.worker_info(strategy)
        with strategy.scope():
            model.optimizer.build(model.trainable_variables)
            self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
            self.elapsed = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="elapsed")
            self.elapsed_cpu = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="elapsed_cpu")
        self.checkpoint = tf.train.Checkpoint(
            model=model, optimizer=model.optimizer, epoch=self.epoch, elapsed=self.elapsed,
            elapsed_cpu=self.elapsed_cpu, sampler=tf.train.Checkpoint(**batches.state_variables()))
        chief_dir = os.path.join(model_dir, STATE_DIR)
        own_dir = chief_dir if self.is_chief else os.path.join(
            model_dir, "workers", f"worker_{self.worker_index}", STATE_DIR)
        self.manager = tf.train.CheckpointManager(self.checkpoint, own_dir, max_to_keep=2)
        self.restore_manager = tf.train.CheckpointManager(self.checkpoint, chief_dir, max_to_keep=2)
        self.restored = False

    @property
    def iterations(self):
        return int(self.model.optimizer.iterations.numpy())

    def position(self, steps_per_epoch):
        """`(epoch, step)`: the epoch to run and the steps of it already done."""
        epoch = int(self.epoch.numpy())
        return epoch, max(self.iterations - epoch * steps_per_epoch, 0)

    def restore(self, checkpoint=None):
        """Restores the latest saved state (or `checkpoint`, a name such as "ckpt-2" in
        the run's checkpoints folder), if any; returns True when it did.

        Raises:
            RestoreError: the checkpoint is missing, truncated or corrupt, or of another
                configuration; the message says which and what to do. Nothing is deleted.
        """
        saved = list(self.restore_manager.checkpoints)
        if checkpoint:
            path = os.path.join(self.restore_manager.directory, os.path.basename(checkpoint))
            if not tf.io.gfile.exists(path + ".index"):
                names = ", ".join(os.path.basename(p) for p in saved) or "none"
                raise RestoreError(f"No checkpoint {checkpoint} in {self.restore_manager.directory} (saved there: "
                                   f"{names}). Received: --resume_checkpoint={checkpoint}")
        else:
            path = self.restore_manager.latest_checkpoint
        if not path:
            return False
        try:
            self.checkpoint.restore(path).assert_existing_objects_matched()
        except (tf.errors.OpError, AssertionError, ValueError, IndexError, KeyError, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            if isinstance(e, (AssertionError, ValueError)):  # the objects or shapes do not match
                what = "it belongs to another configuration, or was written by an incompatible version"
            else:  # the files cannot be read
                what = "it is truncated or corrupt (a full disk, an interrupted copy)"
            earlier = [os.path.basename(p) for p in saved if p != path]
            fix = (f"pass --resume_checkpoint={earlier[-1]} to resume from the one saved before it, or start over "
                   "in a new --model_dir") if earlier else "start over in a new --model_dir"
            raise RestoreError(f"Cannot restore the training state from {path}: {what} ({type(e).__name__}: "
                               f"{first}). Nothing was deleted; {fix}.") from None
        logging.info("Restored %s: epoch %d, step %d", path, int(self.epoch.numpy()), self.iterations)
        self.restored = True
        return True

    def save(self):
        self.manager.save(checkpoint_number=self.iterations)

    def budget_spent(self, wall_seconds=None, cpu_seconds=None):
        """Whether the summed training wall or CPU seconds reached a budget (None: none)."""
        return ((wall_seconds is not None and float(self.elapsed.numpy()) >= wall_seconds)
                or (cpu_seconds is not None and float(self.elapsed_cpu.numpy()) >= cpu_seconds))
