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

from clustr_tf import certify
from clustr_tf import layers
from clustr_tf import losses as losses_lib


def _unpack_targets(y, clusters_per_class):
    """Training targets -> (labels int64 [N], clusters int32 [N] or None, indices or None)."""
    if isinstance(y, dict):
        clusters = y.get("clusters")
        labels = y.get("labels")
        if labels is None and clusters is not None:
            labels = tf.cast(clusters, tf.int64) // clusters_per_class
        if labels is None:
            raise ValueError(
                "Targets must hold 'labels' or 'clusters'. Received keys: " f"{sorted(y)}"
            )
        return tf.reshape(tf.cast(labels, tf.int64), [-1]), clusters, y.get("indices")
    return tf.reshape(tf.cast(y, tf.int64), [-1]), None, None


class Classifier(keras.Model):
    """What evaluation, attacks, certification and export ask of a model.

    `ClusTRModel` (nearest-center certificate) and `baselines.SoftmaxClassifier` (linear
    head) implement it, so no caller needs to look at what a model is:

    - `backbone`, `num_classes`, `embed(images, training=False)`: the features;
    - `logits_from_features(features, neighbours=None)`, `class_logits(images, neighbours=None)`:
      class logits (for ClusTR the log soft-kNC scores over `neighbours` = L);
    - `logits_are_log_scores`: whether exp(logits) are the raw scores the official
      evaluation attacks as logits (ClusTR) or the logits are those scores (a softmax);
    - `certified_rule` and `certify_features(features)`: the decision a certificate speaks
      about and, in float64, its feature-space radius, class and runner-up;
    - `prediction_function(neighbours=None)`: a traced `images -> (class, certified class)`;
    - `evaluation_neighbours(requested=None)`: the L an evaluation uses (None: no L);
    - `check_usable()`: raises ValueError when the model cannot be evaluated (e.g.
      degenerate centers);
    - `prototypes()`: `(centers, classes)` to draw, or None.
    """

    logits_are_log_scores = False
    certified_rule = None

    def embed(self, inputs, training=False):
        """float tensor [batch, D]: the backbone's features."""
        return self.backbone(inputs, training=training)

    def class_logits(self, images, neighbours=None, training=False):
        """float tensor [batch, C]: class logits of images."""
        return self.logits_from_features(self.embed(images, training=training), neighbours)

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


@keras.saving.register_keras_serializable(package="clustr_tf")
class ClusTRModel(Classifier):
    """A ClusTR classifier: `ClusterCenters` on top of a feature extractor.

    Compile it with `clustr_tf.losses.MagnetLoss` and fit it on
    `NeighbourhoodSampler.dataset()` with a `ClusterRefresh` callback. Training targets
    are a dict with `"clusters"` (global cluster index of each example; the magnet loss
    groups the batch by it), optionally `"labels"` and `"indices"` (each example's index
    in the training set, under which its loss is recorded in `loss_recorder`). Evaluation
    targets are plain class labels (or a dict with `"labels"`); the evaluation loss is the
    magnet loss against the stored centers.

    Metrics: the compiled ones (e.g. `"accuracy"`) see class labels and the soft-kNC
    logits; `nearest_center_accuracy` (the certified decision rule) is always reported.

    Args:
        backbone: a Keras model mapping images [batch, H, W, C] in [0, 1] to features
            [batch, D].
        num_classes: int, C.
        clusters_per_class: int, K (official: 2).
        neighbours: int, L of the soft-kNC rule (official: 10 in training).
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
                  loss=clustr_tf.losses.MagnetLoss(clusters_per_class=2),
                  metrics=["accuracy"])
    ```

    Reference:
        Alfarra et al., "Rethinking Clustering for Robustness", BMVC 2021.
    """

    def __init__(self, backbone, num_classes, clusters_per_class=2, neighbours=10, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(backbone, keras.layers.Layer):
            raise TypeError(
                f"`backbone` must be a Keras model or layer. Received: {type(backbone).__name__}"
            )
        self.backbone = backbone
        # The head always computes in float32: squared distances overflow float16.
        self.cluster_centers = layers.ClusterCenters(
            num_classes, clusters_per_class, neighbours, name="cluster_centers", dtype="float32"
        )
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.nearest_center_accuracy = keras.metrics.Accuracy(name="nearest_center_accuracy")
        # Set by ClusterRefresh (or by hand): an object with `record_losses(indices,
        # losses)`, such as the NeighbourhoodSampler. Not part of the model's state.
        self.loss_recorder = None
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

    def certify_features(self, features):
        """float64 `(feature_radius, classes, runner_up)` of the nearest-center rule
        (`certify.feature_radius` against the stored centers)."""
        layer = self.cluster_centers
        radius, classes, runner_up = certify.feature_radius(
            np.asarray(features, np.float64), layer.centers.numpy().astype(np.float64), layer.clusters_per_class)
        return radius.numpy(), classes.numpy(), runner_up.numpy()

    def evaluation_neighbours(self, requested=None):
        """L of the soft-kNC rule at evaluation: `requested` (official: 20), at most C*K."""
        return min(requested or 20, self.cluster_centers.num_clusters)

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

    def _magnet(self):
        if not isinstance(self.loss, losses_lib.MagnetLoss):
            raise TypeError(
                "ClusTRModel must be compiled with clustr_tf.losses.MagnetLoss. "
                f"Received loss: {self.loss!r}"
            )
        if self.loss.clusters_per_class != self.cluster_centers.clusters_per_class:
            raise ValueError(
                "MagnetLoss.clusters_per_class must equal the model's clusters_per_class "
                f"({self.cluster_centers.clusters_per_class}). Received: "
                f"{self.loss.clusters_per_class}"
            )
        return self.loss

    @property
    def metrics(self):
        # Keras's own loss tracker (also named "loss") is replaced by ours: the
        # training loss here is the magnet loss on features, not on the outputs.
        return [self.loss_tracker] + [m for m in super().metrics if m.name != "loss"]

    def _update_metrics(self, x, labels, features, loss):
        logits = self.cluster_centers(features)
        self.loss_tracker.update_state(loss)
        self.nearest_center_accuracy.update_state(
            labels, self.cluster_centers.nearest_center_class(features)
        )
        results = self.compute_metrics(x, labels, logits)
        results["loss"] = self.loss_tracker.result()
        return results

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        magnet = self._magnet()
        labels, clusters, indices = _unpack_targets(y, self.cluster_centers.clusters_per_class)
        if clusters is None:
            raise ValueError(
                "Training targets must be a dict with 'clusters' (the cluster index of each "
                "example), as NeighbourhoodSampler.dataset() yields."
            )
        with tf.GradientTape() as tape:
            features = self.backbone(x, training=True)
            # Keras's own reduction: mean over the batch, divided by the number of
            # replicas under a tf.distribute strategy, plus regularization losses.
            loss = self.compute_loss(
                x=x, y=clusters, y_pred=features, sample_weight=sample_weight, training=True
            )
            scaled = self.optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled, self.trainable_variables)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_variables))
        per_example = magnet.call(clusters, tf.stop_gradient(features))
        if self.loss_recorder is not None and indices is not None:
            self.loss_recorder.record_losses(indices, per_example)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        return self._update_metrics(x, labels, features, loss * replicas)

    def test_step(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        labels, _, _ = _unpack_targets(y, self.cluster_centers.clusters_per_class)
        features = self.backbone(x, training=False)
        layer = self.cluster_centers
        per_example = losses_lib.magnet_loss_with_centers(
            labels,
            features,
            layer.centers,
            layer.variance,
            layer.clusters_per_class,
            alpha=self.loss.alpha if isinstance(self.loss, losses_lib.MagnetLoss) else 12.5,
        )
        return self._update_metrics(x, labels, features, tf.reduce_mean(per_example))

    def get_config(self):
        layer = self.cluster_centers
        return {
            **super().get_config(),
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "num_classes": layer.num_classes,
            "clusters_per_class": layer.clusters_per_class,
            "neighbours": layer.neighbours,
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
