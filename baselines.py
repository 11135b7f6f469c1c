"""Baselines beside a run's profile figures: NSC, NSCB and mAP (profile_scores.py) of
the same fields profiled by an untrained M-CNN and by plain intensity statistics, so
that a user sees what training bought.
"""
import contextlib
import warnings

import tf_env  # noqa: F401  (before TensorFlow)
import horovod.tensorflow as hvd
import numpy as np
import tensorflow as tf

import evaluation
import profile_scores

# Each channel's statistics of a field's raw pixel values, in this order.
INTENSITY_STATISTICS = ("mean", "std", "p01", "p50", "p99")


def intensity_statistics(images):
    """(N, channels x 5) float32: each channel's mean, spread and 1st, 50th and 99th
    percentiles of its pixels, in the stored values (`images`: N x H x W x C); the
    percentiles of every 4th pixel of every 4th row, which a full-size field has 82,000 of."""
    images = np.asarray(images, np.float32)
    pixels = images.reshape(len(images), -1, images.shape[-1])
    sample = images[:, ::4, ::4].reshape(len(images), -1, images.shape[-1])
    parts = [pixels.mean(axis=1), pixels.std(axis=1),
             *np.percentile(sample, [1, 50, 99], axis=1)]
    return np.stack(parts, axis=1).reshape(len(images), -1)


def intensity_names(channels):
    """The intensity profile's feature names: Image_Intensity_<statistic>_<channel>."""
    return [f"Image_Intensity_{statistic}_{channel}" for channel in channels
            for statistic in INTENSITY_STATISTICS]


def intensity_predict(num_classes):
    """A stand-in for evaluation.make_predict's predict whose profiles are the
    intensity statistics (and logits zeros), so that fields are read as the model's."""
    def predict(images):
        statistics = intensity_statistics(images.numpy())
        return tf.zeros((len(statistics), num_classes)), tf.constant(statistics)
    return predict


@contextlib.contextmanager
def initialised(model, seed):
    """`model` with every weight drawn again from its layer's initializer, as at the
    start of a run (after tf.keras.utils.set_random_seed(`seed`); rank 0's on every
    rank), its own weights put back after. tf_keras's initializers give the very values
    the run started from (an unseeded instance draws once); others (fc_512's `tiled`) a
    new draw of the same distribution. Raises ValueError for a trainable weight that is
    no layer's kernel or bias with an initializer."""
    trained = model.get_weights()
    drawn = set()
    tf.keras.utils.set_random_seed(seed)
    with warnings.catch_warnings():  # tf_keras's note that such a draw repeats itself
        warnings.filterwarnings("ignore", message="The initializer .* is unseeded")
        for layer in model.submodules:
            for name in ("kernel", "bias"):
                weight = getattr(layer, name, None)
                initializer = getattr(layer, f"{name}_initializer", None)
                if isinstance(weight, tf.Variable) and initializer is not None:
                    weight.assign(initializer(weight.shape, weight.dtype))
                    drawn.add(id(weight))
    missed = [w.name for w in model.trainable_weights if id(w) not in drawn]
    if missed:
        model.set_weights(trained)
        raise ValueError(f"no initializer for {', '.join(missed)}")
    if hvd.is_initialized():
        hvd.broadcast_variables(model.variables, root_rank=0)
    try:
        yield model
    finally:
        model.set_weights(trained)


def scores(untrained_predict, batches, classes, channels, control, plate_batches=None):
    """{"untrained": figures, "intensity": figures}: profile_scores.score (mAP too) of
    every field's profile by `untrained_predict` (evaluation.make_predict of a model
    while `initialised`) and by intensity_statistics. `batches(split)`: a fresh
    iterator of the split's (images, labels, provenance) batches, this rank's share."""
    results = {}
    for name, predict, names in (("untrained", untrained_predict, None),
                                 ("intensity", intensity_predict(len(classes)),
                                  intensity_names(channels))):
        held_out, held_out_profiles = evaluation.predicted_fields(
            predict, batches("eval"), classes, f"{name}_eval")
        training, training_profiles = evaluation.predicted_fields(
            predict, batches("train"), classes, f"{name}_train")
        table = evaluation.profile_fields(held_out, held_out_profiles, training,
                                          training_profiles, classes, plate_batches, names)
        results[name] = profile_scores.score(table, control)
    return results
