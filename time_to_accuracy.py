"""Time to a target held-out accuracy, measured as MLPerf Training measures it: train
until held-out field accuracy first reaches --target, once per seed, and report the
epochs, steps, images and seconds it took, per seed and as median and spread.

    ./launch bench -- --parts=time_to_accuracy --target=0.95 --seeds=0,1,2 \\
        --flagfile=experiments/synthetic_quick.flags

Each seed is a training run of its own (train_mcnn.py through ./launch train, one rank
on every core here) with the training flags given, stopped at the target by
--target_accuracy; its model dir is MODEL_DIR/PRECISION_seedN and its output
train.log there. A seed draws its own synthetic screen, split, initial weights and
order of fields. Evaluations come every --target_eval_every epochs, so that the epoch
and step counts mean something; "seconds" counts from the start of training to the
evaluation that reached the target, evaluations included, as MLPerf does, and
"train_seconds" the same without the evaluations. A run that ends its --epochs below
the target, or diverges, never reaches it: a median over seeds counts it as slower
than any that did. A seed that ran to its end before with the same command is read
from its model dir, not run again, so that an interrupted study resumes.
"""
import math
import os
import statistics
import subprocess

from absl import flags

import run_files

flags.DEFINE_float("target", 0.95, "Held-out field accuracy to reach (benchmark.py "
                   "--parts=time_to_accuracy), or to count epochs to (studies.py).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of the time-to-accuracy runs, one run each.")
flags.DEFINE_float("target_eval_every", 0.5, "Epochs between evaluations in time-to-accuracy "
                   "runs (overrides --eval_every).")

HERE = os.path.dirname(os.path.abspath(__file__))
MEASURES = ("epochs", "steps", "images", "seconds", "train_seconds")
NEVER = "never"


def train_to_target(training_flags, precision, seed, model_dir, target, eval_every):
    """One run to `target` held-out field accuracy, evaluated every `eval_every` epochs:
    {"reached": bool, MEASURES..., "final_accuracy", "diverged"}.
    A run that ended before with the same command (model_dir/command.txt) is read, not
    run again. Raises RuntimeError, with the end of its output, if the run failed other
    than by diverging."""
    os.makedirs(model_dir, exist_ok=True)
    command = [os.path.join(HERE, "launch"), "train", "--", *training_flags,
               f"--precision={precision}", f"--seed={seed}", f"--model_dir={model_dir}",
               f"--target_accuracy={target}", f"--eval_every={eval_every}",
               "--nonsc",  # the target is field accuracy: no profiling of the training split
               "--noresume", "--overwrite"]
    command_path = os.path.join(model_dir, "command.txt")
    if not ran_before(command, command_path):
        log_path = os.path.join(model_dir, "train.log")
        with open(log_path, "w") as log:
            # os.environ, not the process's own environment: MPI_Init of this (singleton)
            # rank has added variables to that which make a child mpirun fail.
            status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                                    env=dict(os.environ)).returncode
        with open(log_path) as log:
            output = log.read()
        if status and "training diverged" not in output:
            raise RuntimeError(f"{' '.join(command)} failed (exit {status}); its output, "
                               f"{log_path}, ends:\n{output[-3000:]}")
        with open(command_path, "w") as f:
            f.write("\n".join([*command, "diverged" if status else "ended"]) + "\n")
    summary = run_files.read_json(model_dir, run_files.SUMMARY)
    if summary is None:
        return {"reached": False, "diverged": True}
    target = summary["time_to_target"]
    return {"reached": target["reached"], "diverged": False,
            "final_accuracy": summary["final_accuracy"], "image_shape": summary["image_shape"],
            **({m: target[m] for m in MEASURES} if target["reached"] else {})}


def ran_before(command, command_path):
    """Whether `command` ran to its end before (command_path lists it, then how it ended)."""
    if not os.path.isfile(command_path):
        return False
    with open(command_path) as f:
        return f.read().splitlines()[:-1] == command


def median_and_spread(values):
    """(median, least, most) of `values`, where None (never reached) counts as slower
    than any number; each is NEVER where it falls on such a run."""
    numbers = [math.inf if v is None else v for v in values]
    return tuple(NEVER if math.isinf(x) else x
                 for x in (statistics.median(numbers), min(numbers), max(numbers)))


def measure(training_flags, precision, target, eval_every, seeds, folder, say=print):
    """Figures of --parts=time_to_accuracy at `precision`, per seed and over `seeds`
    (--target, --target_eval_every, --seeds), the runs in `folder` (--model_dir)."""
    figures = {"target": target, "eval_every_epochs": eval_every}
    runs = {}
    for seed in seeds:
        model_dir = os.path.join(folder, f"{precision}_seed{seed}")
        runs[seed] = run = train_to_target(training_flags, precision, seed, model_dir, target,
                                           eval_every)
        say(f"time to accuracy, {precision}, seed {seed}: " + (
            f"{target:g} at epoch {run['epochs']:g} (step {run['steps']}, "
            f"{run['images']:,} images) in {run['seconds']:.0f} s, {run['train_seconds']:.0f} s "
            f"of it training" if run["reached"] else
            "diverged" if run["diverged"] else
            f"never reached {target:g} (final accuracy {run['final_accuracy']:.3f})")
            + f"; {model_dir}")
        if "image_shape" in run:
            figures["image_shape"] = " x ".join(str(side) for side in run["image_shape"])
        for measure_name in MEASURES:
            figures[f"seed{seed}_{measure_name}_to_target"] = run.get(measure_name, NEVER)
    figures["seeds_reaching_target"] = f"{sum(r['reached'] for r in runs.values())} of {len(runs)}"
    for measure_name in MEASURES:
        middle, least, most = median_and_spread([r.get(measure_name) for r in runs.values()])
        figures.update({f"median_{measure_name}_to_target": middle,
                        f"min_{measure_name}_to_target": least,
                        f"max_{measure_name}_to_target": most})
    return figures
