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
    versions    the base folder's version folders, `check_export_dir`, `ExportError`

`versions` imports no TensorFlow, and the others import it when they run, so a binary can
check `--export_dir` before TensorFlow loads. `export/export_model.py` is the binary
around `export`; `training/main.py --export_dir` calls `export` at the end of training.
"""

from clustr_tf.serving.saved_model import DEFAULT_EVAL_NEIGHBOURS
from clustr_tf.serving.saved_model import DEFAULT_MODEL_NAME
from clustr_tf.serving.saved_model import METADATA_FILE
from clustr_tf.serving.saved_model import WARMUP_FILE
from clustr_tf.serving.saved_model import export
from clustr_tf.serving.signatures import INPUT_NAME
from clustr_tf.serving.signatures import SIGNATURE_OUTPUTS
from clustr_tf.serving.signatures import SIGNATURES
from clustr_tf.serving.signatures import serving_functions
from clustr_tf.serving.versions import ExportError
from clustr_tf.serving.versions import check_export_dir
from clustr_tf.serving.versions import check_new_version
from clustr_tf.serving.versions import existing_versions
from clustr_tf.serving.versions import next_version
from clustr_tf.serving.versions import parse_version
