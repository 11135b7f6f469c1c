"""Plates as users have them: an image table with one row per field of view (a file
and a plate folder per channel), an MoA table of treatments, and greyscale TIFFs.

Reads them (exactly, 8- or 16-bit), joins fields to their mechanism of action,
divides them into train and held-out splits, finds each plate's intensity ranges
and scales fields with them. The converter (prepare_data.py), training straight
from TIFFs (data_pipeline.py) and prediction (predict.py) all read plates here.
"""
import os
import sys

import numpy as np
import pandas as pd
import tifffile

# Column names of the public BBBC021 tables; --*_column flags name others.
BBBC021_CHANNELS = ("DAPI", "Tubulin", "Actin")
SPLITS = ("compound", "plate", "random")


class InputError(ValueError):
    """Bad input: the message names the table, row or file at fault."""


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
