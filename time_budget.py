"""Sizing a run to a time budget from the speed of its first steps (the demo's
--time_budget_minutes).

A full-size step takes 0.3 s an image on a CPU with AMX and 2.5 s on an AVX2-only
one, so no one set of epochs fits every machine. A throwaway copy of the model
trains a few steps on random images; from that rate the run keeps the largest
image size (of the synthetic screen) at which MIN_EPOCHS fit the budget, and then
trains as many epochs as fit.
"""
import time

import tf_env  # noqa: F401  (before TensorFlow)
import horovod.tensorflow as hvd
import numpy as np
import tensorflow as tf

import mcnn_model

MIN_EPOCHS = 8  # fewer do not learn the synthetic screen (measured: README)
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
    float(train_step(images, labels))
    start = time.perf_counter()
    for _ in range(steps):
        float(train_step(images, labels))
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
