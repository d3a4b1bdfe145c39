"""The export's base folder: TF Serving's numbered version folders, the checks of
`export_dir` and of a version, and `ExportError`. No TensorFlow is imported here, so a
binary can check its flags (`--export_dir`, `--version`) before TensorFlow loads."""

import os

import numpy as np

from clustr_tf import checks


class ExportError(ValueError):
    """An export that cannot be done; the message names the problem and what was received."""


def parse_version(text):
    """A version flag value -> int >= 1; raises ExportError."""
    try:
        version = int(str(text).strip())
    except ValueError:
        raise ExportError(f"--version must be an integer >= 1. Received: {text!r}") from None
    if version < 1:
        raise ExportError(f"--version must be an integer >= 1. Received: {text!r}")
    return version


def existing_versions(export_dir):
    """The sorted version numbers under `export_dir` (folders named by an integer)."""
    if not os.path.isdir(export_dir):
        return []
    return sorted(int(n) for n in os.listdir(export_dir)
                  if n.isdigit() and os.path.isdir(os.path.join(export_dir, n)))


def next_version(export_dir):
    """The version TF Serving would serve after the ones in `export_dir`: max + 1, or 1."""
    versions = existing_versions(export_dir)
    return versions[-1] + 1 if versions else 1


def check_export_dir(export_dir):
    """ExportError unless `export_dir` is a writable folder or can be made one (nothing is
    created: `export` makes it when it writes)."""
    if not export_dir:
        raise ExportError("--export_dir is required (the model's base folder for TF Serving).")
    checks.writable_dir("--export_dir", export_dir, ExportError)


def check_new_version(export_dir, version):
    """The folder of `version` under `export_dir`; ExportError if it exists already: a
    version is never overwritten."""
    path = os.path.join(export_dir, str(int(version)))
    if os.path.exists(path):
        raise ExportError(f"Version {version} already exists; it is never overwritten. Received: {path}")
    return path


def version_folder(export_dir, version):
    """`(path, version)` of a new version folder under `export_dir` (the next free
    version for None).

    Raises:
        ExportError: for a version that is not an integer >= 1, or one that exists (a
            version is never overwritten).
    """
    if version is None:
        version = next_version(export_dir)
    elif isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < 1:
        raise ExportError(f"`version` must be an integer >= 1. Received: {version!r}")
    return check_new_version(export_dir, version), int(version)
