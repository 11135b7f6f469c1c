"""sizing.py: the batch that fits memory, and the demo sized from the speed of its first steps."""
import json
import os
import re
import sys

import pytest

import sizing
from conftest import ROOT, launch_two_ranks, run

# In a process of its own: Horovod is initialised there, not in pytest's process
# (whose later tests start mpirun). The rank's memory is set, not read off this machine.
CHOOSE_BATCH = """
import json, sys
import horovod.tensorflow as hvd
import sizing
hvd.init()
sizing.usable_memory_gb = lambda: sizing.MEMORY_SAFETY * float(sys.argv[1])
requested, recompute, shape = sys.argv[2], sys.argv[3] == "recompute", (1024, 1280, 3)
batch = sizing.choose_per_rank_batch(requested if requested == "auto" else int(requested),
                                     shape, 1000, "float32", recompute)
print(json.dumps({"batch": batch, "needs": sizing.memory_gb(shape, batch, "float32", recompute),
                  "next_needs": sizing.memory_gb(shape, batch + 1, "float32", recompute)}))
"""


def choose_batch(memory_gb, requested, recompute=""):
    result = run([sys.executable, "-c", CHOOSE_BATCH, str(memory_gb), requested, recompute],
                 cwd=ROOT)
    return json.loads(result.stdout.splitlines()[-1]), result.stdout


def test_auto_batch_is_the_largest_that_fits_the_rank_memory():
    chosen, stdout = choose_batch(12, "auto")
    usable = 0.9 * 12
    assert chosen["needs"] <= usable < chosen["next_needs"]
    assert f"--per_rank_batch=auto: {chosen['batch']} images per rank" in stdout
    recomputed, _ = choose_batch(12, "auto", "recompute")
    assert recomputed["batch"] > 4 * chosen["batch"]


def test_a_batch_that_cannot_fit_is_warned_before_training():
    chosen, stdout = choose_batch(8, "32")
    assert chosen["batch"] == 32
    assert "WARNING: --per_rank_batch=32 needs about" in stdout and "--recompute" in stdout
    _, quiet = choose_batch(8, "2")
    assert "WARNING" not in quiet


def test_smaller_sizes_halve_and_stay_multiples_of_128():
    assert sizing.smaller_size(1024, 1280) == (512, 640)
    assert sizing.smaller_size(512, 640) == (256, 256)  # 320 rounds down to 256
    assert sizing.smaller_size(256, 384) == (128, 128)
    assert sizing.smaller_size(128, 256) == (128, 128)
    assert sizing.smaller_size(128, 128) is None


def test_epochs_that_fit_count_training_and_evaluation():
    # 90% of 100 s at 10 images/s = 900 images; an epoch is 80 trained + 60 / 3 evaluated
    assert sizing.epochs_that_fit(10, 100, 80, 60, 1) == 9
    assert sizing.epochs_that_fit(10, 100, 80, 60, 2) == 10  # evaluated every 2 epochs


def test_the_size_shrinks_until_enough_epochs_fit():
    # At full size 0.4 images/s (an AVX2 CPU) leave 1 epoch of 168 in 9 minutes; half
    # size is taken as 4x faster (4 epochs), a quarter (256 x 256) as 20x: 21 epochs.
    size, rate = sizing.image_size_that_fits((1024, 1280), 0.4, 540, 168, 84, 3)
    assert size == (256, 256) and rate == pytest.approx(0.4 * 20)
    # 4 images/s (AMX, bf16) afford 10 epochs at full size: it is kept.
    assert sizing.image_size_that_fits((1024, 1280), 4, 540, 168, 84, 3) == ((1024, 1280), 4)
    # The smallest size is kept even if too few epochs fit there.
    assert sizing.image_size_that_fits((128, 128), 1, 10, 100, 0, 1) == ((128, 128), 1)


def test_a_run_follows_the_size_and_epochs_it_chose_and_says_why(tmp_path):
    command = [os.path.join(ROOT, "train_mcnn.py"), [
        f"--synthetic_cache={tmp_path / 'data'}", f"--model_dir={tmp_path / 'model'}",
        "--image_height=256", "--image_width=256", "--synthetic_classes=3",
        "--synthetic_compounds_per_class=2", "--synthetic_fields_per_treatment=4",
        "--per_rank_batch=4", "--warmup_epochs=1", "--time_budget_minutes=0.2",
        "--log_every=100"]]
    result = launch_two_ranks(*command)
    chosen = re.search(r"images/s measured at (\d+) x (\d+), global batch 8: (\d+) epochs",
                       result.stdout)
    assert chosen, result.stdout
    height, width, epochs = map(int, chosen.groups())
    summary = json.loads((tmp_path / "model" / "summary.json").read_text())
    assert summary["epochs"] == epochs > 1
    assert summary["flags"]["image_height"] == height and summary["flags"]["image_width"] == width
    # it only shrinks, and says so when it does
    assert (height, width) in ((256, 256), (128, 128))
    assert ("the synthetic screen is made at 128 x 128" in result.stdout) == (height == 128)
    # Run again, it keeps those choices (measured again they could differ) and is done.
    again = launch_two_ranks(*command).stdout
    kept = re.search(r"with the choices of its first run \(--epochs=([\d.]+), "
                     r"--image_height=(\d+), --image_width=(\d+)\)", again)
    assert kept and [float(v) for v in kept.groups()] == [epochs, height, width], again
    assert "has finished its" in again and "images/s measured" not in again
