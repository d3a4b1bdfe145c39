"""Image-folder listings: finds an image folder at `data_dir` (`locate`) and lists its
`<split>/<class>/<image>` entries (`list_image_folder`): a local folder is walked (nothing is
read), a `.tar`/`.tar.gz`/`.tgz` archive is streamed once, never extracted, keeping the
bytes of the split to read. The layout may sit under one top-level folder; hidden entries
(names starting with ".") and `__MACOSX` folders are skipped. A layout that is not
`<split>/<class>/<image>` raises a ValueError naming the entry.
"""

import dataclasses
import os
import tarfile
import time
import zlib

from absl import logging

from clustr_tf.data import base

_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tbz2", ".tar.xz")


@dataclasses.dataclass
class Listing:
    """The contents of an image folder, as far as they were read.

    Attributes:
        where: how messages name the folder or archive.
        splits: split -> class -> file name -> source: a file path (folder),
            the file's bytes (archive, the split that was read) or None
            (archive, other splits).
        display: `(split, class, file name or None) -> str` naming an entry.
        first_train: `(class, file name, source)` of the first training image
            in (class, file name) order, or None.
    """

    where: str
    splits: dict
    display: object
    first_train: object = None


def some_names(names, limit=12):
    """Joins names for a message, at most `limit` of them."""
    names = list(names)
    if not names:
        return "none"
    shown = ", ".join(str(n) for n in names[:limit])
    if len(names) > limit:
        shown += f", ... ({len(names) - limit} more)"
    return shown


def is_hidden(name):
    """Whether an entry is skipped: a hidden name (starting with ".") or `__MACOSX`."""
    return name.startswith(".") or name == "__MACOSX"


def _has_split_folder(path):
    return any(os.path.isdir(os.path.join(path, s)) for s in base.SPLITS)


def locate(data_dir):
    """Finds an image folder at `data_dir`.

    Returns:
        `("archive", path)`, `("folder", root)` with `root` the folder that
        holds the split folders, or None when `data_dir` is not an image
        folder (e.g. a TFDS data_dir).

    Raises:
        base.DatasetNotFoundError: if `data_dir` names an archive that is missing.
        ValueError: if `data_dir` is a file but not an archive.
    """
    if data_dir is None:
        return None
    try:
        path = os.fspath(data_dir)
    except TypeError:
        raise ValueError(
            f"`data_dir` must be a path. Received: {data_dir!r}"
        ) from None
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if os.path.isdir(path):
        if _has_split_folder(path):
            return ("folder", path)
        subfolders = [
            e.path
            for e in os.scandir(path)
            if e.is_dir() and not is_hidden(e.name)
        ]
        if len(subfolders) == 1 and _has_split_folder(subfolders[0]):
            return ("folder", subfolders[0])
        return None
    if path.lower().endswith(_ARCHIVE_SUFFIXES):
        if not os.path.isfile(path):
            raise base.DatasetNotFoundError(
                f"The archive {path} could not be found: no such file. Pass "
                "--data_dir=PATH (data_dir=PATH in Python) naming an existing "
                "folder or .tar/.tar.gz/.tgz archive in split/class/image "
                "layout."
            )
        return ("archive", path)
    if os.path.exists(path):
        raise ValueError(
            f"`data_dir` {path} is a file, but not a .tar, .tar.gz or .tgz "
            "archive. Expected a folder or an archive laid out as "
            "<split>/<class>/<image>."
        )
    return None


def layout_error(where, what):
    """The ValueError for an entry of `where` that is not in `<split>/<class>/<image>` layout."""
    return ValueError(
        f"{what} in {where}: expected the layout <split>/<class>/<image> "
        "(e.g. train/airplane/0001.jpg), optionally under one top-level folder."
    )


def _list_folder(root, needed_splits):
    """Lists the splits of a local image folder (nothing is read)."""

    def display(split, cls=None, fname=None):
        return os.path.join(root, *[p for p in (split, cls, fname) if p])

    splits = {}
    for split in base.SPLITS:
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            continue
        splits[split] = {}
        if split not in needed_splits:
            continue
        for entry in os.scandir(split_dir):
            if is_hidden(entry.name):
                continue
            if not entry.is_dir():
                raise layout_error(
                    root, f"{entry.path} is a file directly in a split folder"
                )
            files = {}
            for item in os.scandir(entry.path):
                if is_hidden(item.name):
                    continue
                if item.is_dir():
                    raise layout_error(
                        root, f"{item.path} is a folder inside a class folder"
                    )
                files[item.name] = item.path
            splits[split][entry.name] = files
    listing = Listing(where=root, splits=splits, display=display)
    train = splits.get("train", {})
    keys = [(c, f) for c, files in train.items() for f in files]
    if keys:
        cls, fname = min(keys)
        listing.first_train = (cls, fname, train[cls][fname])
    return listing


def _list_archive(path, read_split):
    """Streams an archive once; keeps the bytes of `read_split`'s images."""
    splits = {}
    roots = set()  # Top-level folders that hold split folders ("" = none).
    first_train = None

    last, members = time.time(), 0
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                members += 1
                if time.time() - last >= 10:  # a long read says how far it is, at least every 10 s
                    logging.info("Reading %s: %d entries so far", os.path.basename(path), members)
                    last = time.time()
                parts = [
                    p for p in member.name.split("/") if p not in ("", ".")
                ]
                if not parts or any(is_hidden(p) for p in parts):
                    continue
                if parts[0] in base.SPLITS:
                    roots.add("")
                    rel = parts
                elif len(parts) > 1 and parts[1] in base.SPLITS:
                    roots.add(parts[0])
                    rel = parts[1:]
                else:
                    continue  # Outside the split folders (README, "extra").
                split = rel[0]
                classes = splits.setdefault(split, {})
                if member.isdir():
                    if len(rel) == 2:
                        classes.setdefault(rel[1], {})
                    continue
                if len(rel) != 3:
                    what = (
                        "is a file directly in a split folder"
                        if len(rel) == 2
                        else "is nested inside a class folder"
                    )
                    raise layout_error(path, f"Member {member.name} {what}")
                if not member.isfile():
                    raise ValueError(
                        f"Member {member.name} of {path} is a link or special "
                        "file; archives must hold the images as regular files."
                    )
                cls, fname = rel[1], rel[2]
                source = None
                if split == read_split:
                    source = tar.extractfile(member).read()
                if split == "train" and (
                    first_train is None or (cls, fname) < first_train[:2]
                ):
                    if source is None:
                        source = tar.extractfile(member).read()
                    first_train = (cls, fname, source)
                    if split != read_split:
                        source = None
                classes.setdefault(cls, {})[fname] = source
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise base.CorruptDatasetError(
            f"Could not read the archive {path} ({type(e).__name__}: {e}). "
            "Expected a .tar, .tar.gz or .tgz archive."
        ) from e
    if len(roots) > 1:
        raise layout_error(
            path,
            "Split folders under several top-level folders ("
            + ", ".join(
                repr(r) if r else "the archive's top" for r in sorted(roots)
            )
            + ")",
        )
    root = next(iter(roots)) if roots else ""

    def display(split, cls=None, fname=None):
        inner = "/".join(p for p in (root, split, cls, fname) if p)
        return f"{path} (member {inner})"

    return Listing(
        where=path, splits=splits, display=display, first_train=first_train
    )


def list_image_folder(location, split, need_train):
    """The `Listing` of the image folder at `location` (from `locate`): its split folders,
    the entries of `split` (from an archive, with their bytes) and, when `need_train`, of
    a local folder's train split (an archive always gives its first training image).

    Raises:
        ValueError: for entries out of the layout (`layout_error`) or, in an archive, a
            link or special file.
        base.CorruptDatasetError: for an archive that cannot be read.
    """
    kind, path = location
    if kind == "archive":
        return _list_archive(path, split)
    return _list_folder(path, {split, "train"} if need_train else {split})
