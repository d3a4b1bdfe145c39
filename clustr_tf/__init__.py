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
`keras.saving.load_model` after `import clustr_tf`.
"""

# The library by concept (each subpackage's docstring says what it holds):
from clustr_tf import config
from clustr_tf import core
from clustr_tf import data
from clustr_tf import nets
from clustr_tf import robustness
from clustr_tf import serving
from clustr_tf import training

# Their modules under the names users write (`from clustr_tf import models, objectives`):
from clustr_tf.core import baselines
from clustr_tf.core import certify
from clustr_tf.core import clustering
from clustr_tf.core import interfaces
from clustr_tf.core import layers
from clustr_tf.core import losses
from clustr_tf.core import models
from clustr_tf.core import sampler
from clustr_tf.core import sampling
from clustr_tf.nets import aol_layers
from clustr_tf.nets import backbones
from clustr_tf.nets import lipschitz
from clustr_tf.nets import lipschitz_layers
from clustr_tf.nets import precision
from clustr_tf.robustness import attacks
from clustr_tf.robustness import evaluation
from clustr_tf.training import consistency
from clustr_tf.training import distribute
from clustr_tf.training import objectives

from clustr_tf.core.clustering import ClusterRefresh
from clustr_tf.core.layers import ClusterCenters
from clustr_tf.core.losses import MagnetLoss
from clustr_tf.core.losses import magnet_loss
from clustr_tf.core.models import ClusTRModel
from clustr_tf.core.sampler import NeighbourhoodSampler

__version__ = "0.1.0"
