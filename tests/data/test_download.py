"""TFDS's real download path, without the internet: a loopback HTTP server serves small
archives in the original release formats, and TFDS's own downloader, checksum check,
extraction and preparation run on them through `data.Mirror`; then our loading and the
training binary run on the prepared data."""

import collections
import functools
import hashlib
import http.server
import os
import socket
import threading

import numpy as np
import tensorflow_datasets as tfds
from absl.testing import absltest

import release_files
from clustr_tf import data
from tests import binaries




class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _serve(test, directory):
    """Serves `directory` on 127.0.0.1 until the test ends; returns its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=directory))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def stop():
        server.shutdown()
        server.server_close()
        thread.join(10)

    test.addCleanup(stop)
    return f"http://127.0.0.1:{server.server_address[1]}"


def _checksum(path):
    with open(path, "rb") as fh:
        blob = fh.read()
    return len(blob), hashlib.sha256(blob).hexdigest()


def _examples(images, labels):
    """The multiset of (label, pixels): TFDS shuffles the examples when it prepares them."""
    return collections.Counter((int(y), x.tobytes()) for x, y in zip(images, labels))


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackDownloadTest(absltest.TestCase):
    def test_cifar10_downloads_verifies_prepares_and_trains(self):
        served, tfds_dir = self.create_tempdir().full_path, self.create_tempdir().full_path
        path, expected = release_files.cifar10_binary(served, per_batch=50)
        url = _serve(self, served)
        mirror = data.Mirror(url, checksums={"cifar-10-binary.tar.gz": _checksum(path)})
        for split in ("train", "test"):
            images, labels = data.load_arrays("cifar10", split, data_dir=tfds_dir, mirror=mirror, dtype="uint8")
            self.assertEqual(_examples(images, labels), _examples(*expected[split]))
        builder = tfds.builder("cifar10", data_dir=tfds_dir)
        self.assertTrue(builder.is_prepared())
        self.assertEqual(builder.info.splits["train"].num_examples, 250)
        self.assertEqual(builder.info.features["label"].names, list(release_files.CIFAR10_CLASSES))
        # The prepared data is TFDS's: it loads again offline, without the mirror.
        _, labels = data.load_arrays("cifar10", "test", data_dir=tfds_dir, download=False)
        self.assertEqual(len(labels), 50)
        run = os.path.join(tfds_dir, "run")
        out = binaries.run(binaries.MAIN, "--dataset=cifar10", f"--data_dir={tfds_dir}", "--nodownload", "--epochs=1",
                           "--steps_per_epoch=1", "--backbone=convnet", "--eval_batch_size=100", f"--model_dir={run}")
        self.assertEqual(out.returncode, 0, out.stderr[-3000:])
        self.assertIn("cifar10: 250 training images", out.stderr)

    def test_svhn_downloads_its_three_files(self):
        served, tfds_dir = self.create_tempdir().full_path, self.create_tempdir().full_path
        _, expected = release_files.svhn_mat(served, train=9, test=5, extra=3)
        url = _serve(self, served)
        checksums = {f"{s}_32x32.mat": _checksum(os.path.join(served, f"{s}_32x32.mat"))
                     for s in ("train", "test", "extra")}
        images, labels = data.load_arrays("svhn", "test", data_dir=tfds_dir, mirror=data.Mirror(url, checksums),
                                          dtype="uint8")
        self.assertEqual(_examples(images, labels), _examples(*expected["test"]))
        self.assertTrue(tfds.builder("svhn_cropped", data_dir=tfds_dir).is_prepared())

    def _fails(self, tfds_dir, mirror, *expected):
        with self.assertRaises(data.DatasetNotFoundError) as ctx:
            data.load_arrays("cifar10", "train", data_dir=tfds_dir, mirror=mirror)
        message = str(ctx.exception)
        self.assertNotIn("\n", message)
        for text in ("'cifar10' could not be found or downloaded", "--data_dir", *expected):
            self.assertIn(text, message)
        # Nothing left that looks prepared, and no half-downloaded file.
        self.assertFalse(tfds.builder("cifar10", data_dir=tfds_dir).is_prepared())
        self.assertFalse(os.path.exists(os.path.join(tfds_dir, "cifar10", "3.0.2")))
        downloads = os.path.join(tfds_dir, "downloads")
        leftovers = [e for e in os.listdir(downloads) if ".tmp." in e] if os.path.isdir(downloads) else []
        self.assertEqual(leftovers, [])
        return message

    def test_wrong_checksum_truncated_file_and_server_down(self):
        served, tfds_dir = self.create_tempdir().full_path, self.create_tempdir().full_path
        path, _ = release_files.cifar10_binary(served, per_batch=50)
        size, sha256 = _checksum(path)
        url = _serve(self, served)
        self._fails(tfds_dir, data.Mirror(url, {"cifar-10-binary.tar.gz": (size, "0" * 64)}), "Checksum", url)
        with open(path, "r+b") as fh:  # the server now sends half the file
            fh.truncate(size // 2)
        self._fails(tfds_dir, data.Mirror(url, {"cifar-10-binary.tar.gz": (size, sha256)}), "NonMatchingChecksum")
        down = f"http://127.0.0.1:{_closed_port()}"
        self._fails(tfds_dir, data.Mirror(down, {"cifar-10-binary.tar.gz": (size, sha256)}),
                    f"the mirror does not serve {down}/cifar-10-binary.tar.gz")

    def test_the_binary_checks_a_mirror_against_the_registered_checksums(self):
        """--data_mirror serving a file that is not the real release: TFDS's registered
        checksum of cifar-10-binary.tar.gz refuses it, in one line, exit status 1."""
        served, tfds_dir = self.create_tempdir().full_path, self.create_tempdir().full_path
        release_files.cifar10_binary(served)
        url = _serve(self, served)
        out = binaries.run(binaries.MAIN, "--dataset=cifar10", f"--data_dir={tfds_dir}", f"--data_mirror={url}",
                           "--epochs=1", f"--model_dir={tfds_dir}/run")
        self.assertEqual(out.returncode, 1, out.stderr[-3000:])
        self.assertNotIn("Traceback", out.stderr)
        last = out.stderr.strip().splitlines()[-1]
        self.assertTrue(last.startswith("main.py: error: Dataset 'cifar10' could not be found or downloaded"), last)
        for text in (f"download from {url} failed", "NonMatchingChecksumError", "--data_dir"):
            self.assertIn(text, last)
        self.assertFalse(os.path.exists(os.path.join(tfds_dir, "cifar10", "3.0.2")))

    def test_mirror_must_be_a_url(self):
        with self.assertRaisesRegex(ValueError, "`mirror` must be a URL or a `Mirror`. Received: 3"):
            data.load_arrays("cifar10", "train", data_dir=self.create_tempdir().full_path, mirror=3)
        np.testing.assert_equal(data.Mirror("http://x").checksums, None)


if __name__ == "__main__":
    absltest.main()
