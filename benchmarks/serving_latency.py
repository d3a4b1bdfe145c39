"""Latency and throughput of the exported SavedModel's signatures, on this machine.

    python benchmarks/serving_latency.py [--width_multiplier=1.0] [--latency_calls=200]

Exports a ClusTR ResNet-18 (or, with `--backbone=lipschitz`, the 1-Lipschitz network of
certified training; CIFAR shape 32x32x3, 10 classes, K=2, L=20) with
`export/export_model.py`, loads the SavedModel with `tf.saved_model.load` (what TF Serving
runs, minus its server), and measures:

- latency at batch 1 of `serving_default`, `certify` and `embed`: the calls are
  interleaved (the order alternates every round) so drifts of the machine hit all alike;
  target: certify's median at most 1.25x serving_default's;
- throughput at batch 256 of each signature (images/s, median over interleaved batches).

Each call is also timed in CPU seconds of this process (all its threads), which other
processes on a shared machine barely change: `*_cpu_ms` and `*_images_per_cpu_s`.

The model is untrained: its weights do not change the work done, only the numbers it
returns. Saves benchmarks/results/serving_latency.json and prints it as one JSON object
last.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import machine  # noqa: E402

TARGET_RATIO = 1.25
SIGNATURES = ("serving_default", "certify", "embed")


class _OthersShare:
    """The share of all CPU time that other processes used while the block ran."""

    def __enter__(self):
        self.system, self.cpu = machine.system_cpu(), time.process_time()
        return self

    def __exit__(self, *exc):
        share = machine.others_share(self.system, machine.system_cpu(), time.process_time() - self.cpu)
        self.value = None if share is None else round(share, 3)


def _stats_ms(seconds):
    import numpy as np

    values = np.asarray(seconds) * 1e3
    return {"median": round(float(np.median(values)), 3), "p90": round(float(np.percentile(values, 90)), 3),
            "mean": round(float(values.mean()), 3)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--width_multiplier", type=float, default=1.0)
    parser.add_argument("--backbone", choices=("resnet18", "lipschitz"), default="resnet18",
                        help="The CIFAR ResNet-18, or the 1-Lipschitz network of certified training.")
    parser.add_argument("--latency_calls", type=int, default=200, help="Batch-1 calls per signature.")
    parser.add_argument("--throughput_batch", type=int, default=256)
    parser.add_argument("--throughput_batches", type=int, default=5, help="Timed batches per signature.")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "serving_latency.json"))
    args = parser.parse_args()
    if args.latency_calls < 1 or args.throughput_batch < 1 or args.throughput_batches < 1:
        parser.error("--latency_calls, --throughput_batch and --throughput_batches must be >= 1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import keras
    import numpy as np
    import tensorflow as tf

    from clustr_tf import backbones
    from clustr_tf import models
    from clustr_tf import serving

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    shape = (32, 32, 3)
    backbone = (backbones.resnet18(shape, args.width_multiplier) if args.backbone == "resnet18"
                else backbones.lipschitz_convnet(shape, width_multiplier=args.width_multiplier))
    model = models.ClusTRModel(backbone, 10, 2, 10)
    # Centers among the features of random images, so decisions and radii vary.
    features = model.embed(rng.random((20, *shape)).astype("float32")).numpy()
    model.cluster_centers.centers.assign(features + 0.1 * features.std() * rng.standard_normal(features.shape))
    model.cluster_centers.variance.assign(float(features.var()))

    tmp = tempfile.mkdtemp()
    try:
        start = time.perf_counter()
        path = serving.export(model, os.path.join(tmp, "clustr"))
        export_seconds = time.perf_counter() - start
        del model
        keras.backend.clear_session()
        loaded = tf.saved_model.load(path)
        with open(os.path.join(path, "assets.extra", serving.METADATA_FILE)) as fh:
            metadata = json.load(fh)
        fns = {name: loaded.signatures[name] for name in SIGNATURES}

        def call(name, images):
            outputs = fns[name](images=images)
            return [v.numpy() for v in outputs.values()]

        pool = [tf.constant(rng.random((1, *shape)), tf.float32) for _ in range(16)]
        for name in SIGNATURES:  # tracing, thread pools, oneDNN primitives
            for x in pool[:5]:
                call(name, x)
        times = {name: [] for name in SIGNATURES}
        cpu_times = {name: [] for name in SIGNATURES}
        with _OthersShare() as latency_load:
            for i in range(args.latency_calls):
                order = SIGNATURES if i % 2 == 0 else SIGNATURES[::-1]
                for name in order:
                    x = pool[i % len(pool)]
                    c, t = time.process_time(), time.perf_counter()
                    call(name, x)
                    times[name].append(time.perf_counter() - t)
                    cpu_times[name].append(time.process_time() - c)
        latency = {f"{name}_ms": _stats_ms(times[name]) for name in SIGNATURES}
        latency.update({f"{name}_cpu_ms": _stats_ms(cpu_times[name]) for name in SIGNATURES})
        ratio = latency["certify_ms"]["median"] / latency["serving_default_ms"]["median"]
        cpu_ratio = latency["certify_cpu_ms"]["median"] / latency["serving_default_cpu_ms"]["median"]

        batch = tf.constant(rng.random((args.throughput_batch, *shape)), tf.float32)
        throughput = {"batch": args.throughput_batch, "batches": args.throughput_batches}
        for name in SIGNATURES:
            call(name, batch)
        seconds = {name: [] for name in SIGNATURES}
        cpu_seconds = {name: [] for name in SIGNATURES}
        with _OthersShare() as throughput_load:
            for i in range(args.throughput_batches):  # interleaved too
                for name in SIGNATURES if i % 2 == 0 else SIGNATURES[::-1]:
                    c, t = time.process_time(), time.perf_counter()
                    call(name, batch)
                    seconds[name].append(time.perf_counter() - t)
                    cpu_seconds[name].append(time.process_time() - c)
        for name in SIGNATURES:
            throughput[f"{name}_images_per_s"] = round(args.throughput_batch / float(np.median(seconds[name])), 2)
            throughput[f"{name}_images_per_cpu_s"] = round(
                args.throughput_batch / float(np.median(cpu_seconds[name])), 2)
            throughput[f"{name}_batch_seconds"] = [round(s, 3) for s in seconds[name]]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    result = {
        "model": f"ClusTR {'ResNet-18' if args.backbone == 'resnet18' else 'lipschitz_convnet'} "
                 f"x{args.width_multiplier:g}, CIFAR shape 32x32x3, 10 classes, K=2, "
                 f"L={metadata['neighbours']}, untrained (weights do not change the work)",
        "loaded_with": "tf.saved_model.load (the SavedModel TF Serving would serve; no server in the loop)",
        "lipschitz_bound": metadata["lipschitz_bound"],
        "export_seconds": round(export_seconds, 2),
        "latency_batch_1": {**latency, "certify_over_serving_default": round(ratio, 3),
                            "certify_over_serving_default_cpu": round(cpu_ratio, 3),
                            "calls_per_signature": args.latency_calls},
        "target": {"certify_over_serving_default_max": TARGET_RATIO, "met": bool(ratio <= TARGET_RATIO)},
        "throughput": throughput,
        "device": machine.describe("cpu", "cpus", "tensorflow", "python", "onednn"),
        "others_cpu_share": {"latency": latency_load.value, "throughput": throughput_load.value},
        "date": time.strftime("%Y-%m-%d"),
    }
    shares = [v for v in result["others_cpu_share"].values() if v is not None]
    if shares and max(shares) > 0.1:
        result["note"] = (
            f"Other processes used up to {100 * max(shares):.0f}% of the CPU while this ran: wall-clock "
            "latencies and throughputs are pessimistic (the CPU-time figures much less so); the "
            "certify/serving_default ratios come from interleaved calls and are not biased by it."
        )
    machine.save(args.out, result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
