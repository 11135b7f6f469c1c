"""The one place that sets what TensorFlow reads when it is imported, and what this
CPU offers it. Every script imports this module before TensorFlow (or Horovod,
which imports TensorFlow):

    import tf_env  # noqa: F401  (before TensorFlow)
"""
import os

# oneDNN makes training about 10x faster; TensorFlow turns it on by itself only on
# CPUs with AVX-512 VNNI and newer, so AVX2 nodes need it set.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
# tf.keras must be Keras 2 (the tf_keras package): Horovod does not hook Keras 3, and
# with it gradients are silently not averaged. Not a default a user may override.
os.environ["TF_USE_LEGACY_KERAS"] = "1"
# Errors and up: an op that fails also raises in Python, where the programs report it
# in one line; TensorFlow's WARNING copy of it (for a tf.data function, with a Python
# traceback) would only bury that line.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# --precision: a Keras mixed-precision policy, or auto (resolve_precision).
PRECISIONS = ("auto", "float32", "mixed_bfloat16")
# CPU flags (/proc/cpuinfo) of native bf16 arithmetic: Intel's AMX (Xeon 4th generation
# and later), AVX512-BF16 (Intel Cooper Lake and later, AMD Zen 4 and later).
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo="/proc/cpuinfo"):
    """The feature flags of this machine's first CPU (empty where cpuinfo has none)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def resolve_precision(precision, flags=None):
    """(policy, why) for --precision: 'auto' is mixed_bfloat16 where the CPU has native
    bf16, float32 elsewhere (emulated bf16 is slower than fp32)."""
    if precision != "auto":
        return precision, "as given"
    native = sorted(set(NATIVE_BF16_FLAGS) & (cpu_flags() if flags is None else flags))
    if native:
        return "mixed_bfloat16", f"auto: this CPU has native bf16 ({', '.join(native)})"
    return "float32", "auto: this CPU has no native bf16 (no amx_bf16 or avx512_bf16)"


def cpu_description():
    """This CPU's model name and the vector and matrix units TensorFlow can use, as to
    print beside every figure measured on it (e.g. 'AMD EPYC; avx2, avx512f, avx512_bf16')."""
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    units = [u for u in ("avx2", "avx512f", *NATIVE_BF16_FLAGS) if u in cpu_flags()]
    return f"{name}; {', '.join(units) or 'no AVX2'}"
