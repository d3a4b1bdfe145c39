"""Loading a saved model: `load_model`, with one-line errors that name the file and what
is wrong with it (`ModelFileError`)."""

import os
import zipfile

import keras


class ModelFileError(ValueError):
    """A .keras file that cannot be loaded; the message names the file and what is wrong."""


def load_model(path):
    """`keras.saving.load_model(path, compile=False)` with one-line errors.

    Raises:
        ModelFileError: no file; not a .keras archive (truncated, or another kind of file);
            or an archive Keras cannot load (written by an incompatible version of
            clustr_tf or Keras, or damaged inside). Nothing is deleted.
    """
    if not os.path.isfile(path):
        raise ModelFileError(f"No model file at {path}")
    size = os.path.getsize(path)
    if not zipfile.is_zipfile(path):
        raise ModelFileError(f"{path} is not a .keras model archive ({size} bytes; a .keras file is a zip archive): "
                             "it is truncated (a full disk, a partial copy) or another kind of file. Copy it again "
                             "whole, or train again in a new --model_dir.")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        damaged = f"{type(e).__name__}: {e}"
    if damaged:
        raise ModelFileError(f"{path} is a damaged .keras archive ({size} bytes; bad member: {damaged}): it was "
                             "truncated or altered. Copy it again whole, or train again in a new --model_dir.")
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as e:  # noqa: BLE001: any load failure becomes one clear message
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelFileError(f"{path} cannot be loaded ({type(e).__name__}: {first}): it was written by an "
                             "incompatible version of clustr_tf or Keras, or is not a model of this library. "
                             "Train again in a new --model_dir with this version.") from None
