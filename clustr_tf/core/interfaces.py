"""What the parts of training must provide: the `Objective` abstract class, its `Result`,
and the `Batches` protocol of a batch source. The classifier's interface is
`models.Classifier`.

An objective (a training method: `clustr_tf.objectives`) gives per-example losses and
metrics for one replica's batch and makes its model and its batch source; the model's
`train_step` does the rest. A batch source is what an objective's `batches` makes: ClusTR's
`sampler.NeighbourhoodSampler` (m clusters x d examples, seeded by recorded losses) or the
baselines' `baselines.BatchSource` (shuffled batches); the training step, `fit` and the
training state use nothing else of it.
"""

import abc
import collections
import typing

import tensorflow as tf

from clustr_tf.core import ops


# What `Objective.losses` returns for one replica's batch: per-example float32 [B] values.
#   losses: what the step minimises (their mean over the global batch);
#   metrics: {name: [B]} averaged over the epoch and shown (accuracy and the like);
#   record: per-example values the step hands the batch source (`record_losses`), or None.
Result = collections.namedtuple("Result", "losses metrics record")


class Objective(abc.ABC):
    """A training method (see the module docstring).

    What a method must provide: `model_class`, `losses` (per-example losses and metrics of
    one replica's batch; the model's `train_step` does the rest), `metric_names`,
    `build_model` and `batches`; it may override `callbacks`, `evaluation` and
    `check_model`. The methods are in `clustr_tf.objectives`.

    Attributes:
        model_class: the `models.Classifier` subclass it trains.
        metric_names: the names of `Result.metrics`, in the order they are logged.
        evaluation_metric_names: the names `evaluation` gives besides "loss".
        validation_metrics: {log name: key of `models.evaluate_accuracy`'s result} logged
            after each epoch on the test split by `training.callbacks.TestAccuracy`.
    """

    model_class = None  # set by every objective
    metric_names = ("accuracy",)
    evaluation_metric_names = ("accuracy",)
    validation_metrics = {"val_accuracy": "clean_accuracy"}

    @abc.abstractmethod
    def losses(self, model, images, targets, seed):
        """`Result` for one replica's batch.

        Args:
            model: the model being trained (an instance of `model_class`).
            images: float tensor [B, H, W, C] in [0, 1].
            targets: the batch source's targets: a dict with "labels" int [B] (ClusTR's
                also "clusters" and "indices").
            seed: int64 tensor [2], distinct per step and replica, for training attacks.
        """

    @abc.abstractmethod
    def build_model(self, backbone, num_classes):
        """The model this objective trains, on `backbone`."""

    @abc.abstractmethod
    def batches(self, images, labels, num_classes, seed=0, batch_size=240):
        """The batch source (a `Batches`) of a training set: images [N, H, W, C] (uint8, or
        float in [0, 1]) and labels int [N]; `batch_size` where the method has a free one."""

    def callbacks(self, batches, resumed=False, strategy=None, batch_size=256, seed=0):
        """Keras callbacks the objective needs in `fit` (before any logger).

        Args:
            batches: the batch source `batches` made.
            resumed: whether training continues a saved state (ClusTR: no first refresh).
            strategy: the `tf.distribute.Strategy` the model was built under, or None.
            batch_size: batch size of passes over the training set (the refresh's).
            seed: int.
        """
        del batches, resumed, strategy, batch_size, seed
        return []

    def check_model(self, model):
        """Raises TypeError (or the objective's own error) for a model it cannot train;
        `models.Classifier.compile` calls it."""
        if not isinstance(model, self.model_class):
            raise TypeError(f"{type(self).__name__} trains a {self.model_class.__name__}. "
                            f"Received: {type(model).__name__}")

    def evaluation(self, model, images, labels):
        """`({"loss": [B], name: [B] for evaluation_metric_names}, logits [B, C])` of a
        labelled batch in inference mode: what `model.evaluate` and validation report.
        The loss is the cross-entropy of the class logits by default."""
        logits = tf.cast(model(images, training=False), tf.float32)
        loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
        return {"loss": loss, "accuracy": ops.correct(logits, labels)}, logits


@typing.runtime_checkable
class Batches(typing.Protocol):
    """A source of training batches that a resumed run continues exactly.

    Attributes:
        batch_size: int, examples per batch (per replica).
    """

    batch_size: int

    def dataset(self, start=0, stream=0, augment=None):
        """An endless `tf.data.Dataset` of `(images float32 [B, H, W, C] in [0, 1], targets)`,
        targets a dict with "labels" int64 [B] (and what the objective needs: ClusTR's
        "clusters" and "indices").

        Args:
            start: int, batches of this stream already consumed: batch b depends on the
                source's seed, `stream`, b and its saved state only, so a resumed run
                continues the sequence.
            stream: int, an independent sequence (one per input pipeline of a
                distributed run).
            augment: optional `augment(images, seed)` applied to each batch.
        """

    def state_variables(self):
        """`{name: tf.Variable}`: the state a checkpoint saves with the model."""

    def record_losses(self, indices, losses):
        """Takes the objective's per-example record (`Result.record`) of the examples
        `indices` (int [B]); usable inside a `tf.function`. May do nothing."""
