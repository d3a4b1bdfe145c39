"""`cifar10`, `cifar100` and `svhn` (TFDS's `svhn_cropped`): an original release or an
image folder at `data_dir` is read from disk (`releases`; `listing`, `folders`); otherwise
tensorflow-datasets loads the prepared dataset from `data_dir`, downloading and preparing
it when it is missing, from the publishers' sites or from a `Mirror`. When the data is
neither there nor downloadable a `DatasetNotFoundError` says so, in one line, and how to
point `--data_dir` at it.
"""

import dataclasses
import os
import posixpath
import shutil
import socket
import urllib.parse
import urllib.request

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from clustr_tf.data import base
from clustr_tf.data import folders
from clustr_tf.data import listing
from clustr_tf.data import releases


@dataclasses.dataclass(frozen=True)
class Mirror:
    """Where TFDS downloads a dataset's original files from, instead of their publishers.

    Each file TFDS's builder asks for (e.g. `cifar-10-binary.tar.gz`) is fetched from
    `url + "/" + its file name` by TFDS's own downloader, then verified (size and sha256)
    against TFDS's registered checksum of the original file, extracted and prepared by
    TFDS as usual: a mirror cannot serve other data.

    Attributes:
        url: the mirror's base URL (http, https or ftp).
        checksums: optional `{file name: (size in bytes, sha256 hex digest)}` for files
            TFDS has no checksum for (your own builds of the files, tests); they replace
            the registered ones for those names.
    """

    url: str
    checksums: dict | None = None


def _one_line(error, limit=400):
    """`Type: message` of an exception on one line (TFDS's messages span several)."""
    text = " ".join(str(error).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _as_mirror(mirror):
    if mirror is None or isinstance(mirror, Mirror):
        return mirror
    if isinstance(mirror, str) and mirror:
        return Mirror(mirror)
    raise ValueError(f"`mirror` must be a URL or a `Mirror`. Received: {mirror!r}")


def _file_name(url):
    return posixpath.basename(urllib.parse.urlparse(url).path)


class _MirroredDownloads:
    """The download manager a builder's `_split_generators` sees: the same TFDS
    `DownloadManager`, with every URL replaced by the mirror's copy of its file."""

    def __init__(self, manager, rewrite):
        self._manager = manager
        self._rewrite = rewrite

    def __getattr__(self, name):
        return getattr(self._manager, name)

    def _urls(self, tree):
        if isinstance(tree, str):
            return self._rewrite(tree)
        if isinstance(tree, dict):
            return {k: self._urls(v) for k, v in tree.items()}
        if isinstance(tree, (list, tuple)):
            return type(tree)(self._urls(v) for v in tree)
        return tree  # a tfds.download.Resource or a path: left as it is

    def download(self, url_or_urls):
        return self._manager.download(self._urls(url_or_urls))

    def download_and_extract(self, url_or_urls):
        return self._manager.download_and_extract(self._urls(url_or_urls))


def _mirrored_builder(tfds_name, data_dir, mirror):
    """A TFDS builder of `tfds_name` (same name, version and data folder) whose files come
    from `mirror`, each checked against the registered checksum of its original."""
    from tensorflow_datasets.core.download import checksums as tfds_checksums

    base = tfds.builder_cls(tfds_name)
    root = mirror.url.rstrip("/")

    def rewrite(url):
        return f"{root}/{_file_name(url)}"

    registered = dict(base.url_infos or {})
    infos = {rewrite(url): info for url, info in registered.items()}
    for name, (size, sha256) in (mirror.checksums or {}).items():
        infos[f"{root}/{name}"] = tfds_checksums.UrlInfo(size=int(size), checksum=str(sha256), filename=name)

    class MirroredBuilder(base, skip_registration=True):
        name = base.name
        url_infos = infos

        def _split_generators(self, dl_manager, *args, **kwargs):
            return super()._split_generators(_MirroredDownloads(dl_manager, rewrite), *args, **kwargs)

    return MirroredBuilder(data_dir=data_dir), sorted(infos)


def _check_mirror(urls, timeout=10):
    """Fails fast, with the URL, when the mirror does not serve a file (TFDS's downloader
    retries a refused connection for minutes)."""
    for url in urls:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
                pass
        except (OSError, ValueError) as e:  # URLError and HTTPError are OSErrors
            raise OSError(f"the mirror does not serve {url} ({_one_line(e)})") from None


def _check_reachable(urls, timeout=10):
    """Fails fast, naming the host, when a download's hosts cannot be reached (no network):
    one connection attempt each, where TFDS's downloader retries for minutes."""
    hosts = set()
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        if parts.hostname:
            hosts.add((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)))
    for host, port in sorted(hosts):
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as e:
            raise OSError(f"{host}:{port} cannot be reached ({_one_line(e)}): no network?") from None


def _tfds_builder(name, tfds_name, data_dir, download, mirror=None):
    """Returns a prepared TFDS builder or raises `base.DatasetNotFoundError`."""
    mirror = _as_mirror(mirror)
    where = data_dir if data_dir is not None else "the default TFDS data_dir"
    hint = (
        f"Pass --data_dir=DIR (data_dir=DIR in Python) where DIR holds the "
        f"prepared TFDS dataset '{tfds_name}' (e.g. made with "
        f"`tfds build {tfds_name} --data_dir=DIR` on a machine with network "
        "access), the original release files, or the images in split/class/image "
        "layout (a folder or a .tar.gz), or allow the download."
    )
    try:
        if mirror is None:
            builder, urls = tfds.builder(tfds_name, data_dir=data_dir), []
        else:
            builder, urls = _mirrored_builder(tfds_name, data_dir, mirror)
        if builder.is_prepared():
            return builder
    except Exception as e:  # TFDS raises assorted errors for bad folders.
        raise base.DatasetNotFoundError(
            f"Dataset '{name}' could not be found or downloaded: reading "
            f"{where} failed ({_one_line(e)}). {hint}"
        ) from e
    if not download:
        raise base.DatasetNotFoundError(
            f"Dataset '{name}' could not be found or downloaded: it is not "
            f"in {where} and downloading is disabled. {hint}"
        )
    root = getattr(builder, "data_dir_root", None)
    downloads = os.path.join(os.fspath(root), "downloads") if root is not None else None
    before = set(os.listdir(downloads)) if downloads and os.path.isdir(downloads) else set()
    source = f" from {mirror.url}" if mirror else ""
    try:
        if mirror is not None:
            _check_mirror(urls)
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(force_checksums_validation=True))
        else:
            _check_reachable(getattr(type(builder), "url_infos", None) or {})
            builder.download_and_prepare()
    except Exception as e:  # Network, disk and checksum errors alike.
        # TFDS writes the dataset into an "incomplete" folder it renames when done, so
        # nothing here looks prepared; the download's temporary files of this attempt go.
        if downloads and os.path.isdir(downloads):
            for entry in set(os.listdir(downloads)) - before:
                if ".tmp." in entry:
                    shutil.rmtree(os.path.join(downloads, entry), ignore_errors=True)
        raise base.DatasetNotFoundError(
            f"Dataset '{name}' could not be found or downloaded: it is not "
            f"in {where} and the download{source} failed ({_one_line(e)}). "
            f"{hint}"
        ) from e
    return builder


def _make_tfds_loaders(name, tfds_name, image_shape):
    """Returns the `(load_dataset, load_arrays)` pair of a TFDS dataset."""

    def local_arrays(data_dir, split):
        """The split from an original release or an image folder at `data_dir`, or None."""
        release = releases.find(name, data_dir)
        if release is not None:
            return releases.read(release, split)
        location = listing.locate(data_dir)
        if location is not None:
            images, labels, _, _ = folders.read(
                name, location, split, base.CLASS_NAMES[name], image_shape
            )
            return images, labels
        return None

    def load_dataset(split, data_dir=None, download=True, mirror=None):
        arrays = local_arrays(data_dir, split)
        if arrays is not None:
            ds = tf.data.Dataset.from_tensor_slices(arrays)
        else:
            builder = _tfds_builder(name, tfds_name, data_dir, download, mirror)
            ds = builder.as_dataset(
                split=split, as_supervised=True, shuffle_files=False
            )
        return ds.map(base.to_unit_float, num_parallel_calls=tf.data.AUTOTUNE)

    def load_arrays(split, data_dir=None, download=True, dtype="float32", mirror=None):
        arrays = local_arrays(data_dir, split)
        if arrays is not None:
            images, labels = arrays
        else:
            builder = _tfds_builder(name, tfds_name, data_dir, download, mirror)
            images, labels = tfds.as_numpy(
                builder.as_dataset(
                    split=split, as_supervised=True, batch_size=-1
                )
            )
        return base.from_uint8(images, dtype), np.asarray(labels).astype(np.int64)

    return load_dataset, load_arrays


def source(name, tfds_name, num_classes, image_shape, mean, std):
    load_dataset, load_arrays = _make_tfds_loaders(name, tfds_name, image_shape)
    info = base.DatasetInfo(name, num_classes, image_shape, mean, std)
    return base.Source(
        info=lambda data_dir: info,
        class_names=lambda data_dir: base.CLASS_NAMES[name],
        splits=base.SPLITS,
        load_dataset=load_dataset,
        load_arrays=load_arrays,
        eight_bit=True,
        augment=name.startswith("cifar"),
    )
