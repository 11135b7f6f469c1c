"""What rank 0 writes as training runs: console lines, TensorBoard scalars (and their
reader) and the run's flags as a flag file (run_files.py: the model dir's other files)."""
import os
import time

import tf_env  # noqa: F401  (before TensorFlow)
from absl import flags
import horovod.tensorflow as hvd
import tensorflow as tf

import run_files


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


NOT_THE_RUN = ("resume", "overwrite")  # how it was started, not what it trains


def project_flags():
    """{name: value} of every flag the project's scripts define, whichever runs (absl's
    and TensorFlow's own left out)."""
    scripts = {name[:-3] for name in os.listdir(os.path.dirname(os.path.abspath(__file__)))
               if name.endswith(".py")}
    return {flag.name: flag.value  # a script run as __main__ is named by its path
            for module, defined in flags.FLAGS.flags_by_module_dict().items()
            if os.path.splitext(os.path.basename(module))[0] in scripts for flag in defined}


def changed_flags(model_dir):
    """{flag: [value then, value now]} of the flags whose values differ from those of
    the run recorded in model_dir's flags.txt (none when there is no record)."""
    then = run_files.recorded_flags(model_dir)
    if not then:
        return {}
    now = run_files.flag_values(flags.FLAGS.flags_into_string())
    return {name: [then.get(name), now.get(name)] for name in sorted(set(then) | set(now))
            if then.get(name) != now.get(name) and name not in NOT_THE_RUN}


def open_log(model_dir):
    """Rank 0's TensorBoard writer; records the flags of this run."""
    with open(os.path.join(model_dir, run_files.FLAGS_FILE), "w") as f:
        f.write(flags.FLAGS.flags_into_string())  # a flag file: --flagfile=flags.txt reruns it
    return tf.summary.create_file_writer(os.path.join(model_dir, run_files.TENSORBOARD))


def read_scalars(log_dir, tag=None):
    """{tag: {step: value}} of every scalar in a TensorBoard log folder (of `tag` only,
    if given); a step logged twice keeps its last value."""
    scalars = {}
    for name in sorted(os.listdir(log_dir)):
        if not name.startswith("events.out.tfevents"):
            continue
        for event in tf.compat.v1.train.summary_iterator(os.path.join(log_dir, name)):
            for value in event.summary.value:
                if tag in (None, value.tag):
                    scalars.setdefault(value.tag, {})[event.step] = float(
                        tf.make_ndarray(value.tensor))
    return {name: dict(sorted(series.items())) for name, series in scalars.items()}
