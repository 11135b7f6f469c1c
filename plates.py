"""Plates as users have them: an image table with one row per field of view (a file
and a plate folder per channel, or one file per field), in BBBC021's or CellProfiler's
layout, and an MoA table of treatments.

Joins fields to their mechanism of action, divides them into train and held-out
splits (splits.py), checks their TIFFs (tiffs.py), estimates their illumination functions
where asked (illumination.py) and each plate's intensity ranges (intensity.py). The
converter (prepare_data.py), training straight from TIFFs (data_pipeline.py) and
prediction (predict.py) all read plates here.
"""
import dataclasses
import os
import re
import sys

import numpy as np
import pandas as pd

from errors import InputError
import illumination
import intensity
import splits
import tiffs

# Column names of the public BBBC021 tables; --*_column flags name others.
BBBC021_CHANNELS = ("DAPI", "Tubulin", "Actin")


def require_columns(table, columns, path, flag_of=None):
    """Raises InputError naming the `columns` `table` lacks, what it has, and (flag_of:
    {column: flag}) the flag that names each."""
    missing = [c for c in columns if c not in table.columns]
    if missing:
        flag_of = flag_of or {}
        named = [f"{c} (--{flag_of[c]} names it)" if c in flag_of else c for c in missing]
        raise InputError(f"{path}: missing column(s) {', '.join(named)}; it has "
                         f"{list(table.columns)}")


def concentration_key(values):
    # Join on concentrations as numbers: "0.10" in one table is 0.1 in the other, and
    # "0,1" (a decimal comma, as Excel writes it in much of Europe) is 0.1 too.
    return pd.to_numeric(pd.Series(values).astype(str).str.replace(",", ".", regex=False),
                         errors="coerce").round(9)


def read_table(path):
    """A CSV table as strings (empty cells ""): comma-separated, or `;`-separated when its
    header has more `;` than `,` (Excel's CSV where the decimal mark is a comma). Raises
    InputError naming the file, and the line of a row that does not parse."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = f.readline()
        separator = ";" if header.count(";") > header.count(",") else ","
        return pd.read_csv(path, dtype=str, keep_default_na=False, sep=separator,
                           encoding="utf-8-sig")
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save "
                         f"it as CSV UTF-8") from None
    except pd.errors.EmptyDataError:
        raise InputError(f"{path}: empty, not a table") from None
    except pd.errors.ParserError as e:
        found = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(e))
        if not found:
            raise InputError(f"{path}: not a CSV table ({str(e).strip()})") from None
        expected, line, saw = found.groups()
        raise InputError(
            f"{path}, line {line}: {saw} values where the header has {expected} columns; a "
            f"value with a {separator!r} in it needs double quotes") from None


SITE_IN_FILE_NAME = re.compile(r"_s(\d+)(?:_|\.|$)")  # BBBC021's Week1_150607_B02_s1_w1...


def field_sites(images, columns, files):
    """Each field's site in its well, as text: the table's site column where it has one
    (CellProfiler's Metadata_Site), else the _sN of its file name (BBBC021's), else ""."""
    if columns.get("site") and columns["site"] in images:
        return images[columns["site"]].astype(str).to_numpy()
    found = [SITE_IN_FILE_NAME.search(os.path.basename(f)) for f in files]
    return [m.group(1) if m else "" for m in found]


def read_fields(image_table, image_root, channels, columns, moa_table=None, control=None,
                include_control=False, missing_moa="skip"):
    """One row per field: table_row (its line in the image table, for messages and
    outputs), plate, well, compound, concentration, one path per channel (path_<channel>),
    file (the first channel's, as the table names it), site (field_sites), batch where
    columns name one,
    and, with `moa_table`, moa.
    A PathName that is absolute (as CellProfiler writes them) is not under image_root."""
    images = read_table(image_table)
    flag_of = {columns[k].format(c): f"{k}_column" for k in ("filename", "pathname")
               for c in channels}
    flag_of.update({columns[k]: f"{k}_column" for k in ("compound", "concentration", "plate",
                                                           "well")})
    require_columns(images, list(flag_of), image_table, flag_of)
    if images.empty:
        raise InputError(f"{image_table}: no rows")
    fields = pd.DataFrame({
        "table_row": np.arange(len(images)) + 2,  # the header is line 1
        "plate": images[columns["plate"]], "well": images[columns["well"]],
        "compound": images[columns["compound"]],
        "concentration": images[columns["concentration"]],
    })
    for channel in channels:
        fields[f"path_{channel}"] = [
            os.path.join(image_root or "", local_path(folder), local_path(name))
            for folder, name in zip(images[columns["pathname"].format(channel)],
                                    images[columns["filename"].format(channel)])]
    if columns.get("batch"):
        require_columns(images, [columns["batch"]], image_table,
                        {columns["batch"]: "batch_column"})
        fields["batch"] = images[columns["batch"]]
    # A field's identity in outputs: the table's line and its first channel's file.
    first = channels[0]
    fields["file"] = [os.path.join(folder, name) for folder, name in zip(
        images[columns["pathname"].format(first)], images[columns["filename"].format(first)])]
    fields["site"] = field_sites(images, columns, fields["file"])
    refuse_repeated_files(fields, channels, image_table)
    if moa_table is None:
        return fields
    return attach_moa(fields, moa_table, columns, control, include_control, missing_moa)


def local_path(path):
    """A table's path with Windows separators (`Week1\\Week1_22123`, as CellProfiler on
    Windows writes them, CellProfiler#1385) read as this system's."""
    return path.replace("\\", os.sep) if os.sep == "/" else path


def refuse_repeated_files(fields, channels, image_table):
    """Raises InputError naming the rows that list a file another row lists too: the
    same field twice would be trained on twice, or both trained on and held out."""
    paths = pd.concat([fields[["table_row", f"path_{c}"]].set_axis(["table_row", "path"], axis=1)
                       for c in channels])
    paths["path"] = paths["path"].map(os.path.normpath)
    paths = paths.drop_duplicates()  # one file may hold all of a field's channels
    repeated = paths[paths.duplicated("path", keep=False)]
    if repeated.empty:
        return
    groups = repeated.groupby("path", sort=False)["table_row"].apply(sorted)
    listing = "; ".join(f"rows {', '.join(map(str, rows))}: {path}"
                        for path, rows in list(groups.items())[:3])
    more = f" (and {len(groups) - 3} more files)" if len(groups) > 3 else ""
    raise InputError(f"{image_table}: the same file on more than one row, as if a field were "
                     f"listed twice: {listing}{more}; list each field once")


def attach_moa(fields, moa_table, columns, control, include_control, missing_moa):
    moas = read_table(moa_table)
    keys = [columns["moa_compound"], columns["moa_concentration"]]
    require_columns(moas, keys + [columns["moa"]], moa_table, {
        columns[k]: f"{k}_column" for k in ("moa_compound", "moa_concentration", "moa")})
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
    unmatched = report_unmatched_moa_rows(moas, keys, fields, moa_table)
    if missing_moa == "skip":
        refuse_another_screens_table(moas, unmatched, columns["moa"], moa_table, control)
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


def name_key(name):
    """A compound name as a near match sees it: case, and spaces around and between
    words, ignored."""
    return " ".join(name.split()).casefold()


def report_unmatched_moa_rows(moas, keys, fields, moa_table):
    """Lists (on stderr) the MoA table's rows that match no field of the image table,
    each with the image table's compound of the same name but for case and spaces."""
    matched = set(zip(fields["compound"], concentration_key(fields["concentration"])))
    compound_column, concentration_column = keys
    unmatched = moas[[(c, k) not in matched for c, k in zip(moas[compound_column], moas["_conc"])]]
    if unmatched.empty:
        return unmatched
    near = {name_key(c): c for c in fields["compound"].unique()}
    listing = []
    for index, row in unmatched.iterrows():
        compound = row[compound_column]
        guess = near.get(name_key(compound))
        hint = f" (the image table has {guess!r})" if guess is not None and guess != compound else ""
        listing.append(f"row {index + 2}: {compound!r} @ {row[concentration_column]}{hint}")
    print(f"{moa_table}: {len(listing)} row(s) match no treatment of the image table: "
          f"{'; '.join(listing)}", file=sys.stderr)
    return unmatched


def refuse_another_screens_table(moas, unmatched, moa_column, moa_table, control):
    """Raises InputError when the MoA table looks like another screen's: most of its
    treatments, or every treatment of an MoA, match no field of the image table."""
    labelled = moas[moas[moa_column] != control]
    lost = sorted(set(labelled[moa_column]) - set(labelled.drop(unmatched.index, errors="ignore")[
        moa_column]))
    if len(unmatched) * 2 <= len(moas) and not lost:
        return
    whole = f"; no field of {len(lost)} MoA(s): {', '.join(lost[:5])}" if lost else ""
    raise InputError(
        f"{moa_table}: {len(unmatched)} of its {len(moas)} treatments match no field of the "
        f"image table{whole}. Is it this screen's MoA table? --missing_moa=skip_any converts "
        f"what matches anyway")


@dataclasses.dataclass(frozen=True)
class ConversionOptions:
    """How plates become training data: which fields (channels, the tables' columns, the
    control, treatments without an MoA), their split, binning, illumination correction
    and intensity ranges. Recorded in the data set's manifest ("conversion"), from
    which prediction reads the table's channels and columns. The flags of
    define_conversion_flags give them (conversion_options)."""
    channels: tuple = BBBC021_CHANNELS
    columns: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_COLUMNS))
    channel_pages: tuple = ()  # the page of each channel in one file per field; () none
    split: str = "compound"
    eval_fraction: float = 0.2
    include_control: bool = False
    control: str = "DMSO"
    missing_moa: str = "skip"
    scaling: str = "per_plate"
    percentiles: tuple = (0.1, 99.9)
    range_sample_fields: int = intensity.SAMPLE_FIELDS
    binning: int = 1
    illumination_method: str = "none"
    illumination_sigma: float = 0.0
    illumination_fields: int = 0
    seed: int = 0

    def __post_init__(self):  # columns given in part are completed with the defaults
        object.__setattr__(self, "columns", {**DEFAULT_COLUMNS, **self.columns})
        object.__setattr__(self, "channels", tuple(self.channels))
        object.__setattr__(self, "channel_pages", tuple(int(p) for p in self.channel_pages or ()))
        object.__setattr__(self, "percentiles", tuple(float(p) for p in self.percentiles))

    def record(self):
        """The options as the manifest records them (JSON writes the tuples as lists)."""
        return dataclasses.asdict(self)


def prepare_fields(image_table, moa_table, image_root, options=None):
    """(fields with their split, the data's description for its manifest: classes,
    channels, image_shape as trained on, field_shape as stored, bin, illumination
    (illumination.estimate with functions, or None), intensity, channel_statistics, and
    the conversion's options). Raises InputError naming the table, row, file or option at
    fault."""
    o = options or ConversionOptions()
    channels, binning, seed = list(o.channels), o.binning, o.seed
    if not channels:
        raise InputError("no channels: --channels names the image table's channels, "
                         "at least one (for BBBC021: DAPI,Tubulin,Actin)")
    if binning < 1:
        raise InputError(f"--bin={binning}: the bin is at least 1 (1: no binning)")
    if o.illumination_method not in illumination.METHODS:
        raise InputError(f"--illumination={o.illumination_method}: one of "
                         f"{', '.join(illumination.METHODS)}")
    fields = read_fields(image_table, image_root, channels, o.columns, moa_table, o.control,
                         o.include_control, o.missing_moa)
    fields = tiffs.check_files(fields, channels, image_table, list(o.channel_pages) or None)
    fields["split"] = splits.assign_split(fields, o.split, o.eval_fraction, seed)
    by_field = splits.split_by_field(fields, o.split)
    splits.announce_split_by_field(fields, by_field, o.control)
    splits.announce_untrained_classes(fields, o.split)
    for side in ("train", "eval"):
        if not (fields["split"] == side).any():
            raise InputError(f"--split={o.split} left no {side} fields "
                             f"({len(fields)} fields, --eval_fraction={o.eval_fraction})")
    first = fields.iloc[0]
    height, width, _ = tiffs.read_field(tiffs.field_planes(first, channels), first["table_row"]).shape
    if min(height, width) < binning:
        raise InputError(f"{image_table} row {first['table_row']}: {height} x {width} fields are "
                         f"smaller than one bin of --bin={binning}")
    correction = None if o.illumination_method == "none" else illumination.estimate(
        fields, channels, binning, o.illumination_sigma, o.illumination_fields, seed)
    read = intensity.field_reader(channels, binning, correction)
    ranges = intensity.intensity_ranges(fields, read, list(o.percentiles), o.scaling,
                                        o.range_sample_fields, seed)
    return fields, {
        "classes": sorted(fields["moa"].unique()), "channels": channels,
        "control": o.control, "plate_batches": plate_batches(fields, image_table),
        "image_shape": [height // binning, width // binning, len(channels)],
        "field_shape": [int(height), int(width)], "bin": binning, "illumination": correction,
        "intensity": ranges, "classes_split_by_field": by_field,
        "channel_pages": list(o.channel_pages) or None, "conversion": o.record(),
        "channel_statistics": intensity.channel_statistics(fields, read, ranges,
                                                           o.range_sample_fields * 4, seed)}


def plate_batches(fields, image_table):
    """{plate: batch} from the fields' batch column, or None without one. Raises
    InputError naming a plate the table puts in more than one batch."""
    if "batch" not in fields:
        return None
    batches = fields.groupby("plate", sort=True)["batch"].unique()
    for plate, names in batches.items():
        if len(names) > 1:
            raise InputError(f"{image_table}: plate {plate} is in batches "
                             f"{', '.join(sorted(names))} (--batch_column): a plate is "
                             f"imaged in one batch")
    return {plate: names[0] for plate, names in batches.items()}


def describe_binning(data):
    """'' without binning, else what was done to the fields of `data` (a manifest), in words."""
    if data.get("bin", 1) == 1:
        return ""
    (height, width), (binned_height, binned_width) = data["field_shape"], data["image_shape"][:2]
    left_over = [f"{n} {side}{'s' * (n > 1)}" for n, side in (
        (height % data["bin"], "row"), (width % data["bin"], "column")) if n]
    return (f"{height} x {width} fields are binned {data['bin']} x {data['bin']} to "
            f"{binned_height} x {binned_width} (the mean of each block"
            + (f"; dropped as left over: {', '.join(left_over)})" if left_over else ")"))


DEFAULT_COLUMNS = {
    "filename": "Image_FileName_{}", "pathname": "Image_PathName_{}",
    "compound": "Image_Metadata_Compound", "concentration": "Image_Metadata_Concentration",
    "plate": "Image_Metadata_Plate_DAPI", "well": "Image_Metadata_Well_DAPI",
    "moa_compound": "compound", "moa_concentration": "concentration", "moa": "moa",
    "batch": "",  # none: NSCB's batch is the plate's week (profiles.batch_of)
    "site": "",  # none: the _sN of a BBBC021 file name (field_sites)
}
# Image-table layouts (--table_layout): the columns of the public BBBC021 tables, or of
# the CSV that CellProfiler's LoadData module reads (its compound and concentration
# columns are whatever Metadata_ a lab adds; these are the usual names).
TABLE_LAYOUTS = {
    "bbbc021": DEFAULT_COLUMNS,
    "cellprofiler": {**DEFAULT_COLUMNS, "filename": "FileName_{}", "pathname": "PathName_{}",
                     "plate": "Metadata_Plate", "well": "Metadata_Well", "site": "Metadata_Site",
                     "compound": "Metadata_Compound",
                     "concentration": "Metadata_Concentration"},
}


def define_table_flags(flags):
    """The flags that describe plates and their tables (shared with predict.py)."""
    flags.DEFINE_string("image_table", None, "CSV, one row per field of view.")
    flags.DEFINE_string("image_root", "", "Folder the table's PathName columns are under "
                        "(not needed where they are absolute, as CellProfiler writes them).")
    flags.DEFINE_enum("table_layout", "bbbc021", list(TABLE_LAYOUTS), "The image table's "
                      "column names: bbbc021 (Image_FileName_<channel>, ...) or cellprofiler "
                      "(LoadData: FileName_<channel>, PathName_<channel>, Metadata_Plate, "
                      "Metadata_Well, Metadata_Compound, Metadata_Concentration); a "
                      "--*_column flag overrides one.")
    flags.DEFINE_list("channels", list(BBBC021_CHANNELS),
                      "Channel names as in the file/path column names, in the order stacked.")
    flags.DEFINE_list("channel_pages", [], "Fields stored one file per field, all channels "
                      "inside (the same file in every channel's columns, or "
                      "--filename_column without {}): the page of each of --channels, where "
                      "the files do not name their channels (OME-TIFF, ImageJ labels do).")
    for key, default in DEFAULT_COLUMNS.items():
        if not key.startswith("moa") and key not in ("batch", "site"):
            flags.DEFINE_string(f"{key}_column", default, f"Image table column: {key}"
                                + (" ({} is the channel)" if "{}" in default else "") + ".")
    flags.DEFINE_string("batch_column", "", "Image table column of each plate's batch, "
                        "which NSCB keeps apart; default: the week of a BBBC021 plate name "
                        "(Week4_27481: Week4), else the plate.")
    flags.DEFINE_string("site_column", "", "Image table column of each field's site in its "
                        "well (profiles' Metadata_Site); default: the _sN of a file name "
                        "(BBBC021's), else none.")


def table_columns(flag_values, layout=None):
    """{key: column name}: --table_layout's (or `layout`, {key: column}), but for the
    --*_column flags given (`flag_values`: absl's FlagValues)."""
    layout = layout or TABLE_LAYOUTS[flag_values.table_layout]
    flag_of = {key: flag_values[f"{key}_column"] for key in layout
               if f"{key}_column" in flag_values}
    return {key: flag.value if flag.present else layout[key] for key, flag in flag_of.items()}


def define_conversion_flags(flags):
    """The flags that say which fields to take and how (shared with train_mcnn.py)."""
    define_table_flags(flags)
    flags.DEFINE_string("moa_table", None, "CSV: compound, concentration, moa.")
    for key in ("moa_compound", "moa_concentration", "moa"):
        flags.DEFINE_string(f"{key}_column", DEFAULT_COLUMNS[key], f"MoA table column: {key}.")
    flags.DEFINE_enum("split", "compound", splits.SPLITS, "How held-out fields are chosen: by "
                      "compound (no compound on both sides; honest MoA accuracy), plate or field.")
    flags.DEFINE_float("eval_fraction", 0.2, "Share of compounds, plates or fields held out.")
    flags.DEFINE_bool("include_dmso", False, "Keep the control as a class (13 classes on BBBC021).")
    flags.DEFINE_string("control_moa", "DMSO", "The MoA label of the control treatment.")
    flags.DEFINE_enum("missing_moa", "skip", ["skip", "skip_any", "error"],
                      "Treatments without an MoA: skip: list and skip them, but stop when "
                      "the MoA table looks like another screen's (most of its treatments, "
                      "or all of one MoA's, match no field); skip_any: skip however many; "
                      "error: stop at any.")
    flags.DEFINE_enum("scaling", "per_plate", ["per_plate", "per_channel"],
                      "Intensity ranges per plate and channel, or per channel overall.")
    flags.DEFINE_list("percentiles", ["0.1", "99.9"], "Low and high percentile of the range.")
    flags.DEFINE_integer("range_sample_fields", intensity.SAMPLE_FIELDS,
                         "Fields per plate read to find the ranges.")
    flags.DEFINE_integer("bin", 1, "Average each N x N block of pixels (2: 2160 x 2160 fields "
                         "train as 1080 x 1080, at about a quarter of the compute).", lower_bound=1)
    flags.DEFINE_enum("illumination", "none", illumination.METHODS, "per_plate: divide each "
                      "field by its plate's illumination function per channel (CellProfiler's "
                      "recipe: the mean of the plate's fields, Gaussian-smoothed, mean 1), "
                      "saved as images beside the data set and with the model.")
    flags.DEFINE_float("illumination_sigma", 0.0, "The smoothing Gaussian's sigma in pixels "
                       "of the (binned) field; 0: an eighth of its shorter side.", lower_bound=0)
    flags.DEFINE_integer("illumination_fields", 0, "Fields averaged per plate (a random "
                         "sample); 0: all of them, as CellProfiler does.", lower_bound=0)


def conversion_options(flag_values, seed=None):
    """The ConversionOptions that the flags of define_conversion_flags() give
    (`flag_values`: absl's FlagValues), with `seed`, if given, for the split's."""
    v = flag_values
    return ConversionOptions(
        channels=v.channels, columns=table_columns(v), channel_pages=v.channel_pages,
        split=v.split, eval_fraction=v.eval_fraction, include_control=v.include_dmso,
        control=v.control_moa, missing_moa=v.missing_moa, scaling=v.scaling,
        percentiles=v.percentiles, range_sample_fields=v.range_sample_fields, binning=v.bin,
        illumination_method=v.illumination, illumination_sigma=v.illumination_sigma,
        illumination_fields=v.illumination_fields, **({} if seed is None else {"seed": seed}))