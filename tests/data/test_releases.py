"""The original releases of CIFAR-10, CIFAR-100 and SVHN, read from disk: every format
round-trips its images and labels exactly, and a broken file is one clear error."""

import hashlib
import os
import pickle

import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

import release_files
from clustr_tf import data
from clustr_tf.data import releases
from tests import binaries




def _digest(path):
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


WRITERS = {
    "cifar10_python": ("cifar10", release_files.cifar10_python, {}),
    "cifar10_python_extracted": ("cifar10", release_files.cifar10_python, {"extracted": True}),
    "cifar10_binary": ("cifar10", release_files.cifar10_binary, {}),
    "cifar10_binary_extracted": ("cifar10", release_files.cifar10_binary, {"extracted": True}),
    "cifar100_python": ("cifar100", release_files.cifar100_python, {}),
    "cifar100_python_extracted": ("cifar100", release_files.cifar100_python, {"extracted": True}),
    "svhn_mat": ("svhn", release_files.svhn_mat, {}),
}


class RoundTripTest(parameterized.TestCase):
    @parameterized.named_parameters(*[(k, k) for k in WRITERS])
    def test_images_and_labels_round_trip(self, kind):
        name, write, kwargs = WRITERS[kind]
        folder = self.create_tempdir().full_path
        path, expected = write(folder, **kwargs)
        # The release itself, or the folder that holds it.
        for data_dir in (path, folder):
            release = releases.find(name, data_dir)
            self.assertIsNotNone(release, data_dir)
            for split in ("train", "test"):
                images, labels = data.load_arrays(name, split, data_dir=data_dir, dtype="uint8")
                np.testing.assert_array_equal(images, expected[split][0])
                np.testing.assert_array_equal(labels, expected[split][1])
                self.assertEqual((images.dtype, labels.dtype), (np.uint8, np.int64))
        as_float, _ = data.load_arrays(name, "test", data_dir=path)
        np.testing.assert_array_equal(as_float, expected["test"][0] / np.float32(255.0))
        streamed = list(data.load(name, "test", data_dir=path).as_numpy_iterator())
        np.testing.assert_array_equal(np.stack([x for x, _ in streamed]), as_float)
        np.testing.assert_array_equal([y for _, y in streamed], expected["test"][1])

    def test_svhn_label_10_is_the_digit_0(self):
        folder = self.create_tempdir().full_path
        _, expected = release_files.svhn_mat(folder, train=40, test=4)
        _, labels = data.load_arrays("svhn", "train", data_dir=folder, dtype="uint8")
        self.assertIn(0, labels)
        self.assertLess(labels.max(), 10)
        np.testing.assert_array_equal(labels, expected["train"][1])

    def test_other_data_dirs_are_not_releases(self):
        folder = self.create_tempdir().full_path
        self.assertIsNone(releases.find("cifar10", folder))  # an empty (TFDS) data_dir
        self.assertIsNone(releases.find("cifar10", None))
        self.assertIsNone(releases.find("digits", folder))
        release_files.cifar100_python(folder)
        self.assertIsNone(releases.find("cifar10", folder))  # CIFAR-100 is not CIFAR-10
        self.assertEqual(releases.find("cifar100", folder).kind, "python_tar")


class BrokenFileTest(parameterized.TestCase):
    def _fails(self, name, data_dir, split, *expected):
        with self.assertRaises(data.CorruptDatasetError) as ctx:
            data.load_arrays(name, split, data_dir=data_dir)
        message = str(ctx.exception)
        self.assertNotIn("\n", message)
        for text in expected:
            self.assertIn(text, message)
        return message

    @parameterized.parameters("cifar10_python", "cifar10_binary", "cifar100_python")
    def test_truncated_archive(self, kind):
        name, write, kwargs = WRITERS[kind]
        folder = self.create_tempdir().full_path
        path, _ = write(folder, per_batch=40, **kwargs) if name == "cifar10" else write(folder, train=200, **kwargs)
        with open(path, "rb") as fh:
            blob = fh.read()
        with open(path, "wb") as fh:
            fh.write(blob[: len(blob) // 2])
        before = _digest(path)
        self._fails(name, path, "train", path)
        self.assertEqual(_digest(path), before)  # nothing was touched

    def test_binary_batch_of_the_wrong_size(self):
        folder = self.create_tempdir().full_path
        path, _ = release_files.cifar10_binary(folder, extracted=True)
        with open(os.path.join(path, "test_batch.bin"), "ab") as fh:
            fh.write(b"\x00" * 17)
        self._fails("cifar10", path, "test", "test_batch.bin", "3073-byte records")

    def test_missing_batch(self):
        folder = self.create_tempdir().full_path
        path, _ = release_files.cifar10_python(folder, extracted=True)
        os.remove(os.path.join(path, "data_batch_3"))
        self._fails("cifar10", path, "train", "data_batch_3", path)
        _, labels = data.load_arrays("cifar10", "test", data_dir=path)  # the other split still reads
        self.assertEqual(len(labels), 6)

    def test_a_pickle_that_would_run_code_is_refused(self):
        folder = self.create_tempdir().full_path
        path, _ = release_files.cifar10_python(folder, extracted=True)

        class Payload:
            def __reduce__(self):
                return (os.system, ("echo never",))

        with open(os.path.join(path, "test_batch"), "wb") as fh:
            pickle.dump({b"data": Payload(), b"labels": [0]}, fh, protocol=2)
        self._fails("cifar10", path, "test", "test_batch", "not a CIFAR python batch", "refused global")

    def test_a_batch_of_another_layout(self):
        folder = self.create_tempdir().full_path
        path, _ = release_files.cifar10_python(folder, extracted=True)
        with open(os.path.join(path, "test_batch"), "wb") as fh:
            pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, fh, protocol=2)
        self._fails("cifar10", path, "test", "uint8 [N, 3072]", "[2, 100]")

    def test_corrupt_mat_file(self):
        folder = self.create_tempdir().full_path
        release_files.svhn_mat(folder)
        path = os.path.join(folder, "test_32x32.mat")
        with open(path, "wb") as fh:
            fh.write(b"MATLAB 5.0 MAT-file, but nothing after it")
        before = _digest(path)
        self._fails("svhn", folder, "test", path)
        self.assertEqual(_digest(path), before)
        os.remove(os.path.join(folder, "train_32x32.mat"))
        self._fails("svhn", folder, "train", "has no train_32x32.mat")


class BinaryTest(absltest.TestCase):
    def test_trains_from_a_cifar10_python_tarball(self):
        folder = self.create_tempdir().full_path
        path, _ = release_files.cifar10_python(folder, per_batch=50)
        run = os.path.join(folder, "run")
        out = binaries.run(binaries.MAIN, "--dataset=cifar10", f"--data_dir={path}", "--epochs=1",
                           "--steps_per_epoch=1", "--backbone=convnet", "--eval_batch_size=100", f"--model_dir={run}")
        self.assertEqual(out.returncode, 0, out.stderr[-3000:])
        self.assertIn("cifar10: 250 training images", out.stderr)
        self.assertTrue(os.path.exists(os.path.join(run, "metrics.json")))

    def test_a_truncated_tarball_is_one_line(self):
        folder = self.create_tempdir().full_path
        path, _ = release_files.cifar10_python(folder, per_batch=40)
        with open(path, "r+b") as fh:
            fh.truncate(os.path.getsize(path) // 2)
        out = binaries.run(binaries.MAIN, "--dataset=cifar10", f"--data_dir={path}", "--epochs=1",
                           f"--model_dir={folder}/run")
        self.assertEqual(out.returncode, 1, out.stderr[-3000:])
        self.assertNotIn("Traceback", out.stderr)
        last = out.stderr.strip().splitlines()[-1]
        self.assertTrue(last.startswith("main.py: error: Could not read the archive"), last)
        self.assertIn(path, last)
        self.assertTrue(os.path.exists(path))


if __name__ == "__main__":
    absltest.main()
