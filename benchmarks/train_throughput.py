"""Training throughput of ClusTR against a plain cross-entropy Keras step, on this machine.

    python benchmarks/train_throughput.py [--width_multiplier=1.0] [--steps=3]
        [--train_images=2400] [--out=benchmarks/results/train_throughput.json]

Measures, on synthetic CIFAR-shaped data (random uint8 images, random labels over 10
classes: the pixel values do not change the time of a step), with the CIFAR ResNet-18 of
`clustr_tf.backbones`:

1. `xent`: the step a Keras user gets for the same backbone + Dense(10):
   `model.compile(Adam, sparse categorical cross-entropy, jit_compile=False)` and
   `model.train_on_batch` on one fixed batch of m*d images (Keras traces its train
   function as a `tf.function`).
2. `clustr`: Keras's train function of `ClusTRModel.train_step` (the step `fit` runs) on an iterator
   of the neighbourhood sampler's dataset, default strategy, same backbone and batch.
3. `clustr_qtrades`: the same with `consistency_lambda=8` (ClusTR+QTRADES).
With `--precisions=float32,bfloat16` (the default) the three steps are also timed with the
backbone under Keras's `mixed_bfloat16` policy (`clustr_tf.precision`; heads and losses stay
float32), each with its own model, all six interleaved round by round: `precisions` holds
every step's summary and `precision_ratios` the bfloat16/float32 step-time and CPU-second
ratios per objective (< 1: bfloat16 is faster). The `device` record lists the CPU features
low precision depends on (AVX512-BF16, AMX); on a CPU with neither, TensorFlow emulates
bfloat16 in float32 and `bfloat16_note` says the bfloat16 times measure that emulation.
4. `sampler`: batches per second of `NeighbourhoodSampler.dataset()` alone, against the
   ClusTR step's consumption rate (`sampler_to_step_ratio`).
5. `refresh`: one `objective.cluster_refresh(sampler).refresh()` (embedding pass + per-class k-means +
   variance + sampler update) against one `clustering.embed` pass over the same images.

Every variant runs `--warmup_steps` untimed steps first (the first one traces); a timed
step runs from the call to the moment its result is a numpy value (`time.perf_counter`),
and the reported time is the median of `--steps` timed steps. The timed steps of xent,
clustr and clustr_qtrades are interleaved round by round, so that load from other
processes falls on all three alike. With `--breakdown` the QTRADES perturbation alone and
a plain inference forward pass of one batch are timed the same way, to show where a
QTRADES step's time goes. XLA is off everywhere (`jit_compile=False`).

The machine may be shared: every timing also records this process's CPU seconds
(`cpu_s`), its share of the machine (`cpu_share`, near 1.0 when it has all cores) and the
share other processes took meanwhile (`others_cpu_share`, from /proc/stat). A call with a
low `cpu_share` and `others_cpu_share` near 0 ran while the machine sat partly idle (seen
on the 2-vCPU test machines: a call intermittently takes ~1.7x its wall time for the same
CPU seconds). The ratios are computed on wall time, as the targets are stated; `*_cpu_s`
ratios and per-round ratios are given too, to judge how much such effects moved them.

Saves the result file and prints it as one JSON object on the last line.
"""

import json
import os
import statistics
import sys
import time

from absl import app
from absl import flags
from absl import logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import machine  # noqa: E402

DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "train_throughput.json")
NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)

# The targets, as (result key, comparison, bound).
TARGETS = {
    "ratio": ("<=", 1.10),
    "qtrades_ratio": ("<=", 2.2),
    "sampler_to_step_ratio": (">=", 10.0),
    "refresh_to_inference_ratio": ("<=", 1.3),
}


def define_flags():
    """Defines the benchmark's flags."""
    flags.DEFINE_float("width_multiplier", 1.0, "ResNet-18 width multiplier.")
    flags.DEFINE_enum("backbone", "resnet18", ["resnet18", "convnet"], "The network timed: the paper's "
                      "ResNet-18 (the results), or the small ConvNet (a quick check of this script: the tests).")
    flags.DEFINE_integer("m", 12, "Clusters per neighbourhood batch.")
    flags.DEFINE_integer("d", 20, "Examples drawn from each cluster of a batch.")
    flags.DEFINE_integer("batch", None, "Batch size m*d; when set, d = batch / m. Default: m*d.")
    flags.DEFINE_integer("k", 2, "Clusters per class K.")
    flags.DEFINE_integer("steps", 3, "Timed steps per variant (the median is reported).")
    flags.DEFINE_integer("warmup_steps", 1, "Untimed steps per variant (the first traces).")
    flags.DEFINE_integer("train_images", 2400, "Images of the training set (sampler, refresh).")
    flags.DEFINE_integer("refresh_repeats", 2, "Timed refreshes and inference passes (median).")
    flags.DEFINE_integer("sampler_batches", 100, "Batches timed for the sampler alone.")
    flags.DEFINE_integer("eval_batch_size", 256, "Batch size of the embedding pass.")
    flags.DEFINE_bool("augment", True, "Use the CIFAR-10 augmentation in the sampler's dataset.")
    flags.DEFINE_bool("breakdown", True, "Also time the QTRADES attack and an inference forward.")
    flags.DEFINE_integer("seed", 0, "Random seed.")
    flags.DEFINE_list("precisions", ["float32", "bfloat16"], "Precisions of the three steps, float32 first "
                      "(clustr_tf.precision; the sampler, breakdown and refresh are float32 only).")
    flags.DEFINE_string("out", DEFAULT_OUT, "Where to write the JSON result.")


def device_description():
    """CPU model, core count, the CPU features low precision depends on, accelerators and
    library versions."""
    return machine.describe("cpu", "cpu_cores", "cpu_features", "native_bfloat16", "accelerators",
                            "tensorflow", "keras", "python", "onednn")


# The machine's load, as the timers below read it (benchmarks/machine.py).
_system_cpu = machine.system_cpu
_others_share = machine.others_share


class Timer:
    """Times calls of one variant: wall seconds and the CPU share this process got.

    `fn` must return only once its work is done (e.g. after `.numpy()` on a result).
    """

    def __init__(self, fn):
        self.fn = fn
        self.warmup_s = 0.0
        self.times = []
        self.cpu_times = []
        self.values = []
        self.others_shares = []
        self.cpu_shares = []

    def warm_up(self, calls):
        start = time.perf_counter()
        for _ in range(calls):
            self.fn()
        self.warmup_s += time.perf_counter() - start

    def timed_call(self):
        system, cpu, start = _system_cpu(), time.process_time(), time.perf_counter()
        value = self.fn()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        self.times.append(wall)
        self.cpu_times.append(cpu)
        self.cpu_shares.append(cpu / (wall * (os.cpu_count() or 1)))
        self.values.append(value)
        self.others_shares.append(_others_share(system, _system_cpu(), cpu))

    @property
    def median(self):
        return statistics.median(self.times)

    def summary(self, batch=None, counted=False):
        """The timing summary; with `counted`, each call returned its number of images."""
        out = {
            "step_s": round(self.median, 4),
            "timed_steps_s": [round(t, 4) for t in self.times],
            "warmup_s": round(self.warmup_s, 2),
            # CPU time of this process / (wall time x cores): well below 1 means other
            # processes took cores during the timed calls.
            "cpu_share": round(statistics.median(self.cpu_shares), 3),
            # CPU seconds of this process per call (all threads): less sensitive to other
            # processes than wall time.
            "cpu_s": round(statistics.median(self.cpu_times), 3),
            # Fraction of the machine's CPU time other processes used meanwhile (from
            # /proc/stat): above ~0.05 the wall times above are inflated by them.
            "others_cpu_share": _round_median(self.others_shares),
            "cpu_share_by_call": [round(v, 3) for v in self.cpu_shares],
            "others_cpu_share_by_call": [
                None if v is None else round(v, 3) for v in self.others_shares
            ],
        }
        if counted:
            batch = statistics.median(self.values)
            out["images_per_step"] = batch
        if batch:
            out["images_per_s"] = round(batch / self.median, 2)
        return out


def _round_median(values, digits=3):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), digits) if values else None


def interleave(timers, warmup, rounds):
    """Warms every timer up, then times one call of each per round, in turn.

    Interleaving spreads any load from other processes over all variants alike, so the
    ratios stay meaningful on a shared machine.
    """
    for timer in timers:
        timer.warm_up(warmup)
    for _ in range(rounds):
        for timer in timers:
            timer.timed_call()


def met(value, comparison, bound):
    return bool(value <= bound) if comparison == "<=" else bool(value >= bound)


def run(f):
    import keras
    import numpy as np
    import tensorflow as tf

    from clustr_tf import backbones
    from clustr_tf import clustering
    from clustr_tf import consistency
    from clustr_tf import objectives
    from clustr_tf import precision
    from clustr_tf import sampler as sampler_lib

    total_start = time.perf_counter()
    load_start = os.getloadavg()
    m, d = f.m, f.d
    if f.batch is not None:
        if f.batch < m or f.batch % m:
            raise app.UsageError(
                f"--batch must be a positive multiple of --m={m}. Received: {f.batch}"
            )
        d = f.batch // m
    batch = m * d
    if f.train_images < NUM_CLASSES * f.k * d:
        raise app.UsageError(
            f"--train_images must be >= num_classes * k * d = {NUM_CLASSES * f.k * d} so that "
            f"every initial cluster holds d examples. Received: {f.train_images}"
        )
    for compute in f.precisions:
        precision.check(compute, app.UsageError, "--precisions")
    if not f.precisions or f.precisions[0] != "float32" or len(set(f.precisions)) != len(f.precisions):
        raise app.UsageError(f"--precisions must start with float32 (the reference), each once. "
                             f"Received: {','.join(f.precisions)}")
    keras.utils.set_random_seed(f.seed)
    rng = np.random.default_rng(f.seed)
    images = rng.integers(0, 256, size=(f.train_images, *IMAGE_SHAPE), dtype=np.uint8)
    # Balanced random labels (every class has train_images / 10 examples, +-1).
    labels = rng.permutation(np.arange(f.train_images) % NUM_CLASSES).astype(np.int64)

    augment, augment_name = None, "none (--noaugment)"
    if f.augment:
        try:
            from clustr_tf import data

            augment = data.augmentation("cifar10")
            probe = augment(tf.zeros([2, *IMAGE_SHAPE]), tf.constant([0, 1], tf.int64))
            if tuple(probe.shape) != (2, *IMAGE_SHAPE):
                raise ValueError(f"it maps [2, 32, 32, 3] to {tuple(probe.shape)}")
            augment_name = "clustr_tf.data.augmentation('cifar10')"
        except Exception as e:  # the data module may be mid-edit
            augment = None
            augment_name = f"none (augmentation unavailable: {type(e).__name__}: {e})"
            logging.warning("No augmentation: %s", augment_name)

    def backbone():
        if f.backbone == "convnet":
            return backbones.get_backbone("convnet", IMAGE_SHAPE)
        return backbones.resnet18(IMAGE_SHAPE, width_multiplier=f.width_multiplier)

    result = {
        "settings": {
            "backbone": f.backbone,
            "width_multiplier": f.width_multiplier,
            "batch": batch,
            "m": m,
            "d": d,
            "clusters_per_class": f.k,
            "num_classes": NUM_CLASSES,
            "steps": f.steps,
            "warmup_steps": f.warmup_steps,
            "train_images": f.train_images,
            "sampler_batches": f.sampler_batches,
            "eval_batch_size": f.eval_batch_size,
            "augmentation": augment_name,
            "data": "synthetic random uint8 images 32x32x3, random balanced labels (10 classes)",
            "optimizer": "Adam(1e-4)",
            "jit_compile": False,
            "strategy": "default (tf.distribute.get_strategy())",
            "precisions": list(f.precisions),
            "xent_step": "model.compile(...) + model.train_on_batch (Keras-traced tf.function)",
            "clustr_step": "model.train_function (model.fit's step of ClusTRModel.train_step) on iter(sampler.dataset())",
        },
        "device": device_description(),
    }

    # ---- 1-3. the three steps, in each precision ---------------------------------------------
    # Per precision: the cross-entropy Keras step, the ClusTR step and the ClusTR+QTRADES
    # step, each with its own model whose backbone is built under that precision's policy
    # (clustr_tf.precision); heads and losses are float32 in every precision.
    x_batch = tf.constant(images[:batch].astype(np.float32) / 255.0)
    y_batch = tf.constant(labels[:batch])
    strategy = tf.distribute.get_strategy()
    sampler = sampler_lib.NeighbourhoodSampler(
        images, labels, num_classes=NUM_CLASSES, clusters_per_class=f.k, m=m, d=d, seed=f.seed
    )

    def make_xent(name):
        with precision.policy_scope(name):
            net = backbone()
        inputs = keras.Input(IMAGE_SHAPE)
        model = keras.Model(inputs, keras.layers.Dense(NUM_CLASSES, dtype="float32")(net(inputs)))
        model.compile(
            optimizer=keras.optimizers.Adam(1e-4),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            jit_compile=False,
        )
        return model

    def make_clustr(consistency_lambda, compute):
        objective = objectives.ClusTR(clusters_per_class=f.k, consistency_lambda=consistency_lambda)
        with strategy.scope():
            with precision.policy_scope(compute):
                net = backbone()
            model = objective.build_model(net, NUM_CLASSES)
            model.compile(optimizer=keras.optimizers.Adam(1e-4), objective=objective, seed=f.seed)
        return model

    def step_timer(model):
        """The step `fit` runs (Keras's train function of the model's `train_step`) on an
        iterator of the sampler's dataset. Every batch holds m * d images: each of the
        synthetic set's clusters has more than d examples."""
        iterator = iter(sampler.dataset(augment=augment))
        model.loss_recorder = sampler
        model.make_train_function()
        return lambda: (float(model.train_function(iterator)["loss"]), sampler.batch_size)[1]

    timers, keep, clustr_model, q_model = {}, [], None, None
    for compute in f.precisions:
        logging.info("%s: building the cross-entropy, ClusTR and ClusTR+QTRADES steps", compute)
        xent_model = make_xent(compute)
        keep.append(xent_model)
        timers[compute, "xent"] = Timer(lambda model=xent_model: model.train_on_batch(x_batch, y_batch))
        c_model = make_clustr(0.0, compute)
        if clustr_model is None:
            logging.info("clustr: first refresh (also the refresh warm-up)")
            clustr_model = c_model
            refresh = c_model.objective.cluster_refresh(sampler, batch_size=f.eval_batch_size, seed=f.seed)
            refresh.set_model(c_model)
            start = time.perf_counter()
            refresh.refresh()  # as fit's first callback does before the first step
            first_refresh = time.perf_counter() - start
        qt = make_clustr(8.0, compute)
        q_model = q_model or qt
        layer = clustr_model.cluster_centers
        for other in (c_model, qt):  # finite, refreshed-looking centers without a refresh
            if other is not clustr_model:
                other.cluster_centers.centers.assign(layer.centers)
                other.cluster_centers.variance.assign(layer.variance)
        keep.extend([c_model, qt])
        timers[compute, "clustr"] = Timer(step_timer(c_model))
        timers[compute, "clustr_qtrades"] = Timer(step_timer(qt))

    logging.info("steps: %d warm-up and %d timed rounds of %d variants", f.warmup_steps, f.steps, len(timers))
    interleave(list(timers.values()), f.warmup_steps, f.steps)
    xent, clustr, qtrades = (timers["float32", name] for name in ("xent", "clustr", "clustr_qtrades"))
    result["xent"] = xent.summary(batch)
    result["clustr"] = clustr.summary(counted=True)
    result["clustr_qtrades"] = qtrades.summary(counted=True)
    for name in ("xent", "clustr", "clustr_qtrades"):
        logging.info("%s: %s", name, result[name])
    result["precisions"] = {
        compute: {name: timers[compute, name].summary(batch if name == "xent" else None, counted=name != "xent")
                  for name in ("xent", "clustr", "clustr_qtrades")}
        for compute in f.precisions
    }
    # Low precision against float32, per objective: step time and CPU seconds (< 1: faster).
    result["precision_ratios"] = {
        compute: {
            name: {
                "step_ratio": round(timers[compute, name].median / timers["float32", name].median, 3),
                "cpu_ratio": round(statistics.median(timers[compute, name].cpu_times)
                                   / statistics.median(timers["float32", name].cpu_times), 3),
                "by_round": [round(a / b, 3) for a, b in zip(timers[compute, name].times,
                                                             timers["float32", name].times)],
            }
            for name in ("xent", "clustr", "clustr_qtrades")
        }
        for compute in f.precisions if compute != "float32"
    }
    native = result["device"]["native_bfloat16"]
    if "bfloat16" in f.precisions and native is False:
        result["bfloat16_note"] = (
            "This CPU has no native bfloat16 (neither AVX512-BF16 nor AMX-BF16): TensorFlow converts "
            "bfloat16 to float32 and back, so the bfloat16 times measure that emulation, not bfloat16 "
            "training on hardware that has it.")
    logging.info("precision ratios: %s", result["precision_ratios"])
    del keep

    if f.breakdown:
        q_config = q_model.objective
        sample = next(iter(sampler.dataset(augment=augment)))[0]

        @tf.function
        def attack(x):
            return consistency.perturbation(
                q_model, x, q_model(x, training=False), q_config.consistency, q_config.consistency_eps,
                q_config.consistency_step, tf.constant([0, 1], tf.int64),
            )

        @tf.function
        def forward(x):
            return q_model(x, training=False)

        parts = {
            "forward_inference": Timer(lambda: forward(sample).numpy()),
            "qtrades_attack": Timer(lambda: attack(sample).numpy()),
        }
        interleave(list(parts.values()), f.warmup_steps, f.steps)
        breakdown = {f"{name}_s": round(timer.median, 4) for name, timer in parts.items()}
        breakdown["cpu_share"] = round(
            statistics.median(s for t in parts.values() for s in t.cpu_shares), 3
        )
        breakdown["others_cpu_share"] = _round_median(
            [s for t in parts.values() for s in t.others_shares]
        )
        q_step = result["clustr_qtrades"]["step_s"]
        breakdown["qtrades_step_minus_attack_s"] = round(q_step - breakdown["qtrades_attack_s"], 4)
        breakdown["note"] = (
            "forward_inference: model(x, training=False) on one batch; qtrades_attack: "
            "an inference forward of the clean batch (the official form's target comes from the "
            "training forward instead) and consistency.perturbation (a forward and a "
            "backward to the input); the rest of a QTRADES step is two training forwards (clean and "
            "adversarial) and their backward pass, vs one of each in a ClusTR step"
        )
        result["qtrades_breakdown"] = breakdown
        logging.info("qtrades breakdown: %s", breakdown)
    del q_model

    # ---- 4. sampler alone ------------------------------------------------------------------
    logging.info("sampler: %d batches", f.sampler_batches)
    iterator = iter(sampler.dataset(start=10_000, augment=augment))
    for _ in range(10):  # warm-up: trace, fill the prefetch buffer
        next(iterator)
    system, cpu, start = _system_cpu(), time.process_time(), time.perf_counter()
    for _ in range(f.sampler_batches):
        x, info = next(iterator)
    _ = x.numpy(), info["indices"].numpy()
    sampler_s = time.perf_counter() - start
    sampler_cpu_s = time.process_time() - cpu
    sampler_others = _others_share(system, _system_cpu(), sampler_cpu_s)
    sampler_cpu = sampler_cpu_s / (sampler_s * (os.cpu_count() or 1))
    sampler_rate = f.sampler_batches / sampler_s
    result["sampler"] = {
        "batches_per_s": round(sampler_rate, 2),
        "batch_ms": round(1000 * sampler_s / f.sampler_batches, 3),
        "batches": f.sampler_batches,
        "cpu_share": round(sampler_cpu, 3),
        "others_cpu_share": None if sampler_others is None else round(sampler_others, 3),
    }
    logging.info("sampler: %s", result["sampler"])

    # ---- 5. refresh vs inference -----------------------------------------------------------
    logging.info("refresh: %d images", f.train_images)
    embed_fn = clustering.embedding_function(clustr_model)
    features = []

    def embed(images=sampler.images):
        features[:] = [clustering.embed(clustr_model, images, f.eval_batch_size, embed_fn)]

    # Warm-up on one full batch and a last batch of the same size as the full pass's: the
    # same shapes are traced and run, at a fraction of a full pass's cost.
    remainder = f.train_images % f.eval_batch_size or f.eval_batch_size
    subset = sampler.images[: min(f.train_images, f.eval_batch_size + remainder)]
    start = time.perf_counter()
    embed(subset)
    inference_warmup_s = time.perf_counter() - start
    inference = Timer(embed)
    refresh = Timer(refresh.refresh)  # warmed up by the first refresh above
    interleave([inference, refresh], 0, f.refresh_repeats)
    start = time.perf_counter()
    clustering.kmeans_per_class(features[0], sampler.labels, NUM_CLASSES, f.k, seed=f.seed)
    kmeans_s = time.perf_counter() - start
    refresh_s, inference_s = refresh.median, inference.median
    result["refresh"] = {
        "refresh_s": round(refresh_s, 3),
        "inference_s": round(inference_s, 3),
        "inference_images_per_s": round(f.train_images / inference_s, 2),
        "kmeans_s": round(kmeans_s, 3),
        "refresh_timed_s": [round(t, 3) for t in refresh.times],
        "inference_timed_s": [round(t, 3) for t in inference.times],
        "refresh_cpu_share_by_call": [round(v, 3) for v in refresh.cpu_shares],
        "inference_cpu_share_by_call": [round(v, 3) for v in inference.cpu_shares],
        "refresh_cpu_s": round(statistics.median(refresh.cpu_times), 3),
        "inference_cpu_s": round(statistics.median(inference.cpu_times), 3),
        "cpu_share": round(statistics.median(inference.cpu_shares + refresh.cpu_shares), 3),
        "others_cpu_share": _round_median(inference.others_shares + refresh.others_shares),
        "first_refresh_s": round(first_refresh, 3),
        "inference_warmup_s": round(inference_warmup_s, 3),
        "images": f.train_images,
        "repeats": f.refresh_repeats,
    }
    logging.info("refresh: %s", result["refresh"])

    # ---- summary ---------------------------------------------------------------------------
    clustr_s = result["clustr"]["step_s"]
    result.update({
        "clustr_images_per_s": result["clustr"]["images_per_s"],
        "xent_images_per_s": result["xent"]["images_per_s"],
        "qtrades_images_per_s": result["clustr_qtrades"]["images_per_s"],
        "xent_step_s": result["xent"]["step_s"],
        "clustr_step_s": clustr_s,
        "qtrades_step_s": result["clustr_qtrades"]["step_s"],
        "ratio": round(clustr_s / result["xent"]["step_s"], 3),
        # Per image: equals `ratio` when every ClusTR batch holds m*d images.
        "ratio_per_image": round(
            result["xent"]["images_per_s"] / result["clustr"]["images_per_s"], 3
        ),
        "qtrades_ratio": round(result["clustr_qtrades"]["step_s"] / clustr_s, 3),
        "sampler_to_step_ratio": round(sampler_rate * clustr_s, 2),
        "refresh_to_inference_ratio": round(refresh_s / inference_s, 3),
    })
    # The same ratios round by round (each round times the variants back to back), and on
    # this process's CPU seconds: when other processes share the machine, these show how
    # much of the spread is the load.
    result["ratio_by_round"] = [round(c / x, 3) for c, x in zip(clustr.times, xent.times)]
    result["qtrades_ratio_by_round"] = [
        round(q / c, 3) for q, c in zip(qtrades.times, clustr.times)
    ]
    result["ratio_cpu_s"] = round(result["clustr"]["cpu_s"] / result["xent"]["cpu_s"], 3)
    result["qtrades_ratio_cpu_s"] = round(
        result["clustr_qtrades"]["cpu_s"] / result["clustr"]["cpu_s"], 3
    )
    result["refresh_to_inference_ratio_cpu_s"] = round(
        result["refresh"]["refresh_cpu_s"] / result["refresh"]["inference_cpu_s"], 3
    )
    result["targets"] = {
        key: {"value": result[key], "target": f"{cmp} {bound}", "met": met(result[key], cmp, bound)}
        for key, (cmp, bound) in TARGETS.items()
    }
    result["load_average_1min"] = {
        "start": round(load_start[0], 2), "end": round(os.getloadavg()[0], 2)
    }
    result["total_wall_s"] = round(time.perf_counter() - total_start, 1)
    result["date"] = time.strftime("%Y-%m-%d")
    return result


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    result = run(flags.FLAGS)
    out = flags.FLAGS.out
    if out:
        machine.save(out, result)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    define_flags()
    app.run(main)
