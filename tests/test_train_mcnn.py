"""train_mcnn.py's choices before training: the per-rank batch against memory."""
import json
import sys

from conftest import ROOT, fails, run

# In a process of its own: Horovod is initialised there, not in pytest's process
# (whose later tests start mpirun). The rank's memory is set, not read off this machine.
CHOOSE_BATCH = """
import json, sys
import horovod.tensorflow as hvd
import train_mcnn
train_mcnn.FLAGS(["train_mcnn", *sys.argv[2:]])
hvd.init()
train_mcnn.rank_memory_gb = lambda: float(sys.argv[1])
shape = (1024, 1280, 3)
batch = train_mcnn.choose_per_rank_batch(shape, 1000)
print(json.dumps({"batch": batch, "needs": train_mcnn.memory_gb(shape, batch),
                  "next_needs": train_mcnn.memory_gb(shape, batch + 1)}))
"""


def choose_batch(memory_gb, *flags):
    result = run([sys.executable, "-c", CHOOSE_BATCH, str(memory_gb), *flags], cwd=ROOT)
    return json.loads(result.stdout.splitlines()[-1]), result.stdout


def test_auto_batch_is_the_largest_that_fits_the_rank_memory():
    chosen, stdout = choose_batch(12, "--per_rank_batch=auto")
    usable = 0.9 * 12
    assert chosen["needs"] <= usable < chosen["next_needs"]
    assert f"--per_rank_batch=auto: {chosen['batch']} images per rank" in stdout
    recomputed, _ = choose_batch(12, "--per_rank_batch=auto", "--recompute")
    assert recomputed["batch"] > 4 * chosen["batch"]


def test_a_batch_that_cannot_fit_is_warned_before_training():
    chosen, stdout = choose_batch(8, "--per_rank_batch=32")
    assert chosen["batch"] == 32
    assert "WARNING: --per_rank_batch=32 needs about" in stdout and "--recompute" in stdout
    _, quiet = choose_batch(8, "--per_rank_batch=2")
    assert "WARNING" not in quiet


def test_per_rank_batch_must_be_a_positive_integer_or_auto():
    for bad in ("0", "many"):
        result = fails([sys.executable, "-c", CHOOSE_BATCH, "8", f"--per_rank_batch={bad}"],
                       cwd=ROOT)
        assert "per_rank_batch" in result.stderr
