"""PGD-20 throughput of the attack adapter on a ClusTR ResNet-18, on this machine.

    python benchmarks/attack_throughput.py [--width_multiplier=1.0] [--batch=32] [--batches=2]

l_inf PGD (eps 8/255, step 2/255, 20 iterations, 1 restart, margin loss) through
`clustr_tf.attacks.pgd` on random CIFAR-shaped images (the content does not change the
time), after one warm-up batch that includes tracing. Saves
benchmarks/results/attack_throughput.json and prints it as one JSON object last.
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import machine  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--width_multiplier", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "attack_throughput.json"))
    args = parser.parse_args()

    import numpy as np
    import tensorflow as tf

    from clustr_tf import attacks, backbones, models

    tf.keras.utils.set_random_seed(0)
    model = models.ClusTRModel(backbones.resnet18((32, 32, 3), args.width_multiplier), 10, 2, 20)
    model_fn = attacks.logits_function(model)
    rng = np.random.default_rng(0)

    def run():
        images = tf.constant(rng.random((args.batch, 32, 32, 3)), tf.float32)
        labels = tf.constant(rng.integers(0, 10, args.batch))
        start = time.perf_counter()
        adv, robust = attacks.pgd(model_fn, images, labels, 8 / 255, 2 / 255, args.iterations)
        adv.numpy()
        return time.perf_counter() - start

    warmup = run()
    times = [run() for _ in range(args.batches)]
    per_batch = float(np.median(times))
    result = {
        "attack": f"l_inf PGD-{args.iterations}, eps 8/255, step 2/255, 1 restart, margin loss",
        "backbone": f"ResNet-18 x{args.width_multiplier}",
        "batch": args.batch,
        "batch_seconds": [round(t, 3) for t in times],
        "warmup_seconds": round(warmup, 3),
        "images_per_s": round(args.batch / per_batch, 3),
        "reference": "a straightforward Keras PGD-20 loop on ResNet-18: about 3.8 images/s on this CPU",
        "device": machine.describe("cpus", "tensorflow", "python"),
        "date": time.strftime("%Y-%m-%d"),
    }
    machine.save(args.out, result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
