"""Predicts the mechanism of action of new fields with a trained M-CNN.

    python predict.py --model_dir runs/x --output predictions.csv \\
        --image_table plates.csv --image_root DIR          # plates: tables + TIFFs
    python predict.py --model_dir runs/x --output predictions.csv --data_dir DIR   # shards

Writes one row per field (plate, well, compound, concentration, predicted MoA, the
probability of each class) to --output, and one row per treatment (majority vote
of its fields, mean probabilities) beside it as *_treatments.csv, and with --profiles
each field's, well's and treatment's profile (profiles.py: Parquet and CSV, the
field's Metadata_ columns), with NSC, NSCB and mAP (profile_scores.py) where the MoAs
are known (--moa_table, or a data set's labels); a field is named by its
image-table line (table_row) and first channel's file. TIFFs are binned as
the training data was, corrected by the illumination function and scaled with the
intensity ranges recorded for their plate, or, for a plate not seen in training, by
its own (as the conversion finds them); the model pads fields itself. The table is read
with the channels, column names and channel pages the training data was converted
with (the model dir records them), unless given here. Launched with
several ranks (./launch train --program predict.py -- ...), each predicts its share.
"""
import os

import tf_env  # (before TensorFlow)
from absl import app, flags
import horovod.tensorflow as hvd
import numpy as np
import pandas as pd

import data_pipeline
import errors
import evaluation
import intensity
import model_files
import plates
import profile_scores
import profiles
import tiffs
import run_files
from run_files import write_csv
from run_log import log

plates.define_table_flags(flags)
flags.DEFINE_string("data_dir", None, "A data set of shards to predict instead of tables.")
flags.DEFINE_string("split", "eval", "With --data_dir: the split to predict.")
flags.DEFINE_string("output", None, "CSV to write, one row per field.")
flags.DEFINE_integer("batch_size", 4, "Fields per forward pass per rank.")
flags.DEFINE_string("model_dir", None, "The --model_dir of a train_mcnn.py run.")
flags.DEFINE_bool("profiles", False, "Also write each field's profile (the fc_512 layer's "
                  "512 values, which the classifier reads), each well's and each treatment's "
                  "(profiles.py), beside --output as *_profiles, *_well_profiles and "
                  "*_treatment_profiles (.parquet and .csv), and their NSC, NSCB and mAP "
                  "where MoAs are known.")
flags.DEFINE_string("moa_table", None, "With --profiles and --image_table: CSV of compound, "
                    "concentration and moa, for NSC, NSCB and mAP of the profiles.")
flags.DEFINE_string("control", profiles.CONTROL_MOA, "The control's MoA (or compound), "
                    "which profiles are normalised against.")
flags.DEFINE_enum("precision", "auto", tf_env.PRECISIONS,
                  "Compute precision, whatever the model was trained in; auto: "
                  "mixed_bfloat16 where the CPU has native bf16.")
FLAGS = flags.FLAGS
PROVENANCE = ["plate", "well", "site", "compound", "concentration", "table_row", "file"]


def table_options(manifest):
    """The image table's options: the training data's conversion's (its channels, table
    columns, channel pages and plate sample, as the manifest records them), but for the
    flags given here; the flags alone for data converted before conversions were
    recorded."""
    recorded = manifest.get("conversion")
    if not recorded:
        return plates.ConversionOptions(channels=FLAGS.channels, columns=plates.table_columns(
            FLAGS), channel_pages=FLAGS.channel_pages or manifest.get("channel_pages"))
    given = {name for name in ("channels", "table_layout", "channel_pages") if FLAGS[name].present}
    return plates.ConversionOptions(**{
        **recorded, "columns": plates.table_columns(
            FLAGS, None if "table_layout" in given else recorded["columns"]),
        **{name: FLAGS[name].value for name in given - {"table_layout"}}})


def table_batches(manifest):
    """This rank's fields from --image_table, scaled as at training, in batches."""
    options = table_options(manifest)
    channels = list(options.channels)
    if channels != manifest.get("channels", channels) or len(channels) != manifest["image_shape"][2]:
        raise app.UsageError(f"--channels={','.join(channels)}, but the model was trained on "
                             f"{manifest.get('channels', manifest['image_shape'][2])}")
    fields = plates.read_fields(FLAGS.image_table, FLAGS.image_root, channels, options.columns)
    provenance = PROVENANCE + (["batch"] if "batch" in fields else [])
    fields = tiffs.check_files(fields, channels, FLAGS.image_table,
                               list(options.channel_pages) or None)
    data, new = intensity.with_new_plates(manifest, fields, options.range_sample_fields)
    if new:
        own = " illumination functions and" if data.get("illumination") else ""
        log(f"{len(new)} plate(s) not seen in training ({', '.join(new[:5])}"
            f"{', ...' if len(new) > 5 else ''}) corrected and scaled by their own{own} "
            f"intensity ranges (percentiles {data['intensity']['percentiles']} of up to "
            f"{options.range_sample_fields} fields each), as the conversion does each plate; "
            f"the others by those recorded in training")
    mine = fields.iloc[hvd.rank()::hvd.size()]
    for start in range(0, len(mine), FLAGS.batch_size):
        rows = mine.iloc[start:start + FLAGS.batch_size]
        images = [intensity.prepared_field(tiffs.field_planes(row, channels), row["table_row"],
                                        row["plate"], data, manifest["dtype"])
                  for _, row in rows.iterrows()]
        yield np.stack(images), rows[provenance].reset_index(drop=True)


def shard_batches(manifest):
    given = data_pipeline.read_manifest(FLAGS.data_dir)
    dataset = data_pipeline.make_dataset(given, FLAGS.split, data_pipeline.Feed(
        FLAGS.batch_size, hvd.rank(), hvd.size(), provenance=True))
    trained = manifest["image_shape"]
    if given["image_shape"] != trained:
        raise app.UsageError(f"{FLAGS.data_dir} holds {given['image_shape']} images, "
                             f"the model takes {trained}")
    for images, labels, provenance in dataset:
        yield images, pd.DataFrame({k: [v.decode() for v in provenance[k].numpy()]
                                    for k in PROVENANCE}).assign(
            moa=[given["classes"][k] for k in labels.numpy()])


def predict_fields(predict, batches, classes):
    """(fields with predicted_moa and p_<class>, their profiles) of this rank's
    batches, or None without any."""
    parts, features = [], []
    for images, provenance in batches:
        predicted, profile = evaluation.batch_predictions(predict, images, classes)
        parts.append(provenance.assign(
            predicted_moa=[classes[k] for k in predicted.pop("prediction")]).join(predicted))
        features.append(profile)
    return (pd.concat(parts, ignore_index=True), np.concatenate(features)) if parts else None


def treatments(fields, classes):
    """Majority vote of each treatment's fields (ties: the class listed first) and their
    mean probabilities (evaluation.treatment_votes)."""
    votes = evaluation.treatment_votes(
        fields.assign(prediction=[classes.index(moa) for moa in fields["predicted_moa"]]),
        len(classes), [f"p_{c}" for c in classes])
    votes.insert(votes.columns.get_loc("prediction"), "predicted_moa",
                 [classes[k] for k in votes.pop("prediction")])
    return votes


def main(argv):
    del argv
    if bool(FLAGS.data_dir) == bool(FLAGS.image_table):
        raise app.UsageError("give either --data_dir or --image_table (with --image_root)")
    folder = os.path.dirname(os.path.abspath(FLAGS.output))
    if not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
        raise app.UsageError(f"--output={FLAGS.output}: {folder} is not a folder this "
                             f"program can write to")
    hvd.init()
    precision, _ = tf_env.resolve_precision(FLAGS.precision)
    model, manifest = model_files.load_trained(FLAGS.model_dir, precision, say=log)
    classes = manifest["classes"]
    for note in model_files.describe_input(manifest):
        log(note)
    batches = shard_batches(manifest) if FLAGS.data_dir else table_batches(manifest)
    predict = evaluation.make_predict(model, manifest["image_shape"],
                                      data_pipeline.DTYPES[manifest["dtype"]])
    try:
        mine = predict_fields(predict, batches, classes)
    except KeyboardInterrupt:
        raise errors.Interrupted(f"stopped by Ctrl-C while predicting: nothing was written "
                                 f"({FLAGS.output} is untouched); rerun the same command") from None
    everyone = [part for part in hvd.allgather_object(mine, name="predictions")
                if part is not None]
    if hvd.rank() != 0:
        return
    fields = pd.concat([f for f, _ in everyone], ignore_index=True)
    stem = os.path.splitext(FLAGS.output)[0]
    write_csv(fields, FLAGS.output)
    write_csv(treatments(fields, classes), stem + "_treatments.csv")
    print(f"{len(fields)} fields -> {FLAGS.output}; treatments -> {stem}_treatments.csv")
    if FLAGS.profiles:
        write_profiles(fields, np.concatenate([p for _, p in everyone]), stem,
                       data_pipeline.read_manifest(FLAGS.data_dir).get("plate_batches")
                       if FLAGS.data_dir else None)


def write_profiles(fields, features, stem, plate_batches=None):
    """--profiles: the field, well and treatment tables beside --output, and NSC, NSCB
    and mAP (printed, and in *_profile_figures.json) where the fields' MoAs are known."""
    if FLAGS.moa_table:
        fields = plates.attach_moa(fields.assign(_row=np.arange(len(fields))), FLAGS.moa_table,
                                   plates.DEFAULT_COLUMNS, FLAGS.control, True, "skip")
        features = features[fields.pop("_row").to_numpy()]
    batches = (dict(zip(fields["plate"], fields["batch"])) if "batch" in fields else
               plate_batches)
    table = profiles.field_table(fields, features, batches)
    normalization = (profiles.DEFAULT_NORMALIZATION if profiles.is_control(table, FLAGS.control)
                     .any() else "none")
    paths = profiles.write_tables(os.path.dirname(os.path.abspath(stem)), table, FLAGS.control,
                                  normalization, os.path.basename(stem) + "_")
    print(f"profiles ({profiles.LAYER}; treatments normalised: {normalization}) -> "
          f"{', '.join(paths)} (and .csv)")
    if "moa" not in fields:
        print("no MoAs (give --moa_table): no NSC, NSCB or mAP")
        return
    figures = profile_scores.score(table, FLAGS.control, normalization)
    figures["nscb_batches"] = profiles.batch_source(batches, table[profiles.PLATE])
    run_files.write_json(f"{stem}_profile_figures.json", figures)
    for name, value in profile_scores.describe(figures):
        print(f"{name}: {value}")
    print(f"NSCB's batches: {figures['nscb_batches']}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["model_dir", "output"])
    errors.run_main(main)
