"""The training data format (TFRecord shards + JSON manifest) and its tf.data input.

A data set is a folder:
  manifest.json            classes, image shape and dtype, splits with their shards and counts
  train-00000.tfrecord ... one tf.train.Example per field of view (see FEATURES)
  eval-00000.tfrecord  ...

Each rank reads its own subset of a split's shards (rank r of n takes shards
r, r+n, ...), so shards must be at least as many as ranks.
"""
import contextlib
import dataclasses
import fcntl
import json
import math
import os
import re

import numpy as np
import tf_env  # noqa: F401  (before TensorFlow)
import tensorflow as tf

import errors
import intensity

MANIFEST = "manifest.json"
FORMAT = "mcnn-tfrecord-v1"
# A field's provenance; table_row, file and site ("" in data sets converted before them)
# say which field of the image table it is: its line, its first channel's file, its site.
TEXT_FIELDS = ("compound", "concentration", "plate", "well", "table_row", "file", "site")
FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),  # raw H x W x C bytes, row-major
    "height": tf.io.FixedLenFeature([], tf.int64),
    "width": tf.io.FixedLenFeature([], tf.int64),
    "channels": tf.io.FixedLenFeature([], tf.int64),
    "label": tf.io.FixedLenFeature([], tf.int64),
    **{name: tf.io.FixedLenFeature([], tf.string, default_value="") for name in TEXT_FIELDS},
}
DTYPES = {"uint8": tf.uint8, "uint16": tf.uint16}


@dataclasses.dataclass(frozen=True)
class Feed:
    """How one rank reads a split: its share of the shards, the batch, and for training
    the order (shuffled, augmented, repeated). With provenance, batches also carry
    each field's compound, concentration, plate and well."""
    batch_size: int
    rank: int = 0
    num_ranks: int = 1
    training: bool = False
    provenance: bool = False
    seed: int = 0
    shuffle_buffer: int = 64
    intensity_jitter: float = 0.0
    shift: float = 0.0
    erase: float = 0.0
    overlay: float = 0.0


# ---------------------------------------------------------------- writing

# What writing a file can raise: the OS's errors, and TensorFlow's file writers' own.
WRITE_ERRORS = (OSError, tf.errors.OpError)


def encode_example(image, label, provenance=None):
    """One field of view as a serialized tf.train.Example; provenance maps TEXT_FIELDS."""
    provenance = provenance or {}
    unknown = set(provenance) - set(TEXT_FIELDS)
    if unknown:
        raise ValueError(f"unknown provenance fields {sorted(unknown)}; known: {TEXT_FIELDS}")
    height, width, channels = image.shape

    def int64(v):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v)]))

    def text(v):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[str(v).encode()]))

    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(
            value=[np.ascontiguousarray(image).tobytes()])),
        "height": int64(height), "width": int64(width), "channels": int64(channels),
        "label": int64(label),
        **{name: text(provenance.get(name, "")) for name in TEXT_FIELDS},
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_shard(path, examples):
    """Writes (image, label, provenance) examples to one shard, atomically: a shard
    that exists is complete."""
    with tf.io.TFRecordWriter(path + ".tmp") as writer:
        for image, label, provenance in examples:
            writer.write(encode_example(image, label, provenance))
    os.replace(path + ".tmp", path)


def finish_dataset(staging, output_dir, manifest):
    """Writes the manifest into `staging` and renames it to `output_dir`: the data set
    appears whole or not at all."""
    with open(os.path.join(staging, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    os.rename(staging, output_dir)


def split_entry(files, labels, num_classes, shard_counts):
    """A split as the manifest records it: its shard `files` (names in the data set's
    folder), its field count, the fields of each class (`labels`, class indices) and
    of each shard (`shard_counts`, so that a shard cut at a record boundary is found)."""
    if len(shard_counts) != len(files) or sum(shard_counts) != len(labels):
        raise ValueError(f"{len(files)} shards of {shard_counts} fields do not hold the "
                         f"split's {len(labels)}")
    return {"files": list(files), "count": len(labels),
            "class_counts": np.bincount(np.asarray(labels, int), minlength=num_classes).tolist(),
            "shard_counts": [int(n) for n in shard_counts]}


def untrained_classes(manifest):
    """{class: held-out fields} of the classes with no training field in the data set
    `manifest` describes (a split by plate, say, that held out the one plate of an MoA);
    {} where the manifest has no class counts."""
    train, held_out = (manifest["splits"].get(s, {}).get("class_counts") for s in ("train", "eval"))
    if not train:
        return {}
    return {name: int(held_out[k]) if held_out else 0
            for k, name in enumerate(manifest["classes"]) if train[k] == 0}


def shard_counts(manifest, split):
    """{shard path: its record count} of `split`, or {} for a data set converted before
    the manifest recorded them."""
    entry = manifest["splits"][split]
    return dict(zip((os.path.join(manifest["source"], f) for f in entry["files"]),
                    entry.get("shard_counts", [])))


def new_manifest(description, dtype, splits):
    """The manifest of a data set of `splits` ({name: split_entry}) stored as `dtype`;
    `description` holds its "classes" (names, in label order) and "image_shape"
    (H, W, C), and whatever else its writer knows of the fields (channels, intensity
    ranges, sources ...)."""
    return {"format": FORMAT, **description, "classes": list(description["classes"]),
            "image_shape": [int(d) for d in description["image_shape"]], "dtype": dtype,
            "splits": splits}


@contextlib.contextmanager
def exclusive_lock(path):
    """Holds an exclusive flock on `path` (many ranks, one writer; released if we die)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


# ---------------------------------------------------------------- reading

def read_manifest(data_dir):
    """Loads and checks manifest.json, adding the folder as "source"; errors name the
    folder and what is wrong."""
    path = os.path.join(data_dir, MANIFEST)
    if not os.path.isdir(data_dir):
        raise errors.InputError(f"data set folder {data_dir} does not exist")
    if not os.path.isfile(path):
        raise errors.InputError(f"{path} not found: {data_dir} is not an M-CNN data set "
                                f"(convert your images first, or omit the data flag for "
                                f"synthetic data)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise errors.InputError(f"{path} is not valid JSON ({e}): was the conversion "
                                f"interrupted?")
    if manifest.get("format") != FORMAT:
        raise errors.InputError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("dtype") not in DTYPES:
        raise errors.InputError(f"{path}: dtype {manifest.get('dtype')!r} is not one of "
                                f"{list(DTYPES)}")
    shape = manifest.get("image_shape")
    if not (isinstance(shape, list) and len(shape) == 3
            and all(isinstance(side, int) and side > 0 for side in shape)):
        raise errors.InputError(f"{path}: image_shape {shape} is not [height, width, channels] "
                                f"of at least 1 each; convert the plates again")
    for split, info in manifest["splits"].items():
        for name in info["files"]:
            shard = os.path.join(data_dir, name)
            if not os.path.isfile(shard):
                raise errors.InputError(f"{path} lists {name} in split {split!r}, "
                                        f"but {shard} does not exist")
            if os.path.getsize(shard) == 0:
                raise errors.InputError(f"{shard} is empty, but {path} lists it in split "
                                        f"{split!r}")
    return {**manifest, "source": data_dir}


def split_files(manifest, split, rank=0, num_ranks=1):
    """This rank's shard files of `split` of the data set `manifest` describes."""
    if split not in manifest["splits"]:
        raise ValueError(f"{manifest['source']} has no split {split!r}; it has "
                         f"{list(manifest['splits'])}")
    files = [os.path.join(manifest["source"], f) for f in manifest["splits"][split]["files"]]
    return rank_files(files, rank, num_ranks)


def tiff_input_error(error):
    """The errors.InputError that make_tiff_dataset's reader raised inside tf.data, out of
    the TensorFlow error that carries it (with a Python traceback); None for others."""
    found = re.search(r"InputError: ([^\n]*)", error.message)
    return errors.InputError(found.group(1).strip()) if found else None


def rank_files(files, rank, num_ranks):
    """Rank `rank` of `num_ranks` takes files rank, rank + num_ranks, ..."""
    if len(files) < num_ranks:
        raise ValueError(f"{len(files)} shard files for {num_ranks} ranks: every rank needs at "
                         f"least one; write the data set with fewer images per shard")
    return files[rank::num_ranks]


def parse_record(record, filename, image_shape, num_classes, dtype="uint8"):
    """Decodes one record to (image, label, provenance), checking it against the manifest."""
    features = tf.io.parse_single_example(record, FEATURES)
    pixels = tf.io.decode_raw(features["image"], DTYPES[dtype])
    height, width, channels = image_shape
    stored = tf.stack([features["height"], features["width"], features["channels"]])
    checks = [
        tf.debugging.Assert(
            tf.reduce_all(tf.equal(stored, tf.constant(image_shape, tf.int64)))
            & tf.equal(tf.size(pixels, out_type=tf.int64), height * width * channels),
            ["A record in", filename, "holds an image of shape", stored, "with",
             tf.size(pixels), f"pixels; the manifest says {list(image_shape)}"]),
        tf.debugging.Assert(
            (features["label"] >= 0) & (features["label"] < num_classes),
            ["A record in", filename, "has label", features["label"],
             f"outside the manifest's {num_classes} classes"]),
    ]
    with tf.control_dependencies(checks):
        image = tf.reshape(pixels, image_shape)
    return image, tf.cast(features["label"], tf.int32), {k: features[k] for k in TEXT_FIELDS}


def augment(image, intensity_jitter=0.0, shift=0.0, erase=0.0, overlay=0.0):
    """Random flips, and transposes for square images: microscopy has no up or left.
    A 90-degree rotation of a non-square field would change its shape, so those
    get the four symmetries of the rectangle, square ones all eight.

    With shift s > 0, the field is also moved by up to s of its height and width
    either way, the border it leaves filled by its mirror image (no seam, nothing
    cropped from the size the model reads): a cell is the same cell anywhere, and
    fc_512 reads each of the merged grid's positions with weights of its own.

    With intensity_jitter j > 0, each channel is also multiplied by its own factor,
    drawn log-uniformly from [1 / (1 + j), 1 + j], and clipped to the dtype: fields
    differ in exposure and staining from field to field and plate to plate, which the
    per-plate scaling does not remove, and an MoA should not be read from them.

    With erase a > 0, a rectangle of the field's shape covering a share of it drawn
    uniformly from [0, a], anywhere inside it, is set to the field's background
    (erased_background): random erasing (Zhong et al., AAAI 2020), so that how densely
    cells lie, which varies from field to field within a treatment, is not read as an MoA.

    With overlay p > 0, a field is, with probability p, overlaid with a copy of itself
    rolled round by a quarter to three quarters of its height and width (overlay_rolled):
    twice its cells, each one as it was, so that density varies twofold within every
    class without a cell being lost, which erasing cannot avoid.
    """
    if overlay > 0:
        image = overlay_rolled(image, overlay)
    image = tf.image.random_flip_left_right(image)
    image = tf.image.random_flip_up_down(image)
    if image.shape[0] == image.shape[1]:
        image = tf.cond(tf.random.uniform([]) < 0.5,
                        lambda: tf.transpose(image, [1, 0, 2]), lambda: image)
    if shift > 0:
        pad = [math.ceil(shift * image.shape[0]), math.ceil(shift * image.shape[1])]
        image = tf.image.random_crop(
            tf.pad(image, [[pad[0]] * 2, [pad[1]] * 2, [0, 0]], mode="REFLECT"), image.shape)
    if erase > 0:
        image = erase_rectangle(image, erase)
    if intensity_jitter > 0:
        spread = math.log1p(intensity_jitter)
        gains = tf.exp(tf.random.uniform([image.shape[-1]], -spread, spread))
        top = image.dtype.max
        image = tf.cast(tf.clip_by_value(tf.cast(image, tf.float32) * gains + 0.5, 0.0, top),
                        image.dtype)
    return image


def make_dataset(manifest, split, feed, good_records=None):
    """(images, labels) batches of this rank's part of `split` of the data set
    `manifest` (read_manifest) describes; with feed.provenance, (images, labels,
    {compound, concentration, plate, well}). With `good_records` (from shard_checks.scan_shards),
    only those records of each file are read.

    Images stay in the stored integer dtype (the model scales them to [0, 1]).
    Training repeats forever with shuffling and augmentation and drops the last
    partial batch; evaluation reads each of this rank's images once, in order.
    """
    files = split_files(manifest, split, feed.rank, feed.num_ranks)
    image_shape = tuple(manifest["image_shape"])
    num_classes = len(manifest["classes"])
    counts = shard_counts(manifest, split)

    def read_file(filename, count_or_good):
        """count_or_good: the file's record count (a shard cut between records would read
        as a shorter one) or, with good_records, the indices of the records to keep."""
        records = tf.data.TFRecordDataset(filename, buffer_size=8 << 20)
        if good_records is not None:
            good = count_or_good
            records = records.take(tf.reduce_max(good) + 1).enumerate().filter(
                lambda i, _: tf.reduce_any(tf.equal(good, i))).map(lambda _, record: record)
        elif counts:
            records = records.apply(tf.data.experimental.assert_cardinality(count_or_good))
        return records.map(lambda record: parse_record(record, filename, image_shape,
                                                       num_classes, manifest["dtype"]))

    if good_records is None:
        ds = tf.data.Dataset.from_tensor_slices(
            (files, tf.constant([counts.get(f, 0) for f in files], tf.int64)))
    else:
        files = [f for f in files if good_records.get(f)]
        if not files:
            raise ValueError(f"no good record left in this rank's shards of {split!r}")
        ds = tf.data.Dataset.from_tensor_slices(
            (files, tf.ragged.constant([good_records[f] for f in files], dtype=tf.int64)))
    if feed.training:
        ds = ds.shuffle(len(files), seed=feed.seed + feed.rank,
                        reshuffle_each_iteration=True).repeat()
    # Read in turn, not in parallel: parallel readers each buffer parsed full-size fields
    # (0.25 GB more at 1024 x 1280), while one reader parses about 130 full-size
    # uint8 fields/s on one core, far more than a rank trains (docs/benchmark.md).
    ds = ds.interleave(read_file, cycle_length=min(len(files), 4), block_length=1)
    if feed.training:
        ds = ds.shuffle(feed.shuffle_buffer, seed=feed.seed + feed.rank)
    return augmented_batches(ds, feed)


def erase_rectangle(image, most):
    """`image` (H, W, C) with one rectangle of its aspect, covering a uniform share in
    [0, `most`] of it, at a uniform place inside it, set to erased_background(image)."""
    height, width = image.shape[0], image.shape[1]
    side = tf.sqrt(tf.random.uniform([], 0.0, most))
    rows = tf.cast(side * height, tf.int32)
    columns = tf.cast(side * width, tf.int32)
    top = tf.random.uniform([], 0, height - rows + 1, tf.int32)
    left = tf.random.uniform([], 0, width - columns + 1, tf.int32)
    y, x = tf.range(height)[:, None], tf.range(width)[None, :]
    inside = (y >= top) & (y < top + rows) & (x >= left) & (x < left + columns)
    return tf.where(inside[..., None], erased_background(image), image)


def overlay_rolled(image, chance):
    """`image` (H, W, C) or, with probability `chance`, overlaid(image, ...) by a uniform
    H/4 to 3H/4 rows and W/4 to 3W/4 columns: a cell narrower than a quarter of the field
    never meets its own copy. Dtype and shape kept."""
    height, width = image.shape[0], image.shape[1]

    def rolled_at_random():
        rows = tf.random.uniform([], height // 4, height - height // 4 + 1, tf.int32)
        columns = tf.random.uniform([], width // 4, width - width // 4 + 1, tf.int32)
        return overlaid(image, rows, columns)
    return tf.cond(tf.random.uniform([]) < chance, rolled_at_random, lambda: image)


def overlaid(images, rows, columns):
    """`images` (..., H, W, C), each the pixel maximum of itself and itself rolled round
    (tf.roll) by `rows` and `columns`: twice its cells, each as it was."""
    return tf.maximum(images, tf.roll(images, [rows, columns], axis=[-3, -2]))


def erased_background(image):
    """(C,) in `image`'s dtype: each channel's 10th percentile over every 8th row and
    column, the level of a field's background where cells cover less than 90% of it."""
    sample = tf.reshape(image[::8, ::8], [-1, image.shape[-1]])
    return tf.sort(sample, axis=0)[tf.shape(sample)[0] // 10]


def augmented_batches(ds, feed):
    """Batches of (image, label, provenance) records; for training, augmented and only
    full ones; without provenance, (image, label) only."""
    if not feed.provenance:
        ds = ds.map(lambda image, label, _: (image, label))
    if feed.training:
        ds = ds.map(lambda image, *rest: (augment(image, feed.intensity_jitter, feed.shift,
                                                  feed.erase, feed.overlay), *rest),
                    num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(feed.batch_size, drop_remainder=feed.training).prefetch(tf.data.AUTOTUNE)


def make_tiff_dataset(fields, manifest, feed):
    """Like make_dataset, but straight from plates: `fields` (plates.prepare_fields rows)
    are read from their TIFFs, binned, corrected and scaled inside tf.data with the
    manifest's channels, bin, illumination functions, intensity ranges, classes and
    dtype. No conversion step, at the cost of decoding TIFFs every epoch."""
    mine = fields.iloc[feed.rank::feed.num_ranks]
    if mine.empty:
        raise ValueError(f"{len(fields)} fields for {feed.num_ranks} ranks: rank {feed.rank} "
                         f"has none")
    channels, dtype, shape = manifest["channels"], manifest["dtype"], manifest["image_shape"]
    class_index = {name: i for i, name in enumerate(manifest["classes"])}

    def load(paths, pages, plate, row):
        return intensity.prepared_field([(p.decode(), int(k)) for p, k in zip(paths, pages)],
                                     int(row), plate.decode(), manifest, dtype)

    def read(columns):
        image = tf.numpy_function(load, [columns["paths"], columns["pages"], columns["plate"],
                                         columns["row"]],
                                  DTYPES[dtype], stateful=False)
        image = tf.ensure_shape(image, shape)
        return image, columns["label"], {k: columns[k] for k in TEXT_FIELDS}

    ds = tf.data.Dataset.from_tensor_slices({
        "paths": np.stack([mine[f"path_{c}"].to_numpy(str) for c in channels], axis=1),
        "pages": np.stack([mine[f"page_{c}"].to_numpy(np.int64) for c in channels], axis=1),
        "row": mine["table_row"].to_numpy(np.int64),
        "label": np.array([class_index[m] for m in mine["moa"]], np.int32),
        **{k: mine[k].to_numpy(str) for k in TEXT_FIELDS},
    })
    if feed.training:
        ds = ds.shuffle(len(mine), seed=feed.seed + feed.rank,
                        reshuffle_each_iteration=True).repeat()
    ds = ds.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=not feed.training)
    return augmented_batches(ds, feed)
