"""`ClusTRModel`: any backbone, a `ClusterCenters` head, and the ClusTR training step.

The model maps images in [0, 1] to class logits (log soft-kNC scores), so `predict`,
`evaluate` and Keras metrics such as `"accuracy"` work as for any classifier. Training is
what differs: the magnet loss is computed on the backbone's features of a neighbourhood
batch, labelled with cluster indices, and each example's loss is recorded for the sampler
that chose the batch.
"""

import keras
import numpy as np
import tensorflow as tf

from clustr_tf.core import certify
from clustr_tf import config
from clustr_tf.core import interfaces
from clustr_tf.core import layers
from clustr_tf.core.model_files import ModelFileError  # noqa: F401  (models.ModelFileError)
from clustr_tf.core.model_files import load_model  # noqa: F401  (models.load_model)
from clustr_tf.core.model_files import load_run  # noqa: F401  (models.load_run)


class _StepState:
    """What `Classifier.compile` sets up for its steps, kept out of Keras's tracking (the
    model's weights and checkpoints stay those of the network): metric trackers (one per
    name, shared by training and evaluation, as Keras's own loss tracker is), the
    variables replicas assign themselves, and the (possibly XLA-compiled) gradient step."""

    def __init__(self, train_trackers, eval_trackers, replica_local, gradient_fn):
        self.train_trackers, self.eval_trackers = train_trackers, eval_trackers
        self.replica_local, self.gradient_fn = replica_local, gradient_fn


class Classifier(keras.Model):
    """What training, evaluation, attacks, certification and export ask of a model.

    `ClusTRModel` (nearest-center certificate) and `baselines.SoftmaxClassifier` (linear
    head) implement it, so no caller needs to look at what a model is:

    - `backbone`, `num_classes`, `embed(images, training=False)`: the features;
    - `logits_from_features(features, neighbours=None)`, `class_logits(images, neighbours=None)`:
      class logits (for ClusTR the log soft-kNC scores over `neighbours` = L);
    - `logits_are_log_scores`: whether exp(logits) are the raw scores the official
      evaluation attacks as logits (ClusTR) or the logits are those scores (a softmax);
    - `certified_rule`, `feature_certificate(features)` and `certify_features(features)`: the
      decision a certificate speaks about and, in float64, its feature-space radius, class
      and runner-up (as tensors, or numpy);
    - `decisions_from_features(features, neighbours=None)`: (predicted class, class of the
      certified rule); `prediction_function(neighbours=None)` traces it on images;
    - `evaluation_neighbours(requested=None)`: the L an evaluation uses (None: no L);
    - `check_usable()`: raises ValueError when the model cannot be evaluated (e.g.
      degenerate centers);
    - `prototypes()`: `(centers, classes)` to draw, or None.

    Training is one step for every objective (`clustr_tf.objectives`): `compile` takes the
    objective, and `train_step` (what `fit` runs, and what the multi-worker driver of
    `clustr_tf.training` runs through `strategy.run`) asks it for per-example losses and
    metrics, averages the loss over the global batch, applies the gradients, and averages
    over replicas the variables each replica assigns itself (batch-norm statistics).
    """

    logits_are_log_scores = False
    certified_rule = None
    # Set by the objective's callbacks (ClusterRefresh) or by hand: an object with
    # `record_losses(indices, losses)`, such as the NeighbourhoodSampler; the training step
    # hands it the objective's per-example record. Not part of the model's state.
    loss_recorder = None
    _step = None  # what `compile` sets up for the training step (`_StepState`)

    def embed(self, inputs, training=False):
        """float tensor [batch, D]: the backbone's features."""
        return self.backbone(inputs, training=training)

    def class_logits(self, images, neighbours=None, training=False):
        """float tensor [batch, C]: class logits of images."""
        return self.logits_from_features(self.embed(images, training=training), neighbours)

    def logits_from_features(self, features, neighbours=None):
        """float tensor [batch, C]: class logits of features."""
        raise NotImplementedError

    def decisions_from_features(self, features, neighbours=None):
        """(predicted class, certified-rule class), int64 [batch] each."""
        raise NotImplementedError

    def feature_certificate(self, features):
        """`(feature_radius, classes, runner_up)` tensors of the certified rule for float64
        features [batch, D] (TensorFlow ops: it runs inside the exported signatures too)."""
        raise NotImplementedError

    def certify_features(self, features):
        """float64 numpy `(feature_radius, classes, runner_up)` of the certified rule."""
        radius, classes, runner_up = self.feature_certificate(tf.constant(np.asarray(features, np.float64)))
        return radius.numpy(), classes.numpy(), runner_up.numpy()

    def prediction_function(self, neighbours=None):
        """A `tf.function` images -> (predicted class, class of the certified rule)."""

        @tf.function(reduce_retracing=True)
        def predict(images):
            return self.decisions_from_features(self.embed(images, training=False), neighbours)

        return predict

    def evaluation_neighbours(self, requested=None):
        return None

    def check_usable(self):
        return None

    def prototypes(self):
        return None

    # ---- training: one step for every objective --------------------------------------------

    def compile(self, optimizer="adam", objective=None, metrics=None, seed=0, jit_compile=False, **kwargs):
        """Configures training with a training objective.

        Args:
            optimizer: a Keras optimizer (a `LossScaleOptimizer` for a float16 backbone).
            objective: an `objectives.Objective` (ClusTR, CrossEntropy, PGDAT, ...): the
                step's losses and metrics are the objective's.
            metrics: more Keras metrics for `evaluate` and validation, on (labels, logits).
            seed: int, the base of the stateless seeds of training attacks (distinct per
                step and replica).
            jit_compile: compile the gradient step with XLA (the sampler's bookkeeping runs
                outside it).
            **kwargs: `keras.Model.compile` arguments (`steps_per_execution`, ...).
        """
        if not isinstance(objective, interfaces.Objective) or "loss" in kwargs:
            raise TypeError(f"{type(self).__name__}.compile takes an `objective` (e.g. clustr_tf.objectives.ClusTR(), "
                            f"or CrossEntropy() for a linear head) instead of a loss. Received: objective="
                            f"{type(objective).__name__}" + (f", loss={kwargs['loss']!r}" if "loss" in kwargs else ""))
        objective.check_model(self)
        super().compile(optimizer=optimizer, metrics=metrics, jit_compile=False, **kwargs)
        self.objective = objective
        self.attack_seed = int(seed)
        train, evaluation = ("loss", *objective.metric_names), ("loss", *objective.evaluation_metric_names)
        trackers = {name: keras.metrics.Mean(name=name) for name in dict.fromkeys(train + evaluation)}
        self._step = _StepState(
            train_trackers=[trackers[n] for n in train], eval_trackers=[trackers[n] for n in evaluation],
            replica_local=[v for v in self.non_trainable_variables
                           if getattr(v.value, "aggregation", None) == tf.VariableAggregation.NONE],
            gradient_fn=tf.function(self._gradient_step, jit_compile=True) if jit_compile else self._gradient_step)

    def get_compile_config(self):
        """None: a saved model holds the network, not its training (the objective is not
        serialized); compile it again to train it further."""
        return None

    @property
    def metrics(self):
        own = list(dict.fromkeys(self._step.train_trackers + self._step.eval_trackers)) if self._step else []
        # Keras's own loss tracker is replaced by ours (the objective's loss); compiled
        # metrics are evaluation's (built by their first `evaluate` batch).
        return own + [m for m in super().metrics if m.name != "loss" and m.built]

    def _attack_seed(self):
        """A stateless seed for this step's training attack, distinct per step and replica."""
        ctx = tf.distribute.get_replica_context()
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        return tf.stack([tf.constant(self.attack_seed, tf.int64),
                         tf.cast(self.optimizer.iterations, tf.int64) * replicas
                         + tf.cast(ctx.replica_id_in_sync_group, tf.int64)])

    def _gradient_step(self, images, targets, seed):
        """The one gradient step of every objective: per-example values and the record."""
        with tf.GradientTape() as tape:
            result = self.objective.losses(self, images, targets, seed)
            # The mean over the global batch: R replicas on R batches update as one
            # replica on all of them (Keras's optimizer sums the replicas' gradients).
            loss = tf.nn.compute_average_loss(result.losses)
            if self.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(self.losses))
            scaled = self.optimizer.scale_loss(loss)
        variables = self.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(scaled, variables), variables))
        ctx = tf.distribute.get_replica_context()
        if ctx.num_replicas_in_sync > 1:  # every replica holds the same batch-norm statistics
            for v in self._step.replica_local:
                v.assign(ctx.all_reduce(tf.distribute.ReduceOp.MEAN, tf.identity(v.value)))
        return {"loss": result.losses, **result.metrics}, result.record

    def train_step(self, data):
        images, targets, _ = keras.utils.unpack_x_y_sample_weight(data)
        targets = targets if isinstance(targets, dict) else {"labels": targets}
        values, record = self._step.gradient_fn(images, targets, self._attack_seed())
        # Outside the (possibly XLA-compiled) step: the sampler's state is a host variable.
        if record is not None and self.loss_recorder is not None and "indices" in targets:
            self.loss_recorder.record_losses(targets["indices"], record)
        if set(values) != {t.name for t in self._step.train_trackers}:
            raise ValueError(f"{type(self.objective).__name__}.losses must give the metrics its `metric_names` "
                             f"declares, {sorted(self.objective.metric_names)}. Received: "
                             f"{sorted(set(values) - {'loss'})}")
        for tracker in self._step.train_trackers:
            tracker.update_state(values[tracker.name])
        return {t.name: t.result() for t in self._step.train_trackers}

    def test_step(self, data):
        images, targets, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        labels = tf.reshape(tf.cast(targets["labels"] if isinstance(targets, dict) else targets, tf.int64), [-1])
        values, logits = self.objective.evaluation(self, images, labels)
        for tracker in self._step.eval_trackers:
            tracker.update_state(values[tracker.name])
        logs = self.compute_metrics(images, labels, logits, sample_weight=sample_weight)
        train_only = {t.name for t in self._step.train_trackers} - {t.name for t in self._step.eval_trackers}
        return {k: v for k, v in logs.items() if k not in train_only}


@keras.saving.register_keras_serializable(package="clustr_tf")
class ClusTRModel(Classifier):
    """A ClusTR classifier: `ClusterCenters` on top of a feature extractor.

    Compile it with an objective (`objectives.ClusTR(...)`) and fit it on the objective's batches
    (`NeighbourhoodSampler.dataset()`) with its callbacks (`ClusterRefresh`). Training
    targets are a dict with `"labels"`, `"clusters"` (global cluster index of each example;
    the magnet loss groups the batch by it) and `"indices"` (each example's index in the
    training set, under which its loss is recorded in `loss_recorder`). Evaluation targets
    are plain class labels (or a dict with `"labels"`); the evaluation loss is the magnet
    loss against the stored centers, and `nearest_center_accuracy` (the certified
    decision rule) is reported beside `accuracy` (soft kNC).

    Args:
        backbone: a Keras model mapping images [batch, H, W, C] in [0, 1] to features
            [batch, D].
        num_classes: int, C.
        clusters_per_class: int, K (official: 2).
        neighbours: int, L of the soft-kNC rule (official: 10 in training).
        trainable_centers: bool, whether the optimizer trains the centers (certified
            ClusTR, `objectives.CertifiedClusTR`) instead of the cluster refresh.
        **kwargs: `keras.Model` arguments (`name`, ...).

    Call arguments:
        inputs: float tensor [batch, H, W, C] in [0, 1].
        training: bool, passed to the backbone (batch normalization).

    Returns:
        float tensor [batch, C], class logits.

    Example:

    ```python
    backbone = clustr_tf.backbones.small_convnet((8, 8, 1))
    model = clustr_tf.models.ClusTRModel(backbone, num_classes=10)
    model.compile(optimizer=keras.optimizers.Adam(1e-4),
                  objective=clustr_tf.objectives.ClusTR(consistency_lambda=8.0))
    ```

    Reference:
        Alfarra et al., "Rethinking Clustering for Robustness", BMVC 2021.
    """

    def __init__(self, backbone, num_classes, clusters_per_class=config.CLUSTERS_PER_CLASS,
                 neighbours=config.NEIGHBOURS, trainable_centers=False, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(backbone, keras.layers.Layer):
            raise TypeError(
                f"`backbone` must be a Keras model or layer. Received: {type(backbone).__name__}"
            )
        self.backbone = backbone
        # The head always computes in float32: squared distances overflow float16.
        self.cluster_centers = layers.ClusterCenters(
            num_classes, clusters_per_class, neighbours, trainable_centers=trainable_centers, name="cluster_centers",
            dtype="float32")
        if backbone.built and getattr(backbone, "inputs", None):
            self.build(tuple(backbone.inputs[0].shape))

    def build(self, input_shape):
        if not self.backbone.built:
            self.backbone.build(input_shape)
        feature_shape = self.backbone.compute_output_shape(input_shape)
        self.cluster_centers.build(feature_shape)
        self.built = True

    def call(self, inputs, training=False):
        return self.cluster_centers(self.backbone(inputs, training=training))

    # ---- the Classifier interface ---------------------------------------------------------

    logits_are_log_scores = True
    certified_rule = "nearest center"

    @property
    def num_classes(self):
        return self.cluster_centers.num_classes

    def logits_from_features(self, features, neighbours=None):
        layer = self.cluster_centers
        return layer.logits_from_distances(layer.squared_distances(features), neighbours)

    def decisions_from_features(self, features, neighbours=None):
        """(soft-kNC class, nearest-center class) int64 [batch] of features."""
        layer = self.cluster_centers
        distances = layer.squared_distances(features)
        soft = tf.argmax(layer.logits_from_distances(distances, neighbours), axis=-1)
        return soft, tf.argmin(distances, axis=-1) // layer.clusters_per_class

    def feature_certificate(self, features):
        """float64 `(feature_radius, classes, runner_up)` of the nearest-center rule
        (`certify.feature_radius` against the stored centers)."""
        layer = self.cluster_centers
        return certify.feature_radius(tf.cast(features, tf.float64), tf.cast(layer.centers, tf.float64),
                                      layer.clusters_per_class)

    def evaluation_neighbours(self, requested=None):
        """L of the soft-kNC rule at evaluation: `requested` (official: 20), at most C*K."""
        return min(requested or config.EVAL_NEIGHBOURS, self.cluster_centers.num_clusters)

    def check_usable(self):
        """Raises ValueError for centers that cannot classify (NaN, all equal) or a variance <= 0."""
        layer = self.cluster_centers
        centers = layer.centers.numpy()
        if not (float(layer.variance.numpy()) > 0 and np.isfinite(centers).all()
                and np.ptp(centers, axis=0).max() > 0):
            raise ValueError("degenerate cluster centers (NaN, all equal, or a zero variance)")

    def prototypes(self):
        """(centers [C*K, D], their classes [C*K]) as numpy."""
        layer = self.cluster_centers
        return layer.centers.numpy(), np.arange(layer.num_clusters) // layer.clusters_per_class

    def get_config(self):
        layer = self.cluster_centers
        return {
            **super().get_config(),
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "num_classes": layer.num_classes,
            "clusters_per_class": layer.clusters_per_class,
            "neighbours": layer.neighbours,
            "trainable_centers": layer.trainable_centers,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(
            config["backbone"], custom_objects=custom_objects
        )
        return cls(**config)


def prediction_function(model, neighbours=None):
    """A `tf.function` images -> (predicted class, certified-rule class); reuse it."""
    return model.prediction_function(neighbours)


def evaluate_accuracy(model, dataset, neighbours=None, batch_size=256, predict_fn=None):
    """Clean accuracy of both decision rules on a labelled dataset.

    Args:
        model: a `Classifier` (a `ClusTRModel` or a softmax classifier).
        dataset: unbatched `tf.data.Dataset` of `(image [H, W, C] in [0, 1], label)`.
        neighbours: L of the soft-kNC rule for this evaluation (official: 20); defaults to
            the model's.
        batch_size: int.
        predict_fn: the result of `prediction_function(model, neighbours)`, to reuse
            one trace across calls.

    Returns:
        dict with `clean_accuracy` (soft kNC), `nearest_center_accuracy` (the certified
        rule), `agreement` (fraction of examples where both rules predict the same class)
        and `num_examples`.
    """
    predict = predict_fn or prediction_function(model, neighbours)
    totals = {"soft": 0, "hard": 0, "agree": 0, "n": 0}
    for images, labels in dataset.batch(batch_size).prefetch(2):
        soft, hard = predict(images)
        labels = tf.cast(labels, tf.int64)
        totals["soft"] += int(tf.reduce_sum(tf.cast(soft == labels, tf.int32)))
        totals["hard"] += int(tf.reduce_sum(tf.cast(hard == labels, tf.int32)))
        totals["agree"] += int(tf.reduce_sum(tf.cast(soft == hard, tf.int32)))
        totals["n"] += int(tf.shape(labels)[0])
    n = max(totals["n"], 1)
    return {
        "clean_accuracy": totals["soft"] / n,
        "nearest_center_accuracy": totals["hard"] / n,
        "agreement": totals["agree"] / n,
        "num_examples": totals["n"],
    }
