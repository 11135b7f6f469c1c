"""What a training run's model dir holds, and how it is written and read: the record of
its training data (record_data), the export, its checkpoints found and restored (the
newest that restores whole), and a trained model loaded for prediction."""
import contextlib
import glob
import json
import os
import re
import shutil
import tempfile

import tf_env  # noqa: F401  (before TensorFlow)
import tensorflow as tf

import data_pipeline
import errors
import illumination
import mcnn_model
import plates
import run_files


def record_data(model_dir, data_manifest):
    """Writes the manifest of a run's training data (classes, channels, field size,
    binning, illumination functions (as images in the model dir), intensity ranges,
    and the input_standardization the model was built with), which prediction and a
    resumed run need, with the padding the model applies; atomically."""
    height, width = data_manifest["image_shape"][:2]
    record = {**data_manifest, "padded_to": list(mcnn_model.padded_size(height, width)),
              "padding": [list(sides) for sides in mcnn_model.padding(height, width)],
              "illumination": illumination.save(data_manifest.get("illumination"), model_dir,
                                                data_manifest.get("channels", []),
                                                data_manifest.get("source"))}
    run_files.write_json(os.path.join(model_dir, run_files.DATA_MANIFEST), record)


def describe_input(data_manifest):
    """What happens to the data's fields before the columns, in words: binning,
    illumination correction, padding, standardization."""
    return [note for note in (plates.describe_binning(data_manifest),
                              illumination.describe(data_manifest.get("illumination")),
                              mcnn_model.describe_padding(*data_manifest["image_shape"][:2]),
                              describe_standardization(data_manifest)) if note]


def describe_standardization(data_manifest):
    statistics = data_manifest.get("input_standardization")
    if not statistics:
        return None
    mean, std = (", ".join(f"{v:.3f}" for v in statistics[k]) for k in ("mean", "std"))
    return (f"input standardized per channel (--input_scaling=standardize): pixels / the "
            f"dtype's largest value, less mean [{mean}], over spread [{std}] of the "
            f"training fields")


def export(model, model_dir):
    """Saves `model` as a SavedModel beside its data manifest (record_data), whole or
    not at all; a failed write is an OutputError and leaves no partial folder."""
    exported = os.path.join(model_dir, run_files.SAVED_MODEL)
    try:
        model.save(exported + ".partial")
        if os.path.isdir(exported):  # a previous export, replaced once the new one is whole
            os.replace(exported, exported + ".previous")
        os.replace(exported + ".partial", exported)
        shutil.rmtree(exported + ".previous", ignore_errors=True)
    except data_pipeline.WRITE_ERRORS as error:
        shutil.rmtree(exported + ".partial", ignore_errors=True)
        raise errors.OutputError(
            f"could not write {exported}: {errors.error_text(error)}") from None


def checkpoints_in(folder):
    """The checkpoints in `folder` (paths without suffix), newest first: every
    ckpt-N whose files are there, whatever its index, `checkpoint`, lists (it may be
    missing, garbled or stale)."""
    steps = [int(match.group(1)) for match in (
        re.fullmatch(r"ckpt-(\d+)\.index", name) for name in
        (os.listdir(folder) if os.path.isdir(folder) else [])) if match]
    return [os.path.join(folder, f"ckpt-{step}") for step in sorted(steps, reverse=True)]


@contextlib.contextmanager
def readable_by_tensorflow(path):
    """`path`, or, where its folder has a character a glob reads ([ ] * ?), the same file
    through a symlink to that folder from one without: TensorFlow's checkpoint and
    SavedModel readers look their files up by pattern (tensorflow/tensorflow#34290)."""
    folder, name = os.path.split(os.path.abspath(path))
    if not glob.has_magic(folder):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="mcnn-") as alias:
        os.symlink(folder, os.path.join(alias, "folder"))
        yield os.path.join(alias, "folder", name)


def restore_newest(checkpoint, folder):
    """Restores into `checkpoint` (a tf.train.Checkpoint) the newest checkpoint of
    `folder` that restores whole. Returns (its path or None, [(path, reason)] of
    the newer ones that did not)."""
    failed = []
    for path in checkpoints_in(folder):
        try:
            with readable_by_tensorflow(path) as readable:
                status = checkpoint.restore(readable)
                status.assert_existing_objects_matched()
                status.expect_partial()  # prediction has no optimizer to restore
            return path, failed
        except Exception as error:  # noqa: BLE001  damaged files fail in many ways
            failed.append((path, errors.error_text(error)[:300]
                           or type(error).__name__))
    return None, failed


def load_trained(model_dir, precision="float32", say=print):
    """(model, data manifest) of a training run, computing in `precision` whatever the
    precision it was trained in: the weights of its SavedModel, else, if that is
    missing or damaged, of its newest checkpoint that restores; `say` is told which."""
    manifest_path = os.path.join(model_dir, run_files.DATA_MANIFEST)
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as error:
        raise errors.InputError(f"cannot read {manifest_path} ({error}): is {model_dir} the "
                                f"--model_dir of a train_mcnn.py run?") from None
    manifest["illumination"] = illumination.load(manifest.get("illumination"), model_dir)
    model = mcnn_model.build_mcnn(tuple(manifest["image_shape"]), len(manifest["classes"]),
                       input_dtype=manifest["dtype"], precision=precision,
                       standardization=manifest.get("input_standardization"))
    exported = os.path.join(model_dir, run_files.SAVED_MODEL)
    try:
        with readable_by_tensorflow(exported) as readable:
            model.set_weights(tf.keras.models.load_model(readable, compile=False).get_weights())
        return model, manifest
    except Exception as error:  # noqa: BLE001  a missing or damaged SavedModel
        reason = errors.error_text(error)[:300]
        unreadable = (f"{exported} cannot be loaded ({reason})" if os.path.exists(exported)
                      else f"{model_dir} has no {run_files.SAVED_MODEL}/")
    folder = os.path.join(model_dir, run_files.CHECKPOINTS)
    path, failed = restore_newest(tf.train.Checkpoint(model=model), folder)
    for damaged, reason in failed:
        say(f"{damaged} does not restore ({reason})")
    if path is None:
        raise errors.InputError(f"{model_dir} has no usable weights: {unreadable}, and no "
                                f"checkpoint in {folder} restores")
    say(f"{unreadable}: using the weights of {path}")
    return model, manifest
