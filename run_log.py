"""What rank 0 writes as training runs: console lines, TensorBoard scalars, the run's
flags as a flag file, and JSON files written whole or not at all."""
import json
import os
import time

import tf_env  # noqa: F401  (before TensorFlow)
from absl import flags
import horovod.tensorflow as hvd
import tensorflow as tf


def log(message):
    if hvd.rank() == 0:
        print(message, flush=True)


class StepTimer:
    """Loss and seconds of the training steps since it was made; other time is skipped."""

    def __init__(self):
        self.loss, self.steps, self.seconds, self.mark = 0.0, 0, 0.0, time.time()

    def add(self, loss):
        now = time.time()
        self.loss += loss
        self.steps += 1
        self.seconds += now - self.mark
        self.mark = now

    def skip(self):
        self.mark = time.time()

    def mean_loss(self):
        return self.loss / self.steps


def write_scalars(writer, step, **scalars):
    if writer:
        with writer.as_default(step=step):
            for name, value in scalars.items():
                tf.summary.scalar(name, value)


def open_log(model_dir):
    """Rank 0's TensorBoard writer; records the flags of this run."""
    with open(os.path.join(model_dir, "flags.txt"), "w") as f:
        f.write(flags.FLAGS.flags_into_string())  # a flag file: --flagfile=flags.txt reruns it
    return tf.summary.create_file_writer(os.path.join(model_dir, "tensorboard"))


def write_json(path, content):
    """Writes `content` to `path` through a temporary file: a reader never sees half of it."""
    with open(path + ".tmp", "w") as f:
        json.dump(content, f, indent=2)
    os.replace(path + ".tmp", path)
    return path
