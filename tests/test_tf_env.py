"""tf_env.py: TensorFlow's import-time settings and the CPU's native bf16."""
import subprocess
import sys

import pytest
import tensorflow as tf
import tf_keras

import tf_env
from conftest import ROOT


def test_tf_keras_is_keras_2_which_horovod_hooks():
    assert tf.keras.Model is tf_keras.Model


def test_a_user_setting_for_keras_3_is_overridden():
    # TF_USE_LEGACY_KERAS=0 would give Keras 3, whose gradients Horovod does not average.
    check = "import tf_env, tensorflow as tf, tf_keras; assert tf.keras.Model is tf_keras.Model"
    subprocess.run([sys.executable, "-c", check], cwd=ROOT, check=True,
                   env={"TF_USE_LEGACY_KERAS": "0", "PATH": ""}, capture_output=True)


@pytest.mark.parametrize("flags, policy", [
    ({"avx2", "avx512f", "amx_bf16", "amx_tile"}, "mixed_bfloat16"),  # Sapphire Rapids
    ({"avx2", "avx512f", "avx512_bf16"}, "mixed_bfloat16"),  # Zen 4
    ({"avx2", "avx512f"}, "float32"),  # Skylake: bf16 only emulated
    ({"avx2"}, "float32"),
])
def test_auto_precision_is_bf16_where_the_cpu_has_it_natively(flags, policy):
    chosen, why = tf_env.resolve_precision("auto", flags)
    assert chosen == policy and why.startswith("auto: ")
    assert ("bf16" in why.split("(")[1]) if policy == "mixed_bfloat16" else "no native" in why


def test_a_given_precision_is_kept():
    assert tf_env.resolve_precision("float32", {"amx_bf16"}) == ("float32", "as given")
    assert tf_env.resolve_precision("mixed_bfloat16", set())[0] == "mixed_bfloat16"


def test_cpu_flags_and_description_come_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n")
    assert tf_env.cpu_flags(str(cpuinfo)) == {"fpu", "avx2", "avx512_bf16"}
    assert tf_env.cpu_flags(str(tmp_path / "missing")) == set()
    assert tf_env.cpu_description().count(";") == 1
