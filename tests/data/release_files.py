"""Small files in the original release formats of CIFAR-10, CIFAR-100 and SVHN, for tests.

Each writer makes random images and labels, writes them in the publisher's layout (file
names, folders, record and pickle formats of the real releases) and returns them, split by
split, in the order the files hold them.
"""

import io
import os
import pickle
import tarfile

import numpy as np

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _split(rng, n, num_classes):
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, num_classes, n).astype(np.int64)
    return images, labels


def _planes(images):
    """[N, 32, 32, 3] -> [N, 3072]: the red, green and blue planes, as CIFAR stores them."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def _pickle(obj):
    return pickle.dumps(obj, protocol=2)  # the releases are Python 2 pickles (protocol 2)


def _write_tree(files, folder, archive):
    """Writes {relative path: bytes} under `folder` or into the .tar.gz `archive`."""
    if archive is None:
        for name, blob in files.items():
            path = os.path.join(folder, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as fh:
                fh.write(blob)
        return
    with tarfile.open(archive, "w:gz") as tar:
        for name, blob in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def cifar10_python(directory, per_batch=6, extracted=False, seed=0):
    """cifar-10-python.tar.gz (or its folder cifar-10-batches-py/) in `directory`.

    Returns `(path, {"train": (images, labels), "test": (images, labels)})`."""
    rng = np.random.default_rng(seed)
    batches = [_split(rng, per_batch, 10) for _ in range(6)]
    files = {"cifar-10-batches-py/batches.meta": _pickle(
        {b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_cases_per_batch": per_batch})}
    for i, (images, labels) in enumerate(batches):
        name = f"data_batch_{i + 1}" if i < 5 else "test_batch"
        files[f"cifar-10-batches-py/{name}"] = _pickle(
            {b"batch_label": name.encode(), b"labels": [int(v) for v in labels], b"data": _planes(images),
             b"filenames": [f"{name}_{j}.png".encode() for j in range(per_batch)]})
    path = os.path.join(directory, "cifar-10-batches-py" if extracted else "cifar-10-python.tar.gz")
    _write_tree(files, directory, None if extracted else path)
    return path, _splits(batches)


def cifar10_binary(directory, per_batch=6, extracted=False, seed=0):
    """cifar-10-binary.tar.gz (or its folder cifar-10-batches-bin/) in `directory`."""
    rng = np.random.default_rng(seed)
    batches = [_split(rng, per_batch, 10) for _ in range(6)]
    files = {"cifar-10-batches-bin/batches.meta.txt": ("\n".join(CIFAR10_CLASSES) + "\n\n").encode()}
    for i, (images, labels) in enumerate(batches):
        name = f"data_batch_{i + 1}.bin" if i < 5 else "test_batch.bin"
        records = np.concatenate([labels.astype(np.uint8)[:, None], _planes(images)], axis=1)
        files[f"cifar-10-batches-bin/{name}"] = records.tobytes()
    path = os.path.join(directory, "cifar-10-batches-bin" if extracted else "cifar-10-binary.tar.gz")
    _write_tree(files, directory, None if extracted else path)
    return path, _splits(batches)


def cifar100_python(directory, train=12, test=6, extracted=False, seed=0):
    """cifar-100-python.tar.gz (or its folder cifar-100-python/) in `directory`."""
    rng = np.random.default_rng(seed)
    splits = {"train": _split(rng, train, 100), "test": _split(rng, test, 100)}
    files = {"cifar-100-python/meta": _pickle({b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                                              b"coarse_label_names": [f"s{i}".encode() for i in range(20)]})}
    for name, (images, labels) in splits.items():
        files[f"cifar-100-python/{name}"] = _pickle(
            {b"filenames": [f"{j}.png".encode() for j in range(len(labels))], b"batch_label": name.encode(),
             b"fine_labels": [int(v) for v in labels], b"coarse_labels": [int(v) // 5 for v in labels],
             b"data": _planes(images)})
    path = os.path.join(directory, "cifar-100-python" if extracted else "cifar-100-python.tar.gz")
    _write_tree(files, directory, None if extracted else path)
    return path, splits


def svhn_mat(directory, train=7, test=5, seed=0, extra=None):
    """train_32x32.mat and test_32x32.mat (and extra_32x32.mat with `extra` images) in
    `directory`: X uint8 [32, 32, 3, N], y [N, 1] in 1..10 (10 is the digit 0)."""
    from scipy import io as scipy_io

    rng = np.random.default_rng(seed)
    splits = {}
    for name, n in (("train", train), ("test", test), ("extra", extra)):
        if n is None:
            continue
        images, labels = _split(rng, n, 10)
        scipy_io.savemat(os.path.join(directory, f"{name}_32x32.mat"),
                         {"X": images.transpose(1, 2, 3, 0), "y": np.where(labels == 0, 10, labels)[:, None]})
        splits[name] = (images, labels)
    return directory, splits


def _splits(batches):
    train = batches[:5]
    return {"train": (np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train])),
            "test": batches[5]}
