"""Serving: a ClusTR model as a SavedModel for TF Serving.

`export(model, export_dir)` writes `export_dir/<version>/` (TF Serving's layout; the next
free version by default, an existing one is never overwritten) with three signatures on
`images` float32 [batch, H, W, C] in [0, 1], the contract of docs/serving.md:
`serving_default` (soft-kNC `probabilities` and `classes`), `certify` (nearest-center
`classes`, certified l2 `radius`, `feature_radius`, `lipschitz_bound`, `runner_up`) and
`embed` (`embeddings`). The SavedModel needs plain TensorFlow only: this project need not
be installed where it is served.

The package is laid out by concept, one module each:

    signatures  the serving functions and their request checks (the contract, in detail)
    saved_model `export`: checks, Lipschitz bound, tracing, warmup requests, metadata
    export_files `check_export`: an export read back and checked, one line per way it can be broken
    versions    the base folder's version folders, `check_export_dir`, `ExportError`

    client      `ClusTRClient` and the REST/gRPC requests of a served model (NumPy only)

`versions` and `client` import no TensorFlow, and this package imports each module on first
use, so they work where TensorFlow is not installed and a binary can check `--export_dir`
before TensorFlow loads. `export/export_model.py` is the binary
around `export`; `training/main.py --export_dir` calls `export` at the end of training.
"""

import importlib

_NAMES = {
    "DEFAULT_EVAL_NEIGHBOURS": "saved_model", "DEFAULT_MAX_BATCH_SIZE": "saved_model", "DEFAULT_MODEL_NAME": "saved_model", "METADATA_FILE": "saved_model",
    "WARMUP_FILE": "saved_model", "export": "saved_model", "check_export": "export_files",
    "read_metadata": "export_files",
    "INPUT_NAME": "signatures", "SIGNATURE_OUTPUTS": "signatures", "SIGNATURES": "signatures",
    "serving_functions": "signatures",
    "ExportError": "versions", "check_export_dir": "versions", "check_new_version": "versions",
    "existing_versions": "versions", "next_version": "versions", "parse_version": "versions",
}
_MODULES = ("client", "export_files", "saved_model", "signatures", "versions")
__all__ = [*_MODULES, *_NAMES]


def __getattr__(name):
    """Imports a module or name on first use (PEP 562)."""
    if name in _MODULES:
        value = importlib.import_module(f"clustr_tf.serving.{name}")
    elif name in _NAMES:
        value = getattr(importlib.import_module(f"clustr_tf.serving.{_NAMES[name]}"), name)
    else:
        raise AttributeError(f"module 'clustr_tf.serving' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
