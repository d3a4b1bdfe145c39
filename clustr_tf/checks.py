"""Argument checks shared by the library: each raises an error naming the argument (in
backticks) and what was received, the way every error of this library reads. `error` is the
exception class (default ValueError; `clustr_tf.config` passes its `ConfigError`). Also
`write_json`, the atomic write of the results files."""

import json
import math
import numbers
import os
import tempfile


def positive_int(name, value, error=ValueError, optional=False):
    """Returns `value` if it is an integer >= 1 (bools are not; None too when `optional`)."""
    if optional and value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise error(f"`{name}` must be an integer >= 1. Received: {value!r}")
    return value


def integer(name, value, error=ValueError):
    """Returns `value` if it is an integer (bools are not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise error(f"`{name}` must be an integer. Received: {value!r}")
    return value


def one_of(name, value, choices, error=ValueError):
    """Returns `value` if it is one of `choices`; the error lists them."""
    if value not in choices:
        raise error(f"Unknown `{name}`. Expected one of {', '.join(map(str, choices))}. Received: {value!r}")
    return value


def l2_radius(name, value, error=ValueError):
    """Returns `value` as a float if it is a finite l2 radius >= 0 (pixel units)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value >= 0):
        raise error(f"`{name}` must be a finite l2 radius >= 0 (pixel units). Received: {value!r}")
    return float(value)


def non_negative(name, value, error=ValueError):
    """Returns `value` if it is a number >= 0 (not NaN)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
        raise error(f"`{name}` must be >= 0. Received: {value!r}")
    return value


def writable_dir(name, path, error=ValueError):
    """`error` unless `path` is a writable directory or can be made one (its nearest
    existing parent is a writable directory). Creates nothing: the caller makes the folder
    when it writes, so a command that fails first leaves nothing behind. `name` is how the
    message names the setting (e.g. "`model_dir`", "--export_dir")."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise error(f"{name} exists and is not a directory. Received: {path}")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise error(f"{name} cannot be made: {existing} is a file, not a directory. Received: {path}")
    try:
        tempfile.NamedTemporaryFile(dir=existing, prefix=".write_test").close()
    except OSError as e:
        raise error(f"{name} is not a writable directory: {e.strerror or e} ({existing}). Received: {path}") from None


def write_json(path, value):
    """Writes `value` as JSON to `path` atomically: a temporary file in the same folder,
    then a rename, so a kill never leaves a half-written file (readers see the old one or
    the new one). The file gets the permissions `open` would give it (mkstemp's are 0600)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "w") as fh:
            json.dump(value, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
