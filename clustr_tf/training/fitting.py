"""Runs a compiled model's `train_step` over a run's epochs: Keras `fit`, or a thin driver.

`fit_run` trains from the position a `state.TrainingState` restored: `model.fit` for every
strategy Keras's `fit` supports, called twice when a run resumes inside an epoch (the rest
of that epoch, then the remaining epochs), since `fit` starts epochs at their first step.
Keras 3's `fit` does not run under `MultiWorkerMirroredStrategy` (keras-team/keras#20585):
there `driver_fit` runs the same `train_step` through `strategy.run` and the same Keras
callbacks, with `fit`'s order of hooks and nothing of its own (no gradient, logging, NaN or
checkpoint code).

Every replica trains on its own whole batch (for ClusTR a neighbourhood batch of m
clusters x d examples), fed by `strategy.distribute_datasets_from_function`; a resumed run
continues the batch sequence where it stopped (`dataset(start=...)` of the batch source).
"""

import keras
import tensorflow as tf


def _dataset(batches, strategy, start, augment):
    def dataset_fn(context):
        return batches.dataset(start=start, stream=context.input_pipeline_id, augment=augment)

    return strategy.distribute_datasets_from_function(dataset_fn)


def _per_epoch(history):
    """A Keras `History` as a list of per-epoch log dicts."""
    values = history.history if history is not None else {}
    epochs = len(next(iter(values.values()), []))
    return [{k: v[i] for k, v in values.items()} for i in range(epochs)]


def driver_fit(model, dataset, initial_epoch, epochs, steps_per_epoch, callbacks=(), verbose=1):
    """`model.fit`'s epoch loop, for strategies `fit` does not support: the model's
    `train_step` through `strategy.run`, the callbacks through `keras.callbacks.CallbackList`.

    Returns:
        The `keras.callbacks.History` of the call.
    """
    strategy = model.distribute_strategy
    callback_list = keras.callbacks.CallbackList(
        list(callbacks), add_history=True, add_progbar=verbose != 0, model=model, verbose=verbose,
        epochs=epochs, steps=steps_per_epoch)

    @tf.function
    def step(iterator):
        return strategy.run(model.train_step, args=(next(iterator),))

    def local(logs):
        return {k: float(strategy.experimental_local_results(v)[0]) for k, v in logs.items()}

    iterator = iter(dataset)
    model.stop_training = False
    callback_list.on_train_begin()
    epoch_logs = {}
    for epoch in range(initial_epoch, epochs):
        model.reset_metrics()
        callback_list.on_epoch_begin(epoch)
        logs = {}
        for batch in range(steps_per_epoch):
            callback_list.on_train_batch_begin(batch)
            logs = local(step(iterator))
            callback_list.on_train_batch_end(batch, logs)
            if model.stop_training:
                break
        results = model.get_metrics_result()  # over every replica and worker
        epoch_logs = {k: float(results[k]) for k in logs}
        callback_list.on_epoch_end(epoch, epoch_logs)
        if model.stop_training:
            break
    callback_list.on_train_end(epoch_logs)
    return model.history


def fit_run(model, batches, state, epochs, steps_per_epoch, callbacks=(), augment=None, verbose=1):
    """Trains `model` from `state`'s position until `epochs` or a callback stops it.

    Args:
        model: a `models.Classifier` compiled with its objective, built under its strategy.
        batches: the objective's batch source (`dataset(start, stream, augment)`).
        state: the run's `state.TrainingState`, restored (or new).
        epochs: int, the epochs of the whole run.
        steps_per_epoch: int, steps of an epoch (each: one batch per replica).
        callbacks: Keras callbacks, in order.
        augment: optional batch augmentation `augment(images, seed)`.
        verbose: Keras's verbosity (progress bar on 1).

    Returns:
        The list of per-epoch logs of this call.
    """
    strategy = model.distribute_strategy
    local_replicas = max(strategy.num_replicas_in_sync // state.num_workers, 1)
    multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    history = []
    epoch, step = state.position(steps_per_epoch)
    while epoch < epochs:
        last = epoch + 1 if step else epochs  # a resumed epoch alone, then the rest
        dataset = _dataset(batches, strategy, state.iterations * local_replicas, augment)
        if multi_worker:
            result = driver_fit(model, dataset, epoch, last, steps_per_epoch - step, callbacks, verbose)
        else:
            result = model.fit(dataset, initial_epoch=epoch, epochs=last, steps_per_epoch=steps_per_epoch - step,
                               callbacks=list(callbacks), verbose=verbose, shuffle=False)
        history += _per_epoch(result)
        if model.stop_training:
            break
        epoch, step = last, 0
    return history
