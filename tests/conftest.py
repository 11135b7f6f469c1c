"""Shared test set-up: the project's scripts on sys.path, TensorFlow configured as in training."""
import os
import subprocess
import sys

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
LAUNCH = os.path.join(ROOT, "launch")


def run(command, timeout=900, **kwargs):
    """Runs a command, failing the test with its output if it fails."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, (
        f"{' '.join(command)} exited {result.returncode}\n"
        f"--- stdout\n{result.stdout[-5000:]}\n--- stderr\n{result.stderr[-5000:]}")
    return result


def launch_two_ranks(program, args, timeout=900):
    """`./launch train` of `program` with 2 ranks of 1 core each (CI has 2 cores)."""
    return run([LAUNCH, "train", "--program", program, "--sockets", "1",
                "--cores-per-socket", "2", "--ranks-per-socket", "2", "--", *args],
               timeout=timeout)
