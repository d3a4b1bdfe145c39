"""The ClusTR training loop on `strategy.run`: one code path from one CPU to many workers.

`Trainer` trains a `ClusTRModel` with the magnet loss (plus, optionally, the cross-entropy
and the QTRADES consistency terms of the paper's recipes) under any `tf.distribute`
strategy:

- every replica trains on its own whole neighbourhood batch (m clusters x d examples),
  fed by `strategy.distribute_datasets_from_function`;
- the loss of each replica is divided by the global batch size
  (`tf.nn.compute_average_loss`), and Keras's optimizer sums the gradients over replicas,
  so R replicas on R batches make the update one replica makes on all of them;
- variables a replica assigns itself (batch-norm moving statistics, aggregation NONE)
  are averaged over replicas after each step, so every replica holds the same model;
- the cluster refresh embeds the training set under the strategy, and every worker runs
  the same k-means on the same features, so centers agree everywhere;
- a `tf.train.CheckpointManager` saves model, optimizer, epoch and the sampler's state
  every `checkpoint_every_steps` steps and at the end of each epoch; a new `Trainer` on the
  same directory continues from there (after a kill, at most the steps since the last
  save are lost). Workers other than the chief save into their own folders.

The training log (CSV, one row per epoch, each epoch exactly once across restarts),
TensorBoard scalars and a progress bar are written by the chief.

Reference:
    Alfarra et al., "Rethinking Clustering for Robustness", BMVC 2021 (ClusTR+QTRADES);
    Zhang et al., "Theoretically Principled Trade-off between Robustness and Accuracy",
    ICML 2019 (TRADES).
"""

import csv
import dataclasses
import os
import sys
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from clustr_tf import baselines
from clustr_tf import clustering
from clustr_tf import distribute
from clustr_tf import losses
from clustr_tf import models

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
        consistency: the form of that term, one of `CONSISTENCY_FORMS`: "official" (the
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
    time_budget_seconds: float | None = None
    cpu_budget_seconds: float | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"`method` must be one of {', '.join(METHODS)}. Received: {self.method!r}")
        if self.consistency not in CONSISTENCY_FORMS:
            raise ValueError(f"`consistency` must be one of {', '.join(CONSISTENCY_FORMS)}. "
                             f"Received: {self.consistency!r}")
        for name in ("xent_lambda", "logits_xent_lambda", "consistency_lambda"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"`{name}` must be >= 0. Received: {getattr(self, name)!r}")


METHODS = ("clustr", "cross_entropy", "pgd_at")
# "official": the paper's ClusTR+QTRADES term; "kl": a TRADES-style KL, not the paper's.
CONSISTENCY_FORMS = ("official", "kl")


def kl_divergence(logits_p, logits_q):
    """Per-example KL(p || q) between the softmax distributions of two logit tensors."""
    log_p = tf.nn.log_softmax(tf.cast(logits_p, tf.float32))
    log_q = tf.nn.log_softmax(tf.cast(logits_q, tf.float32))
    return tf.reduce_sum(tf.exp(log_p) * (log_p - log_q), axis=-1)


def official_consistency(probabilities, scores):
    """The official ClusTR+QTRADES term per example: -sum_c p_c log softmax(S)_c.

    A cross-entropy between the clean soft-kNC probabilities `p` and a softmax of the RAW
    scores `S` (in [0, K]) of the perturbed input, not of log S. It is at least
    log(1 + (C - 1) e^-K) (0.80 nats for C = 10, K = 2) and at most K + log C (4.3): bounded,
    unlike a KL between soft-kNC probabilities (about 100 nats when a class leaves the L
    nearest clusters), and lowered by moving the perturbed input towards the centers of
    the clean prediction.

    Args:
        probabilities: float [B, C], p.
        scores: float [B, C], S of the perturbed input.

    Returns:
        float32 [B].
    """
    log_q = tf.nn.log_softmax(tf.cast(scores, tf.float32))
    return -tf.reduce_sum(tf.cast(probabilities, tf.float32) * log_q, axis=-1)


def _consistency_output(model, images, form, training):
    """What the consistency term of `form` compares: S (official) or logits (kl)."""
    if form == "official":
        layer = model.cluster_centers
        return layer.scores_from_distances(layer.squared_distances(model.embed(images, training=training)))
    return model(images, training=training)


def _consistency_term(form, clean_logits, output):
    if form == "official":
        return official_consistency(tf.nn.softmax(clean_logits), output)
    return kl_divergence(clean_logits, output)


def consistency_perturbation(model, images, target, form, eps, step, seed):
    """The QTRADES adversarial input: one random-start signed step on the consistency term.

    Starts from `images + uniform(-eps, eps)` (clipped to [0, 1]), takes one step of size
    `step` along the sign of the gradient, with respect to x, of the term of `form` between
    the constant `target` and the model at x, and projects back into the l_inf ball of
    radius `eps` and [0, 1]:

    - "official": `official_consistency(p, S(x))`, p = softmax(target), S over the model's
      training L;
    - "kl": KL(p || p(x)).

    The model runs in inference mode (the official code runs its attack in training
    mode: batch statistics, and it updates the moving ones), and the result is a constant
    (`stop_gradient`): the attack's gradient never reaches the weights (the official code
    adds the attack's weight gradients to the training step; not copied).

    Args:
        model: a `ClusTRModel`.
        images: float tensor [B, H, W, C] in [0, 1].
        target: float tensor [B, C], the clean logits (log-scores), held constant.
        form: one of `CONSISTENCY_FORMS`.
        eps: float, l_inf radius.
        step: float, step size.
        seed: int tensor [2], for the random start.

    Returns:
        float tensor [B, H, W, C], the perturbed images.
    """
    if form not in CONSISTENCY_FORMS:
        raise ValueError(f"`form` must be one of {', '.join(CONSISTENCY_FORMS)}. Received: {form!r}")
    images = tf.stop_gradient(images)
    target = tf.stop_gradient(target)
    start = images + tf.random.stateless_uniform(tf.shape(images), seed, -eps, eps, images.dtype)
    start = tf.clip_by_value(start, 0.0, 1.0)
    with tf.GradientTape() as tape:
        tape.watch(start)
        term = tf.reduce_sum(_consistency_term(form, target, _consistency_output(model, start, form, False)))
    grad = tape.gradient(term, start)
    adv = start + step * tf.sign(grad)
    adv = tf.clip_by_value(tf.clip_by_value(adv, images - eps, images + eps), 0.0, 1.0)
    return tf.stop_gradient(adv)


def qtrades_perturbation(model, images, eps, step, seed):
    """The "kl" form's input: `consistency_perturbation` on KL(p(images) || p(x)), the
    clean logits taken in inference mode."""
    return consistency_perturbation(model, images, model(images, training=False), "kl", eps, step, seed)


def per_example_objective(model, images, targets, config, adversarial=None, seed=None):
    """The ClusTR training objective per example, on one replica's batch.

        magnet loss (batch form; capped if `config.magnet_epsilon`)
        + xent_lambda * cross-entropy(labels, S)            (raw scores as logits, official)
        + logits_xent_lambda * cross-entropy(labels, log S)
        + consistency_lambda * term(x, x')

    with `term` the official `official_consistency(p(x), S(x'))` (p keeps its gradient, as
    in the official code) or, for `consistency="kl"`, KL(p(x) || p(x')). p and S use the
    stored centers and variance and the training L; x and x' both pass the backbone in
    training mode. x' is `adversarial` when given, else `consistency_perturbation` with
    `seed`, against the clean prediction of this training pass held constant (official) or
    the clean logits in inference mode (kl).

    Args:
        model: a `ClusTRModel`.
        images: float tensor [B, H, W, C].
        targets: dict with "labels" int [B] and "clusters" int [B].
        config: `TrainConfig`.
        adversarial: optional QTRADES input for `images` (a constant).
        seed: int tensor [2]; needed when consistency_lambda > 0 and `adversarial` is None.

    Returns:
        `(total, magnet, logits, features, extras)`: float32 [B] total and magnet-loss
        values, the clean logits [B, C] and features [B, D], and a dict that holds, when
        consistency_lambda > 0, "adversarial" (x') and "consistency" (the term [B]).
    """
    layer = model.cluster_centers
    features = model.backbone(images, training=True)
    magnet = losses.magnet_loss(
        targets["clusters"], features, layer.clusters_per_class, config.alpha,
        num_clusters=layer.num_clusters, epsilon=config.magnet_epsilon,
    )
    distances = layer.squared_distances(features)
    logits = layer.logits_from_distances(distances)
    labels = tf.cast(targets["labels"], tf.int64)
    total = magnet
    extras = {}
    if config.xent_lambda:
        total += config.xent_lambda * tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels, layer.scores_from_distances(distances)
        )
    if config.logits_xent_lambda:
        total += config.logits_xent_lambda * tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
    if config.consistency_lambda:
        form = config.consistency
        if adversarial is None:
            if seed is None:
                raise ValueError("`per_example_objective` needs `adversarial` or `seed` when consistency_lambda > 0")
            target = logits if form == "official" else model(images, training=False)
            adversarial = consistency_perturbation(
                model, images, target, form, config.consistency_eps, config.consistency_step, seed
            )
        term = _consistency_term(form, logits, _consistency_output(model, adversarial, form, training=True))
        total += config.consistency_lambda * term
        extras = {"adversarial": adversarial, "consistency": term}
    return total, magnet, logits, features, extras


class Trainer:
    """Trains a `ClusTRModel` (or, with `config.method` "cross_entropy" or "pgd_at", a
    `baselines.SoftmaxClassifier`) under a `tf.distribute` strategy; see the module docstring.

    Build the model and the optimizer inside `strategy.scope()`; create the sampler
    outside it (its variables are plain CPU variables that each worker keeps).

    Args:
        model: a `ClusTRModel`, built.
        optimizer: a Keras optimizer (a `LossScaleOptimizer` under mixed_float16).
        sampler: a `NeighbourhoodSampler` over the training set (a `baselines.BatchSource`
            for the baselines).
        strategy: the `tf.distribute.Strategy` the model was built under.
        model_dir: the run directory (checkpoints, logs).
        config: a `TrainConfig`.
        test_dataset: optional unbatched `(image, label)` dataset evaluated after each
            epoch (clean and nearest-center accuracy).
        augment: optional batch augmentation `augment(images, seed)`.
        verbose: 1 shows "Epoch i/n" and a Keras progress bar on the chief's stdout.
    """

    def __init__(self, model, optimizer, sampler, strategy, model_dir, config,
                 test_dataset=None, augment=None, verbose=1):
        self.model = model
        self.optimizer = optimizer
        self.sampler = sampler
        self.strategy = strategy
        self.model_dir = model_dir
        self.config = config
        self.test_dataset = test_dataset
        self.augment = augment
        self.verbose = verbose
        self.clustr = config.method == "clustr"
        if self.clustr != isinstance(model, models.ClusTRModel):
            raise TypeError(f"method {config.method!r} trains a "
                            f"{'ClusTRModel' if self.clustr else 'baselines.SoftmaxClassifier'}. "
                            f"Received: {type(model).__name__}")
        self.is_chief, self.worker_index, self.num_workers = distribute.worker_info(strategy)
        self.replicas = strategy.num_replicas_in_sync
        self.local_replicas = max(self.replicas // self.num_workers, 1)
        with strategy.scope():
            self.optimizer.build(model.trainable_variables)
            self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
            self.elapsed = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="elapsed")
            self.elapsed_cpu = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="elapsed_cpu")
        self.refresher = None
        if self.clustr:
            self.refresher = clustering.ClusterRefresh(
                sampler, batch_size=config.eval_batch_size, seed=config.seed, strategy=strategy
            )
            self.refresher.set_model(model)
            model.loss_recorder = sampler
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
        sums, magnet = self._compute_fn(images, targets)
        # Outside the (possibly XLA-compiled) computation: the sampler's state is a
        # host variable.
        if self.clustr:
            self.sampler.record_losses(targets["indices"], magnet)
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

    def _baseline_step(self, images, targets):
        """A cross-entropy step on clean ("cross_entropy") or PGD ("pgd_at") inputs."""
        model, config = self.model, self.config
        ctx = tf.distribute.get_replica_context()
        labels = tf.cast(targets["labels"], tf.int64)
        inputs = images
        if config.method == "pgd_at":
            seed = self._attack_seed(ctx)
            inputs = baselines.pgd_perturbation(
                model, images, labels, config.pgd_eps, config.pgd_step, config.pgd_iterations, seed
            )
        with tf.GradientTape() as tape:
            logits = tf.cast(model(inputs, training=True), tf.float32)
            total = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
            loss = tf.nn.compute_average_loss(total)
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
            scaled = self.optimizer.scale_loss(loss)
        variables = model.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(scaled, variables), variables))
        self._sync_replicas(ctx)
        return {
            "loss": tf.reduce_sum(total),
            "accuracy": tf.reduce_sum(tf.cast(tf.argmax(logits, -1) == labels, tf.float32)),
            "count": tf.cast(tf.shape(labels)[0], tf.float32),
        }, total

    def _compute_step(self, images, targets):
        if not self.clustr:
            return self._baseline_step(images, targets)
        model, config = self.model, self.config
        ctx = tf.distribute.get_replica_context()
        seed = self._attack_seed(ctx) if config.consistency_lambda else None
        with tf.GradientTape() as tape:
            total, magnet, logits, features, extras = per_example_objective(
                model, images, targets, config, seed=seed
            )
            loss = tf.nn.compute_average_loss(total)
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
            scaled = self.optimizer.scale_loss(loss)
        variables = model.trainable_variables
        grads = tape.gradient(scaled, variables)
        self.optimizer.apply_gradients(zip(grads, variables))
        self._sync_replicas(ctx)
        labels = tf.cast(targets["labels"], tf.int64)
        hard = model.cluster_centers.nearest_center_class(features)
        sums = {"consistency_loss": tf.reduce_sum(extras["consistency"])} if "consistency" in extras else {}
        return {
            **sums,
            "loss": tf.reduce_sum(total),
            "magnet_loss": tf.reduce_sum(magnet),
            "accuracy": tf.reduce_sum(tf.cast(tf.argmax(logits, -1) == labels, tf.float32)),
            "nearest_center_accuracy": tf.reduce_sum(tf.cast(hard == labels, tf.float32)),
            "count": tf.cast(tf.shape(labels)[0], tf.float32),
        }, magnet

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

    # ---- logs --------------------------------------------------------------------------

    def _csv_rows_before(self, epoch):
        """Keeps the CSV rows of epochs < epoch (a restart redoes the later ones)."""
        path = os.path.join(self.model_dir, CSV_NAME)
        if not os.path.exists(path):
            return
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            fieldnames = reader.fieldnames
            rows = [r for r in reader if int(r["epoch"]) < epoch]
        with open(path, "w", newline="") as fh:
            if fieldnames:
                writer = csv.DictWriter(fh, fieldnames=fieldnames)
                writer.writeheader()
                writer.writerows(rows)

    def _write_epoch(self, epoch, logs):
        path = os.path.join(self.model_dir, CSV_NAME)
        new = not os.path.exists(path) or os.path.getsize(path) == 0
        with open(path, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["epoch"] + sorted(logs))
            if new:
                writer.writeheader()
            writer.writerow({"epoch": epoch, **logs})
        with self._writer.as_default(step=epoch):
            for name, value in logs.items():
                tf.summary.scalar(name, value)
        self._writer.flush()

    # ---- the loop ----------------------------------------------------------------------

    def train(self):
        """Trains until `config.epochs`; returns the list of per-epoch logs of this call."""
        config = self.config
        resumed = self.restore()
        if not resumed:
            if self.refresher:
                self.refresher.refresh()
            self.save()
        epoch = int(self.epoch.numpy())
        step = int(self.optimizer.iterations.numpy()) - epoch * config.steps_per_epoch
        if self.is_chief:
            self._csv_rows_before(epoch)
            self._writer = tf.summary.create_file_writer(os.path.join(self.model_dir, "logs", "train"))
        else:
            self._writer = tf.summary.create_noop_writer()
        if epoch >= config.epochs or self._budget_spent():
            logging.info("Training already finished at epoch %d", epoch)
            return []
        iterator = iter(self._dataset(int(self.optimizer.iterations.numpy()) * self.local_replicas))
        step_fn = self._distributed_step()
        history = []
        while epoch < config.epochs:
            start, start_cpu = time.time(), time.process_time()
            logging.info("Epoch %d/%d (from step %d)", epoch + 1, config.epochs, step)
            show = 1 if (self.verbose and self.is_chief) else 0
            if show:  # the same display as Keras's fit: a header, then a progress bar
                sys.stdout.write(f"Epoch {epoch + 1}/{config.epochs}\n")
                sys.stdout.flush()
            bar = keras.utils.Progbar(config.steps_per_epoch, verbose=show,
                                      stateful_metrics=["loss", "accuracy", "nearest_center_accuracy"])
            if step:
                bar.update(step)
            sums = {}
            while step < config.steps_per_epoch:
                out = step_fn(iterator)
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                step += 1
                n = max(sums["count"], 1.0)
                bar.update(step, [(k, sums[k] / n) for k in ("loss", "accuracy", "nearest_center_accuracy")
                                  if k in sums])
                if (config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0
                        and step < config.steps_per_epoch):
                    self.save()
            n = max(sums.get("count", 0.0), 1.0)
            logs = {k: sums[k] / n for k in ("loss", "magnet_loss", "consistency_loss", "accuracy",
                                              "nearest_center_accuracy") if k in sums}
            if not np.isfinite(logs.get("loss", 0.0)):
                raise FloatingPointError(f"The training loss is {logs['loss']} at epoch {epoch + 1}")
            if self.refresher and (epoch + 1) % config.refresh_every == 0:
                self.refresher.refresh()
            if self.refresher:
                logs.update(self.refresher.last)
            if self.test_dataset is not None:
                test = models.evaluate_accuracy(
                    self.model, self.test_dataset, config.eval_neighbours, config.eval_batch_size,
                    predict_fn=self.predict_fn,
                )
                logs["val_accuracy"] = test["clean_accuracy"]
                if self.clustr:
                    logs["val_nearest_center_accuracy"] = test["nearest_center_accuracy"]
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.optimizer.learning_rate))
            logs["seconds"] = time.time() - start
            logs["cpu_seconds"] = time.process_time() - start_cpu
            epoch += 1
            step = 0
            self.epoch.assign(epoch)
            self.elapsed.assign_add(logs["seconds"])
            self.elapsed_cpu.assign_add(logs["cpu_seconds"])
            if self.is_chief:
                self._write_epoch(epoch - 1, logs)
            self.save()
            logging.info("Epoch %d: %s", epoch, " - ".join(f"{k}: {v:.4g}" for k, v in logs.items()))
            history.append(logs)
            if self._budget_spent():
                logging.info("Budget spent after %d epochs (%.0f s wall, %.0f s CPU)",
                             epoch, float(self.elapsed.numpy()), float(self.elapsed_cpu.numpy()))
                break
        return history

    def _budget_spent(self):
        wall, cpu = self.config.time_budget_seconds, self.config.cpu_budget_seconds
        return ((wall is not None and float(self.elapsed.numpy()) >= wall)
                or (cpu is not None and float(self.elapsed_cpu.numpy()) >= cpu))
