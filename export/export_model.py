"""Exports a trained ClusTR model as a SavedModel for TF Serving.

    python export/export_model.py --model_dir=RUN --export_dir=BASE [--version=N]
    python export/export_model.py --check_export=BASE_OR_VERSION_FOLDER

writes `BASE/N/` (TF Serving's layout; N defaults to the next free version, an existing
version is never overwritten) with the signatures `serving_default`, `certify` and `embed`
of docs/serving.md. The library does the work (`clustr_tf.serving`: `serving.signatures`
describes the signatures, the request checks and the stored Lipschitz bound,
`serving.export` the export and its warmup requests; `training/main.py --export_dir=BASE`
calls it at the end of training); this binary loads a run directory, takes L from its
config.json and checks its flags. `--check_export` reads an existing export back (a copied
or half-written one is one line naming the broken file).
"""

import os
import sys

from absl import flags
from absl import logging

def define_flags(flag_values=flags.FLAGS):
    flags.DEFINE_string("check_export", None, "Check an existing export instead of writing one: a version folder, or "
                        "a base folder (its highest version). Loads it as TF Serving will and runs every signature; "
                        "one line says what is broken, if anything.", flag_values=flag_values)
    flags.DEFINE_string("model_dir", None, "The run directory (holds model.keras and config.json).",
                        flag_values=flag_values)
    flags.DEFINE_string("export_dir", None, "The model's base folder; the export goes to <export_dir>/<version>/.",
                        flag_values=flag_values)
    flags.DEFINE_string("version", None, "Version number >= 1. Default: the next free one.", flag_values=flag_values)
    flags.DEFINE_integer("eval_L", None, "L of serving_default. Default: the run's eval_L, else min(20, C*K).",
                         flag_values=flag_values)
    flags.DEFINE_string("model_name", None, "Model name in the warmup requests. Default: clustr.",
                        flag_values=flag_values)
    flags.DEFINE_integer("max_batch_size", 1024, "The most images one request may hold; a larger one gets "
                         "INVALID_ARGUMENT naming the limit (recorded in clustr_export.json). The client "
                         "(clustr-client) sends larger batches as several requests.", flag_values=flag_values)
    flags.DEFINE_string("precision", "float32", "What the signatures' backbone computes in: float32 (the network "
                        "the evaluation and the certificate are stated for), or `trained`: the run's "
                        "--mixed_precision (faster where the hardware has it). Inputs and outputs keep their dtypes.",
                        flag_values=flag_values)


def load_run(model_dir):
    """The run's model and config.json dict (`models.load_run`); ExportError when they cannot be used."""
    from clustr_tf import models
    from clustr_tf.serving import ExportError

    if not model_dir:
        raise ExportError("--model_dir is required (a run directory of training/main.py).")
    if not os.path.isdir(model_dir):
        raise ExportError(f"--model_dir is not a directory. Received: {model_dir}")
    try:
        model, run_config = models.load_run(model_dir)
    except models.ModelFileError as e:
        raise ExportError(str(e)) from None
    return model, run_config


def check(f):
    """--check_export: the line that says the export is sound (ExportError when it is not)."""
    from clustr_tf import serving
    from clustr_tf.serving import ExportError

    if f.model_dir or f.export_dir:
        raise ExportError("--check_export checks an existing export: pass it without --model_dir and --export_dir. "
                          f"Received: --model_dir={f.model_dir} --export_dir={f.export_dir}")
    folder, metadata = serving.check_export(f.check_export)
    return (f"{folder}: a sound export (signatures {', '.join(metadata['signatures'])}; input "
            f"{metadata['input']['shape']}, at most {metadata['input'].get('max_batch_size')} images per request; "
            f"certified rule {metadata.get('certified_rule')}, Lipschitz bound {metadata.get('lipschitz_bound'):g})")


def run(f):
    """Validates the flags, exports, and returns the version folder."""
    from clustr_tf import serving
    from clustr_tf.serving import ExportError

    if f.check_export:
        return check(f)

    if not f.model_dir:
        raise ExportError("--model_dir is required (a run directory of training/main.py).")
    if not f.export_dir:
        raise ExportError("--export_dir is required (the model's base folder for TF Serving).")
    version = serving.parse_version(f.version) if f.version is not None else None
    if f.precision not in ("float32", "trained"):
        raise ExportError(f"--precision must be float32 or trained. Received: {f.precision!r}")
    if f.max_batch_size < 1:
        raise ExportError(f"--max_batch_size must be >= 1. Received: {f.max_batch_size}")
    if f.eval_L is not None and f.eval_L < 1:
        raise ExportError(f"--eval_L must be >= 1. Received: {f.eval_L}")
    if not os.path.isdir(f.model_dir):
        raise ExportError(f"--model_dir is not a directory. Received: {f.model_dir}")
    serving.check_export_dir(f.export_dir)
    if version is not None:
        serving.check_new_version(f.export_dir, version)
    model, run_config = load_run(f.model_dir)
    from clustr_tf import models

    neighbours = None
    if isinstance(model, models.ClusTRModel):
        clusters = model.cluster_centers.num_clusters
        neighbours = f.eval_L or min(run_config.get("eval_L") or serving.DEFAULT_EVAL_NEIGHBOURS, clusters)
        if neighbours > clusters:
            raise ExportError(f"--eval_L must be at most the number of clusters, {clusters}. Received: {neighbours}")
    elif f.eval_L is not None:
        raise ExportError(f"--eval_L applies to ClusTR models; {f.model_dir} holds a linear-head classifier. "
                          f"Received: --eval_L={f.eval_L}")
    path = serving.export(model, f.export_dir, version=version, neighbours=neighbours,
                          model_name=f.model_name or serving.DEFAULT_MODEL_NAME,
                          compute_precision="float32" if f.precision == "float32" else None,
                          max_batch_size=f.max_batch_size)
    logging.info("Exported %s (L=%s)", path, neighbours)
    return path


def main(argv, flag_values=flags.FLAGS):
    from clustr_tf import cli

    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}", 2)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    from clustr_tf.serving import ExportError

    try:
        path = run(flag_values)
    except ExportError as e:
        cli.fail(e, 2)
    print(path)


def console_main():
    """The `clustr-export` command of the pip package (pyproject.toml)."""
    os.environ["CLUSTR_TF_DEFER_IMPORTS"] = "1"  # flags parsed and checked before TensorFlow loads
    from clustr_tf import cli

    cli.start(main, define_flags, __name__)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    console_main()
