"""Certified radii for the nearest-center decision.

ClusTR classifies a feature z = f(x) by the class of its nearest center. If the feature
extractor f is L-Lipschitz in l2, no input perturbation delta with
||delta||_2 < radius(x) changes that class, where

    radius_feature(x) = min over centers j of another class of
                        (||z - mu_j||^2 - ||z - mu_i||^2) / (2 ||mu_i - mu_j||),
    radius(x) = radius_feature(x) / L,

i being the nearest center (the paper's certificate for nearest-cluster classifiers; the
hypothesis margin of nearest-prototype classifiers). For K = 1 center per class this is
exactly the distance from z to the boundary of its Voronoi cell. For K > 1 it ignores the
other centers of the predicted class and is only a lower bound; `exact_feature_radius`
computes the exact distance from z to the nearest region where some center of another
class is at least as near as every center of the predicted class (for each such center, a
projection onto an intersection of K half-spaces).

This module holds the feature-space part and the certified accuracy; the Lipschitz bound
of the feature extractor is a separate piece.

Reference:
    Alfarra et al., "Rethinking Clustering for Robustness", BMVC 2021;
    Saralajew et al., "Fast Adversarial Robustness Certification of Nearest Prototype
    Classifiers for Arbitrary Seminorms", NeurIPS 2020.
"""

import itertools

import numpy as np
import tensorflow as tf

from clustr_tf.core import ops


def feature_radius(features, centers, clusters_per_class):
    """The theorem's feature-space radius, per example.

    Computed in float64 when `features` are float64 (tight to rounding), else float32.

    Args:
        features: float tensor [N, D].
        centers: float tensor [C*K, D]; center j belongs to class j // K.
        clusters_per_class: int, K.

    Returns:
        A tuple `(radius, classes, runner_up)`: float [N] radius (0 on a tie), int64 [N]
        nearest-center class, int64 [N] the class of the other-class center that attains
        the minimum (the class the decision would change to first).
    """
    features = tf.convert_to_tensor(features)
    dtype = tf.float64 if features.dtype == tf.float64 else tf.float32
    features = tf.cast(features, dtype)
    centers = tf.cast(centers, dtype)
    distances = ops.pairwise_squared_distances(features, centers)  # [N, CK]
    nearest = tf.argmin(distances, axis=-1)
    classes = nearest // clusters_per_class
    center_class = tf.range(tf.shape(centers)[0], dtype=tf.int64) // clusters_per_class
    own = tf.gather(distances, nearest, axis=1, batch_dims=1)
    mu_i = tf.gather(centers, nearest)  # [N, D]
    separation = tf.norm(mu_i[:, tf.newaxis, :] - centers[tf.newaxis, :, :], axis=-1)  # [N, CK]
    other = center_class[tf.newaxis, :] != classes[:, tf.newaxis]
    margins = (distances - own[:, tf.newaxis]) / (2.0 * tf.maximum(separation, 1e-12))
    margins = tf.where(other, margins, tf.fill(tf.shape(margins), tf.constant(float("inf"), dtype)))
    best = tf.argmin(margins, axis=-1)
    radius = tf.nn.relu(tf.gather(margins, best, axis=1, batch_dims=1))
    return radius, classes, best // clusters_per_class


def linear_feature_radius(features, kernel, bias):
    """The exact feature-space radius of a linear (softmax) head, per example.

    The head predicts argmax_j (w_j . z + b_j); the predicted class c keeps winning while
    z stays on its side of every hyperplane (w_c - w_j) . z + b_c - b_j = 0, so the
    distance to the decision boundary is min over j != c of
    ((w_c - w_j) . z + b_c - b_j) / ||w_c - w_j|| (the Lipschitz-margin certificate of
    Tsuzuku et al., NeurIPS 2018, exact in feature space). With a Lipschitz bound of the
    backbone it certifies the baselines as `feature_radius` certifies ClusTR.

    Args:
        features: float tensor [N, D].
        kernel: float tensor [D, C], the head's weights.
        bias: float tensor [C].

    Returns:
        `(radius, classes, runner_up)` as `feature_radius` returns them.
    """
    features = tf.convert_to_tensor(features)
    dtype = tf.float64 if features.dtype == tf.float64 else tf.float32
    features, kernel, bias = (tf.cast(t, dtype) for t in (features, kernel, bias))
    logits = features @ kernel + bias  # [N, C]
    classes = tf.argmax(logits, axis=-1)
    w_c = tf.gather(tf.transpose(kernel), classes)  # [N, D]
    norms = tf.norm(w_c[:, :, tf.newaxis] - kernel[tf.newaxis], axis=1)  # [N, C]
    gaps = tf.gather(logits, classes, axis=1, batch_dims=1)[:, tf.newaxis] - logits
    margins = gaps / tf.maximum(norms, 1e-12)
    own = tf.one_hot(classes, tf.shape(kernel)[1], on_value=True, off_value=False)
    margins = tf.where(own, tf.fill(tf.shape(margins), tf.constant(float("inf"), dtype)), margins)
    best = tf.argmin(margins, axis=-1)
    return tf.nn.relu(tf.gather(margins, best, axis=1, batch_dims=1)), classes, best


def _distance_to_polyhedron(z, g, h, tol):
    """Distance from z to {y : g y <= h} (few rows), by enumerating active sets.

    The projection onto a polyhedron is the projection onto the affine hull of its active
    constraints; every candidate that is feasible is a point of the polyhedron, so the
    smallest feasible candidate distance is the exact distance.
    """
    if np.all(g @ z <= h + tol):
        return 0.0, z
    best, point = np.inf, None
    rows = range(len(h))
    for size in range(1, len(h) + 1):
        for subset in itertools.combinations(rows, size):
            gs, hs = g[list(subset)], h[list(subset)]
            # y = z - gs^T lambda with gs gs^T lambda = gs z - hs (least squares if singular)
            lam = np.linalg.lstsq(gs @ gs.T, gs @ z - hs, rcond=None)[0]
            y = z - gs.T @ lam
            if np.allclose(gs @ y, hs, atol=tol) and np.all(g @ y <= h + tol):
                d = float(np.linalg.norm(z - y))
                if d < best:
                    best, point = d, y
    return best, point


def exact_feature_radius(features, centers, clusters_per_class, tol=1e-9, return_points=False):
    """The exact feature-space distance to a change of the nearest-center class.

    For the predicted class c of z and every center j of another class, the region where
    j is at least as near as every center k of class c is the polyhedron
    {y : 2 y.(mu_k - mu_j) <= ||mu_k||^2 - ||mu_j||^2 for all k in c}; the exact radius is
    the smallest distance from z to these regions. It equals `feature_radius` when K = 1
    and is at least as large otherwise. Computed in float64 NumPy.

    Args:
        features: float array [N, D].
        centers: float array [C*K, D].
        clusters_per_class: int, K.
        tol: feasibility tolerance.
        return_points: also return, per example, the nearest point where the class changes.

    Returns:
        float64 array [N] (and, with `return_points`, float64 [N, D]).
    """
    features = np.asarray(features, np.float64)
    centers = np.asarray(centers, np.float64)
    k = clusters_per_class
    center_class = np.arange(len(centers)) // k
    sq = (centers**2).sum(-1)
    radii = np.zeros(len(features))
    points = np.zeros_like(features)
    for n, z in enumerate(features):
        c = center_class[np.argmin(((z - centers) ** 2).sum(-1))]
        own = np.flatnonzero(center_class == c)
        best, where = np.inf, z
        for j in np.flatnonzero(center_class != c):
            g = 2.0 * (centers[own] - centers[j])
            h = sq[own] - sq[j]
            d, y = _distance_to_polyhedron(z, g, h, tol * max(1.0, np.abs(h).max()))
            if d < best:
                best, where = d, y
        radii[n], points[n] = best, where
    return (radii, points) if return_points else radii


def certified_radius(feature_radii, lipschitz_bound):
    """Input-space l2 radius: feature radius / Lipschitz bound of the feature extractor."""
    if not lipschitz_bound > 0:
        raise ValueError(f"`lipschitz_bound` must be > 0. Received: {lipschitz_bound!r}")
    return np.asarray(feature_radii, np.float64) / float(lipschitz_bound)


def certified_accuracy(radii, correct, thresholds):
    """Fraction of examples that are correct and certified at each l2 radius.

    Args:
        radii: float array [N], certified radii.
        correct: bool array [N], whether the nearest-center class is the true label.
        thresholds: iterable of radii r.

    Returns:
        dict `str(r) -> fraction` of examples with `correct and radius > r` (r = 0 counts
        the correct examples with a positive radius).
    """
    radii = np.asarray(radii, np.float64)
    correct = np.asarray(correct, bool)
    if radii.shape != correct.shape:
        raise ValueError(
            f"`radii` and `correct` must have the same shape. Received: {radii.shape} and {correct.shape}"
        )
    n = max(len(radii), 1)
    return {str(r): float(np.sum(correct & (radii > r)) / n) for r in thresholds}
