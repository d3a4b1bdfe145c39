"""Loading a saved model: `load_model` and a run directory's `load_run`, with one-line
errors that name the file and what is wrong with it (`ModelFileError`)."""

import json
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
    import clustr_tf  # noqa: PLC0415

    clustr_tf.load_all()  # registers the model classes (a binary may have deferred the library's imports)
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as e:  # noqa: BLE001: any load failure becomes one clear message
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelFileError(f"{path} cannot be loaded ({type(e).__name__}: {first}): it was written by an "
                             "incompatible version of clustr_tf or Keras, or is not a model of this library. "
                             "Train again in a new --model_dir with this version.") from None


def load_run(model_dir):
    """A run directory's model (a `models.Classifier`) and its config.json as a dict ({}
    when there is none), as training/main.py left them.

    Raises:
        ModelFileError: no model.keras (training has not finished), a model that cannot be
            loaded (`load_model`) or is not a classifier of this library, or a config.json
            that cannot be read. Nothing is deleted.
    """
    from clustr_tf.core import models  # noqa: PLC0415  (models imports this module)

    path = os.path.join(model_dir, "model.keras")
    if not os.path.exists(path):
        raise ModelFileError(f"No model.keras in --model_dir (has training finished?). Received: {model_dir}")
    run_config = {}
    config_path = os.path.join(model_dir, "config.json")
    if os.path.exists(config_path):
        try:
            with open(config_path) as fh:
                run_config = json.load(fh)
        except (OSError, ValueError) as e:
            raise ModelFileError(f"Cannot read {config_path} ({type(e).__name__}: {e}): it is truncated or not "
                                 "the config.json training/main.py writes.") from None
    model = load_model(path)
    if not isinstance(model, models.Classifier):
        raise ModelFileError(f"{path} is not a ClusTR model nor a baseline classifier "
                             f"(clustr_tf.models.Classifier). Received: {type(model).__name__}")
    return model, run_config
