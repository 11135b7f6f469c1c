"""sizing.py and rank_memory.py: the batch that fits memory, and the demo sized from the
speed of its first steps."""
import json
import os
import re
import sys

import pytest

import mcnn_model
import rank_memory
import sizing
from conftest import ROOT, launch_two_ranks, run

# In a process of its own: Horovod is initialised there, not in pytest's process
# (whose later tests start mpirun). The rank's memory is given, not read off this machine.
CHOOSE_BATCH = """
import json, sys
import horovod.tensorflow as hvd
import rank_memory
hvd.init()
requested, recompute = sys.argv[2], sys.argv[3] == "recompute"
memory = rank_memory.RankMemory((1024, 1280, 3), 6, 1, "float32", recompute, 64)
batch = rank_memory.choose_per_rank_batch(requested if requested == "auto" else int(requested),
                                          memory, 1000, per_rank_gb=float(sys.argv[1]))
print(json.dumps({"batch": batch, "needs": memory.gb(batch), "next_needs": memory.gb(batch + 1)}))
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


def test_the_memory_estimate_follows_the_padded_field_the_model_and_the_pipeline():
    odd = rank_memory.RankMemory((1000, 1000, 3), 13, 2, "float32", False, 64, accumulate=2)
    padded = rank_memory.RankMemory((1024, 1024, 3), 13, 2, "float32", False, 64, accumulate=2)
    # activations at the padded size; the pipeline holds fields as stored (2 bytes a
    # value here): its shuffle buffer, a few in flight, and 4 steps of 2 x 3 images
    assert odd.parts(3)["activations"] == padded.parts(3)["activations"]
    assert odd.parts(3)["input"] == pytest.approx(
        (64 + 16 + 4 * 2 * 3) * 1000 * 1000 * 3 * 2 / 2 ** 30)
    # the model's state grows with fc_512, whose input grows with the field
    assert odd.parts(1)["state"] == padded.parts(1)["state"] > rank_memory.RankMemory(
        (512, 512, 3), 13, 2, "float32", False, 64).parts(1)["state"]
    assert padded.gb(4) - padded.gb(3) == pytest.approx(padded.gb(2) - padded.gb(1))


def test_the_parameters_are_counted_without_building_the_model():
    for shape, classes in [((1024, 1280, 3), 13), ((200, 300, 5), 7), ((1392, 1040, 4), 2)]:
        assert (mcnn_model.parameter_count(shape, classes)
                == mcnn_model.build_mcnn(shape, classes).count_params()), shape


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


@pytest.mark.slow
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
    assert summary["plan"]["model"]["image_shape"] == [height, width, 3]
    assert summary["plan"]["epochs"] == epochs and summary["flags"]["image_height"] == 256
    assert json.loads((tmp_path / "model" / "plan.json").read_text()) == summary["plan"]
    # it only shrinks, and says so when it does
    assert (height, width) in ((256, 256), (128, 128))
    assert ("the synthetic screen is made at 128 x 128" in result.stdout) == (height == 128)
    # Run again, it keeps those choices (measured again they could differ) and is done.
    again = launch_two_ranks(*command).stdout
    kept = re.search(r"with the choices of its first run \(--epochs=([\d.]+), "
                     r"--image_height=(\d+), --image_width=(\d+)\)", again)
    assert kept and [float(v) for v in kept.groups()] == [epochs, height, width], again
    assert "has finished its" in again and "images/s measured" not in again
