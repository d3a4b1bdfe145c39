"""Serving a ClusTR model with TF Serving.

- `export.export_model`: writes a SavedModel in TF Serving's layout
  (`<export_dir>/<version>/`) with the `serving_default`, `certify` and `embed`
  signatures, input checks inside the graph, the Lipschitz bound stored in the model,
  and TF Serving warmup requests. Library function `export(model, export_dir, ...)` and
  the command `python export/export_model.py --model_dir=RUN --export_dir=BASE`.
- `export.client`: the command line around `clustr_tf.serving.client`, which sends images
  to TF Serving over REST or gRPC for any of the three signatures.

The modules import TensorFlow lazily; importing this package imports nothing heavy.
"""
