"""Training objectives: one small object per training method.

An objective says what one training step minimises on a batch, per example, and what it
reports; the model's `train_step` (`models.Classifier`, run by Keras `fit`) owns the
gradient step itself, once for every objective. Each objective also makes the model it
trains and the batches it trains on, and may add Keras callbacks (ClusTR's cluster refresh):

    objective = objectives.ClusTR(consistency_lambda=8.0)        # ClusTR+QTRADES
    model = objective.build_model(backbone, num_classes=10)
    batches = objective.batches(images, labels, num_classes=10)  # neighbourhood batches
    model.compile(optimizer=keras.optimizers.Adam(1e-4), objective=objective)
    model.fit(batches.dataset(), steps_per_epoch=50, epochs=25,
              callbacks=objective.callbacks(batches))

The methods:

- `ClusTR`: the magnet loss on neighbourhood batches, plus the official cross-entropy
  term (`xent_lambda`, raw scores S as logits), a cross-entropy on log S
  (`logits_xent_lambda`) and the QTRADES consistency term (`consistency_lambda`, in the
  official form or a TRADES-style KL);
- `CrossEntropy`: a linear head and cross-entropy on shuffled batches; with
  `certified_margin`, on a Lipschitz-by-construction backbone, the Lipschitz-margin
  cross-entropy (certified training);
- `CertifiedClusTR` (`clustr_tf.training.certified`): certified ClusTR, trainable centers
  trained on the certificate's own logits;
- `PGDAT`: cross-entropy on PGD inputs (Madry et al.).

A new method is a new `Objective` subclass: `losses` (and, if it needs them, `batches`,
`build_model`, `callbacks`, `evaluation`); the training step does not change.

Reference:
    Alfarra et al., "Rethinking Clustering for Robustness", BMVC 2021 (ClusTR+QTRADES);
    Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018.
"""

import tensorflow as tf

from clustr_tf.core import baselines
from clustr_tf import checks
from clustr_tf.core import clustering
from clustr_tf import config
from clustr_tf.training import consistency
from clustr_tf.training.certified import CertifiedClusTR  # noqa: F401  (an objective of this module)
from clustr_tf.training.certified import CertifiedMargin
from clustr_tf.training.certified import margin_logits
from clustr_tf.core.interfaces import Objective
from clustr_tf.core.interfaces import Result
from clustr_tf.core import losses
from clustr_tf.core import models
from clustr_tf.core import ops
from clustr_tf.core import sampler as sampler_lib


class CrossEntropy(CertifiedMargin, Objective):
    """A softmax classifier (a linear head on the backbone) trained with cross-entropy.

    Args:
        certified_margin: an l2 radius eps in pixels (0: plain cross-entropy). With it, the
            cross-entropy of the Lipschitz-margin logits z_j + eps L ||w_j - w_y|| for every
            class j other than the label y (Tsuzuku et al., NeurIPS 2018, with the pairwise
            head norms of Leino et al.'s GloRo, ICML 2021), L the backbone's bound by
            construction: a zero loss certifies the head's decision at radius eps.
        temperature: T, the logits are divided by it (with `certified_margin`: the offset
            cross-entropy of Prach et al., CVPR 2024).
    """

    model_class = baselines.SoftmaxClassifier

    def __init__(self, certified_margin=0.0, temperature=1.0):
        self._init_margin(certified_margin, temperature)

    def batches(self, images, labels, num_classes, seed=0, batch_size=240):
        """Shuffled batches (`baselines.BatchSource`)."""
        del num_classes
        return baselines.BatchSource(images, labels, min(batch_size, len(labels)), seed=seed)

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
        loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, trained / self.temperature)
        return Result(loss, {"accuracy": ops.correct(logits, labels)}, None)


class PGDAT(CrossEntropy):
    """Madry et al.'s adversarial training: cross-entropy on l_inf PGD inputs (random
    start; on CIFAR-10 eps 8/255, step 2/255, 7 to 10 steps). The attack runs in inference
    mode and its result is a constant (`baselines.pgd_perturbation`)."""

    def __init__(self, eps=config.PGD_EPS, step=config.PGD_STEP, iterations=config.PGD_ITERATIONS):
        super().__init__()
        checks.positive_int("iterations", iterations)
        if not 0 < step <= eps:
            raise ValueError(f"PGD-AT needs 0 < `step` <= `eps`. Received: step={step!r}, eps={eps!r}")
        self.eps, self.step, self.iterations = float(eps), float(step), iterations

    def _inputs(self, model, images, labels, seed):
        return baselines.pgd_perturbation(model, images, labels, self.eps, self.step, self.iterations, seed)


class ClusTR(Objective):
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
        consistency: its form, one of `config.CONSISTENCY_FORMS`.
        consistency_eps, consistency_step: its perturbation (official 8/255, 10/255).
        refresh_every: re-cluster after every this many epochs (official 1).
    """

    model_class = models.ClusTRModel
    validation_metrics = {"val_accuracy": "clean_accuracy", "val_nearest_center_accuracy": "nearest_center_accuracy"}
    evaluation_metric_names = ("accuracy", "nearest_center_accuracy")

    def __init__(self, clusters_per_class=config.CLUSTERS_PER_CLASS, neighbours=config.NEIGHBOURS,
                 m=config.CLUSTERS_PER_BATCH, d=config.EXAMPLES_PER_CLUSTER, alpha=config.MAGNET_ALPHA,
                 magnet_epsilon=None, xent_lambda=0.0, logits_xent_lambda=0.0, consistency_lambda=0.0,
                 consistency="official", consistency_eps=config.QTRADES_EPS, consistency_step=config.QTRADES_STEP,
                 refresh_every=1):
        for name, value in (("clusters_per_class", clusters_per_class), ("neighbours", neighbours), ("m", m),
                            ("d", d), ("refresh_every", refresh_every)):
            checks.positive_int(name, value)
        for name, value in (("alpha", alpha), ("xent_lambda", xent_lambda), ("logits_xent_lambda", logits_xent_lambda),
                            ("consistency_lambda", consistency_lambda), ("consistency_eps", consistency_eps),
                            ("consistency_step", consistency_step)):
            checks.non_negative(name, value)
        checks.one_of("consistency", consistency, config.CONSISTENCY_FORMS)
        self.clusters_per_class, self.neighbours, self.m, self.d = clusters_per_class, neighbours, m, d
        self.alpha, self.magnet_epsilon = float(alpha), magnet_epsilon
        self.xent_lambda, self.logits_xent_lambda = float(xent_lambda), float(logits_xent_lambda)
        self.consistency_lambda, self.consistency = float(consistency_lambda), consistency
        self.consistency_eps, self.consistency_step = float(consistency_eps), float(consistency_step)
        self.refresh_every = refresh_every

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

    @property
    def metric_names(self):
        names = ("magnet_loss", "accuracy", "nearest_center_accuracy")
        return names + ("consistency_loss",) if self.consistency_lambda else names

    def cluster_refresh(self, batches, resumed=False, strategy=None, batch_size=256, seed=0):
        """The `clustering.ClusterRefresh` of a run on `batches` (a `NeighbourhoodSampler`):
        before the first step of a new run, and after every `refresh_every` epochs; a
        resumed run keeps the centers it saved. Its `refresh()` re-clusters now (once its
        model is set)."""
        return clustering.ClusterRefresh(
            batches, frequency=self.refresh_every, refresh_on_train_begin=not resumed,
            batch_size=batch_size, seed=seed, strategy=strategy)

    def callbacks(self, batches, resumed=False, strategy=None, batch_size=256, seed=0):
        return [self.cluster_refresh(batches, resumed, strategy, batch_size, seed)]

    def losses(self, model, images, targets, seed):
        if "clusters" not in targets:
            raise ValueError("ClusTR's training targets must be a dict with 'labels', 'clusters' (the cluster of "
                             "each example) and 'indices', as NeighbourhoodSampler.dataset() yields. Received "
                             f"keys: {sorted(targets)}")
        total, magnet, logits, features, extras = per_example_objective(model, images, targets, self, seed=seed)
        labels = tf.cast(targets["labels"], tf.int64)
        hard = model.cluster_centers.nearest_center_class(features)
        metrics = {"magnet_loss": magnet, "accuracy": ops.correct(logits, labels),
                   "nearest_center_accuracy": tf.cast(hard == labels, tf.float32)}
        if "consistency" in extras:
            metrics["consistency_loss"] = extras["consistency"]
        # Each example's magnet loss goes to the sampler's seed distribution.
        return Result(total, metrics, magnet)

    def evaluation(self, model, images, labels):
        """The magnet loss against the stored centers (`losses.magnet_loss_with_centers`),
        the soft-kNC accuracy and the nearest-center accuracy."""
        layer = model.cluster_centers
        features = model.embed(images, training=False)
        logits = model.logits_from_features(features)
        loss = losses.magnet_loss_with_centers(labels, features, layer.centers, layer.variance,
                                               layer.clusters_per_class, alpha=self.alpha, epsilon=self.magnet_epsilon)
        hard = layer.nearest_center_class(features)
        return {"loss": loss, "accuracy": ops.correct(logits, labels),
                "nearest_center_accuracy": tf.cast(hard == labels, tf.float32)}, logits


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
        config: a `ClusTR` objective.
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
            adversarial = consistency.perturbation(
                model, images, target, form, config.consistency_eps, config.consistency_step, seed
            )
        term = consistency.term(form, logits, consistency.term_output(model, adversarial, form, training=True))
        total += config.consistency_lambda * term
        extras = {"adversarial": adversarial, "consistency": term}
    return total, magnet, logits, features, extras


def from_config(objective, model):
    """The objective of a run's `config.Objective` section (`method` and its settings),
    with the `config.Model` section's K and L for ClusTR."""
    if objective.method == "cross_entropy":
        return CrossEntropy(certified_margin=objective.certified_margin, temperature=objective.temperature or 1.0)
    if objective.certified_margin:
        return CertifiedClusTR(objective.certified_margin, clusters_per_class=model.k, neighbours=model.L,
                               temperature=objective.temperature or config.CERTIFIED_TEMPERATURE)
    if objective.method == "pgd_at":
        return PGDAT(objective.pgd_eps, objective.pgd_step, objective.pgd_iterations)
    return ClusTR(clusters_per_class=model.k, neighbours=model.L, m=objective.m, d=objective.d, alpha=objective.alpha,
                  magnet_epsilon=losses.OFFICIAL_EPSILON if objective.magnet_cap else None,
                  xent_lambda=objective.xent_lambda, logits_xent_lambda=objective.logits_xent_lambda,
                  consistency_lambda=objective.consistency_lambda, consistency=objective.consistency,
                  consistency_eps=objective.consistency_eps, consistency_step=objective.consistency_step,
                  refresh_every=objective.refresh_every)
