"""How large a run this machine affords: the per-rank batch its memory holds
(--per_rank_batch=auto), and the epochs and image size that fit a time budget
(--time_budget_minutes, the demo's).

Memory: a rank's peak is a fixed part (runtime, weights, gradients, momentum) and
a part per image of its batch, measured by `benchmark.py --parts=memory`.
Time: a full-size step takes 0.3 s an image on a CPU with AMX and 1.3-2.5 s on an
AVX2-only one, so no one set of epochs fits every machine. A throwaway copy of the
model trains a few steps on random images; from that rate the run keeps the
largest image size (of the synthetic screen) at which MIN_EPOCHS fit the budget,
and then trains as many epochs as fit.
"""
import math
import os
import time

import tf_env  # noqa: F401  (before TensorFlow)
from absl import app, flags
import horovod.tensorflow as hvd
import numpy as np
import psutil
import tensorflow as tf

import mcnn_model
from run_log import log

flags.DEFINE_float("time_budget_minutes", 0, "Train for about this long: the epochs, and for "
                   "the synthetic screen the image size, follow from the speed of a few steps "
                   "measured first (0: --epochs as given).")
FLAGS = flags.FLAGS


class BatchParser(flags.ArgumentParser):
    """train_mcnn.py's --per_rank_batch: a positive integer, or 'auto' (the largest
    batch that fits memory: choose_per_rank_batch)."""
    syntactic_help = "a positive integer or 'auto'"

    def parse(self, argument):
        if argument == "auto":
            return argument
        value = int(argument)
        if value < 1:
            raise ValueError(f"must be at least 1, got {value}")
        return value

    def flag_type(self):
        return "int or 'auto'"

# Peak memory of a training rank at 1024 x 1280 x 3 (docs/performance.md).
MEMORY_FIXED_GB = 2.6
MEMORY_PER_FULL_SIZE_IMAGE_GB = {  # (precision, recompute)
    ("float32", False): 0.48, ("float32", True): 0.07,
    ("mixed_bfloat16", False): 0.20, ("mixed_bfloat16", True): 0.07,
}
FULL_SIZE_PIXELS = 1024 * 1280 * 3
MEMORY_SAFETY = 0.9  # of the memory the rank may use



def memory_gb(image_shape, batch, precision, recompute):
    """Estimated peak memory of a training rank with this per-rank batch (the model
    computes at the padded size)."""
    pixels = math.prod(mcnn_model.padded_size(*image_shape[:2])) * image_shape[2]
    per_image = MEMORY_PER_FULL_SIZE_IMAGE_GB[precision, recompute]
    return MEMORY_FIXED_GB + batch * per_image * pixels / FULL_SIZE_PIXELS


def usable_memory_gb():
    """MEMORY_SAFETY of this rank's share of the memory available on its node."""
    return MEMORY_SAFETY * psutil.virtual_memory().available / 2 ** 30 / hvd.local_size()


def largest_batch(image_shape, most, usable_gb, precision, recompute):
    """The largest per-rank batch, up to `most`, whose estimate fits `usable_gb` (at least 1)."""
    batch = 1
    while batch < most and memory_gb(image_shape, batch + 1, precision, recompute) <= usable_gb:
        batch += 1
    return batch


def choose_per_rank_batch(requested, image_shape, most, precision, recompute):
    """`requested`, or for 'auto' the largest batch that fits (up to `most`); warns when
    the batch asked for will not fit."""
    usable = usable_memory_gb()
    if requested == "auto":
        batch = largest_batch(image_shape, most, usable, precision, recompute)
        log(f"--per_rank_batch=auto: {batch} images per rank, estimated "
            f"{memory_gb(image_shape, batch, precision, recompute):.1f} GB of this rank's "
            f"{usable:.1f} GB")
        return batch
    needs = memory_gb(image_shape, requested, precision, recompute)
    if needs > usable:
        log(f"WARNING: --per_rank_batch={requested} needs about {needs:.1f} GB per rank, more "
            f"than the {usable:.1f} GB each of the {hvd.local_size()} ranks on this node can "
            f"use; expect it to be killed. --recompute or a smaller batch would fit.")
    return requested


MIN_EPOCHS = 8  # fewer learn the synthetic screen poorly (docs/performance.md)
USABLE = 0.9  # of the budget: the rest is tracing, checkpoints and start-up
EVAL_COST = 1 / 3  # an evaluated image costs a forward pass, a third of a trained one


def images_per_second(model, make_train_step, batch, num_classes, steps=2):
    """Global training images/s of `model`, from `steps` steps after a traced first
    one; the slowest rank's time, so that every rank agrees."""
    train_step = make_train_step(model, tf.keras.optimizers.SGD(1e-6), num_classes)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.integers(0, 256, (batch, *model.input.shape[1:])),
                         model.input.dtype)
    labels = tf.constant(rng.integers(0, num_classes, batch), tf.int64)
    float(train_step(images, labels)[0])
    start = time.perf_counter()
    for _ in range(steps):
        float(train_step(images, labels)[0])
    seconds = hvd.allreduce(tf.constant(time.perf_counter() - start), op=hvd.Max,
                            name="calibration_seconds")
    return steps * batch * hvd.size() / float(seconds)


def smaller_size(height, width):
    """Half the size, each side rounded down to a multiple of the M-CNN's 128 (at least
    128), or None when it would not shrink."""
    multiple = mcnn_model.SIZE_MULTIPLE
    smaller = tuple(max(multiple, side // 2 // multiple * multiple) for side in (height, width))
    return smaller if smaller != (height, width) else None


def epochs_that_fit(rate, budget_seconds, train_count, eval_count, eval_every):
    """Whole epochs of `train_count` images, with their evaluations, that fit the budget."""
    epoch_cost = train_count + EVAL_COST * eval_count / eval_every
    return int(USABLE * budget_seconds * rate // epoch_cost)


def image_size_that_fits(size, rate, budget_seconds, train_count, eval_count, eval_every):
    """(size, estimated rate): `size`, halved while MIN_EPOCHS do not fit at it; the rate
    is taken to grow as the pixels shrink."""
    while epochs_that_fit(rate, budget_seconds, train_count, eval_count,
                          eval_every) < MIN_EPOCHS and smaller_size(*size):
        smaller = smaller_size(*size)
        rate *= (size[0] * size[1]) / (smaller[0] * smaller[1])
        size = smaller
    return size, rate


def fit_synthetic_size(size, counts, rate_at, eval_every):
    """--time_budget_minutes, before the synthetic screen of (train, eval) `counts` fields
    is made: (the largest size at which MIN_EPOCHS fit, the rate measured there);
    rate_at(size) measures global training images/s."""
    rate = rate_at(size)
    fitted, _ = image_size_that_fits(size, rate, 60 * FLAGS.time_budget_minutes, *counts,
                                     eval_every)
    if fitted == size:
        return size, rate
    log(f"--time_budget_minutes={FLAGS.time_budget_minutes:g}: {rate:.2f} images/s at "
        f"{size[0]} x {size[1]} leave fewer than {MIN_EPOCHS} epochs; the synthetic screen "
        f"is made at {fitted[0]} x {fitted[1]} instead")
    return fitted, rate_at(fitted)


def fit_epochs(rate, manifest, global_batch, eval_every, warmup_epochs):
    """--time_budget_minutes: as many epochs of the data set `manifest` describes as fit
    at `rate`."""
    counts = {split: manifest["splits"][split]["count"] for split in ("train", "eval")}
    epochs = epochs_that_fit(rate, 60 * FLAGS.time_budget_minutes, counts["train"],
                             counts["eval"], eval_every)
    if epochs <= warmup_epochs:
        raise app.UsageError(
            f"--time_budget_minutes={FLAGS.time_budget_minutes:g} leaves {epochs} epochs at the "
            f"{rate:.2f} images/s measured here, no more than --warmup_epochs; give more time")
    log(f"--time_budget_minutes={FLAGS.time_budget_minutes:g}: {rate:.2f} images/s measured "
        f"at {manifest['image_shape'][0]} x {manifest['image_shape'][1]}, global batch "
        f"{global_batch}: {epochs} epochs of {counts['train']} images (about "
        f"{epochs * counts['train'] / rate / 60:.1f} minutes of steps)")
    return epochs


def keep_previous_choices(model_dir):
    """--time_budget_minutes, resuming the run in `model_dir`: it keeps the image size and
    epochs its first run chose (they are in its flags.txt); measured again, they could
    differ, and its checkpoint would not fit. Returns whether there were any."""
    path = os.path.join(model_dir, "flags.txt")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        chosen = dict(line.strip()[2:].split("=", 1) for line in f
                      if line.startswith(("--image_height=", "--image_width=", "--epochs=")))
    for name, value in chosen.items():
        setattr(FLAGS, name, FLAGS[name].parser.parse(value))  # not marked as given
    log(f"--time_budget_minutes: resuming {model_dir} with the choices of its first run "
        f"({', '.join(f'--{k}={v}' for k, v in sorted(chosen.items()))})")
    return True
