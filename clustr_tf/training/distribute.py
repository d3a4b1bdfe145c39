"""tf.distribute strategies by name, and the facts a training loop needs about them.

ClusTR trains each replica on whole neighbourhood batches, so the training loop feeds
replicas through `strategy.distribute_datasets_from_function` (one m x d batch per
replica), never by slicing one global batch apart.
"""

import json
import os

import tensorflow as tf

STRATEGIES = ("auto", "default", "mirrored", "multi_worker", "tpu")


def _tf_config():
    try:
        return json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    except json.JSONDecodeError as e:
        raise ValueError(f"TF_CONFIG is not valid JSON ({e}). Received: {os.environ['TF_CONFIG']!r}") from None


def _cluster_size(config):
    cluster = config.get("cluster", {})
    return sum(len(cluster.get(kind, [])) for kind in ("chief", "worker"))


def task_tag():
    """`""` for a lone process; `"-worker-1"`, `"-chief-0"`, ... for a task of the cluster that
    `TF_CONFIG` names (the tasks of one multi-worker run share a run directory)."""
    try:
        task = _tf_config().get("task")
    except (ValueError, AttributeError):  # the strategy reports a bad TF_CONFIG
        return ""
    if not isinstance(task, dict) or "type" not in task:
        return ""
    return f"-{task['type']}-{task.get('index', 0)}"


def get_strategy(name="auto", tpu_address=None):
    """Returns a `tf.distribute.Strategy` by name.

    Args:
        name: one of:
            - `"default"`: no distribution (one device).
            - `"mirrored"`: `MirroredStrategy` over all local GPUs (or the CPU).
            - `"multi_worker"`: `MultiWorkerMirroredStrategy`; the cluster comes from the
              `TF_CONFIG` environment variable.
            - `"tpu"`: `TPUStrategy` on the TPU at `tpu_address` (or the local one).
            - `"auto"`: multi_worker when TF_CONFIG names more than one task, mirrored
              when there is more than one GPU, else default.
        tpu_address: the TPU name or address for `"tpu"`.

    Returns:
        A `tf.distribute.Strategy`.

    Raises:
        ValueError: for an unknown name, or multi_worker without a usable TF_CONFIG.
    """
    if name not in STRATEGIES:
        raise ValueError(f"Unknown strategy. Expected one of {', '.join(STRATEGIES)}. Received: {name!r}")
    if name == "auto":
        if _cluster_size(_tf_config()) > 1:
            name = "multi_worker"
        elif len(tf.config.list_logical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        config = _tf_config()
        if not config.get("cluster") or "task" not in config:
            raise ValueError(
                "--strategy=multi_worker needs TF_CONFIG with 'cluster' and 'task' "
                f"(see tf.distribute.MultiWorkerMirroredStrategy). Received: {os.environ.get('TF_CONFIG')!r}"
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu_address or "")
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def worker_info(strategy):
    """`(is_chief, worker_index, num_workers)` of this process under `strategy`."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True, 0, 1
    task_type, task_id = resolver.task_type, resolver.task_id
    spec = resolver.cluster_spec().as_dict()
    num_workers = len(spec.get("chief", [])) + len(spec.get("worker", []))
    if task_type == "chief":
        return True, 0, num_workers
    has_chief = "chief" in spec
    index = task_id + (1 if has_chief else 0)
    return (not has_chief and task_id == 0), index, num_workers
