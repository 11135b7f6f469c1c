"""How long a run this machine affords: the epochs and image size that fit a time
budget (--time_budget_minutes, the demo's). The batch its memory holds is
rank_memory.py's.

A full-size step takes 0.3 s an image on a CPU with AMX and 1.3-2.5 s on an
AVX2-only one, so no one set of epochs fits every machine. A throwaway copy of the
model trains a few steps on random images; from that rate the run keeps the
largest image size (of the synthetic screen) at which MIN_EPOCHS fit the budget,
and then trains as many epochs as fit.
"""
import time

import tf_env  # noqa: F401  (before TensorFlow)
from absl import app
import horovod.tensorflow as hvd
import numpy as np
import tensorflow as tf

import mcnn_model
from run_log import log


MIN_EPOCHS = 8  # fewer learn the synthetic screen poorly (docs/performance.md)
USABLE = 0.9  # of the budget: the rest is tracing, checkpoints and start-up
EVAL_COST = 1 / 3  # an evaluated image costs a forward pass, a third of a trained one


def images_per_second(model, make_train_step, batch, num_classes, steps=4):
    """Global training images/s of the Keras `model`, from `steps` steps of `batch`
    random images after a traced first one, make_train_step(model) making the step as
    the run will; the slowest rank's time, so that every rank agrees. Two steps read 4.12 images/s on a host whose run then trained at
    3.14 (docs/recipe_study.md, "The demo's final check"): more steps average its swings."""
    train_step = make_train_step(model)
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


def fit_synthetic_size(size, counts, rate_at, eval_every, budget_minutes):
    """--time_budget_minutes (`budget_minutes`), before the synthetic screen of (train,
    eval) `counts` fields is made: (the largest size at which MIN_EPOCHS fit, the rate
    measured there); rate_at(size) measures global training images/s."""
    rate = rate_at(size)
    fitted, _ = image_size_that_fits(size, rate, 60 * budget_minutes, *counts, eval_every)
    if fitted == size:
        return size, rate
    log(f"--time_budget_minutes={budget_minutes:g}: {rate:.2f} images/s at "
        f"{size[0]} x {size[1]} leave fewer than {MIN_EPOCHS} epochs; the synthetic screen "
        f"is made at {fitted[0]} x {fitted[1]} instead")
    return fitted, rate_at(fitted)


def fit_epochs(rate, manifest, global_batch, eval_every, warmup_epochs, budget_minutes):
    """--time_budget_minutes (`budget_minutes`): as many epochs of the data set `manifest`
    describes as fit at `rate` (global images/s)."""
    counts = {split: manifest["splits"][split]["count"] for split in ("train", "eval")}
    epochs = epochs_that_fit(rate, 60 * budget_minutes, counts["train"], counts["eval"],
                             eval_every)
    if epochs <= warmup_epochs:
        raise app.UsageError(
            f"--time_budget_minutes={budget_minutes:g} leaves {epochs} epochs at the "
            f"{rate:.2f} images/s measured here, no more than --warmup_epochs; give more time")
    log(f"--time_budget_minutes={budget_minutes:g}: {rate:.2f} images/s measured "
        f"at {manifest['image_shape'][0]} x {manifest['image_shape'][1]}, global batch "
        f"{global_batch}: {epochs} epochs of {counts['train']} images (about "
        f"{epochs * counts['train'] / rate / 60:.1f} minutes of steps)")
    return epochs
