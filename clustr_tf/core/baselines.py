"""The baselines ClusTR is compared with: a softmax classifier trained with cross-entropy,
and the same trained adversarially with PGD (Madry et al.).

`SoftmaxClassifier` puts a linear head on any backbone; the objectives
`objectives.CrossEntropy` and `objectives.PGDAT` train it through the same `train_step`
and `fit` as ClusTR, on shuffled batches from `BatchSource`.
The robustness evaluation attacks it exactly as it attacks a ClusTR model.

Reference:
    Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks",
    ICLR 2018.
"""

import keras
import numpy as np
import tensorflow as tf

from clustr_tf.core import certify
from clustr_tf.core import models


@keras.saving.register_keras_serializable(package="clustr_tf")
class SoftmaxClassifier(models.Classifier):
    """A backbone with a linear (dense) head: class logits from features.

    Args:
        backbone: a Keras model mapping images [batch, H, W, C] in [0, 1] to features
            [batch, D].
        num_classes: int.
        **kwargs: `keras.Model` arguments.

    Call arguments:
        inputs: float tensor [batch, H, W, C] in [0, 1].
        training: bool, passed to the backbone.

    Returns:
        float32 tensor [batch, num_classes], class logits.
    """

    def __init__(self, backbone, num_classes, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(backbone, keras.layers.Layer):
            raise TypeError(f"`backbone` must be a Keras model or layer. Received: {type(backbone).__name__}")
        if num_classes < 2:
            raise ValueError(f"`num_classes` must be >= 2. Received: {num_classes}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.head = keras.layers.Dense(num_classes, name="head", dtype="float32")
        if backbone.built and getattr(backbone, "inputs", None):
            self.build(tuple(backbone.inputs[0].shape))

    def build(self, input_shape):
        if not self.backbone.built:
            self.backbone.build(input_shape)
        self.head.build(self.backbone.compute_output_shape(input_shape))
        self.built = True

    def call(self, inputs, training=False):
        return self.head(self.backbone(inputs, training=training))

    # ---- the Classifier interface (models.Classifier) ------------------------------------

    certified_rule = "linear head"

    def logits_from_features(self, features, neighbours=None):
        """The head's logits (there is no L: `neighbours` is ignored)."""
        del neighbours
        return tf.cast(self.head(features), tf.float32)

    def decisions_from_features(self, features, neighbours=None):
        """Both rules are the head's argmax."""
        classes = tf.argmax(self.logits_from_features(features), axis=-1)
        return classes, classes

    def feature_certificate(self, features):
        """float64 `(feature_radius, classes, runner_up)` of the linear head
        (`certify.linear_feature_radius`, exact)."""
        return certify.linear_feature_radius(tf.cast(features, tf.float64), tf.cast(self.head.kernel, tf.float64),
                                             tf.cast(self.head.bias, tf.float64))

    def get_config(self):
        return {
            **super().get_config(),
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "num_classes": self.num_classes,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"], custom_objects=custom_objects)
        return cls(**config)


def pgd_perturbation(model, images, labels, eps, step, iterations, seed):
    """Madry et al.'s training attack: l_inf PGD on the cross-entropy, random start.

    The model runs in inference mode, and the result is a constant: the attack's gradient
    never reaches the weights.

    Args:
        model: any model returning class logits.
        images: float tensor [B, H, W, C] in [0, 1].
        labels: int tensor [B].
        eps: float, l_inf radius (Madry et al. on CIFAR-10: 8/255).
        step: float, step size (2/255).
        iterations: int, PGD steps (a Python int: the loop is unrolled; 7 or 10 usual).
        seed: int tensor [2], for the random start.

    Returns:
        float tensor [B, H, W, C], the perturbed images.
    """
    images = tf.stop_gradient(images)
    labels = tf.cast(labels, tf.int64)
    adv = images + tf.random.stateless_uniform(tf.shape(images), seed, -eps, eps, images.dtype)
    adv = tf.clip_by_value(adv, 0.0, 1.0)
    for _ in range(iterations):
        with tf.GradientTape() as tape:
            tape.watch(adv)
            loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels, tf.cast(model(adv, training=False), tf.float32)))
        adv = adv + step * tf.sign(tape.gradient(loss, adv))
        adv = tf.clip_by_value(tf.clip_by_value(adv, images - eps, images + eps), 0.0, 1.0)
    return tf.stop_gradient(adv)


class BatchSource:
    """Shuffled training batches for the baselines, with the sampler's interface.

    Each epoch is a fresh stateless permutation of the training set, cut into batches;
    batch b is a function of (seed, b) alone, so a resumed run gets exactly the batches
    it would have had; the baselines train on it where ClusTR uses a `NeighbourhoodSampler`.

    Args:
        images: uint8 or float array [N, H, W, C] (uint8 is scaled to [0, 1]).
        labels: int array [N].
        batch_size: int, examples per batch (per replica).
        seed: int.
    """

    def __init__(self, images, labels, batch_size, seed=0):
        if not 1 <= batch_size <= len(labels):
            raise ValueError(
                f"`batch_size` must be in [1, {len(labels)}] (the number of examples). Received: {batch_size}"
            )
        self.images = images
        self.labels = labels
        self.batch_size = batch_size
        self.seed = seed
        self.steps_per_epoch = len(labels) // batch_size

    def dataset(self, start=0, stream=0, augment=None):
        """Endless `(images float32 [B, H, W, C], {"labels": int64 [B]})` batches.

        Args:
            start: int, batches of this stream already consumed (to resume).
            stream: int, selects an independent sequence of epochs (one per input
                pipeline of a distributed run), as `NeighbourhoodSampler.dataset`.
            augment: optional `augment(images, seed)`, as `data.augmentation` returns.
        """
        n, size = len(self.labels), self.batch_size
        seed = self.seed + 1_000_003 * int(stream)
        images = tf.constant(self.images)
        labels = tf.constant(self.labels, tf.int64)
        steps = self.steps_per_epoch

        def batch(b):
            epoch, i = b // steps, b % steps
            order = tf.argsort(tf.random.stateless_uniform([n], tf.stack([tf.constant(seed, tf.int64), epoch])))
            index = order[i * size:(i + 1) * size]
            x = tf.gather(images, index)
            x = tf.cast(x, tf.float32) / 255.0 if images.dtype == tf.uint8 else tf.cast(x, tf.float32)
            if augment is not None:
                x = augment(x, tf.stack([tf.constant(seed + 1, tf.int64), b]))
            return x, {"labels": tf.gather(labels, index)}

        return tf.data.Dataset.range(start, 2**62).map(batch, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)

    def state_variables(self):
        """Nothing to checkpoint: batches depend on the step alone."""
        return {}

    def record_losses(self, indices, losses):
        """Baselines draw uniformly: losses are not recorded."""
