"""What a benchmark ran on: the CPU, the libraries, and how busy the machine was.

    from benchmarks import machine   # or `import machine` from a script in benchmarks/
    machine.describe("cpu", "cpus", "tensorflow")  # {'cpu': 'AMD EPYC ...', 'cpus': 2, 'tensorflow': '2.21.0'}
    machine.cpu_model()              # 'AMD EPYC', 'Intel(R) Xeon(R) Platinum 8480+', ...
    machine.cpu_features()           # {'avx512f': True, 'avx512_bf16': True, 'amx_bf16': False, ...}
    before = machine.system_cpu(); ...; machine.others_share(before, machine.system_cpu(), own_cpu_s)
    machine.save("benchmarks/results/x.json", result)  # the result file, written atomically
    machine.exit_on_sigterm()        # `kill` ends the benchmark and the training it runs

Every benchmark describes its machine with `describe` (each result file keeps the keys it
has always had). Read from /proc (Linux); elsewhere the model is `platform.processor()`, the
features are None (unknown), never False, and the share of other processes is None.
"""

import os
import platform
import signal
import sys

# CPU flags (as /proc/cpuinfo names them) that decide how fast low-precision training runs.
FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def _cpuinfo():
    try:
        with open("/proc/cpuinfo") as fh:
            return fh.read()
    except OSError:
        return None


def cpu_model():
    """The CPU's model name, or the platform's processor string off Linux."""
    for line in (_cpuinfo() or "").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return processor()


def processor():
    """`platform.processor()`, or the architecture where that is empty (most Linux builds)."""
    return platform.processor() or platform.machine()


def cpu_features():
    """{feature: bool} for `FEATURES` (None each where /proc/cpuinfo cannot be read)."""
    text = _cpuinfo()
    if text is None:
        return {name: None for name in FEATURES}
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return {name: name in flags for name in FEATURES}


def native_bfloat16(features=None):
    """True when the CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16), False when it
    does not (TensorFlow then converts to float32 and back), None when unknown."""
    features = features or cpu_features()
    known = [features.get("avx512_bf16"), features.get("amx_bf16")]
    if any(known):
        return True
    return None if None in known else False


def accelerators():
    """The names of the devices TensorFlow sees besides the CPU."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    return [d.name for d in tf.config.list_physical_devices() if d.device_type != "CPU"]


# What `describe` can name. Two facts have two names each ("cpu"/"cpu_model", "cpus"/
# "cpu_cores"): result files written before this helper used both, and keep their keys.
FACTS = {
    "cpu": cpu_model,
    "cpu_model": cpu_model,
    "cpus": os.cpu_count,
    "cpu_cores": os.cpu_count,
    "processor": processor,
    "cpu_features": cpu_features,
    "native_bfloat16": native_bfloat16,
    "accelerators": accelerators,
    "tensorflow": lambda: __import__("tensorflow").__version__,
    "keras": lambda: __import__("keras").__version__,
    "python": platform.python_version,
    "onednn": lambda: os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on)"),
}


def describe(*keys):
    """{key: value} for each of `keys` (names in `FACTS`), in that order."""
    unknown = [key for key in keys if key not in FACTS]
    if unknown:
        raise ValueError(f"Unknown machine facts {unknown}; known: {sorted(FACTS)}")
    return {key: FACTS[key]() for key in keys}


def system_cpu():
    """(total, idle) jiffies of all CPUs from /proc/stat, or None off Linux."""
    try:
        with open("/proc/stat") as fh:
            values = [int(v) for v in fh.readline().split()[1:]]
        return sum(values), values[3] + values[4]
    except (OSError, ValueError, IndexError):
        return None


def others_share(before, after, own_cpu_s):
    """Fraction of all CPU time that other processes used between two `system_cpu()`
    readings, given this process's CPU seconds meanwhile; None when unknown."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    total = after[0] - before[0]
    busy = total - (after[1] - before[1])
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return max(0.0, (busy / ticks - own_cpu_s) / (total / ticks))


def save(path, result):
    """Writes a benchmark's result to `path` (its folder made if needed) as indented JSON,
    atomically (`clustr_tf.checks.write_json`): an interrupted benchmark leaves the former
    result whole, never half of a new one."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    if "clustr_tf" not in sys.modules:  # a benchmark without TensorFlow (code_shape.py) loads none
        os.environ["CLUSTR_TF_DEFER_IMPORTS"] = "1"
    from clustr_tf import checks  # no TensorFlow

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    checks.write_json(path, result)


def exit_on_sigterm():
    """Makes SIGTERM (`kill`, a job scheduler's stop) end this process through `SystemExit`.

    SIGTERM's default action ends the benchmark alone: a `subprocess.run` child (the
    training it was waiting on) goes on writing into its run folder, and the benchmark
    run again next to it would train the same folder twice. Raised as `SystemExit`, the
    signal reaches `subprocess.run`, which kills the child before it re-raises. Every
    benchmark that starts a training or evaluation process calls this first.
    """
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
