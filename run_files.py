"""A model dir's files: their names, and how they are written and read without
TensorFlow, so that studies.py, report.py and time_to_accuracy.py read runs without
starting it. JSON and CSV files are written whole or not at all.

    model_dir/
      flags.txt           the run's flags, a flag file (--flagfile=flags.txt reruns it)
      plan.json           what the run decided once (run_plan.Plan)
      history.json        its evaluations and training seconds over all its starts
      summary.json        written at the end: figures, time to target, evaluations
      data_manifest.json  its training data's record (model_files.record_data)
      checkpoints/ saved_model/ tensorboard/ evaluation/
"""
import json
import os

from absl import flags

import errors

FLAGS_FILE = "flags.txt"
PLAN = "plan.json"
HISTORY = "history.json"
SUMMARY = "summary.json"
DATA_MANIFEST = "data_manifest.json"
CHECKPOINTS = "checkpoints"
SAVED_MODEL = "saved_model"
TENSORBOARD = "tensorboard"
EVALUATION = "evaluation"
DIVERGED = "diverged"  # left by experiments/batch_study/run beside a run that diverged


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


def read_json(model_dir, name):
    """The JSON file `name` of `model_dir` as a dict, or None without one."""
    path = os.path.join(model_dir, name)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def flag_values(flag_file_text):
    """{name: value} of a flag file's lines (--name=value, --name, --noname). A bare
    --noname is read as name=false when `name` is a boolean flag this process defines."""
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


def recorded_flags(model_dir):
    """{name: value as text} of the run recorded in model_dir's flags.txt; {} without one."""
    path = os.path.join(model_dir, FLAGS_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return flag_values(f.read())


def read_history(model_dir, start_step):
    """(evaluations up to `start_step`, seconds trained before, starts before) of the run
    in `model_dir`, from its history.json; ([], 0, 0) for a new run. Evaluations after
    the checkpoint resumed from are dropped: those steps are trained again."""
    if not start_step:
        return [], 0.0, 0
    try:
        past = read_json(model_dir, HISTORY) or {}
    except (OSError, ValueError):
        return [], 0.0, 0
    return ([e for e in past.get("evaluations", []) if e["step"] <= start_step],
            float(past.get("seconds", 0)), int(past.get("starts", 0)))


def write_history(model_dir, evaluations, seconds, starts):
    """history.json: the run's evaluations, its training seconds over all its starts
    (wall time from each start to its last write) and how many starts it had."""
    return write_json(os.path.join(model_dir, HISTORY), {
        "evaluations": evaluations, "seconds": round(seconds, 2), "starts": starts})
