"""Training objectives: one small object per training method.

An objective says what one training step minimises on a batch, per example, and what it
reports; `clustr_tf.training.Trainer` owns everything else (the loop, the shared gradient
step, distribution, checkpoints, logging). Each objective also makes the model it trains
and the batches it trains on, and may add Keras callbacks (ClusTR's cluster refresh):

    objective = objectives.ClusTR(consistency_lambda=8.0)        # ClusTR+QTRADES
    model = objective.build_model(backbone, num_classes=10)
    batches = objective.batches(images, labels, num_classes=10)  # neighbourhood batches

The methods:

- `ClusTR`: the magnet loss on neighbourhood batches, plus the official cross-entropy
  term (`xent_lambda`, raw scores S as logits), a cross-entropy on log S
  (`logits_xent_lambda`) and the QTRADES consistency term (`consistency_lambda`, in the
  official form or a TRADES-style KL);
- `CrossEntropy`: a linear head and cross-entropy on shuffled batches;
- either with `certified_margin`, on a Lipschitz-by-construction backbone: the same
  objective at the worst case a perturbation of that l2 radius can do (certified training);
- `PGDAT`: the same on PGD inputs (Madry et al.).

A new method is a new `Objective` subclass: `losses` (and, if it needs them, `batches`,
`build_model`, `callbacks`, `record`); the training loop does not change.

Reference:
    Alfarra et al., "Rethinking Clustering for Robustness", BMVC 2021 (ClusTR+QTRADES);
    Zhang et al., "Theoretically Principled Trade-off between Robustness and Accuracy",
    ICML 2019 (TRADES); Madry et al., "Towards Deep Learning Models Resistant to
    Adversarial Attacks", ICLR 2018.
"""

import collections

import tensorflow as tf

from clustr_tf import baselines
from clustr_tf import checks
from clustr_tf import clustering
from clustr_tf import config
from clustr_tf import lipschitz
from clustr_tf import losses
from clustr_tf import models
from clustr_tf import ops
from clustr_tf import sampler as sampler_lib

# "official": the paper's ClusTR+QTRADES term; "kl": a TRADES-style KL, not the paper's.
CONSISTENCY_FORMS = config.CONSISTENCY_FORMS

# What `Objective.losses` returns for one replica's batch: per-example float32 [B] values.
#   losses: what the step minimises (their mean over the global batch);
#   metrics: {name: [B]} averaged over the epoch and shown (accuracy and the like);
#   record: per-example values the objective hands its batch source (`record`), or None.
Result = collections.namedtuple("Result", "losses metrics record")


def _accuracy(logits, labels):
    return tf.cast(tf.argmax(logits, -1) == labels, tf.float32)


class Objective:
    """A training method (see the module docstring).

    Attributes:
        model_class: the `models.Classifier` subclass it trains.
        validation_metrics: {log name: key of `models.evaluate_accuracy`'s result} logged
            after each epoch on the test split.
    """

    model_class = models.Classifier
    validation_metrics = {"val_accuracy": "clean_accuracy"}

    def losses(self, model, images, targets, seed):
        """`Result` for one replica's batch.

        Args:
            model: the model being trained (an instance of `model_class`).
            images: float tensor [B, H, W, C] in [0, 1].
            targets: the batch source's targets (a dict with "labels", ...).
            seed: int64 tensor [2], distinct per step and replica, for training attacks.
        """
        raise NotImplementedError

    def build_model(self, backbone, num_classes):
        """The model this objective trains, on `backbone`."""
        raise NotImplementedError

    def batches(self, images, labels, num_classes, seed=0, batch_size=240):
        """The batch source (`dataset(start, stream, augment)`, `state_variables()`,
        `record_losses(indices, losses)`, `batch_size`): shuffled batches by default."""
        del num_classes
        return baselines.BatchSource(images, labels, min(batch_size, len(labels)), seed=seed)

    def callbacks(self, trainer, resumed):
        """Keras callbacks the objective needs in `trainer`'s loop (before the loggers)."""
        del trainer, resumed
        return []

    def record(self, source, targets, record):
        """Hands `record` (from `losses`) to the batch source; nothing by default."""
        del source, targets, record


class _CertifiedMargin:
    """The certified-margin setting an objective shares: `certified_margin` (an l2 radius in
    pixels, 0: off) and the exact Lipschitz bound of the backbone it is trained on."""

    def _init_margin(self, certified_margin):
        self.certified_margin = checks.l2_radius("certified_margin", certified_margin)

    def feature_margin(self, model):
        """The certified margin in feature units: `certified_margin` times the backbone's
        bound by construction (`lipschitz.construction_bound`), which raises
        `lipschitz.NotLipschitzByConstructionError` for a backbone without one. (Read when
        the step is traced, not at every step.)"""
        if not self.certified_margin:
            return 0.0
        return self.certified_margin * lipschitz.construction_bound(model.backbone)

    def check_model(self, model):
        """Raises for a model this objective cannot certify-train (no exact bound)."""
        self.feature_margin(model)


class CrossEntropy(Objective, _CertifiedMargin):
    """A softmax classifier (a linear head on the backbone) trained with cross-entropy.

    Args:
        certified_margin: an l2 radius eps in pixels (0: plain cross-entropy). With it, the
            cross-entropy of the Lipschitz-margin logits z_j + eps L ||w_j - w_y|| for every
            class j other than the label y (Tsuzuku et al., NeurIPS 2018, with the pairwise
            head norms of Leino et al.'s GloRo, ICML 2021), L the backbone's bound by
            construction: a zero loss certifies the head's decision at radius eps.
    """

    model_class = baselines.SoftmaxClassifier

    def __init__(self, certified_margin=0.0):
        self._init_margin(certified_margin)

    def build_model(self, backbone, num_classes):
        model = baselines.SoftmaxClassifier(backbone, num_classes=num_classes)
        self.check_model(model)
        return model

    def _inputs(self, model, images, labels, seed):
        del model, labels, seed
        return images

    def losses(self, model, images, targets, seed):
        labels = tf.cast(targets["labels"], tf.int64)
        inputs = self._inputs(model, images, labels, seed)
        logits = tf.cast(model(inputs, training=True), tf.float32)
        margin = self.feature_margin(model)
        trained = margin_logits(logits, labels, model.head.kernel, margin) if margin else logits
        loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, trained)
        return Result(loss, {"accuracy": _accuracy(logits, labels)}, None)


def margin_logits(logits, labels, kernel, feature_margin):
    """Lipschitz-margin logits: z_j + r ||w_j - w_y|| for j != y (z_y unchanged), r the
    margin in feature units; the worst logits a feature displacement of norm r can give."""
    kernel = tf.cast(kernel, tf.float32)  # [D, C]
    columns = tf.transpose(kernel)
    gaps = ops.pairwise_distances(columns, columns)  # [C, C]
    own = tf.gather(gaps, labels)  # [B, C]: ||w_y - w_j||
    other = tf.one_hot(labels, tf.shape(logits)[-1], on_value=0.0, off_value=1.0)
    return logits + float(feature_margin) * own * other


class PGDAT(CrossEntropy):
    """Madry et al.'s adversarial training: cross-entropy on l_inf PGD inputs (random
    start; on CIFAR-10 eps 8/255, step 2/255, 7 to 10 steps). The attack runs in inference
    mode and its result is a constant (`baselines.pgd_perturbation`)."""

    def __init__(self, eps=8.0 / 255.0, step=2.0 / 255.0, iterations=10):
        super().__init__()
        checks.positive_int("iterations", iterations)
        if not 0 < step <= eps:
            raise ValueError(f"PGD-AT needs 0 < `step` <= `eps`. Received: step={step!r}, eps={eps!r}")
        self.eps, self.step, self.iterations = float(eps), float(step), iterations

    def _inputs(self, model, images, labels, seed):
        return baselines.pgd_perturbation(model, images, labels, self.eps, self.step, self.iterations, seed)


class ClusTR(Objective, _CertifiedMargin):
    """ClusTR: the magnet loss on neighbourhood batches, with its optional terms (see
    `per_example_objective`), on a `models.ClusTRModel`.

    Args:
        clusters_per_class: K (official 2).
        neighbours: L of the soft-kNC rule in training (official 10).
        m, d: clusters per neighbourhood batch and examples per cluster (official 12, 20).
        alpha: the magnet loss margin (official 12.5).
        magnet_epsilon: None (uncapped), or `losses.OFFICIAL_EPSILON` (the official cap).
        xent_lambda: weight of the official cross-entropy (raw scores S as logits).
        logits_xent_lambda: weight of a cross-entropy on log S.
        consistency_lambda: weight of the QTRADES term (0: off; official 8).
        consistency: its form, one of `CONSISTENCY_FORMS`.
        consistency_eps, consistency_step: its perturbation (official 8/255, 10/255).
        refresh_every: re-cluster after every this many epochs (official 1).
        certified_margin: an l2 radius eps in pixels (0: off, the paper's objective). With
            it, certified ClusTR: the magnet loss with every other-class squared distance
            reduced by 2 eps L ||mu_own - mu_j|| (`losses.magnet_loss`'s `feature_margin`),
            L the backbone's bound by construction (`lipschitz.construction_bound`: a
            `--backbone=lipschitz` network), so a zero loss certifies the nearest-center
            decision at radius eps against the batch's cluster means; the refresh then
            puts the stored centers on those means.
    """

    model_class = models.ClusTRModel
    validation_metrics = {"val_accuracy": "clean_accuracy", "val_nearest_center_accuracy": "nearest_center_accuracy"}

    def __init__(self, clusters_per_class=2, neighbours=10, m=12, d=20, alpha=12.5, magnet_epsilon=None,
                 xent_lambda=0.0, logits_xent_lambda=0.0, consistency_lambda=0.0, consistency="official",
                 consistency_eps=8.0 / 255.0, consistency_step=10.0 / 255.0, refresh_every=1,
                 certified_margin=0.0):
        for name, value in (("clusters_per_class", clusters_per_class), ("neighbours", neighbours), ("m", m),
                            ("d", d), ("refresh_every", refresh_every)):
            checks.positive_int(name, value)
        for name, value in (("alpha", alpha), ("xent_lambda", xent_lambda), ("logits_xent_lambda", logits_xent_lambda),
                            ("consistency_lambda", consistency_lambda), ("consistency_eps", consistency_eps),
                            ("consistency_step", consistency_step)):
            checks.non_negative(name, value)
        checks.one_of("consistency", consistency, CONSISTENCY_FORMS)
        self.clusters_per_class, self.neighbours, self.m, self.d = clusters_per_class, neighbours, m, d
        self.alpha, self.magnet_epsilon = float(alpha), magnet_epsilon
        self.xent_lambda, self.logits_xent_lambda = float(xent_lambda), float(logits_xent_lambda)
        self.consistency_lambda, self.consistency = float(consistency_lambda), consistency
        self.consistency_eps, self.consistency_step = float(consistency_eps), float(consistency_step)
        self.refresh_every = refresh_every
        self._init_margin(certified_margin)

    def build_model(self, backbone, num_classes):
        model = models.ClusTRModel(backbone, num_classes=num_classes, clusters_per_class=self.clusters_per_class,
                                   neighbours=self.neighbours)
        self.check_model(model)
        return model

    def batches(self, images, labels, num_classes, seed=0, batch_size=None):
        del batch_size  # m x d
        return sampler_lib.NeighbourhoodSampler(images, labels, num_classes=num_classes,
                                                clusters_per_class=self.clusters_per_class, m=self.m, d=self.d,
                                                seed=seed)

    def cluster_refresh(self, trainer, resumed=False):
        """The `clustering.ClusterRefresh` of `trainer`'s run (its model set): before the
        first step of a new run, and after every `refresh_every` epochs; a resumed run
        keeps the centers it saved. Its `refresh()` re-clusters now."""
        refresh = clustering.ClusterRefresh(
            trainer.sampler, frequency=self.refresh_every, refresh_on_train_begin=not resumed,
            batch_size=trainer.config.eval_batch_size, seed=trainer.config.seed, strategy=trainer.strategy)
        refresh.set_model(trainer.model)
        return refresh

    def callbacks(self, trainer, resumed):
        return [self.cluster_refresh(trainer, resumed)]

    def losses(self, model, images, targets, seed):
        total, magnet, logits, features, extras = per_example_objective(model, images, targets, self, seed=seed)
        labels = tf.cast(targets["labels"], tf.int64)
        hard = model.cluster_centers.nearest_center_class(features)
        metrics = {"magnet_loss": magnet, "accuracy": _accuracy(logits, labels),
                   "nearest_center_accuracy": tf.cast(hard == labels, tf.float32)}
        if "consistency" in extras:
            metrics["consistency_loss"] = extras["consistency"]
        return Result(total, metrics, magnet)

    def record(self, source, targets, record):
        """Each example's magnet loss goes to the sampler's seed distribution."""
        source.record_losses(targets["indices"], record)


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
        config: a `ClusTR` objective (or anything with its term weights and settings).
        adversarial: optional QTRADES input for `images` (a constant).
        seed: int tensor [2]; needed when consistency_lambda > 0 and `adversarial` is None.

    Returns:
        `(total, magnet, logits, features, extras)`: float32 [B] total and magnet-loss
        values, the clean logits [B, C] and features [B, D], and a dict that holds, when
        consistency_lambda > 0, "adversarial" (x') and "consistency" (the term [B]).
    """
    layer = model.cluster_centers
    features = model.backbone(images, training=True)
    margin = config.feature_margin(model) if hasattr(config, "feature_margin") else 0.0
    magnet = losses.magnet_loss(
        targets["clusters"], features, layer.clusters_per_class, config.alpha,
        num_clusters=layer.num_clusters, epsilon=config.magnet_epsilon, feature_margin=margin,
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


def from_train_config(config, **clustr_settings):
    """The objective a `training.TrainConfig` names (`method` and its settings).

    `clustr_settings` (`clusters_per_class`, `neighbours`, `m`, `d`) go to `ClusTR`: they
    shape its model and batches, which the training loop itself does not need.
    """
    if config.method == "cross_entropy":
        return CrossEntropy(certified_margin=config.certified_margin)
    if config.method == "pgd_at":
        return PGDAT(config.pgd_eps, config.pgd_step, config.pgd_iterations)
    return ClusTR(**clustr_settings, alpha=config.alpha, magnet_epsilon=config.magnet_epsilon, xent_lambda=config.xent_lambda,
                  logits_xent_lambda=config.logits_xent_lambda, consistency_lambda=config.consistency_lambda,
                  consistency=config.consistency, consistency_eps=config.consistency_eps,
                  consistency_step=config.consistency_step, refresh_every=config.refresh_every,
                  certified_margin=config.certified_margin)
