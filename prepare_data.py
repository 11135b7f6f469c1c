"""Converts plates of greyscale TIFFs, described by BBBC021-style tables, to training shards.

    python prepare_data.py --image_table BBBC021_v1_image.csv --moa_table BBBC021_v1_moa.csv \\
        --image_root DIR --output_dir DIR [--split compound|plate|random] [--include_dmso]

The image table has one row per field of view and, per channel, a file name and a
plate folder (root / PathName / FileName). The MoA table gives the mechanism of
action of each treatment (compound, concentration). Fields of annotated treatments
are read exactly (8- or 16-bit), stacked in --channels order, scaled to --dtype
with robust per-plate (or per-channel) percentiles and written as shards, with a
manifest and fields.csv saying which split each field went to. The output appears
only when complete; a rerun with the same inputs and flags resumes where it stopped.
"""
import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import sys
import time

import numpy as np
import pandas as pd
import tifffile

# Column names of the public BBBC021 tables; --*_column flags name others.
BBBC021_CHANNELS = ("DAPI", "Tubulin", "Actin")
FIELDS_CSV = "fields.csv"
SPLITS = ("compound", "plate", "random")


class InputError(ValueError):
    """Bad input: the message names the table, row or file at fault."""


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def require_columns(table, columns, path):
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing}; it has {list(table.columns)}")


def concentration_key(values):
    # Join on concentrations as numbers: "0.10" in one table is 0.1 in the other.
    return pd.to_numeric(values, errors="coerce").round(9)


def read_fields(image_table, image_root, channels, columns, moa_table=None, control=None,
                include_control=False, missing_moa="skip"):
    """One row per field: plate, well, compound, concentration, [moa], one path per channel.

    `row` is the field's line number in the image table, for error messages.
    """
    images = pd.read_csv(image_table, dtype=str, keep_default_na=False)
    path_columns = [columns["filename"].format(c) for c in channels] + [
        columns["pathname"].format(c) for c in channels]
    require_columns(images, [columns[k] for k in ("compound", "concentration", "plate", "well")]
                    + path_columns, image_table)
    if images.empty:
        raise InputError(f"{image_table}: no rows")
    fields = pd.DataFrame({
        "row": np.arange(len(images)) + 2,  # the header is line 1
        "plate": images[columns["plate"]], "well": images[columns["well"]],
        "compound": images[columns["compound"]],
        "concentration": images[columns["concentration"]],
    })
    for channel in channels:
        fields[f"path_{channel}"] = [
            os.path.join(image_root, folder, name) for folder, name in zip(
                images[columns["pathname"].format(channel)],
                images[columns["filename"].format(channel)])]
    if moa_table is None:
        return fields
    return attach_moa(fields, moa_table, columns, control, include_control, missing_moa)


def attach_moa(fields, moa_table, columns, control, include_control, missing_moa):
    moas = pd.read_csv(moa_table, dtype=str, keep_default_na=False)
    keys = [columns["moa_compound"], columns["moa_concentration"]]
    require_columns(moas, keys + [columns["moa"]], moa_table)
    moas = moas.assign(_conc=concentration_key(moas[keys[1]]))
    duplicated = moas[moas.duplicated([keys[0], "_conc"], keep=False)]
    if not duplicated.empty:
        raise InputError(f"{moa_table}: treatments listed twice, rows "
                         f"{list(duplicated.index + 2)}")
    fields = fields.assign(_conc=concentration_key(fields["concentration"])).merge(
        moas[[keys[0], "_conc", columns["moa"]]].rename(
            columns={keys[0]: "compound", columns["moa"]: "moa"}),
        on=["compound", "_conc"], how="left").drop(columns="_conc")
    fields["moa"] = fields["moa"].fillna("")
    unlabelled = fields[fields["moa"] == ""]
    if not unlabelled.empty:
        treatments = unlabelled.groupby(["compound", "concentration"]).size()
        listing = ", ".join(f"{c} @ {k} ({n} fields)" for (c, k), n in treatments.items())
        message = (f"{len(treatments)} treatment(s) in the image table have no MoA in "
                   f"{moa_table}: {listing}")
        if missing_moa == "error":
            raise InputError(message)
        print(f"Skipping {len(unlabelled)} fields: {message}", file=sys.stderr)
        fields = fields[fields["moa"] != ""]
    if control and not include_control:
        fields = fields[fields["moa"] != control]
    if fields.empty:
        raise InputError(f"no labelled fields left from the image table and {moa_table}"
                         f"{'' if include_control else f' (the {control} control excluded)'}")
    return fields.reset_index(drop=True)


def assign_split(fields, how, eval_fraction, seed):
    """'train' or 'eval' per field; stratified by MoA; deterministic by seed.

    compound: each MoA's compounds are divided, so no compound is on both sides
    (a class with one compound, like the DMSO control, is split by field instead);
    plate: whole plates; random: fields, stratified by MoA.
    """
    rng = np.random.default_rng(seed)
    split = pd.Series("train", index=fields.index)
    if how == "plate":
        plates = sorted(fields["plate"].unique())
        held = set(rng.permutation(plates)[:held_out_count(len(plates), eval_fraction)])
        split[fields["plate"].isin(held)] = "eval"
        return split
    for moa, members in fields.groupby("moa", sort=True):
        compounds = sorted(members["compound"].unique())
        if how == "compound" and len(compounds) > 1:
            held = set(rng.permutation(compounds)[:held_out_count(len(compounds), eval_fraction)])
            split[members.index[members["compound"].isin(held)]] = "eval"
        else:
            chosen = rng.permutation(members.index)[:held_out_count(len(members), eval_fraction)]
            split[chosen] = "eval"
    return split


def held_out_count(n, fraction):
    """round(n * fraction), but leaving at least one on each side when n > 1."""
    return min(max(round(n * fraction), 1), n - 1) if n > 1 else 0


def read_field(paths, row):
    """The channels of one field stacked as (H, W, C), exactly as stored."""
    planes = []
    for path in paths:
        try:
            plane = tifffile.imread(path)
        except FileNotFoundError:
            raise InputError(f"image table row {row}: {path} does not exist") from None
        except Exception as error:  # tifffile raises many types for damaged files
            raise InputError(f"image table row {row}: cannot read {path}: {error}") from None
        if plane.ndim != 2:
            raise InputError(f"image table row {row}: {path} is not a single greyscale plane "
                             f"(shape {plane.shape})")
        if planes and plane.shape != planes[0].shape:
            raise InputError(f"image table row {row}: {path} is {plane.shape[0]} x "
                             f"{plane.shape[1]}, but {paths[0]} is {planes[0].shape[0]} x "
                             f"{planes[0].shape[1]}")
        planes.append(plane)
    return np.stack(planes, axis=-1)


def channel_percentiles(fields, channels, percentiles, sample_fields, seed):
    """[[low, high] per channel] over up to `sample_fields` fields (pixels subsampled 4x4)."""
    rng = np.random.default_rng(seed)
    chosen = fields.iloc[sorted(rng.permutation(len(fields))[:sample_fields])]
    pixels = np.concatenate([
        read_field([r[f"path_{c}"] for c in channels], r["row"])[::4, ::4].reshape(-1, len(channels))
        for _, r in chosen.iterrows()])
    lows = np.percentile(pixels, percentiles[0], axis=0)
    highs = np.percentile(pixels, percentiles[1], axis=0)
    return [[float(lo), float(max(hi, lo + 1))] for lo, hi in zip(lows, highs)]


def intensity_ranges(fields, channels, percentiles, scaling, sample_fields, seed):
    """{"all": ranges, "plates": {plate: ranges}} (plates only with per_plate scaling)."""
    ranges = {"scaling": scaling, "percentiles": list(percentiles),
              "all": channel_percentiles(fields, channels, percentiles, sample_fields * 4, seed)}
    if scaling == "per_plate":
        ranges["plates"] = {plate: channel_percentiles(members, channels, percentiles,
                                                       sample_fields, seed)
                            for plate, members in fields.groupby("plate", sort=True)}
    return ranges


def scale_to(image, ranges, dtype):
    """Maps each channel's [low, high] to the full range of `dtype`, clipping outside."""
    low, high = np.asarray(ranges, np.float32).T
    unit = np.clip((image.astype(np.float32) - low) / (high - low), 0.0, 1.0)
    return (unit * np.iinfo(dtype).max + 0.5).astype(dtype)


def ranges_for(plate, intensity):
    """The ranges a field of `plate` is scaled with (the overall ones for unseen plates)."""
    return intensity.get("plates", {}).get(plate, intensity["all"])


def shard_plan(fields, images_per_shard):
    """[(file name, field indices)] per split, in a deterministic order."""
    plan = []
    for split in ("train", "eval"):
        members = fields.index[fields["split"] == split]
        for number, start in enumerate(range(0, len(members), images_per_shard)):
            plan.append((f"{split}-{number:05d}.tfrecord",
                         list(members[start:start + images_per_shard])))
    return plan


def write_shard(path, rows, channels, intensity, dtype, class_index):
    """Reads, scales and writes one shard's fields (atomically: tmp, then rename)."""
    import data_pipeline  # TensorFlow only in the processes that write

    def examples():
        for row in rows:
            image = read_field([row[f"path_{c}"] for c in channels], row["row"])
            scaled = scale_to(image, ranges_for(row["plate"], intensity), dtype)
            yield scaled, class_index[row["moa"]], {
                k: row[k] for k in ("compound", "concentration", "plate", "well")}

    data_pipeline.write_shard(path, examples())
    return len(rows)


def fingerprint(**inputs):
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def prepare_fields(image_table, moa_table, image_root, channels=BBBC021_CHANNELS, columns=None,
                   split="compound", eval_fraction=0.2, include_control=False, control="DMSO",
                   missing_moa="skip", scaling="per_plate", percentiles=(0.1, 99.9),
                   range_sample_fields=8, seed=0):
    """(fields with their split, classes, (height, width, channels), intensity ranges)."""
    fields = read_fields(image_table, image_root, list(channels),
                         {**DEFAULT_COLUMNS, **(columns or {})}, moa_table, control,
                         include_control, missing_moa)
    fields["split"] = assign_split(fields, split, eval_fraction, seed)
    for side in ("train", "eval"):
        if not (fields["split"] == side).any():
            raise InputError(f"--split={split} left no {side} fields "
                             f"({len(fields)} fields, --eval_fraction={eval_fraction})")
    first = fields.iloc[0]
    height, width = read_field([first[f"path_{c}"] for c in channels], first["row"]).shape[:2]
    intensity = intensity_ranges(fields, list(channels), percentiles, scaling,
                                 range_sample_fields, seed)
    classes = sorted(fields["moa"].unique())
    return fields, classes, (int(height), int(width), len(channels)), intensity


def convert(image_table, moa_table, image_root, output_dir, channels=BBBC021_CHANNELS,
            columns=None, split="compound", eval_fraction=0.2, include_control=False,
            control="DMSO", missing_moa="skip", dtype="uint8", scaling="per_plate",
            percentiles=(0.1, 99.9), range_sample_fields=8, images_per_shard=16, seed=0,
            workers=None, progress=print):
    """Converts plates to a data set in `output_dir`; returns its manifest."""
    import data_pipeline

    columns = {**DEFAULT_COLUMNS, **(columns or {})}
    channels = list(channels)
    if os.path.exists(os.path.join(output_dir, data_pipeline.MANIFEST)):
        raise InputError(f"{output_dir} already holds a data set; choose another --output_dir")
    fields, classes, image_shape, intensity = prepare_fields(
        image_table, moa_table, image_root, channels, columns, split, eval_fraction,
        include_control, control, missing_moa, scaling, percentiles, range_sample_fields, seed)
    sources = {"image_table": file_sha256(image_table), "moa_table": file_sha256(moa_table)}
    staging = f"{os.path.abspath(output_dir)}.partial-" + fingerprint(
        sources=sources, image_root=os.path.abspath(image_root), channels=channels,
        columns=columns, split=split, eval_fraction=eval_fraction, control=control,
        include_control=include_control, dtype=dtype, intensity=intensity,
        images_per_shard=images_per_shard, seed=seed)
    os.makedirs(staging, exist_ok=True)

    plan = shard_plan(fields, images_per_shard)
    fields["shard"] = ""
    for name, indices in plan:
        fields.loc[indices, "shard"] = name
    todo = [(n, i) for n, i in plan if not os.path.exists(os.path.join(staging, n))]
    if len(todo) < len(plan):
        progress(f"Resuming in {staging}: {len(plan) - len(todo)} of {len(plan)} shards done")
    class_index = {name: i for i, name in enumerate(classes)}
    write_shards(todo, fields, staging, channels, intensity, dtype, class_index,
                 workers or len(os.sched_getaffinity(0)), progress)

    manifest = {
        "format": data_pipeline.FORMAT, "classes": classes,
        "image_shape": list(image_shape), "dtype": dtype,
        "channels": channels, "intensity": intensity,
        "split": {"by": split, "eval_fraction": eval_fraction, "seed": seed},
        "splits": {side: {
            "files": [n for n, _ in plan if n.startswith(side)],
            "count": int((fields["split"] == side).sum()),
            "class_counts": [int(((fields["split"] == side) & (fields["moa"] == c)).sum())
                             for c in classes]} for side in ("train", "eval")},
        "sources": {"image_table": os.path.abspath(image_table),
                    "moa_table": os.path.abspath(moa_table),
                    "image_root": os.path.abspath(image_root),
                    "sha256": sources},
    }
    fields.drop(columns=[f"path_{c}" for c in channels]).to_csv(
        os.path.join(staging, FIELDS_CSV), index=False)
    data_pipeline.finish_dataset(staging, output_dir, manifest)
    return manifest


def write_shards(todo, fields, staging, channels, intensity, dtype, class_index, workers,
                 progress):
    start, done = time.time(), 0
    total = sum(len(indices) for _, indices in todo)
    # spawn, not fork: the caller may be an MPI rank with TensorFlow running.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(write_shard, os.path.join(staging, name),
                               [fields.loc[i].to_dict() for i in indices], channels,
                               intensity, dtype, class_index) for name, indices in todo]
        for future in concurrent.futures.as_completed(futures):
            done += future.result()
            rate = done / (time.time() - start)
            progress(f"  {done}/{total} fields written ({rate:.1f} fields/s)")


DEFAULT_COLUMNS = {
    "filename": "Image_FileName_{}", "pathname": "Image_PathName_{}",
    "compound": "Image_Metadata_Compound", "concentration": "Image_Metadata_Concentration",
    "plate": "Image_Metadata_Plate_DAPI", "well": "Image_Metadata_Well_DAPI",
    "moa_compound": "compound", "moa_concentration": "concentration", "moa": "moa",
}


def define_table_flags(flags):
    """The flags that describe plates and their tables (shared with predict.py)."""
    flags.DEFINE_string("image_table", None, "CSV, one row per field of view.")
    flags.DEFINE_string("image_root", None, "Folder the table's PathName columns are under.")
    flags.DEFINE_list("channels", list(BBBC021_CHANNELS),
                      "Channel names as in the file/path column names, in the order stacked.")
    for key, default in DEFAULT_COLUMNS.items():
        if not key.startswith("moa"):
            flags.DEFINE_string(f"{key}_column", default, f"Image table column: {key}"
                                + (" ({} is the channel)" if "{}" in default else "") + ".")


def table_columns(FLAGS):
    return {key: FLAGS[f"{key}_column"].value for key in DEFAULT_COLUMNS
            if f"{key}_column" in FLAGS}


def define_conversion_flags(flags):
    """The flags that say which fields to take and how (shared with train_mcnn.py)."""
    define_table_flags(flags)
    flags.DEFINE_string("moa_table", None, "CSV: compound, concentration, moa.")
    for key in ("moa_compound", "moa_concentration", "moa"):
        flags.DEFINE_string(f"{key}_column", DEFAULT_COLUMNS[key], f"MoA table column: {key}.")
    flags.DEFINE_enum("split", "compound", SPLITS, "How held-out fields are chosen: by "
                      "compound (no compound on both sides; honest MoA accuracy), plate or field.")
    flags.DEFINE_float("eval_fraction", 0.2, "Share of compounds, plates or fields held out.")
    flags.DEFINE_bool("include_dmso", False, "Keep the control as a class (13 classes on BBBC021).")
    flags.DEFINE_string("control_moa", "DMSO", "The MoA label of the control treatment.")
    flags.DEFINE_enum("missing_moa", "skip", ["skip", "error"],
                      "Treatments without an MoA: list and skip them, or stop.")
    flags.DEFINE_enum("scaling", "per_plate", ["per_plate", "per_channel"],
                      "Intensity ranges per plate and channel, or per channel overall.")
    flags.DEFINE_list("percentiles", ["0.1", "99.9"], "Low and high percentile of the range.")
    flags.DEFINE_integer("range_sample_fields", 8, "Fields per plate read to find the ranges.")


def conversion_options(FLAGS):
    """prepare_fields() arguments from the flags of define_conversion_flags()."""
    return dict(image_table=FLAGS.image_table, moa_table=FLAGS.moa_table,
                image_root=FLAGS.image_root, channels=FLAGS.channels,
                columns=table_columns(FLAGS), split=FLAGS.split,
                eval_fraction=FLAGS.eval_fraction, include_control=FLAGS.include_dmso,
                control=FLAGS.control_moa, missing_moa=FLAGS.missing_moa,
                scaling=FLAGS.scaling, percentiles=[float(p) for p in FLAGS.percentiles],
                range_sample_fields=FLAGS.range_sample_fields)


def main(_):
    manifest = convert(output_dir=FLAGS.output_dir, dtype=FLAGS.dtype,
                       images_per_shard=FLAGS.images_per_shard, seed=FLAGS.seed,
                       workers=FLAGS.workers, **conversion_options(FLAGS))
    counts = {side: manifest["splits"][side]["count"] for side in ("train", "eval")}
    print(f"{FLAGS.output_dir}: {counts['train']} train and {counts['eval']} eval fields of "
          f"{manifest['image_shape']} {manifest['dtype']}, {len(manifest['classes'])} classes, "
          f"split by {FLAGS.split}")


if __name__ == "__main__":
    from absl import app, flags

    define_conversion_flags(flags)
    flags.DEFINE_string("output_dir", None, "Data set folder to create.")
    flags.DEFINE_enum("dtype", "uint8", ["uint8", "uint16"], "Stored pixel type.")
    flags.DEFINE_integer("images_per_shard", 16, "Fields per TFRecord shard.")
    flags.DEFINE_integer("seed", 0, "Seed of the split and of the range sample.")
    flags.DEFINE_integer("workers", 0, "Processes reading and writing (0: every core).")
    flags.mark_flags_as_required(["image_table", "moa_table", "image_root", "output_dir"])
    FLAGS = flags.FLAGS
    app.run(main)
