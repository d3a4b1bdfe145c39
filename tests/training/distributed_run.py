"""A small distributed ClusTR run, started as a subprocess by test_distribute.py.

    python tests/training/distributed_run.py --strategy=mirrored --out=result.json --model_dir=DIR
    TF_CONFIG=... python tests/training/distributed_run.py --strategy=multi_worker ...

Writes JSON: per-epoch losses, and for every model variable the first values of each
local replica's copy (so a test can check that replicas and workers agree). With
--check_scaling it also compares one 2-replica step with the single-device update on the
same two batches.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import tensorflow as tf  # noqa: E402


def _build(strategy, seed, optimizer=None):
    """A compiled digits ClusTR model built under `strategy`, and its sampler."""
    import keras

    from clustr_tf import backbones, data, objectives

    keras.utils.set_random_seed(seed)
    x, y = data.load_arrays("digits", "train")
    info = data.info("digits")
    objective = objectives.ClusTR(clusters_per_class=2, neighbours=10, m=6, d=10)
    sampler = objective.batches(x, y, 10, seed=seed)
    with strategy.scope():
        backbone = backbones.small_convnet(info.image_shape, width=8, embedding_dim=16,
                                           mean=info.mean, std=info.std)
        model = objective.build_model(backbone, 10)
        model.compile(optimizer=optimizer() if optimizer else keras.optimizers.Adam(3e-3), objective=objective)
    return model, sampler


def check_scaling(strategy):
    """One step on two replicas vs the one-device update on the same two batches."""
    import keras
    import numpy as np

    from clustr_tf import objectives

    one_model, one_sampler = _build(tf.distribute.get_strategy(), seed=5, optimizer=lambda: keras.optimizers.SGD(0.5))
    refresh = one_model.objective.cluster_refresh(one_sampler)
    refresh.set_model(one_model)
    refresh.refresh()
    batches = list(one_sampler.dataset().take(2))
    weights = [w.numpy() for w in one_model.weights]
    with tf.GradientTape() as tape:
        totals = [objectives.per_example_objective(one_model, x, t, one_model.objective)[0] for x, t in batches]
        loss = tf.reduce_sum(tf.concat(totals, 0)) / tf.cast(sum(int(tf.size(t)) for t in totals), tf.float32)
    grads = tape.gradient(loss, one_model.trainable_variables)
    expected = [w.numpy() - 0.5 * g.numpy() for w, g in zip(one_model.trainable_variables, grads)]

    two_model, _ = _build(strategy, seed=5, optimizer=lambda: keras.optimizers.SGD(0.5))
    two_model.set_weights(weights)
    per_replica = strategy.experimental_distribute_values_from_function(
        lambda ctx: batches[ctx.replica_id_in_sync_group])
    strategy.run(tf.function(two_model.train_step), args=(per_replica,))
    return max(float(np.max(np.abs(v.numpy() - e))) for v, e in zip(two_model.trainable_variables, expected))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--check_scaling", action="store_true")
    args = parser.parse_args()
    if args.strategy == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    else:
        from clustr_tf import distribute

        strategy = distribute.get_strategy(args.strategy)

    from clustr_tf import data, training

    result = {"replicas": strategy.num_replicas_in_sync}
    if args.check_scaling:
        result["scaling_max_abs_diff"] = check_scaling(strategy)
    model, sampler = _build(strategy, seed=0)
    history, state = training.train(model, sampler, os.path.join(args.model_dir, "run"), args.epochs, args.steps,
                                    test=data.load("digits", "test"), checkpoint_every_steps=2)
    result["magnet_loss"] = [h["magnet_loss"] for h in history]
    result["val_nearest_center_accuracy"] = [h["val_nearest_center_accuracy"] for h in history]
    result["is_chief"] = state.is_chief
    result["variables"] = {}
    for v in model.weights:
        copies = getattr(v.value, "values", None) or (v.value,)
        result["variables"][v.path] = [tf.reshape(c, [-1]).numpy()[:256].astype(float).tolist() for c in copies]
    with open(args.out, "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main()
