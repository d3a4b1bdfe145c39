"""Tests for `clustr_tf.sampler` and `clustr_tf.sampling`: neighbourhood batches, impostors, seeds."""

import re

import numpy as np
import tensorflow as tf
from absl.testing import absltest
from absl.testing import parameterized
from scipy import stats

from clustr_tf import sampler
from clustr_tf import sampling

NUM_CLASSES = 4
K = 2


def _data(per_class=30, num_classes=NUM_CLASSES, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(num_classes), per_class))
    images = rng.random((labels.size, 3, 3, 2)).astype(np.float32)
    if dtype == np.uint8:
        images = (images * 255).astype(np.uint8)
    return images, labels


def _random_state(labels, num_classes, k, dim=3, seed=0, empty=()):
    """Random class-consistent assignments (clusters in `empty` left empty) and centers."""
    rng = np.random.default_rng(seed)
    assignments = labels * k + rng.integers(0, k, labels.size)
    for j in empty:
        moved = assignments == j
        other = j - 1 if j % k else j + 1
        assignments[moved] = other
    centers = rng.normal(size=(num_classes * k, dim))
    return assignments, centers


def _brute_force_impostors(centers, sizes, k, count):
    out = []
    for i in range(len(centers)):
        candidates = [
            (float(np.linalg.norm(centers[i] - centers[j])), j)
            for j in range(len(centers))
            if j // k != i // k and sizes[j] > 0
        ]
        out.append([j for _, j in sorted(candidates)[:count]])
    return np.array(out)


def _groups(clusters):
    """Splits a batch's cluster column into consecutive runs: [(cluster, start, stop)]."""
    bounds = np.flatnonzero(np.diff(clusters)) + 1
    starts = np.concatenate([[0], bounds])
    stops = np.concatenate([bounds, [len(clusters)]])
    return [(int(clusters[a]), int(a), int(b)) for a, b in zip(starts, stops)]


def _set_cluster_losses(s, values):
    """Records, for each example, the loss of its cluster in `values`."""
    assignments = s.assignments.numpy()
    s.record_losses(np.arange(s.num_examples), np.asarray(values, np.float32)[assignments])


class NeighbourhoodSamplerTest(parameterized.TestCase):
    def test_properties_and_initial_state(self):
        images, labels = _data()
        s = sampler.NeighbourhoodSampler(images, labels, NUM_CLASSES, K, m=3, d=5, seed=1)
        self.assertEqual(
            (s.num_examples, s.num_classes, s.clusters_per_class, s.num_clusters),
            (120, NUM_CLASSES, K, NUM_CLASSES * K),
        )
        self.assertEqual((s.m, s.d, s.batch_size), (3, 5, 15))
        assignments = s.assignments.numpy()
        self.assertEqual(s.assignments.dtype, tf.int32)
        self.assertFalse(s.assignments.trainable)
        np.testing.assert_array_equal(assignments // K, labels)
        # Rank among the class's examples, modulo K.
        for c in range(NUM_CLASSES):
            members = np.flatnonzero(labels == c)
            np.testing.assert_array_equal(
                assignments[members], c * K + np.arange(members.size) % K
            )
        impostors = s.impostors.numpy()
        self.assertEqual(impostors.shape, (NUM_CLASSES * K, 2))
        self.assertEqual(s.impostors.dtype, tf.int32)
        for j, row in enumerate(impostors):
            self.assertTrue(np.all(row // K != j // K))
        np.testing.assert_array_equal(s.example_losses.numpy(), np.ones(120, np.float32))
        np.testing.assert_allclose(s.seed_probabilities().numpy(), np.full(8, 1 / 8))

    @parameterized.named_parameters(("float32", np.float32), ("uint8", np.uint8))
    def test_batches_are_neighbourhoods(self, dtype):
        images, labels = _data(dtype=dtype)
        m, d = 4, 5
        s = sampler.NeighbourhoodSampler(images, labels, NUM_CLASSES, K, m=m, d=d, seed=3)
        assignments, centers = _random_state(labels, NUM_CLASSES, K, seed=1)
        s.update(assignments, centers)
        impostors = s.impostors.numpy()
        expected_images = images.astype(np.float32)
        if dtype == np.uint8:
            expected_images /= 255.0
        ds = s.dataset()
        self.assertEqual(ds.element_spec[0], tf.TensorSpec([None, 3, 3, 2], tf.float32))
        self.assertEqual(ds.element_spec[1]["labels"].dtype, tf.int64)
        self.assertEqual(ds.element_spec[1]["clusters"].dtype, tf.int32)
        self.assertEqual(ds.element_spec[1]["indices"].dtype, tf.int32)
        for batch_images, info in ds.take(20):
            indices = info["indices"].numpy()
            clusters = info["clusters"].numpy()
            self.assertLen(indices, m * d)
            groups = _groups(clusters)
            self.assertLen(groups, m)
            self.assertTrue(all(stop - start == d for _, start, stop in groups))
            neighbourhood = [g[0] for g in groups]
            np.testing.assert_array_equal(neighbourhood[1:], impostors[neighbourhood[0]])
            np.testing.assert_array_equal(assignments[indices], clusters)
            np.testing.assert_array_equal(info["labels"].numpy(), clusters // K)
            np.testing.assert_array_equal(labels[indices], clusters // K)
            self.assertLen(np.unique(indices), len(indices))
            np.testing.assert_allclose(batch_images.numpy(), expected_images[indices])

    def test_small_cluster_contributes_all_members_and_warns(self):
        images, labels = _data()
        s = sampler.NeighbourhoodSampler(images, labels, NUM_CLASSES, K, m=3, d=5)
        assignments = labels * K
        small = np.flatnonzero(labels == 2)[:3]
        assignments[small] = 2 * K + 1  # Cluster 5 holds 3 < d examples.
        _, centers = _random_state(labels, NUM_CLASSES, K)
        with self.assertLogs(logger="absl", level="WARNING") as logs:
            s.update(assignments, centers)
        self.assertLen(logs.records, 1)
        self.assertIn("5: 3", logs.output[0])
        self.assertIn("d=5", logs.output[0])
        # Only cluster 5 has a loss: it is every batch's seed.
        _set_cluster_losses(s, np.eye(NUM_CLASSES * K)[5])
        for _, info in s.dataset().take(5):
            clusters = info["clusters"].numpy()
            groups = _groups(clusters)
            self.assertEqual(groups[0][:2], (5, 0))
            self.assertEqual(groups[0][2], 3)
            np.testing.assert_array_equal(
                np.sort(info["indices"].numpy()[:3]), np.sort(small)
            )
            self.assertLen(clusters, 3 + 2 * 5)

    def test_no_warning_when_clusters_are_large_enough(self):
        images, labels = _data()
        s = sampler.NeighbourhoodSampler(images, labels, NUM_CLASSES, K, m=3, d=5)
        assignments, centers = _random_state(labels, NUM_CLASSES, K, seed=2)
        with self.assertNoLogs(logger="absl", level="WARNING"):
            s.update(assignments, centers)

    @parameterized.parameters((1, 2, 0), (2, 5, 1), (3, 7, 2))
    def test_impostors_are_nearest_other_class_clusters(self, k, m, seed):
        num_classes = 5
        images, labels = _data(per_class=12, num_classes=num_classes, seed=seed)
        s = sampler.NeighbourhoodSampler(images, labels, num_classes, k, m=m, d=2)
        empty = (1,) if k > 1 else ()
        assignments, centers = _random_state(labels, num_classes, k, seed=seed, empty=empty)
        if k > 1:
            # Empty cluster 1 sits on cluster 2K's center: it must still not be chosen.
            centers[1] = centers[2 * k]
            centers[3] = centers[4] = centers[2]  # Ties: lower index first.
        s.update(assignments, centers)
        sizes = np.bincount(assignments, minlength=num_classes * k)
        expected = _brute_force_impostors(centers, sizes, k, m - 1)
        np.testing.assert_array_equal(s.impostors.numpy(), expected)
        np.testing.assert_array_equal(s.assignments.numpy(), assignments)
        for j, row in enumerate(s.impostors.numpy()):
            self.assertTrue(np.all(row // k != j // k))
            self.assertTrue(np.all(sizes[row] > 0))

    def test_update_accepts_nan_center_of_empty_cluster(self):
        images, labels = _data()
        s = sampler.NeighbourhoodSampler(images, labels, NUM_CLASSES, K, m=4, d=2)
        assignments, centers = _random_state(labels, NUM_CLASSES, K, empty=(2,))
        centers[2] = np.nan
        s.update(assignments, centers)
        sizes = np.bincount(assignments, minlength=NUM_CLASSES * K)
        expected = _brute_force_impostors(np.nan_to_num(centers), sizes, K, 3)
        non_empty = sizes > 0
        np.testing.assert_array_equal(s.impostors.numpy()[non_empty], expected[non_empty])
        # Even the empty cluster's own row (all distances NaN) holds valid impostors.
        self.assertNotIn(2, s.impostors.numpy())
        self.assertTrue(np.all(s.impostors.numpy()[2] // K != 1))
        self.assertEqual(float(s.seed_probabilities()[2]), 0.0)

    def test_cluster_losses_and_probabilities(self):
        images, labels = _data()
        s = sampler.NeighbourhoodSampler(images, labels, NUM_CLASSES, K, m=2, d=2)
        assignments, centers = _random_state(labels, NUM_CLASSES, K, empty=(3,))
        s.update(assignments, centers)
        losses = np.random.default_rng(0).random(s.num_examples).astype(np.float32)
        s.record_losses(np.arange(s.num_examples), losses)
        expected = np.array(
            [losses[assignments == j].mean() if np.any(assignments == j) else 0.0
             for j in range(s.num_clusters)]
        )
        np.testing.assert_allclose(s.cluster_losses().numpy(), expected, rtol=1e-6)
        np.testing.assert_allclose(
            s.seed_probabilities().numpy(), expected / expected.sum(), rtol=1e-5
        )
        # All losses zero: uniform over the non-empty clusters.
        s.record_losses(np.arange(s.num_examples), np.zeros(s.num_examples))
        uniform = np.full(s.num_clusters, 1 / 7)
        uniform[3] = 0.0
        np.testing.assert_allclose(s.seed_probabilities().numpy(), uniform, rtol=1e-6)

    def test_seed_frequencies_follow_losses(self):
        images, labels = _data()
        s = sampler.NeighbourhoodSampler(images, labels, NUM_CLASSES, K, m=3, d=4, seed=7)
        cluster_losses = np.array([1.0, 2.0, 0.0, 3.0, 0.5, 4.0, 1.5, 2.5])
        _set_cluster_losses(s, cluster_losses)
        expected = cluster_losses / cluster_losses.sum()
        np.testing.assert_allclose(s.seed_probabilities().numpy(), expected, rtol=1e-6)
        draws = 4000
        seeds = (
            tf.data.Dataset.range(draws)
            .map(lambda i: s.sample_indices(tf.stack([tf.constant(7, tf.int64), i]))[1][0])
            .batch(draws)
        )
        counts = np.bincount(next(iter(seeds)).numpy(), minlength=s.num_clusters)
        self.assertEqual(counts[2], 0)
        nonzero = cluster_losses > 0
        result = stats.chisquare(counts[nonzero], draws * expected[nonzero])
        self.assertGreater(result.pvalue, 1e-3)

    def test_record_losses_in_tf_function_changes_later_batches(self):
        images, labels = _data()
        s = sampler.NeighbourhoodSampler(images, labels, NUM_CLASSES, K, m=3, d=4)
        ds = s.dataset()
        first_seeds = {int(info["clusters"][0]) for _, info in ds.take(40)}
        self.assertGreater(len(first_seeds), 1)

        @tf.function
        def train_step(info):
            # Stand-in for a per-example loss: 2 for cluster 6, else 0.
            losses = tf.where(info["clusters"] == 6, 2.0, 0.0)
            s.record_losses(info["indices"], losses)
            return losses

        # A batch from the pipeline goes through the traced function...
        _, info = next(iter(ds))
        train_step(info)
        expected = np.ones(s.num_examples, np.float32)
        expected[info["indices"].numpy()] = np.where(info["clusters"].numpy() == 6, 2, 0)
        np.testing.assert_array_equal(s.example_losses.numpy(), expected)
        # ...and so does one "batch" of every example: only cluster 6 keeps a loss.
        train_step({"indices": tf.range(s.num_examples), "clusters": s.assignments})
        cluster_losses = s.cluster_losses().numpy()
        np.testing.assert_array_equal(cluster_losses, 2.0 * np.eye(8)[6])
        np.testing.assert_array_equal(s.seed_probabilities().numpy(), np.eye(8)[6])
        later_seeds = {int(info["clusters"][0]) for _, info in ds.take(10)}
        self.assertEqual(later_seeds, {6})

    def test_recorded_losses_partial_update(self):
        images, labels = _data()
        s = sampler.NeighbourhoodSampler(images, labels, NUM_CLASSES, K, m=3, d=4)
        members = np.flatnonzero(s.assignments.numpy() == 0)
        tf.function(s.record_losses)(
            tf.constant(members[:2], tf.int32), tf.constant([3.0, 5.0])
        )
        expected = (3.0 + 5.0 + (members.size - 2)) / members.size
        self.assertAlmostEqual(float(s.cluster_losses()[0]), expected, places=5)
        self.assertEqual(float(s.cluster_losses()[1]), 1.0)

    def test_same_seed_same_batches(self):
        images, labels = _data()

        def batches(seed):
            s = sampler.NeighbourhoodSampler(images, labels, NUM_CLASSES, K, m=3, d=4,
                                             seed=seed)
            _set_cluster_losses(s, np.arange(1.0, 9.0))
            return [info["indices"].numpy() for _, info in s.dataset().take(8)]

        a, b, c = batches(5), batches(5), batches(6)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
        self.assertFalse(all(np.array_equal(x, y) for x, y in zip(a, c)))
        # One sampler's dataset replays the same sequence on every iteration.
        s = sampler.NeighbourhoodSampler(images, labels, NUM_CLASSES, K, m=3, d=4, seed=5)
        _set_cluster_losses(s, np.arange(1.0, 9.0))
        ds = s.dataset()
        first = [info["indices"].numpy() for _, info in ds.take(8)]
        second = [info["indices"].numpy() for _, info in ds.take(8)]
        for x, y, z in zip(first, second, a):
            np.testing.assert_array_equal(x, y)
            np.testing.assert_array_equal(x, z)

    @parameterized.named_parameters(
        ("m_zero", dict(m=0), "`m` must be an integer >= 1. Received: 0"),
        ("d_zero", dict(d=0), "`d` must be an integer >= 1. Received: 0"),
        ("k_zero", dict(clusters_per_class=0),
         "`clusters_per_class` must be an integer >= 1. Received: 0"),
        ("classes_zero", dict(num_classes=0), "`num_classes` must be an integer >= 1"),
        ("m_too_large", dict(m=8), "Received: m=8"),
        ("label_out_of_range", dict(labels_fn=lambda y: np.where(y == 3, 4, y)),
         "Received: 4"),
        ("negative_label", dict(labels_fn=lambda y: np.where(y == 3, -1, y)),
         "Received: -1"),
        ("missing_class", dict(labels_fn=lambda y: np.where(y == 3, 2, y)),
         "class 3 has 0"),
        ("too_few_examples", dict(labels_fn=lambda y: np.concatenate([y, [4]]),
                                  images_fn=lambda x: np.concatenate([x, x[:1]]),
                                  num_classes=5),
         "class 4 has 1"),
        ("length_mismatch", dict(images_fn=lambda x: x[:-1]),
         "Received: 119 images and 120 labels"),
        ("not_finite", dict(images_fn=lambda x: np.where(x > 0.99, np.nan, x)),
         "`images` must be finite"),
        ("images_rank", dict(images_fn=lambda x: x[..., 0]), "Received: shape (120, 3, 3)"),
        ("float_labels", dict(labels_fn=lambda y: y.astype(np.float32)),
         "Received: shape (120,), dtype float32"),
    )
    def test_constructor_validation(self, kwargs, message):
        images, labels = _data()
        kwargs = dict(kwargs)
        images = kwargs.pop("images_fn", lambda x: x)(images)
        labels = kwargs.pop("labels_fn", lambda y: y)(labels)
        args = dict(num_classes=NUM_CLASSES, clusters_per_class=K, m=3, d=4)
        args.update(kwargs)
        with self.assertRaisesRegex(ValueError, re.escape(message)):
            sampler.NeighbourhoodSampler(images, labels, **args)

    def test_largest_valid_m(self):
        images, labels = _data()
        s = sampler.NeighbourhoodSampler(images, labels, NUM_CLASSES, K, m=7, d=2)
        _, info = next(iter(s.dataset()))
        self.assertLen(_groups(info["clusters"].numpy()), 7)

    def test_update_validation(self):
        images, labels = _data()
        s = sampler.NeighbourhoodSampler(images, labels, NUM_CLASSES, K, m=6, d=2)
        assignments, centers = _random_state(labels, NUM_CLASSES, K)
        before = s.impostors.numpy()
        # An example in another class's cluster (which is also the only way to leave a
        # class without a non-empty cluster).
        wrong = assignments.copy()
        wrong[0] = (labels[0] * K + K) % (NUM_CLASSES * K)
        with self.assertRaisesRegex(ValueError, "in a cluster of its class.*example 0"):
            s.update(wrong, centers)
        with self.assertRaisesRegex(ValueError, "Received: 8 at index 3"):
            bad = assignments.copy()
            bad[3] = 8
            s.update(bad, centers)
        with self.assertRaisesRegex(ValueError, r"Received: shape \(119,\)"):
            s.update(assignments[:-1], centers)
        with self.assertRaisesRegex(ValueError, r"Received: shape \(7, 3\)"):
            s.update(assignments, centers[:-1])
        with self.assertRaisesRegex(ValueError, "`centers` must be finite"):
            nan_centers = centers.copy()
            nan_centers[assignments[0]] = np.nan
            s.update(assignments, nan_centers)
        # Clusters 1, 3, 5, 7 empty: each cluster sees 3 non-empty clusters of other
        # classes, with m - 1 = 5 needed.
        sparse = labels * K
        with self.assertRaisesRegex(ValueError, "m-1=5 non-empty clusters.*has 3"):
            s.update(sparse, centers)
        np.testing.assert_array_equal(s.impostors.numpy(), before)




class PureSamplingFunctionsTest(absltest.TestCase):
    """The state-free functions of `clustr_tf.sampling`, each on its own."""

    def test_member_lists_and_cluster_means(self):
        assignments = np.array([2, 0, 2, 1, 0, 2])
        members, offsets = sampling.member_lists(assignments, 4)
        np.testing.assert_array_equal(members, [1, 4, 3, 0, 2, 5])
        np.testing.assert_array_equal(offsets, [0, 2, 3, 6, 6])
        means = sampling.cluster_means(tf.constant([1.0, 2.0, 3.0, 4.0, 6.0, 8.0]), tf.constant(assignments), 4)
        np.testing.assert_allclose(means.numpy(), [4.0, 4.0, 4.0, 0.0])

    def test_seed_probabilities(self):
        p = sampling.seed_probabilities(tf.constant([1.0, 3.0, -2.0, 5.0]), tf.constant([2, 2, 2, 0]))
        np.testing.assert_allclose(p.numpy(), [0.25, 0.75, 0.0, 0.0])  # negative clipped, empty 0
        p = sampling.seed_probabilities(tf.zeros([3]), tf.constant([1, 0, 4]))
        np.testing.assert_allclose(p.numpy(), [0.5, 0.0, 0.5])  # all zero: uniform over non-empty

    def test_draw_neighbourhood(self):
        # 3 clusters: 0 = {0, 1, 2}, 1 = {3, 4}, 2 = {5}; cluster 1 always seeds.
        members, offsets = sampling.member_lists(np.array([0, 0, 0, 1, 1, 2]), 3)
        impostors = tf.constant([[1, 2], [2, 0], [0, 1]], tf.int32)
        probabilities = tf.constant([0.0, 1.0, 0.0])
        indices, clusters = sampling.draw_neighbourhood(tf.constant([3, 4]), probabilities, impostors,
                                                        tf.constant(members), tf.constant(offsets), 3, 2)
        np.testing.assert_array_equal(clusters.numpy(), [1, 1, 2, 0, 0])  # seed first; d = 2 at most
        self.assertEqual(sorted(indices.numpy()[:2]), [3, 4])
        self.assertEqual(indices.numpy()[2], 5)
        self.assertTrue(set(indices.numpy()[3:]) <= {0, 1, 2})
        again, _ = sampling.draw_neighbourhood(tf.constant([3, 4]), probabilities, impostors,
                                               tf.constant(members), tf.constant(offsets), 3, 2)
        np.testing.assert_array_equal(again.numpy(), indices.numpy())

    def test_checks_name_what_is_wrong(self):
        images = np.zeros((4, 2, 2, 1), np.float32)
        with self.assertRaisesRegex(ValueError, "`labels` must be in \\[0, 2\\). Received: 5 at index 3"):
            sampling.check_training_set(images, np.array([0, 1, 0, 5]), 2, 1)
        checked, labels = sampling.check_training_set(images, np.array([0, 1, 0, 1]), 2, 2)
        self.assertEqual((checked.dtype, labels.dtype), (np.float32, np.int64))
        with self.assertRaisesRegex(ValueError, "example 1 of class 1 in cluster 0"):
            sampling.check_assignments(np.array([0, 0, 1, 1]), np.zeros((4, 3)), np.array([0, 1, 0, 1]), 2, 4)
        with self.assertRaisesRegex(ValueError, "`centers` must have shape \\[4, D\\]"):
            sampling.check_assignments(np.array([0, 2, 1, 3]), np.zeros((3, 3)), np.array([0, 1, 0, 1]), 2, 4)


if __name__ == "__main__":
    absltest.main()
