"""ClusTR for TensorFlow/Keras: clustering for certified robustness.

Keras building blocks for "Rethinking Clustering for Robustness" (Alfarra et al.,
BMVC 2021, arXiv:2006.07682):

- `clustr_tf.layers.ClusterCenters`: centers, variance, soft-kNC logits, nearest center.
- `clustr_tf.losses.magnet_loss` / `MagnetLoss`: the magnet loss, in the log domain.
- `clustr_tf.sampler.NeighbourhoodSampler`: neighbourhood batches as tf.data;
  `clustr_tf.sampling`: its steps as state-free functions.
- `clustr_tf.clustering.ClusterRefresh`: per-class k-means refresh as a Keras callback.
- `clustr_tf.models.ClusTRModel`: a backbone with a ClusterCenters head; every
  `models.Classifier` trains through one `train_step`, compiled with an objective.
- `clustr_tf.backbones`: the paper's CIFAR ResNet-18, a small ConvNet and a ConvNet that
  is 1-Lipschitz by construction, built of `clustr_tf.aol_layers` and
  `clustr_tf.lipschitz_layers`.
- `clustr_tf.data.load`: datasets as tf.data (embedded digits, CIFAR-10/100, SVHN, folders).
- `clustr_tf.objectives`: one object per training method (ClusTR, cross-entropy, PGD-AT);
  `clustr_tf.consistency`: the ClusTR+QTRADES term; `clustr_tf.interfaces`: what an
  objective (`Objective`) and a batch source (`Batches`) provide.
- `clustr_tf.training.train`: resumable `fit` in a run directory;
  `clustr_tf.training.run(clustr_tf.config.RunConfig(...))`: a whole run, as the binary does.
- `clustr_tf.precision`: float32, or a float16/bfloat16 backbone (heads and losses float32).
- `clustr_tf.serving.export`: the SavedModel for TF Serving (predict, certify, embed).
- `clustr_tf.certify` / `clustr_tf.lipschitz`: certified radii and the Lipschitz bound.
- `clustr_tf.attacks.pgd`: CleverHans PGD with the official, logits and margin losses.

Importing the package registers every serializable object, so `.keras` files load with
`keras.saving.load_model` after `import clustr_tf`. Two cases import only what is asked
for, each module on first use (`clustr_tf.models` and the like still work):

- TensorFlow is not installed: the TensorFlow-free modules work (`config`,
  `config_flags`, `checks`, `cli`, `serving.client`, `serving.versions`);
- the environment variable CLUSTR_TF_DEFER_IMPORTS=1 at import time (the binaries set it,
  so that they parse and check their flags before TensorFlow loads, then call
  `clustr_tf.load_all()`). The variable is removed when read: processes started later
  import the package as usual.
"""

import importlib
import importlib.util
import os

__version__ = "0.1.0"

# The library by concept (each subpackage's docstring says what it holds), then their
# modules under the names users write (`from clustr_tf import models, objectives`).
_SUBPACKAGES = ("config", "core", "data", "nets", "robustness", "serving", "training")
_MODULES = {
    "baselines": "clustr_tf.core.baselines",
    "certify": "clustr_tf.core.certify",
    "clustering": "clustr_tf.core.clustering",
    "interfaces": "clustr_tf.core.interfaces",
    "layers": "clustr_tf.core.layers",
    "losses": "clustr_tf.core.losses",
    "models": "clustr_tf.core.models",
    "sampler": "clustr_tf.core.sampler",
    "sampling": "clustr_tf.core.sampling",
    "aol_layers": "clustr_tf.nets.aol_layers",
    "backbones": "clustr_tf.nets.backbones",
    "lipschitz": "clustr_tf.nets.lipschitz",
    "lipschitz_layers": "clustr_tf.nets.lipschitz_layers",
    "precision": "clustr_tf.nets.precision",
    "attacks": "clustr_tf.robustness.attacks",
    "evaluation": "clustr_tf.robustness.evaluation",
    "consistency": "clustr_tf.training.consistency",
    "distribute": "clustr_tf.training.distribute",
    "objectives": "clustr_tf.training.objectives",
}
_NAMES = {
    "ClusterRefresh": "clustr_tf.core.clustering",
    "ClusterCenters": "clustr_tf.core.layers",
    "MagnetLoss": "clustr_tf.core.losses",
    "magnet_loss": "clustr_tf.core.losses",
    "ClusTRModel": "clustr_tf.core.models",
    "NeighbourhoodSampler": "clustr_tf.core.sampler",
}
__all__ = [*_SUBPACKAGES, *_MODULES, *_NAMES, "load_all"]


def __getattr__(name):
    """Imports a subpackage, module or name on first use (PEP 562)."""
    if name in _SUBPACKAGES:
        value = importlib.import_module(f"clustr_tf.{name}")
    elif name in _MODULES:
        value = importlib.import_module(_MODULES[name])
    elif name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
    else:
        raise AttributeError(f"module 'clustr_tf' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


def load_all():
    """Imports every module (TensorFlow included), which registers every serializable
    object with Keras; what `import clustr_tf` does unless it was deferred."""
    from clustr_tf import config, core, data, nets, robustness, serving, training  # noqa: F401,PLC0415
    for name in __all__[:-1]:
        __getattr__(name)


if os.environ.pop("CLUSTR_TF_DEFER_IMPORTS", "") != "1" and importlib.util.find_spec("tensorflow") is not None:
    load_all()
