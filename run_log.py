"""What rank 0 writes as training runs: console lines, TensorBoard scalars, the run's
flags as a flag file, and JSON and CSV files written whole or not at all."""
import json
import os
import time

import tf_env  # noqa: F401  (before TensorFlow)
from absl import flags
import horovod.tensorflow as hvd
import tensorflow as tf

import errors


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


def flag_values(flag_file_text):
    """{name: value} of a flag file's lines (--name=value, --name, --noname)."""
    values = {}
    for line in flag_file_text.splitlines():
        line = line.strip()
        if not line.startswith("--"):
            continue
        name, is_set, value = line[2:].partition("=")
        if is_set:
            values[name] = value
        elif name.startswith("no") and name[2:] in flags.FLAGS and flags.FLAGS[name[2:]].boolean:
            values[name[2:]] = "false"
        else:
            values[name] = "true"
    return values


FLAGS_FILE = "flags.txt"  # in a model dir: the flags of its run, a flag file
NOT_THE_RUN = ("resume", "overwrite")  # how it was started, not what it trains


def project_flags():
    """{name: value} of every flag the project's scripts define, whichever runs (absl's
    and TensorFlow's own left out)."""
    scripts = {name[:-3] for name in os.listdir(os.path.dirname(os.path.abspath(__file__)))
               if name.endswith(".py")}
    return {flag.name: flag.value  # a script run as __main__ is named by its path
            for module, defined in flags.FLAGS.flags_by_module_dict().items()
            if os.path.splitext(os.path.basename(module))[0] in scripts for flag in defined}


def recorded_flags(model_dir):
    """{name: value as text} of the run recorded in model_dir's flags.txt; {} without one."""
    path = os.path.join(model_dir, FLAGS_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return flag_values(f.read())


def changed_flags(model_dir):
    """{flag: [value then, value now]} of the flags whose values differ from those of
    the run recorded in model_dir's flags.txt (none when there is no record)."""
    then = recorded_flags(model_dir)
    if not then:
        return {}
    now = flag_values(flags.FLAGS.flags_into_string())
    return {name: [then.get(name), now.get(name)] for name in sorted(set(then) | set(now))
            if then.get(name) != now.get(name) and name not in NOT_THE_RUN}


def open_log(model_dir):
    """Rank 0's TensorBoard writer; records the flags of this run."""
    with open(os.path.join(model_dir, FLAGS_FILE), "w") as f:
        f.write(flags.FLAGS.flags_into_string())  # a flag file: --flagfile=flags.txt reruns it
    return tf.summary.create_file_writer(os.path.join(model_dir, "tensorboard"))


def write_json(path, content):
    """Writes `content` to `path` through a temporary file: a reader never sees half of it."""
    with open(path + ".tmp", "w") as f:
        json.dump(content, f, indent=2)
    os.replace(path + ".tmp", path)
    return path


def write_csv(table, path, **options):
    """Writes a DataFrame to `path` whole or not at all (`options`: DataFrame.to_csv's);
    errors.OutputError, naming the path, if it cannot."""
    try:
        table.to_csv(path + ".tmp", index=False, **options)
        os.replace(path + ".tmp", path)
    except OSError as error:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        raise errors.OutputError(f"could not write {path}: {error.strerror or error}. Nothing "
                                 f"was written there; free space or fix the folder, then "
                                 f"rerun") from None


HISTORY = "history.json"  # a run's evaluations and training time over all its starts


def read_history(model_dir, start_step):
    """(evaluations up to `start_step`, seconds trained before, starts before) of the run
    in `model_dir`, from its history.json; ([], 0, 0) for a new run. Evaluations after
    the checkpoint resumed from are dropped: those steps are trained again."""
    if not start_step:
        return [], 0.0, 0
    try:
        with open(os.path.join(model_dir, HISTORY)) as f:
            past = json.load(f)
    except (OSError, ValueError):
        return [], 0.0, 0
    return ([e for e in past.get("evaluations", []) if e["step"] <= start_step],
            float(past.get("seconds", 0)), int(past.get("starts", 0)))


def write_history(model_dir, evaluations, seconds, starts):
    """history.json: the run's evaluations, its training seconds over all its starts
    (wall time from each start to its last write) and how many starts it had."""
    return write_json(os.path.join(model_dir, HISTORY), {
        "evaluations": evaluations, "seconds": round(seconds, 2), "starts": starts})

