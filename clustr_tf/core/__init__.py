"""The method: cluster centers on a backbone's features, the magnet loss, the cluster refresh,
neighbourhood batches and the nearest-center certificate.

    layers      `ClusterCenters`: centers, variance, soft-kNC logits, nearest center
    losses      the magnet loss (per example, in the log domain) and `MagnetLoss`
    clustering  per-class k-means and the `ClusterRefresh` callback
    sampling    the neighbourhood sampler's steps as state-free functions
    sampler     `NeighbourhoodSampler`: neighbourhood batches as tf.data
    certify     certified radii of the nearest-center rule (and of a linear head)
    models      `Classifier` (what training, evaluation and export ask of a model, and the
                one `train_step` of every objective) and `ClusTRModel`
    model_files `load_model`: a saved .keras model, with one-line errors
    baselines   `SoftmaxClassifier` (a linear head), its PGD training attack, shuffled batches
    interfaces  what an objective (`Objective`) and a batch source (`Batches`) provide
    ops         small tensor operations they share
"""

from clustr_tf.core import ops
from clustr_tf.core import interfaces
from clustr_tf.core import certify
from clustr_tf.core import layers
from clustr_tf.core import losses
from clustr_tf.core import models
from clustr_tf.core import baselines
from clustr_tf.core import clustering
from clustr_tf.core import sampling
from clustr_tf.core import sampler
