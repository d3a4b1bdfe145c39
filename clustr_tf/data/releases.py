"""The original releases of CIFAR-10, CIFAR-100 and SVHN, read from the files a researcher has.

`data.load(name, split, data_dir=PATH)` reads these when PATH is one of them, or a folder
that holds one (the file names are the publishers'):

    cifar10    cifar-10-python.tar.gz, or its extracted folder cifar-10-batches-py/
               (data_batch_1 ... data_batch_5, test_batch: pickled batches)
               cifar-10-binary.tar.gz, or its extracted folder cifar-10-batches-bin/
               (data_batch_1.bin ... data_batch_5.bin, test_batch.bin: records of
               1 label byte + 3,072 pixel bytes)
    cifar100   cifar-100-python.tar.gz, or its extracted folder cifar-100-python/
               (train, test: pickled; the 100 fine labels)
    svhn       train_32x32.mat and test_32x32.mat (MATLAB; label 10 is the digit 0)

The splits, labels and class order are TFDS's (`cifar10`, `cifar100` with its fine
labels, `svhn_cropped`): train is the five training batches (CIFAR-10) or the train file,
test the test batch or file; SVHN's label 10 becomes 0. Archives are streamed, never
extracted. The pickled batches are read with an unpickler that only builds dicts, lists,
numbers, strings and numpy arrays, so a file that is not a CIFAR batch cannot run code.

A file that exists but cannot be read (truncated, corrupt, of another layout) raises
`CorruptDatasetError` naming the file and what is wrong; nothing is written or deleted.

Reference:
    Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009 (CIFAR);
    Netzer et al., "Reading Digits in Natural Images with Unsupervised Feature
    Learning", NIPS workshop 2011 (SVHN).
"""

import dataclasses
import importlib
import io
import os
import pickle
import tarfile
import zlib

import numpy as np


class CorruptDatasetError(ValueError):
    """A dataset file that exists but cannot be read; the message names the file and what
    is wrong."""


@dataclasses.dataclass(frozen=True)
class Release:
    """One original release on disk.

    Attributes:
        dataset: "cifar10", "cifar100" or "svhn".
        kind: "python_tar", "python_dir", "binary_tar", "binary_dir" or "mat".
        path: the archive, the extracted folder, or (mat) the folder of the .mat files.
    """

    dataset: str
    kind: str
    path: str


# For each dataset: (kind, file or folder name), in the order they are looked for.
_NAMES = {
    "cifar10": (("python_tar", "cifar-10-python.tar.gz"), ("python_dir", "cifar-10-batches-py"),
                ("binary_tar", "cifar-10-binary.tar.gz"), ("binary_dir", "cifar-10-batches-bin")),
    "cifar100": (("python_tar", "cifar-100-python.tar.gz"), ("python_dir", "cifar-100-python")),
    "svhn": (),
}
# The members of each split, by dataset and format ("python" or "binary").
_SPLIT_FILES = {
    ("cifar10", "python"): {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
    ("cifar10", "binary"): {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]},
    ("cifar100", "python"): {"train": ["train"], "test": ["test"]},
}
_NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10}
_MAT_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
_PIXELS = 32 * 32 * 3
_RECORD = 1 + _PIXELS  # CIFAR-10 binary: a label byte, then the pixels
_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


def find(dataset, data_dir):
    """The original release of `dataset` at `data_dir`, or None.

    Args:
        dataset: a dataset name; only "cifar10", "cifar100" and "svhn" have releases.
        data_dir: None, a release (archive or extracted folder; for SVHN a .mat file), or a
            folder holding one.

    Returns:
        A `Release`, or None when `data_dir` holds none (a TFDS data_dir, an image folder).
    """
    if not data_dir or dataset not in _NAMES:
        return None
    path = os.path.abspath(os.fspath(data_dir))
    if dataset == "svhn":
        folder = os.path.dirname(path) if os.path.basename(path) in _MAT_FILES.values() else path
        if os.path.isdir(folder) and any(os.path.isfile(os.path.join(folder, f)) for f in _MAT_FILES.values()):
            return Release("svhn", "mat", folder)
        return None
    for kind, name in _NAMES[dataset]:
        if os.path.basename(path.rstrip(os.sep)) == name and os.path.exists(path):
            return Release(dataset, kind, path)
    if os.path.isdir(path):
        for kind, name in _NAMES[dataset]:
            candidate = os.path.join(path, name)
            if os.path.exists(candidate):
                return Release(dataset, kind, candidate)
    return None


def read(release, split):
    """The images and labels of one split of a release.

    Args:
        release: a `Release` (from `find`).
        split: "train" or "test".

    Returns:
        `(images, labels)`: uint8 numpy [N, 32, 32, 3] and int64 [N].

    Raises:
        CorruptDatasetError: a file is missing, truncated, corrupt or of another layout.
    """
    if split not in ("train", "test"):
        raise ValueError(f"`split` must be 'train' or 'test'. Received: {split!r}")
    if release.kind == "mat":
        images, labels = _read_mat(os.path.join(release.path, _MAT_FILES[split]))
    else:
        fmt = release.kind.split("_")[0]
        names = _SPLIT_FILES[(release.dataset, fmt)][split]
        blobs = _read_tar(release.path, names) if release.kind.endswith("tar") else _read_dir(release.path, names)
        parse = _parse_python_batch if fmt == "python" else _parse_binary_batch
        parts = [parse(blobs[name], f"{release.path}: {name}", release.dataset) for name in names]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= _NUM_CLASSES[release.dataset]:
        raise CorruptDatasetError(
            f"{release.path}: labels outside [0, {_NUM_CLASSES[release.dataset]}) in the {split} split "
            f"(found {labels.min()} to {labels.max()}): not a {release.dataset} release")
    return images, labels


def _read_tar(path, names):
    """{name: bytes} of the members whose base names are `names` (one per name)."""
    wanted, found = set(names), {}
    try:
        with tarfile.open(path, "r:*") as archive:  # streamed: members are read in order
            for member in archive:
                base = os.path.basename(member.name)
                if member.isfile() and base in wanted and base not in found:
                    found[base] = archive.extractfile(member).read()
    except _TAR_ERRORS as e:
        raise CorruptDatasetError(f"Could not read the archive {path} ({type(e).__name__}: {e}): it is "
                                  "truncated or corrupt; download it again") from None
    missing = [n for n in names if n not in found]
    if missing:
        raise CorruptDatasetError(f"The archive {path} has no {', '.join(missing)}: not the original release "
                                  "(or truncated)")
    return found


def _read_dir(path, names):
    missing = [n for n in names if not os.path.isfile(os.path.join(path, n))]
    if missing:
        raise CorruptDatasetError(f"The folder {path} has no {', '.join(missing)}: not an extracted release")
    found = {}
    for name in names:
        with open(os.path.join(path, name), "rb") as fh:
            found[name] = fh.read()
    return found


class _BatchUnpickler(pickle.Unpickler):
    """Builds what a CIFAR python batch holds (dicts, lists, bytes, numbers, numpy
    arrays) and refuses every other global, so a foreign pickle cannot run code."""

    _ALLOWED = {
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): lambda: _multiarray()._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): lambda: _multiarray()._reconstruct,
        ("_codecs", "encode"): lambda: importlib.import_module("_codecs").encode,
    }

    def find_class(self, module, name):
        make = self._ALLOWED.get((module, name))
        if make is None:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return make()


def _multiarray():
    try:
        return importlib.import_module("numpy._core.multiarray")
    except ImportError:  # NumPy 1
        return importlib.import_module("numpy.core.multiarray")


def _parse_python_batch(blob, where, dataset):
    try:
        batch = _BatchUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001: any unpickling failure is a corrupt file
        raise CorruptDatasetError(f"{where} is not a CIFAR python batch ({type(e).__name__}: {e})") from None
    key = b"fine_labels" if dataset == "cifar100" else b"labels"
    if not isinstance(batch, dict) or b"data" not in batch or key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise CorruptDatasetError(f"{where} is not a {dataset} python batch: it needs b'data' and {key!r}. "
                                  f"Received: {keys}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[key], np.int64).reshape(-1)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS or len(data) != len(labels):
        raise CorruptDatasetError(f"{where}: b'data' must be uint8 [N, 3072] with one label each. Received: "
                                  f"{data.dtype} {list(data.shape)} and {len(labels)} labels")
    return _planes_to_images(data), labels


def _parse_binary_batch(blob, where, dataset):
    del dataset
    if len(blob) % _RECORD:
        raise CorruptDatasetError(f"{where} has {len(blob)} bytes, not a whole number of {_RECORD}-byte records "
                                  "(truncated)")
    records = np.frombuffer(blob, np.uint8).reshape(-1, _RECORD)
    return _planes_to_images(records[:, 1:]), records[:, 0].astype(np.int64)


def _planes_to_images(data):
    """[N, 3072] red, green and blue 32x32 planes -> [N, 32, 32, 3]."""
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def _read_mat(path):
    from scipy import io as scipy_io

    if not os.path.isfile(path):
        raise CorruptDatasetError(f"The SVHN release at {os.path.dirname(path)} has no {os.path.basename(path)}")
    try:
        mat = scipy_io.loadmat(path, variable_names=["X", "y"])
        images, labels = mat["X"], mat["y"]
    except Exception as e:  # noqa: BLE001: scipy raises assorted errors for bad files
        raise CorruptDatasetError(f"Could not read {path} ({type(e).__name__}: {e}): it is truncated or not an "
                                  "SVHN .mat file") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[:3] != (32, 32, 3) \
            or labels.size != images.shape[3]:
        raise CorruptDatasetError(f"{path}: X must be uint8 [32, 32, 3, N] and y [N, 1]. Received: X {images.dtype} "
                                  f"{list(images.shape)}, y {list(labels.shape)}")
    labels = labels.reshape(-1).astype(np.int64)
    if labels.min(initial=1) < 1 or labels.max(initial=1) > 10:
        raise CorruptDatasetError(f"{path}: SVHN labels are 1 to 10 (10 is the digit 0). Received: "
                                  f"{labels.min()} to {labels.max()}")
    return np.ascontiguousarray(images.transpose(3, 0, 1, 2)), labels % 10
