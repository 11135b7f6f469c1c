"""Run under mpirun -np 2: gradients of 2 ranks x b images against 1 x 2b, saved by rank 0.

Each rank computes, through optimization.batch_gradients (allreduce included):
  split: the gradient of its own half of a fixed batch of 2b images;
  whole: the gradient of the whole batch (the same on every rank, so the average
         is the single-process gradient of 2b images);
  accumulated: without allreduce, the whole batch as 2 micro-batches of b.
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tf_env  # noqa: F401,E402  (before TensorFlow)
import horovod.tensorflow as hvd  # noqa: E402
import tensorflow as tf  # noqa: E402

import mcnn_model  # noqa: E402
import optimization  # noqa: E402

NUM_CLASSES = 4


def main(output):
    hvd.init()
    tf.keras.utils.set_random_seed(0)
    model = mcnn_model.build_mcnn((128, 128, 3), NUM_CLASSES)
    hvd.broadcast_variables(model.variables, root_rank=0)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (8, 128, 128, 3), dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES, 8).astype(np.int32)
    half = len(images) // hvd.size()
    mine = slice(hvd.rank() * half, (hvd.rank() + 1) * half)

    recipe = optimization.Recipe()  # the authors': label smoothing, weight decay
    _, split, _ = optimization.batch_gradients(model, images[mine], labels[mine], NUM_CLASSES,
                                               recipe)
    _, whole, _ = optimization.batch_gradients(model, images, labels, NUM_CLASSES, recipe)
    _, accumulated, _ = tf.function(optimization.batch_gradients)(
        model, images, labels, NUM_CLASSES, recipe, accumulate=2, average=False)
    np.savez(f"{output}.rank{hvd.rank()}.npz",
             **{f"split_{i}": g.numpy() for i, g in enumerate(split)},
             **{f"whole_{i}": g.numpy() for i, g in enumerate(whole)},
             **{f"accumulated_{i}": g.numpy() for i, g in enumerate(accumulated)})


if __name__ == "__main__":
    main(sys.argv[1])
