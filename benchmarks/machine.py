"""What a benchmark ran on: the CPU's model and the features its numbers depend on.

    from benchmarks import machine   # or `import machine` from a script in benchmarks/
    machine.cpu_model()              # 'AMD EPYC', 'Intel(R) Xeon(R) Platinum 8480+', ...
    machine.cpu_features()           # {'avx512f': True, 'avx512_bf16': True, 'amx_bf16': False, ...}

Read from /proc/cpuinfo (Linux); elsewhere the model is `platform.processor()` and the
features are None (unknown), never False.
"""

import platform

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
