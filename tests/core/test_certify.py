"""The certificate is tight where the theorem says so, exact for K > 1, and sound."""

import numpy as np
import tensorflow as tf
from absl.testing import absltest
from absl.testing import parameterized
from scipy import optimize

from clustr_tf import certify


def _nearest_class(z, centers, k):
    return np.argmin(((np.atleast_2d(z)[:, None, :] - centers[None]) ** 2).sum(-1), axis=-1) // k


def _setup(seed, num_classes, k, dim, n=12):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(num_classes * k, dim)) * 3
    features = rng.normal(size=(n, dim)) * 3
    return centers, features


class FeatureRadiusTest(parameterized.TestCase):
    def test_hand_example(self):
        """Centers at 0 (class 0) and 4 (class 1) on a line: z = 1 is 1 from the bisector 2."""
        radius, classes, runner_up = certify.feature_radius([[1.0], [3.5]], [[0.0], [4.0]], 1)
        np.testing.assert_allclose(radius.numpy(), [1.0, 1.5], rtol=1e-6)
        self.assertEqual(classes.numpy().tolist(), [0, 1])
        self.assertEqual(runner_up.numpy().tolist(), [1, 0])

    @parameterized.parameters((0, 1.0), (1, 2.5), (2, 0.3))
    def test_tight_for_k1_under_a_scaled_isometry(self, seed, scale):
        """f(x) = scale * Q x with Q orthogonal: L = scale, and radius_feature / L is the
        exact input distance to the decision boundary: 0.999x never flips along any of many
        directions, 1.001x along the right direction always does."""
        rng = np.random.default_rng(seed)
        dim = 6
        q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
        centers, inputs = _setup(seed, num_classes=5, k=1, dim=dim)
        f = lambda x: scale * np.atleast_2d(x) @ q.T  # noqa: E731
        radius_f, classes, _ = certify.feature_radius(f(inputs), centers, 1)
        radius = certify.certified_radius(radius_f.numpy(), scale)
        exact = certify.exact_feature_radius(f(inputs), centers, 1) / scale
        np.testing.assert_allclose(radius, exact, rtol=1e-5)
        _, points = certify.exact_feature_radius(f(inputs), centers, 1, return_points=True)
        for x, r, c, p in zip(inputs, radius, classes.numpy(), points):
            direction = (p - f(x)[0]) / np.linalg.norm(p - f(x)[0])  # feature space
            direction = direction @ q  # back to input space (Q^T maps features to inputs)
            self.assertNotEqual(_nearest_class(f(x + 1.001 * r * direction), centers, 1)[0], c)
            self.assertEqual(_nearest_class(f(x + 0.999 * r * direction), centers, 1)[0], c)
            random = rng.normal(size=(500, dim))
            random *= 0.999 * r / np.linalg.norm(random, axis=1, keepdims=True)
            self.assertTrue(np.all(_nearest_class(f(x + random), centers, 1) == c))

    @parameterized.parameters((0, 2), (1, 2), (2, 3))
    def test_exact_radius_for_k_above_1_matches_a_brute_force_search(self, seed, k):
        centers, features = _setup(seed, num_classes=3, k=k, dim=4, n=6)
        exact, points = certify.exact_feature_radius(features, centers, k, return_points=True)
        bound = certify.feature_radius(features, centers, k)[0].numpy()
        center_class = np.arange(len(centers)) // k
        for z, e, b, p in zip(features, exact, bound, points):
            c = _nearest_class(z, centers, k)[0]
            own = centers[center_class == c]
            brute = np.inf
            for j in np.flatnonzero(center_class != c):
                # {y: center j at least as near as every own center}, written as the
                # half-spaces it is (2 y.(mu_j - mu_own) >= |mu_j|^2 - |mu_own|^2), solved by
                # scipy's interior-point trust-constr (SLSQP from one start stopped at
                # non-solutions on some CPUs' BLAS).
                a = 2 * (centers[j] - own)
                rhs = (centers[j] ** 2).sum() - (own ** 2).sum(-1)
                res = optimize.minimize(lambda y: ((y - z) ** 2).sum(), centers[j], jac=lambda y: 2 * (y - z),
                                        hess=lambda y: 2 * np.eye(len(z)), method="trust-constr",
                                        constraints=[optimize.LinearConstraint(a, rhs, np.inf)],
                                        options={"gtol": 1e-12, "xtol": 1e-12, "maxiter": 5000})
                if (a @ res.x - rhs).min() >= -1e-7:
                    brute = min(brute, np.sqrt(res.fun))
            self.assertAlmostEqual(e, brute, delta=1e-5 * max(1.0, brute))
            self.assertGreaterEqual(e, b - 1e-5)  # the theorem's bound is a lower bound
            step = (p - z) / np.linalg.norm(p - z)
            self.assertNotEqual(_nearest_class(z + 1.001 * e * step, centers, k)[0], c)
            self.assertEqual(_nearest_class(z + 0.999 * e * step, centers, k)[0], c)

    def test_sound_on_random_networks(self):
        """A small random ReLU network, its Lipschitz bound the product of the layers'
        spectral norms: no perturbation inside the certified radius flips the decision,
        along random directions or along an l2 gradient search kept inside the radius."""
        rng = np.random.default_rng(7)
        w1, w2 = rng.normal(size=(8, 5)), rng.normal(size=(4, 8))
        lipschitz = np.linalg.norm(w1, 2) * np.linalg.norm(w2, 2)
        f = lambda x: np.maximum(np.atleast_2d(x) @ w1.T, 0) @ w2.T  # noqa: E731
        centers = rng.normal(size=(6, 4)) * 3
        inputs = rng.normal(size=(20, 5))
        radius_f, classes, _ = certify.feature_radius(f(inputs), centers, 2)
        radius = certify.certified_radius(radius_f.numpy(), lipschitz)
        w1_t, w2_t, centers_t = (tf.constant(a, tf.float64) for a in (w1, w2, centers))

        @tf.function  # the 50 steps of one input in one graph call
        def ascend(x, c, r):
            delta = tf.zeros(5, tf.float64)
            for _ in tf.range(50):  # projected gradient ascent on the margin, inside the ball
                with tf.GradientTape() as tape:
                    tape.watch(delta)
                    z = tf.linalg.matvec(w2_t, tf.nn.relu(tf.linalg.matvec(w1_t, x + delta)))
                    d = tf.reduce_sum((z[tf.newaxis] - centers_t) ** 2, -1)
                    own = tf.reduce_min(d[c * 2:c * 2 + 2])
                    other = tf.reduce_min(tf.concat([d[:c * 2], d[c * 2 + 2:]], 0))
                    margin = own - other
                g = tape.gradient(margin, delta)
                step = delta + 0.1 * r * g / (tf.norm(g) + 1e-12)
                delta = step * tf.minimum(tf.constant(1.0, tf.float64), 0.999 * r / (tf.norm(step) + 1e-12))
            return delta

        for x, r, c in zip(inputs, radius, classes.numpy()):
            random = rng.normal(size=(300, 5))
            random *= r * rng.random((300, 1)) / np.linalg.norm(random, axis=1, keepdims=True)
            self.assertTrue(np.all(_nearest_class(f(x + random), centers, 2) == c))
            delta = ascend(tf.constant(x), tf.constant(int(c)), tf.constant(float(r), tf.float64))
            self.assertEqual(_nearest_class(f(x + delta.numpy()), centers, 2)[0], c)

    def test_certified_accuracy(self):
        acc = certify.certified_accuracy([0.0, 0.2, 0.5, 1.0], [True, True, False, True], [0.0, 0.25, 0.5])
        self.assertEqual(acc, {"0.0": 0.5, "0.25": 0.25, "0.5": 0.25})
        with self.assertRaisesRegex(ValueError, "lipschitz_bound.*Received: 0"):
            certify.certified_radius([1.0], 0)
        with self.assertRaisesRegex(ValueError, "same shape"):
            certify.certified_accuracy([1.0, 2.0], [True], [0.1])


if __name__ == "__main__":
    absltest.main()


class LinearFeatureRadiusTest(parameterized.TestCase):
    @parameterized.parameters(0, 1, 2)
    def test_exact_distance_to_the_decision_boundary(self, seed):
        """Moving z by 0.999x the radius along the worst direction keeps the class;
        1.001x flips it to the runner-up; random directions inside never flip it."""
        rng = np.random.default_rng(seed)
        z = rng.normal(size=(20, 5))
        kernel, bias = rng.normal(size=(5, 4)), rng.normal(size=4)
        radius, classes, runner = (t.numpy() for t in certify.linear_feature_radius(z, kernel, bias))
        np.testing.assert_array_equal(classes, np.argmax(z @ kernel + bias, 1))
        for i in range(20):
            w = kernel[:, classes[i]] - kernel[:, runner[i]]
            step = -w / np.linalg.norm(w)
            for factor, same in ((0.999, True), (1.001, False)):
                moved = z[i] + factor * radius[i] * step
                self.assertEqual(np.argmax(moved @ kernel + bias) == classes[i], same)
            for direction in rng.normal(size=(200, 5)):
                moved = z[i] + 0.999 * radius[i] * direction / np.linalg.norm(direction)
                self.assertEqual(np.argmax(moved @ kernel + bias), classes[i])
