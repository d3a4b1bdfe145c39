"""The defaults of a run and the settings' choices, written once: the official ClusTR
settings (Alfarra et al.) and what the library shares with `clustr_tf.config` (which
re-exports every name here). No TensorFlow."""

__all__ = ["CLUSTERS_PER_CLASS", "NEIGHBOURS", "EVAL_NEIGHBOURS", "CLUSTERS_PER_BATCH", "EXAMPLES_PER_CLUSTER", "MAGNET_ALPHA", "QTRADES_LAMBDA", "QTRADES_EPS", "QTRADES_STEP", "PGD_EPS", "PGD_STEP", "PGD_ITERATIONS", "CERTIFIED_TEMPERATURE", "LEARNING_RATE", "LEARNING_RATES", "EPOCHS", "DATASET_EPOCHS", "DATASET_CLASSES", "FOLDER_DATASETS", "BACKBONES", "EXACT_BOUND_BACKBONES", "STRATEGIES", "METHODS", "CONSISTENCY_FORMS", "OPTIMIZERS", "LR_SCHEDULES", "ATTACK_LOSSES", "MIXED_PRECISIONS"]

# The official ClusTR settings (Alfarra et al.; notes/official-clustr.md) and the defaults the
# library shares with this config: written here once.
CLUSTERS_PER_CLASS = 2  # K
NEIGHBOURS = 10  # L, the nearest clusters of the soft-kNC rule in training
EVAL_NEIGHBOURS = 20  # L at evaluation (at most the number of clusters)
CLUSTERS_PER_BATCH = 12  # m
EXAMPLES_PER_CLUSTER = 20  # d
MAGNET_ALPHA = 12.5  # the magnet loss margin
QTRADES_LAMBDA = 8.0  # ClusTR+QTRADES: the consistency term's weight
QTRADES_EPS = 8.0 / 255.0  # its l_inf radius (pixel units)
QTRADES_STEP = 10.0 / 255.0  # its signed-gradient step
PGD_EPS = 8.0 / 255.0  # PGD-AT's training attack (Madry et al. on CIFAR-10)
PGD_STEP = 2.0 / 255.0
PGD_ITERATIONS = 10
CERTIFIED_TEMPERATURE = 0.25  # certified ClusTR: T of the cross-entropy on its certificate logits
LEARNING_RATE = 1e-4  # the official ClusTR (Adam) rate
# (dataset, backbone) -> the rate where LEARNING_RATE does not suit: the small Lipschitz network
# trains slowly at 1e-4 on digits (on CIFAR-10 1e-3 can collapse it, so 1e-4 there).
LEARNING_RATES = {("digits", "lipschitz"): 1e-3}
EPOCHS = 90  # when `epochs` is None, except on the datasets of DATASET_EPOCHS
DATASET_EPOCHS = {"digits": 40}

DATASET_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "svhn": 10}
# Datasets whose classes are read from data_dir (the sorted class folders).
FOLDER_DATASETS = ("image_folder",)
BACKBONES = ("auto", "convnet", "resnet18", "lipschitz")
# Backbones whose l2 Lipschitz bound is exact by construction (`lipschitz.construction_bound`).
EXACT_BOUND_BACKBONES = ("lipschitz",)
STRATEGIES = ("auto", "default", "mirrored", "multi_worker", "tpu")
METHODS = ("clustr", "cross_entropy", "pgd_at")
CONSISTENCY_FORMS = ("official", "kl")
OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("milestones", "cosine")
ATTACK_LOSSES = ("official", "logits", "margin")  # the losses of `attacks.LOSSES` (training/evaluate.py --losses)
MIXED_PRECISIONS = ("float16", "bfloat16")
