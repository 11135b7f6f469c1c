"""Converts plates of greyscale TIFFs, described by BBBC021-style tables, to training shards.

    python prepare_data.py --image_table BBBC021_v1_image.csv --moa_table BBBC021_v1_moa.csv \\
        --image_root DIR --output_dir DIR [--split compound|plate|random] [--include_dmso]

The image table has one row per field of view and, per channel, a file name and a
plate folder (root / PathName / FileName); --table_layout=cellprofiler reads
CellProfiler's LoadData CSVs (FileName_<channel>, PathName_<channel>, absolute or
under --image_root, Metadata_Plate, ...). The MoA table gives the mechanism of
action of each treatment (compound, concentration). Fields of annotated treatments
are read exactly (8- or 16-bit), stacked in --channels order, divided by their
plate's illumination function where --illumination=per_plate (illumination.py; the
functions are saved as images in the data set's illumination/ folder), scaled to
--dtype with robust per-plate (or per-channel) percentiles and written as shards,
with a manifest and fields.csv saying which split each field went to. The output appears
only when complete; a rerun with the same inputs and flags resumes where it stopped.
"""
import concurrent.futures
import contextlib
import hashlib
import json
import multiprocessing
import os
import signal
import sys
import threading
import time

import data_pipeline
import errors
import illumination
import intensity
import plates
import tiffs

FIELDS_CSV = "fields.csv"


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_plan(fields, images_per_shard):
    """[(file name, field indices)] per split, in a deterministic order."""
    plan = []
    for split in ("train", "eval"):
        members = fields.index[fields["split"] == split]
        for number, start in enumerate(range(0, len(members), images_per_shard)):
            plan.append((f"{split}-{number:05d}.tfrecord",
                         list(members[start:start + images_per_shard])))
    return plan


def write_shard(path, rows, data, dtype, class_index):
    """Reads, bins, scales and writes one shard's fields (atomically: tmp, then rename);
    `data` is the description of plates.prepare_fields."""
    def examples():
        for row in rows:
            image = intensity.prepared_field(tiffs.field_planes(row, data["channels"]),
                                          row["table_row"], row["plate"], data, dtype)
            yield image, class_index[row["moa"]], {
                k: str(row[k]) for k in data_pipeline.TEXT_FIELDS}

    data_pipeline.write_shard(path, examples())
    return len(rows)


def fingerprint(**inputs):
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def convert(image_table, moa_table, image_root, output_dir, options=None, dtype="uint8",
            images_per_shard=16, workers=None, progress=print):
    """Converts plates to a data set in `output_dir` as `options` (plates.ConversionOptions)
    say; returns its manifest, which records them."""
    options = options or plates.ConversionOptions()
    if os.path.exists(os.path.join(output_dir, data_pipeline.MANIFEST)):
        raise errors.InputError(f"{output_dir} already holds a data set; choose another "
                                f"--output_dir")
    fields, data = plates.prepare_fields(image_table, moa_table, image_root, options)
    classes, channels, split = data["classes"], data["channels"], options.split
    sources = {"image_table": file_sha256(image_table), "moa_table": file_sha256(moa_table)}
    staging = f"{os.path.abspath(output_dir)}.partial-" + fingerprint(
        sources=sources, image_root=os.path.abspath(image_root), channels=channels,
        columns=options.columns, split=split, eval_fraction=options.eval_fraction,
        control=options.control, include_control=options.include_control, dtype=dtype,
        intensity=data["intensity"], illumination=illumination.settings(data["illumination"]),
        channel_pages=list(options.channel_pages) or None, binning=options.binning,
        images_per_shard=images_per_shard, seed=options.seed)
    plan = shard_plan(fields, images_per_shard)
    fields["shard"] = ""
    for name, indices in plan:
        fields.loc[indices, "shard"] = name
    todo = [(n, i) for n, i in plan if not os.path.exists(os.path.join(staging, n))]
    if len(todo) < len(plan):
        progress(f"Resuming in {staging}: {len(plan) - len(todo)} of {len(plan)} shards done")
    class_index = {name: i for i, name in enumerate(classes)}
    try:
        os.makedirs(staging, exist_ok=True)
        recorded_illumination = illumination.save(data["illumination"], staging, channels)
    except OSError as error:
        raise cannot_write(staging, error) from None
    write_shards(todo, fields, staging, data, dtype, class_index,
                 workers or len(os.sched_getaffinity(0)), progress)

    splits = {side: data_pipeline.split_entry(
        [n for n, _ in plan if n.startswith(side)],
        fields.loc[fields["split"] == side, "moa"].map(class_index), len(classes),
        [len(indices) for n, indices in plan if n.startswith(side)])
        for side in ("train", "eval")}
    manifest = data_pipeline.new_manifest({
        **data, "illumination": recorded_illumination,
        "split": {"by": split, "eval_fraction": options.eval_fraction, "seed": options.seed},
        "sources": {"image_table": os.path.abspath(image_table),
                    "moa_table": os.path.abspath(moa_table),
                    "image_root": os.path.abspath(image_root) if image_root else None,
                    "sha256": sources}}, dtype, splits)
    try:
        fields.drop(columns=[f"{k}_{c}" for c in channels for k in ("path", "page")]).to_csv(
            os.path.join(staging, FIELDS_CSV), index=False)
        data_pipeline.finish_dataset(staging, output_dir, manifest)
    except OSError as error:
        raise cannot_write(staging, error) from None
    return manifest


def write_shards(todo, fields, staging, data, dtype, class_index, workers, progress):
    """Writes the shards `todo` ((name, field indices) of `fields`) into `staging`, by
    `workers` processes (1: this one), saying how far it is as each ends."""
    start, done = time.time(), 0
    total = sum(len(indices) for _, indices in todo)
    jobs = [(os.path.join(staging, name), [fields.loc[i].to_dict() for i in indices], data,
             dtype, class_index) for name, indices in todo]
    try:
        with contextlib.closing(shards_written(jobs, workers)) as written:
            for fields_written in written:
                done += fields_written
                rate = done / (time.time() - start)
                progress(f"  {done}/{total} fields written ({rate:.1f} fields/s)")
    except data_pipeline.WRITE_ERRORS as error:
        raise cannot_write(staging, error) from None
    except KeyboardInterrupt:
        raise errors.Interrupted(
            f"stopped by Ctrl-C: {done} of {total} fields written are kept in {staging}; "
            f"rerun the same command to resume") from None


def shards_written(jobs, workers):
    """The fields each of `jobs` (write_shard's arguments) wrote, as each ends: in this
    process with one worker, else in a pool of `workers` processes, whose shards not yet
    begun are dropped when the caller stops (a failure, Ctrl-C) or closes this."""
    if workers == 1:
        yield from (write_shard(*job) for job in jobs)
        return
    # spawn, not fork: the caller may be an MPI rank with TensorFlow running.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        with ctrl_c_left_to_this_process():  # the workers start here, at the first submit
            futures = [pool.submit(write_shard, *job) for job in jobs]
        try:
            for future in concurrent.futures.as_completed(futures):
                yield future.result()
        except BaseException:  # and GeneratorExit, when the caller closes it
            pool.shutdown(cancel_futures=True)
            raise


@contextlib.contextmanager
def ctrl_c_left_to_this_process():
    """Processes started within ignore SIGINT from their first instruction (an ignored
    signal stays ignored across exec, and Python keeps it so): Ctrl-C reaches the whole
    process group, and this process alone stops the pool and says what is kept, instead
    of a traceback from each worker, even one still importing TensorFlow. Only the main
    thread may set signal handlers: from another (a library caller's), nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)


def cannot_write(staging, error):
    return errors.OutputError(
        f"could not write to {staging}: {errors.error_text(error)}. The shards "
        f"written so far are kept there; free space or fix the folder, then rerun the same "
        f"command to resume")


FEW_RANKS = 8  # two nodes of four ranks: fewer shards than this in a split is worth a word


def main(_):
    manifest = convert(FLAGS.image_table, FLAGS.moa_table, FLAGS.image_root, FLAGS.output_dir,
                       plates.conversion_options(FLAGS, FLAGS.seed), FLAGS.dtype,
                       FLAGS.images_per_shard, FLAGS.workers)
    counts = {side: manifest["splits"][side]["count"] for side in ("train", "eval")}
    print(f"{FLAGS.output_dir}: {counts['train']} train and {counts['eval']} eval fields of "
          f"{manifest['image_shape']} {manifest['dtype']}, {len(manifest['classes'])} classes, "
          f"split by {FLAGS.split}")
    if plates.describe_binning(manifest):
        print(plates.describe_binning(manifest))
    shards = {side: len(manifest["splits"][side]["files"]) for side in ("train", "eval")}
    if min(shards.values()) < FEW_RANKS:
        print(f"{shards['train']} train and {shards['eval']} held-out shards: a run trains on "
              f"at most {min(shards.values())} ranks (each reads whole shards of both); a "
              f"smaller --images_per_shard makes more", file=sys.stderr)


if __name__ == "__main__":
    from absl import flags

    plates.define_conversion_flags(flags)
    flags.DEFINE_string("output_dir", None, "Data set folder to create.")
    flags.DEFINE_enum("dtype", "uint8", ["uint8", "uint16"], "Stored pixel type.")
    flags.DEFINE_integer("images_per_shard", 16, "Fields per TFRecord shard.")
    flags.DEFINE_integer("seed", 0, "Seed of the split and of the range sample.")
    flags.DEFINE_integer("workers", 0, "Processes reading and writing (0: every core).")
    flags.mark_flags_as_required(["image_table", "moa_table", "output_dir"])
    FLAGS = flags.FLAGS
    errors.run_main(main)
