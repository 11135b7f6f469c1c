"""Profiles of fields, wells and treatments by the field's reference protocol, in the
tables the field's tools (pycytominer, copairs) read.

A field's profile is the activation of the M-CNN's `fc_512` layer, the 512 values the
classifier reads (its logits are a linear map of them), as deep-profiling work takes
the layer before the classifier. From there (profile_levels), as DeepProfiler's
BBBC021 evaluation (Moshkov et al., Nat. Commun. 15:1594, 2024) and Ando et al.
("Improving phenotypic measurements in high-content imaging screens", bioRxiv 161422,
2017) do, and docs/profiles.md says where this departs:
  1. a well's profile is the mean of its fields';
  2. wells are normalised against the control's wells (NORMALIZATIONS): "none";
     "plate", each plate's wells standardised by its control wells' mean and spread per
     feature (pycytominer.normalize's "standardize" with samples = the control); "tvn",
     typical variation normalisation (Ando et al. 2017): each plate centred on its
     control wells, then whitened by the principal components of all control wells;
  3. a treatment's (compound and concentration) profile is the median of its wells'.
NSC and NSCB of the treatments, and mAP of the wells and treatments: profile_scores.py.

Tables: one row per field, well or treatment; metadata in pycytominer's names
(METADATA: Metadata_Plate, Metadata_Well, ...), then one column per feature named
Image_<source>_<k>, whole-image features as CellProfiler names them (pycytominer infers
them with image_features=True).
"""
import os
import re

import numpy as np
import pandas as pd

LAYER = "fc_512"
FEATURE_PREFIX = "Image_MCNN_fc512_"
CONTROL_MOA = "DMSO"
# Our field frames' column -> the table's (pycytominer's Metadata_ names).
METADATA = {"plate": "Metadata_Plate", "well": "Metadata_Well", "site": "Metadata_Site",
            "compound": "Metadata_Compound", "concentration": "Metadata_Concentration",
            "moa": "Metadata_MoA", "batch": "Metadata_Batch", "split": "Metadata_Split",
            "table_row": "Metadata_TableRow", "file": "Metadata_File"}
PLATE, WELL, COMPOUND, CONCENTRATION, MOA, BATCH, SPLIT = (METADATA[k] for k in (
    "plate", "well", "compound", "concentration", "moa", "batch", "split"))
TREATMENT = ["compound", "concentration"]
TREATMENT_KEYS = [COMPOUND, CONCENTRATION]
# What each level carries beside its keys; values that differ within one are joined
# with JOIN (a treatment imaged in two batches: "Week1;Week2").
CARRIED = {"wells": [MOA, BATCH, SPLIT],
           "treatments": [MOA, BATCH, PLATE, SPLIT]}
JOIN = ";"
NORMALIZATIONS = ("none", "plate", "tvn")
DEFAULT_NORMALIZATION = "tvn"
# Each level's table beside a run's evaluation or a --profiles prediction, as Parquet
# (pycytominer's and copairs' usual format) and CSV (pandas, R, spreadsheets).
TABLES = {"fields": "profiles", "wells": "well_profiles", "treatments": "treatment_profiles"}
WEEK = re.compile(r"^(Week\d+)[_-]")


def batch_of(plate, batches=None):
    """The batch of `plate`: from `batches` ({plate: batch}, a --batch_column's) where
    given, else the week of a BBBC021 plate name (WeekN_...), else the plate itself."""
    if batches and plate in batches:
        return batches[plate]
    week = WEEK.match(str(plate))
    return week.group(1) if week else str(plate)


def batch_source(batches=None, plates=()):
    """How NSCB's batches of `plates` were found, for the run's output: a phrase."""
    if batches:
        return "the image table's batch column (--batch_column)"
    weeks = sum(bool(WEEK.match(str(p))) for p in set(plates))
    if weeks == len(set(plates)):
        return "the week of each plate's name (WeekN_..., as BBBC021's)"
    return (f"each plate its own batch for {len(set(plates)) - weeks} plate(s) whose names "
            f"hold no week (WeekN_...): give --batch_column at conversion where plates "
            f"share a batch")


def field_table(fields, features, batches=None, names=None, prefix=FEATURE_PREFIX):
    """The field-level table: `fields`' metadata (a frame with plate, well, compound,
    concentration and, where known, site, moa, split, table_row, file) under METADATA's
    names, Metadata_Batch (batch_of its plate), then `features` (fields x features,
    float32) as columns `names` (default: `prefix` and the feature's index)."""
    meta = pd.DataFrame({name: fields[column].astype(str).to_numpy()
                         for column, name in METADATA.items() if column in fields})
    meta[BATCH] = [batch_of(p, batches) for p in fields["plate"]]
    names = list(names) if names is not None else [f"{prefix}{k}"
                                                   for k in range(features.shape[1])]
    return pd.concat([meta, pd.DataFrame(np.asarray(features, np.float32), columns=names)],
                     axis=1)


def feature_columns(table):
    """A profile table's feature columns: those not named Metadata_..."""
    return [c for c in table.columns if not c.startswith("Metadata_")]


def aggregate(table, keys, carried, how):
    """One row per distinct `keys` of `table`: its keys, the `carried` metadata (joined
    with JOIN where they differ within it), Metadata_Count (rows), and the `how`
    ("mean" or "median") of each feature."""
    features = feature_columns(table)
    grouped = table.groupby(keys, sort=True)
    meta = grouped[[c for c in carried if c in table]].agg(
        lambda values: JOIN.join(sorted(set(JOIN.join(values).split(JOIN)))))
    return pd.concat([meta, grouped.size().rename("Metadata_Count"),
                      grouped[features].agg(how).astype(np.float32)], axis=1).reset_index()


def well_profiles(fields):
    """Wells of a field table: the mean of each well's (plate's and well's) fields, of
    each treatment in it (one, but for a table that lists more)."""
    return aggregate(fields, [PLATE, WELL, *TREATMENT_KEYS], CARRIED["wells"], "mean")


def treatment_profiles(wells):
    """Treatments of a well table: the median of each compound and concentration's wells."""
    return aggregate(wells, TREATMENT_KEYS, CARRIED["treatments"], "median")


def is_control(table, control=CONTROL_MOA):
    """Boolean array: the rows of `control`, by MoA where the table has one, else by
    compound."""
    column = MOA if MOA in table else COMPOUND
    return (table[column] == control).to_numpy()


def normalize(wells, method, control=CONTROL_MOA):
    """`wells` with their features normalised against the control's wells by `method`
    (NORMALIZATIONS, module docstring). Raises ValueError for another method, or where
    a method needs control wells and `wells` has none."""
    if method not in NORMALIZATIONS:
        raise ValueError(f"normalisation {method!r}: one of {', '.join(NORMALIZATIONS)}")
    if method == "none":
        return wells
    controls = is_control(wells, control)
    if not controls.any():
        raise ValueError(f"normalisation {method!r} needs wells of the control {control!r}, "
                         f"and there are none")
    features = feature_columns(wells)
    values = wells[features].to_numpy(np.float64)
    centred, spread = centre_on_plate_controls(values, wells[PLATE].to_numpy(), controls)
    values = centred / spread if method == "plate" else whiten(centred, controls)
    names = features if method == "plate" else [f"Image_TVN_{k}"
                                                 for k in range(values.shape[1])]
    return pd.concat([wells.drop(columns=features),
                      pd.DataFrame(values.astype(np.float32), wells.index, names)], axis=1)


def centre_on_plate_controls(values, plates, controls):
    """(values minus their plate's control mean, the spread per feature of each row's
    plate's controls): a plate with fewer than 2 control wells takes the spread of all
    control wells (each centred on its plate), one with none their mean as well; a
    spread of 0 counts as 1."""
    centred, spread = np.empty_like(values), np.empty_like(values)
    pooled_mean = values[controls].mean(axis=0)
    for plate in np.unique(plates):
        rows, mine = plates == plate, controls & (plates == plate)
        centred[rows] = values[rows] - (values[mine].mean(axis=0) if mine.any() else pooled_mean)
    pooled_spread = centred[controls].std(axis=0, ddof=1) if controls.sum() > 1 else None
    for plate in np.unique(plates):
        rows, mine = plates == plate, controls & (plates == plate)
        spread[rows] = (centred[mine].std(axis=0, ddof=1) if mine.sum() > 1 else
                        pooled_spread if pooled_spread is not None else 1.0)
    return centred, np.where(spread > 1e-12, spread, 1.0)


def whiten(centred, controls, floor=1e-6):
    """`centred` in the principal components of its `controls` rows, each divided by the
    control's spread along it: the control's profiles get mean 0 and identity covariance
    (Ando et al. 2017's TVN). Components with a variance below `floor` times the largest
    are dropped (fewer control wells than features leave the rest unmeasured)."""
    reference = centred[controls]
    if len(reference) < 2:
        return centred
    _, singular, axes = np.linalg.svd(reference - reference.mean(axis=0), full_matrices=False)
    variance = singular ** 2 / (len(reference) - 1)
    kept = variance > floor * variance.max()
    return (centred @ axes[kept].T) / np.sqrt(variance[kept])


def profile_levels(fields, control=CONTROL_MOA, normalization=DEFAULT_NORMALIZATION):
    """(wells, treatments) of a field table: raw well profiles, and the treatment
    profiles of the wells normalised by `normalization` (module docstring, steps 1-3),
    with Metadata_Normalization saying which ("none" where there are no control wells)."""
    wells = well_profiles(fields)
    if not is_control(wells, control).any():
        normalization = "none"
    treatments = treatment_profiles(normalize(wells, normalization, control))
    return wells, treatments.assign(Metadata_Normalization=normalization)


def write_tables(folder, fields, control=CONTROL_MOA, normalization=DEFAULT_NORMALIZATION,
                 stem=""):
    """Writes the field, well and treatment tables (TABLES, profile_levels) into `folder`
    as Parquet and CSV, each name prefixed by `stem`; returns the Parquet paths."""
    wells, treatments = profile_levels(fields, control, normalization)
    paths = []
    for level, table in zip(TABLES, (fields, wells, treatments)):
        path = os.path.join(folder, f"{stem}{TABLES[level]}")
        table.to_parquet(path + ".parquet", index=False)
        table.to_csv(path + ".csv", index=False, float_format="%.6g")
        paths.append(path + ".parquet")
    return paths
