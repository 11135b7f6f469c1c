"""What keeps a training run alive across crashes, pre-emption and restarts.

Rank 0 writes checkpoints (model, optimizer with its step count, and the global
batch they assume) through tf.train.CheckpointManager, restores the latest on a
rerun, or clears a previous run when told to; every rank then starts from its
state by broadcast. SIGTERM or SIGINT to any rank stops all of them at the same
step, after a checkpoint. In Horovod's elastic mode the state to roll back to is
committed with every checkpoint.
"""
import dataclasses
import glob
import json
import os
import shutil
import signal
import time

import tf_env  # noqa: F401  (before TensorFlow)
from absl import app, flags
import horovod.tensorflow as hvd
import tensorflow as tf

import data_pipeline
import errors
import illumination
import model_files
import run_files
from run_log import log

flags.DEFINE_integer("checkpoint_every", 1, "Checkpoint every this many epochs.")
flags.DEFINE_integer("checkpoint_steps", 0, "Also checkpoint every this many steps (0: at "
                     "epoch ends only). At most this many steps are redone after a crash.")
flags.DEFINE_integer("keep_checkpoints", 3, "Checkpoints kept.")
flags.DEFINE_bool("resume", True, "Continue from the latest checkpoint in --model_dir, if any.")
flags.DEFINE_bool("resume_with_other_data", False, "Resume a run on data of the same classes "
                  "and field size but other pixels (other plates, or intensity ranges), as to "
                  "train on; without it such a resume is refused.")
flags.DEFINE_bool("overwrite", False, "With --noresume: delete a previous run in --model_dir "
                  "and start afresh.")


@dataclasses.dataclass(frozen=True)
class Policy:
    """When a run checkpoints and how many it keeps, and what its start does with a
    previous run in its model dir (resume it, or with overwrite delete it)."""
    every_epochs: int = 1
    every_steps: int = 0  # 0: at epoch ends only
    keep: int = 3
    resume: bool = True
    overwrite: bool = False
    resume_with_other_data: bool = False

    @classmethod
    def from_flags(cls, flag_values):
        """The policy this module's flags give (`flag_values`: absl's FlagValues)."""
        return cls(flag_values.checkpoint_every, flag_values.checkpoint_steps,
                   flag_values.keep_checkpoints, flag_values.resume, flag_values.overwrite,
                   flag_values.resume_with_other_data)

# What a run leaves in its model dir besides flags.txt; --overwrite deletes them.
RUN_OUTPUTS = (run_files.CHECKPOINTS, run_files.SAVED_MODEL, run_files.DATA_MANIFEST,
               illumination.ILLUMINATION_DIR, run_files.TENSORBOARD, run_files.EVALUATION,
               run_files.SUMMARY, run_files.HISTORY)


@flags.multi_flags_validator(["resume", "overwrite"],
                             message="--overwrite deletes a previous run and --resume continues "
                                     "it: give --noresume with --overwrite")
def _overwrite_only_without_resume(values):
    return not (values["resume"] and values["overwrite"])


def make_checkpoint(model, optimizer, global_batch):
    """What a checkpoint holds: model, optimizer (with its step count, so the schedule
    and the data position follow) and the global batch they assume."""
    return tf.train.Checkpoint(model=model, optimizer=optimizer,
                               global_batch=tf.Variable(global_batch, dtype=tf.int64))


class CheckpointManager(tf.train.CheckpointManager):
    """tf.train.CheckpointManager whose pruning deletes the files of the checkpoints it
    drops by their names. TensorFlow's reads `<folder>/ckpt-N.index` as a glob pattern
    (tensorflow/tensorflow#34290): in a model dir named `runs/lr[1]` it deleted
    `runs/lr1`'s checkpoints and never its own."""

    def _sweep(self):
        """TensorFlow 2.18's CheckpointManager._sweep, files deleted literally."""
        if not self._max_to_keep:
            return
        while len(self._maybe_delete) > self._max_to_keep:
            path, timestamp = self._maybe_delete.popitem(last=False)
            if (self._keep_checkpoint_every_n_hours
                    and timestamp - self._keep_checkpoint_every_n_hours * 3600.
                    >= self._last_preserved_timestamp):
                self._last_preserved_timestamp = timestamp
                continue
            remove_files_of(path)


def remove_files_of(path):
    """Deletes checkpoint `path`'s files."""
    for file in checkpoint_files(path):
        os.remove(file)


def checkpoint_files(path):
    """The files of checkpoint `path` (`path.index`, `path.data-*`), the path taken
    literally."""
    return glob.glob(glob.escape(path) + ".*")


def open_checkpoints(checkpoint, model_dir, policy):
    """The manager that writes and prunes the model dir's checkpoints (keeping
    policy.keep); opened after agree_on_start, which mends the folder's index if it has to."""
    return CheckpointManager(checkpoint, os.path.join(model_dir, run_files.CHECKPOINTS),
                             max_to_keep=policy.keep)


def checkpoint_due(step, steps_per_epoch, policy):
    """Whether `policy` (every so many epochs, or steps) asks for a checkpoint after `step`."""
    epoch_end = step % steps_per_epoch == 0
    return bool((epoch_end and (step // steps_per_epoch) % policy.every_epochs == 0)
                or (policy.every_steps and step % policy.every_steps == 0))


def restore_or_start(checkpoint, model_dir, global_batch, data_manifest, policy):
    """Rank 0: restores the newest checkpoint that restores (policy.resume), or clears a
    previous run (policy.overwrite), or refuses to touch it. Returns the step to continue
    from; the caller records the data the run trains on (record_data) if it trains."""
    try:
        os.makedirs(model_dir, exist_ok=True)
    except OSError as e:
        raise app.UsageError(f"--model_dir={model_dir} cannot be created: {e.strerror}")
    folder = os.path.join(model_dir, run_files.CHECKPOINTS)
    step = 0
    if model_files.checkpoints_in(folder) and policy.resume:
        check_same_data(model_dir, data_manifest, policy.resume_with_other_data)
        step = resume(checkpoint, folder, global_batch)
    elif not policy.resume:
        clear_previous_run(model_dir, policy.overwrite)
    return step


def data_the_weights_fit(data_manifest):
    """What a run's weights are tied to: field size, channels, binning, classes and the
    input standardization."""
    return {"image_shape": data_manifest["image_shape"], "channels": data_manifest.get("channels"),
            "bin": data_manifest.get("bin", 1), "classes": data_manifest["classes"],
            "input_standardization": data_manifest.get("input_standardization")}


def pixels_of(data_manifest):
    """Where a run's fields come from and how their pixels are corrected and scaled:
    the sources (the tables and their checksums, or the folder), the illumination
    correction and the intensity ranges."""
    return {"sources": data_manifest.get("sources", data_manifest.get("source")),
            "illumination": illumination.settings(data_manifest.get("illumination")),
            "intensity": data_manifest.get("intensity")}


def check_same_data(model_dir, data_manifest, other_data_allowed=False):
    """Refuses to resume a run recorded (record_data) with data of another field size,
    channels, binning or classes: its weights would not fit, or would fit and mean
    something else; and, unless `other_data_allowed` (--resume_with_other_data), with
    other sources or intensity ranges: a rerun would train (or record) other data under
    the same name."""
    path = os.path.join(model_dir, run_files.DATA_MANIFEST)
    if not os.path.isfile(path):
        return  # a run from before the record; restoring checks the shapes
    with open(path) as f:
        recorded = json.load(f)
    there, here = data_the_weights_fit(recorded), data_the_weights_fit(data_manifest)
    differences = [f"{key} {there[key]} there, {here[key]} here"
                   for key in here if there[key] != here[key]]
    if not differences and not other_data_allowed:
        there, here = pixels_of(recorded), pixels_of(data_manifest)
        said = {"sources": here["sources"], "illumination": "other functions",
                "intensity": "other ranges"}
        differences = [f"other {key} ({said[key]})"
                       for key in here if there[key] != here[key]]
        if differences:
            raise app.UsageError(
                f"--model_dir={model_dir} holds a run trained on other data than this run's: "
                f"{'; '.join(differences)}. --resume_with_other_data goes on training it on "
                f"these; another --model_dir, or --noresume --overwrite, starts afresh")
    if differences:
        raise app.UsageError(
            f"--model_dir={model_dir} holds a run trained on other data than this run's "
            f"({data_manifest['source']}): {'; '.join(differences)}. Give another --model_dir, "
            f"or --noresume --overwrite to start afresh in this one")


def resume(checkpoint, folder, global_batch):
    """Restores the newest checkpoint of `folder` that restores, whatever its index
    says; newer ones that do not are set aside in damaged/ and the index is mended.
    When none restores, stops and changes nothing: never a fresh start over them.
    Returns the step restored."""
    listed = indexed_checkpoint(folder)
    path, failed = model_files.restore_newest(checkpoint, folder)
    if path is None:
        raise app.UsageError(
            f"no checkpoint in {folder} restores into this model: "
            + "; ".join(f"{damaged}: {reason}" for damaged, reason in failed)
            + ". If they are damaged, restore the folder from a copy; if they are of another "
            "model (image size, classes), give another --model_dir. Nothing was changed; "
            "--noresume --overwrite deletes them and starts afresh")
    for damaged, reason in failed:
        log(f"{damaged} does not restore ({reason}): set aside in {set_aside(damaged)}")
    if path != listed:
        log(f"{os.path.join(folder, 'checkpoint')}, the index, lists "
            f"{listed or 'no readable checkpoint'}; resuming from {path}, the newest "
            f"checkpoint in the folder that restores")
    mend_index(folder)
    saved_batch = int(checkpoint.global_batch)
    if saved_batch != global_batch:
        raise app.UsageError(
            f"{path} was trained with a global batch of {saved_batch}, this run has "
            f"{global_batch} (ranks x --per_rank_batch): the schedule would not continue. "
            f"Use the same, or --noresume --overwrite to start afresh")
    return int(checkpoint.optimizer.iterations)


def indexed_checkpoint(folder):
    """The latest checkpoint the folder's index names, or None if it names none or
    cannot be read."""
    try:
        state = tf.train.get_checkpoint_state(folder)
    except (ValueError, tf.errors.OpError):
        return None
    path = state and state.model_checkpoint_path  # joined to the folder if relative
    return path if path and os.path.isfile(path + ".index") else None


def set_aside(path):
    """Moves the files of checkpoint `path` into damaged/ beside it; returns that folder."""
    damaged = os.path.join(os.path.dirname(path), "damaged")
    os.makedirs(damaged, exist_ok=True)
    for file in checkpoint_files(path):
        target = os.path.join(damaged, os.path.basename(file))
        if os.path.exists(target):  # set aside before: keep both
            target += f".{int(time.time())}"
        os.replace(file, target)
    return damaged


def mend_index(folder):
    """Rewrites the index to list the checkpoints in the folder, oldest first, with
    their times, so that the manager prunes them as if it had written them."""
    paths = model_files.checkpoints_in(folder)[::-1]
    times = [os.path.getmtime(path + ".index") for path in paths]
    tf.compat.v1.train.update_checkpoint_state(
        folder, paths[-1], all_model_checkpoint_paths=paths,
        all_model_checkpoint_timestamps=times, last_preserved_timestamp=min(times) - 1)


def clear_previous_run(model_dir, overwrite):
    """--noresume: deletes a previous run's outputs with --overwrite, else refuses."""
    previous = [name for name in RUN_OUTPUTS if os.path.exists(os.path.join(model_dir, name))]
    if previous and not overwrite:
        raise app.UsageError(f"--model_dir={model_dir} holds a previous run "
                             f"({', '.join(previous)}); --resume (the default) continues it, "
                             f"--noresume --overwrite deletes it and starts afresh")
    for name in previous:
        path = os.path.join(model_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def agree_on_start(checkpoint, model_dir, global_batch, data_manifest, policy):
    """The step every rank starts from; rank 0 decides, and its errors stop every rank.
    The caller then broadcasts rank 0's (restored) variables."""
    step, error = 0, None
    if hvd.rank() == 0:
        try:
            step = restore_or_start(checkpoint, model_dir, global_batch, data_manifest, policy)
        except app.UsageError as e:
            error = str(e)
    step, error = hvd.broadcast_object((step, error), root_rank=0, name="start")
    if error:
        raise app.UsageError(error)
    return step


def save_checkpoint(manager, model, step, lr):
    """Rank 0 writes the checkpoint of `step`. Non-finite weights are never saved, and a
    failed write leaves the previous checkpoint the latest."""
    if not all(bool(tf.reduce_all(tf.math.is_finite(w))) for w in model.weights):
        raise FloatingPointError(
            f"weights are not finite after step {step} (learning rate {lr:g}): training "
            f"diverged and was not checkpointed. The last good weights are in "
            f"{manager.latest_checkpoint or 'no checkpoint'}; lower --base_lr or lengthen "
            f"--warmup_epochs")
    try:
        manager.save(checkpoint_number=step)
    except data_pipeline.WRITE_ERRORS as e:
        for partial in glob.glob(os.path.join(glob.escape(manager.directory),
                                              f"ckpt-{step}[._]*")):
            shutil.rmtree(partial, ignore_errors=True) if os.path.isdir(partial) else os.remove(
                partial)
        reason = errors.error_text(e)
        raise errors.OutputError(
            f"could not write the checkpoint of step {step} in {manager.directory}: {reason}. "
            f"The previous checkpoint, {manager.latest_checkpoint or 'none'}, is intact; free "
            f"space or fix the folder, then rerun the same command to resume") from None


def export_finished(manager, model, model_dir):
    """Rank 0 exports a finished run's model; if it cannot, says what is kept and how
    to export it later."""
    try:
        model_files.export(model, model_dir)
    except errors.OutputError as error:
        raise errors.OutputError(
            f"{error}. The finished run's checkpoint, {manager.latest_checkpoint}, is kept; "
            f"free space or fix the folder, then rerun the same command to export it "
            f"(predict.py uses the checkpoint meanwhile)") from None
    log(f"exported the model to {os.path.join(model_dir, run_files.SAVED_MODEL)}")


class StopSignals:
    """SIGTERM (a scheduler's warning before SIGKILL), SIGINT (Ctrl-C), or SIGUSR1 and
    SIGUSR2 (how the launcher passes a SIGTERM or a Ctrl-C on through mpirun, which
    forwards them to every rank at once) to any rank: every rank stops at the same step
    boundary, after a checkpoint, and the stop line names what the user did."""
    # When ranks receive different signals, the one named: the user's own before the
    # scheduler's, a signal received before one passed on.
    PRECEDENCE = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
    MEANING = {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM",
               signal.SIGUSR1: "SIGUSR1 (a SIGTERM to ./launch, passed on)",
               signal.SIGUSR2: "SIGUSR2 (Ctrl-C to ./launch, passed on)"}
    EXIT = {signal.SIGUSR1: 128 + signal.SIGTERM, signal.SIGUSR2: 128 + signal.SIGINT}

    def __init__(self):
        self.received = 0
        for signum in self.PRECEDENCE:
            signal.signal(signum, self.handle)

    def handle(self, signum, frame):
        self.received = self.received or signum  # the first: the launcher's follows Ctrl-C

    def agreed(self):
        """Collective: the signal any rank received (the highest in PRECEDENCE), or 0."""
        rank = self.PRECEDENCE.index(self.received) + 1 if self.received else 0
        agreed = int(hvd.allreduce(tf.constant(rank), op=hvd.Max, name="stop_signal"))
        return self.PRECEDENCE[agreed - 1] if agreed else 0

    @classmethod
    def describe(cls, signum):
        """(what the stop line calls `signum`, the exit status it ends with)."""
        return cls.MEANING[signum], cls.EXIT.get(signum, 128 + signum)
