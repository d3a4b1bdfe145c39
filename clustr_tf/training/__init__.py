"""Training: the objectives, and one `train_step` for all of them, run by Keras `fit`.

A model (`core.models.Classifier`) is compiled with an objective and its `train_step` is
the only gradient step of the library:

- `objectives`: one object per training method (ClusTR and its terms, cross-entropy,
  PGD-AT, the certified margins); `consistency`: the ClusTR+QTRADES term;
- `distribute`: tf.distribute strategies by name;

- `run(config)`: a whole run from a `clustr_tf.config.RunConfig`, as `training/main.py`
  does (data, model, `train`, model.keras, metrics.json, export);
- `train(model, batches, model_dir, epochs, steps_per_epoch, ...)`: resumable training of
  a compiled model in a run directory, with the run's callbacks;
- `fitting.fit_run`: `model.fit` from a restored position, or, under
  `MultiWorkerMirroredStrategy` where Keras's `fit` cannot go, a thin driver of the same
  step and callbacks;
- `state.TrainingState`: the checkpointed state a killed run resumes from (mid-epoch);
- `callbacks`: the test accuracy, the clock and budgets, the state's checkpoints and a
  resumable CSV log, beside Keras's TensorBoard and TerminateOnNaN.
"""

from clustr_tf.training import distribute
from clustr_tf.training import consistency
from clustr_tf.training import objectives
from clustr_tf.training import callbacks
from clustr_tf.training import fitting
from clustr_tf.training import state
from clustr_tf.training.fitting import fit_run
from clustr_tf.training.run import CSV_NAME
from clustr_tf.training.run import TrainingDivergedError
from clustr_tf.training.run import init_from
from clustr_tf.training.run import optimizer_of
from clustr_tf.training.run import run
from clustr_tf.training.run import train
from clustr_tf.training.state import STATE_DIR
from clustr_tf.training.state import RestoreError
from clustr_tf.training.state import RunDirInUseError
from clustr_tf.training.state import TrainingState
