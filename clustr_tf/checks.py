"""Argument checks shared by the library: each raises an error naming the argument (in
backticks) and what was received, the way every error of this library reads. `error` is the
exception class (default ValueError; `clustr_tf.config` passes its `ConfigError`)."""

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
    """Creates the folder `path` if needed; `error` unless it is a writable directory.
    `name` is how the message names the setting (e.g. "`model_dir`", "--export_dir")."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise error(f"{name} exists and is not a directory. Received: {path}")
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=path, prefix=".write_test").close()
    except OSError as e:
        raise error(f"{name} is not a writable directory: {e.strerror or e}. Received: {path}") from None
