"""A data set's shards read against its manifest: every record parsed, each shard's
record count checked (a TFRecord reader takes a shard cut between two records for its
end), and tf.data's DataLossError, which names no file, turned into the files and
records at fault."""
import itertools

import tf_env  # noqa: F401  (before TensorFlow)
import tensorflow as tf

import data_pipeline
import errors


def scan_shards(files, manifest):
    """Reads every record of `files` and checks it against the manifest.

    Returns ({file: indices of its good records}, [problems, each naming file and
    record]). A corrupt or truncated record ends its file: TFRecords cannot be
    resynchronised after one. A file with fewer records than the manifest records
    was cut at a record boundary, which TFRecord readers take for its end.
    """
    expected = {split_file: count for split in manifest["splits"]
                for split_file, count in data_pipeline.shard_counts(manifest, split).items()}
    good, problems = {}, []
    for filename in files:
        good[filename], problems_here = scan_shard(filename, manifest, expected.get(filename))
        problems += problems_here
    return good, problems


def scan_shard(filename, manifest, expected_count=None):
    """scan_shards of one file, which should hold `expected_count` records (None: not
    known)."""
    good, problems = [], []
    records = iter(tf.data.TFRecordDataset(filename))
    for index in itertools.count():
        try:
            record = next(records)
        except StopIteration:
            if expected_count is not None and index < expected_count:
                problems.append(f"{filename}: {index} records, the manifest records "
                                f"{expected_count}: the shard was cut short between records")
            break
        except tf.errors.DataLossError as e:
            problems.append(f"{filename}: record {index} and after are corrupt or "
                            f"truncated ({errors.error_text(e)})")
            break
        try:
            data_pipeline.parse_record(record, filename, tuple(manifest["image_shape"]),
                                       len(manifest["classes"]), manifest["dtype"])
            good.append(index)
        except tf.errors.InvalidArgumentError as e:
            problems.append(f"{filename}: record {index}: {errors.error_text(e)}")
    return good, problems


def explain_data_loss(files, manifest, error):
    """tf.data's DataLossError, which names no file, as an InputError naming the shards
    and records at fault."""
    _, problems = scan_shards(files, manifest)
    where = "; ".join(problems) or "no shard fails when read again"
    return errors.InputError(f"{where}. Rerun with --skip_bad_records to skip such records "
                             f"(tf.data said: {errors.error_text(error)})")
