"""Training step of the 1-Lipschitz AOL network: does bfloat16 and/or XLA make it faster on this CPU?

    python benchmarks/lipschitz_step.py [--rounds=8] [--batch_size=240]
        [--out=benchmarks/results/lipschitz_step.json]

Times one training step (Keras's train function of `Classifier.train_step`, the step `fit`
runs, as `benchmarks/train_throughput.py` times ClusTR) of the Lipschitz-by-construction
backbone (`backbones.get_backbone("lipschitz", (32, 32, 3), mean=(0.5,)*3,
width_multiplier=1.0)`: AOL convolutions, MaxMin, space-to-depth) under the two certified
heads of `benchmarks/certified.py`:

    certified_clustr        objectives.CertifiedClusTR(36/255, clusters_per_class=2, neighbours=10)
    lipschitz_margin_xent   objectives.CrossEntropy(certified_margin=36/255): a linear head

each in up to four variants (`--mixed_precision` and `--jit_compile` of training/main.py):

    float32         everything float32, no XLA
    bfloat16        the backbone built under `precision.policy_scope("bfloat16")` (Keras's
                    mixed_bfloat16; heads, losses and certificate stay float32)
    float32_jit     float32, `model.compile(..., jit_compile=True)` (the gradient step under XLA)
    bfloat16_jit    both

Every model (8: 4 variants x 2 heads) has its own backbone, `Adam(1e-4)`, and runs on an
iterator of `tf.data.Dataset.from_tensors((images, {"labels": labels})).repeat()`, one fixed
synthetic CIFAR-shaped batch (random uint8 images scaled to [0, 1] float32, random labels
over 10 classes: the pixel values do not change the time of a step). A variant whose model
fails to build, compile or run (e.g. XLA without a kernel for an op) records its error
instead of a time.

Each model runs 2 untimed steps (the first traces), then `--rounds` rounds in which every
model takes one timed step, in turn, so that load from other processes falls on all alike.
A step is timed from the call until its loss is a numpy value (`time.perf_counter`), with
this process's CPU seconds (`time.process_time`, all threads) beside it. Reported per head
and variant: the median wall and CPU seconds per step and their ratios to float32 of the
same head (< 1: faster than float32). The `device` record lists the CPU features low
precision depends on: without AVX512-BF16 or AMX-BF16, TensorFlow emulates bfloat16 in
float32.

Saves the result file (indent=2) and prints it as one JSON object last.
"""

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import machine  # noqa: E402

DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "lipschitz_step.json")
NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)
RADIUS = 36 / 255
WARMUP_STEPS = 2
# name: (precision, jit_compile); float32 first (the reference of the ratios).
VARIANTS = {
    "float32": ("float32", False),
    "bfloat16": ("bfloat16", False),
    "float32_jit": ("float32", True),
    "bfloat16_jit": ("bfloat16", True),
}
HEADS = ("certified_clustr", "lipschitz_margin_xent")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=8, help="Timed rounds (one step per model each).")
    parser.add_argument("--batch_size", type=int, default=240, help="Images per step.")
    parser.add_argument("--seed", type=int, default=0, help="Random seed.")
    parser.add_argument("--out", default=DEFAULT_OUT, help="Where to write the JSON result ('' : nowhere).")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.batch_size < 1:
        parser.error("--rounds and --batch_size must be >= 1")
    return args


def _error(e):
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= 2000 else text[:2000] + " ..."


class Step:
    """One model's train function on its iterator, and its timings."""

    def __init__(self, model, iterator):
        self.model, self.iterator = model, iterator
        model.make_train_function()
        self.times, self.cpu_times, self.losses = [], [], []
        self.warmup_s = 0.0
        self.error = None

    def __call__(self):
        return float(self.model.train_function(self.iterator)["loss"])

    def warm_up(self, steps):
        start = time.perf_counter()
        for _ in range(steps):
            self()
        self.warmup_s = time.perf_counter() - start

    def timed(self):
        cpu, start = time.process_time(), time.perf_counter()
        loss = self()
        self.times.append(time.perf_counter() - start)
        self.cpu_times.append(time.process_time() - cpu)
        self.losses.append(loss)


def run(args):
    import keras
    import numpy as np
    import tensorflow as tf

    from clustr_tf import backbones
    from clustr_tf import objectives
    from clustr_tf import precision

    total_start = time.perf_counter()
    load_start = os.getloadavg()
    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    images = rng.integers(0, 256, size=(args.batch_size, *IMAGE_SHAPE), dtype=np.uint8)
    images = tf.constant(images.astype(np.float32) / 255.0)
    labels = tf.constant(rng.integers(0, NUM_CLASSES, size=args.batch_size).astype(np.int64))
    dataset = tf.data.Dataset.from_tensors((images, {"labels": labels})).repeat()

    def objective_of(head):
        if head == "certified_clustr":
            return objectives.CertifiedClusTR(RADIUS, clusters_per_class=2, neighbours=10)
        return objectives.CrossEntropy(certified_margin=RADIUS)

    def build(head, compute, jit):
        with precision.policy_scope(compute):
            net = backbones.get_backbone("lipschitz", IMAGE_SHAPE, mean=(0.5, 0.5, 0.5), width_multiplier=1.0)
        objective = objective_of(head)
        model = objective.build_model(net, NUM_CLASSES)
        model.compile(optimizer=keras.optimizers.Adam(1e-4), objective=objective, jit_compile=jit)
        return Step(model, iter(dataset))

    steps, errors = {}, {}
    for variant, (compute, jit) in VARIANTS.items():
        for head in HEADS:
            start = time.perf_counter()
            try:
                step = build(head, compute, jit)
                step.warm_up(WARMUP_STEPS)
                steps[head, variant] = step
                print(f"{head}/{variant}: built and warmed up in {time.perf_counter() - start:.1f} s",
                      file=sys.stderr, flush=True)
            except Exception as e:  # noqa: BLE001 (e.g. XLA cannot compile an op)
                errors[head, variant] = _error(e)
                print(f"{head}/{variant}: FAILED: {errors[head, variant][:300]}", file=sys.stderr, flush=True)

    for r in range(args.rounds):
        for key, step in list(steps.items()):
            try:
                step.timed()
            except Exception as e:  # noqa: BLE001
                errors[key] = _error(e)
                del steps[key]
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{h}/{v} {s.times[-1]:.2f}s" for (h, v), s in steps.items()), file=sys.stderr, flush=True)

    results = {}
    for head in HEADS:
        results[head] = {}
        reference = steps.get((head, "float32"))
        for variant in VARIANTS:
            if (head, variant) in errors:
                results[head][variant] = {"error": errors[head, variant]}
                continue
            step = steps[head, variant]
            wall, cpu = statistics.median(step.times), statistics.median(step.cpu_times)
            entry = {
                "step_s": round(wall, 4),
                "cpu_s": round(cpu, 4),
                "images_per_s": round(args.batch_size / wall, 1),
                "timed_steps_s": [round(t, 4) for t in step.times],
                "timed_cpu_s": [round(t, 4) for t in step.cpu_times],
                "warmup_s": round(step.warmup_s, 2),
                "last_loss": step.losses[-1],
            }
            if reference is not None:
                entry["wall_ratio_to_float32"] = round(wall / statistics.median(reference.times), 3)
                entry["cpu_ratio_to_float32"] = round(cpu / statistics.median(reference.cpu_times), 3)
                entry["wall_ratio_by_round"] = [round(a / b, 3) for a, b in zip(step.times, reference.times)]
            results[head][variant] = entry

    device = machine.describe("cpu", "cpu_cores", "cpu_features", "native_bfloat16", "accelerators",
                              "tensorflow", "keras", "python", "onednn")
    result = {
        "command": "python " + " ".join([os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)] + sys.argv[1:]),
        "settings": {
            "backbone": "get_backbone('lipschitz', (32, 32, 3), mean=(0.5, 0.5, 0.5), width_multiplier=1.0)",
            "heads": {
                "certified_clustr": "objectives.CertifiedClusTR(36/255, clusters_per_class=2, neighbours=10)",
                "lipschitz_margin_xent": "objectives.CrossEntropy(certified_margin=36/255)",
            },
            "variants": {name: {"mixed_precision": compute, "jit_compile": jit}
                         for name, (compute, jit) in VARIANTS.items()},
            "optimizer": "Adam(1e-4)",
            "batch_size": args.batch_size,
            "rounds": args.rounds,
            "warmup_steps": WARMUP_STEPS,
            "data": "synthetic: one fixed batch of random uint8 images 32x32x3 / 255 (float32), random labels "
                    "over 10 classes; Dataset.from_tensors(...).repeat()",
            "step": "model.train_function(iterator) (Keras's train function of Classifier.train_step), timed "
                    "until its loss is a Python float; rounds interleave all models",
        },
        "device": device,
        "results": results,
        "summary": {
            head: {variant: (None if "error" in entry else {
                "step_s": entry["step_s"], "cpu_s": entry["cpu_s"],
                "wall_ratio": entry.get("wall_ratio_to_float32"), "cpu_ratio": entry.get("cpu_ratio_to_float32")})
                for variant, entry in results[head].items()}
            for head in HEADS
        },
        "errors": {f"{h}/{v}": e for (h, v), e in errors.items()},
    }
    if device.get("native_bfloat16") is False:
        result["bfloat16_note"] = (
            "This CPU has no native bfloat16 (neither AVX512-BF16 nor AMX-BF16): TensorFlow converts bfloat16 "
            "to float32 and back, so the bfloat16 times measure that emulation.")
    result["load_average_1min"] = {"start": round(load_start[0], 2), "end": round(os.getloadavg()[0], 2)}
    result["total_wall_s"] = round(time.perf_counter() - total_start, 1)
    result["date"] = time.strftime("%Y-%m-%d")
    return result


def main(argv=None):
    args = parse_args(argv)
    result = run(args)
    if args.out:
        machine.save(args.out, result)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
