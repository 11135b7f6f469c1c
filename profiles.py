"""Profiles and the field's standard measure on BBBC021: NSC and NSCB.

A field's profile is the activation of the M-CNN's `fc_512` layer, the 512 values the
classifier reads (its logits are a linear map of them), as deep-profiling work takes
the layer before the classifier. A treatment's profile (a compound at a
concentration) is the mean of its fields' profiles.

NSC, not-same-compound (Ljosa et al., J. Biomol. Screen. 18(10), 2013): each query
treatment's MoA is that of its nearest neighbour by cosine similarity among the
treatments of other compounds; the control is neither query nor neighbour. NSCB,
not-same-compound-or-batch (Ando et al., 2017), also leaves out neighbours imaged in
a batch of the query's (BBBC021's batch is the week: plate Week4_27481 is of Week4).
"""
import re

import numpy as np
import pandas as pd

TREATMENT = ["compound", "concentration"]
LAYER = "fc_512"
# CSV, because every tool a biologist uses reads it (pandas, R, spreadsheets) with no
# further dependency; a BBBC021 field's 512 values take about 5 kB of it.
PROFILE_CSVS = ("profiles.csv", "treatment_profiles.csv")
# Each figure of nsc_metrics: its name, its queries, and why it can be None.
NSC_FIGURES = {
    "nsc": ("NSC", "held-out treatments", "no held-out compound"),
    "nscb": ("NSCB", "held-out treatments", "no treatment of another batch"),
    "nsc_all": ("NSC of all treatments", "treatments", "one compound"),
}


def describe_nsc(metrics):
    """[(name, 'value (N queries)' or 'none (why)')] of the NSC figures in `metrics`."""
    return [(name, f"{metrics[key]:.4f} ({metrics[key + '_queries']} {queries})"
             if metrics[key] is not None else f"none ({why_none})")
            for key, (name, queries, why_none) in NSC_FIGURES.items() if key in metrics]
WEEK = re.compile(r"^(Week\d+)[_-]")


def batch_of(plate, batches=None):
    """The batch of `plate`: from `batches` ({plate: batch}, a --batch_column's) where
    given, else the week of a BBBC021 plate name (WeekN_...), else the plate itself."""
    if batches and plate in batches:
        return batches[plate]
    week = WEEK.match(str(plate))
    return week.group(1) if week else str(plate)


def treatment_profiles(fields, profiles, batches=None):
    """(treatments, their profiles): one row per treatment of `fields` (a frame with
    compound, concentration, plate and, optionally, label, moa and split, one row per field)
    with its number of fields, the set of batches its fields were imaged in, and its
    split ("train", "eval", or "both" where its fields are on both sides); and the mean
    of its fields' `profiles` (fields x features), in the same order."""
    keys = fields[TREATMENT].astype(str).agg("\x1f".join, axis=1)
    order = sorted(set(keys))
    index = {key: i for i, key in enumerate(order)}
    rows = np.array([index[k] for k in keys])
    sums = np.zeros((len(order), profiles.shape[1]), np.float64)
    np.add.at(sums, rows, profiles)
    counts = np.bincount(rows, minlength=len(order))
    grouped = fields.assign(_row=rows).groupby("_row", sort=True)
    table = pd.DataFrame({
        "compound": grouped["compound"].first(), "concentration": grouped["concentration"].first(),
        "fields": counts,
        "batches": grouped["plate"].agg(lambda p: frozenset(batch_of(x, batches) for x in p))})
    for column in ("label", "moa"):
        if column in fields:
            table[column] = grouped[column].first()
    if "split" in fields:
        table["split"] = grouped["split"].agg(lambda s: s.iloc[0] if s.nunique() == 1 else "both")
    return table.reset_index(drop=True), sums / counts[:, None]


def nearest_neighbour_accuracy(treatments, profiles, queries, control_label=None,
                               other_batch=False):
    """(accuracy, queries answered): the share of `queries` (a boolean mask over
    `treatments`) whose nearest neighbour by cosine similarity, among the treatments
    of other compounds (and, with `other_batch`, of no batch of the query's), has the
    query's label. Treatments of `control_label` are neither queries nor neighbours;
    a query left with no neighbour is not counted. accuracy is None without any."""
    labels = treatments["label"].to_numpy()
    usable = labels != control_label if control_label is not None else np.ones(len(labels), bool)
    unit = profiles / np.maximum(np.linalg.norm(profiles, axis=1, keepdims=True), 1e-12)
    similarity = unit @ unit.T
    compounds = treatments["compound"].to_numpy()
    batches = treatments["batches"].to_numpy()
    hits = answered = 0
    for q in np.flatnonzero(np.asarray(queries) & usable):
        allowed = usable & (compounds != compounds[q])
        if other_batch:
            allowed &= np.array([not (b & batches[q]) for b in batches])
        if not allowed.any():
            continue
        neighbour = np.flatnonzero(allowed)[np.argmax(similarity[q, allowed])]
        hits += labels[neighbour] == labels[q]
        answered += 1
    return (hits / answered if answered else None), answered


def nsc_metrics(treatments, profiles, control_label=None):
    """NSC and NSCB of the held-out treatments of compounds with no training field (the
    honest figures for a supervised model: compounds it never saw), matched against
    every other compound's treatments, training ones included; and NSC with every
    treatment a query, as unsupervised features are reported. {"nsc", "nsc_queries",
    "nscb", "nscb_queries", "nsc_all", "nsc_all_queries"}; a figure is None where no
    query had a neighbour (a split by field has no unseen compound)."""
    trained = set(treatments.loc[treatments["split"] != "eval", "compound"])
    held_out = (~treatments["compound"].isin(trained)).to_numpy()
    figures = {}
    for name, queries, other_batch in (("nsc", held_out, False), ("nscb", held_out, True),
                                       ("nsc_all", np.ones(len(treatments), bool), False)):
        accuracy, answered = nearest_neighbour_accuracy(treatments, profiles, queries,
                                                        control_label, other_batch)
        figures[name], figures[f"{name}_queries"] = accuracy, answered
    return figures


def profile_tables(fields, field_profiles):
    """(a row per field: plate, well, compound, concentration, table_row, file and moa
    where `fields` has them, then f0, f1, ... of its profile; a row per treatment: its
    compound, concentration, fields, moa where known, and mean profile)."""
    columns = [c for c in ("plate", "well", "compound", "concentration", "table_row", "file",
                           "moa") if c in fields]
    treatments, means = treatment_profiles(fields, field_profiles)
    named = ["compound", "concentration", "fields"] + (["moa"] if "moa" in fields else [])
    return (profile_table(fields, field_profiles, columns),
            profile_table(treatments, means, named))


def profile_table(fields, profiles, columns):
    """`fields`' `columns` beside their profiles, one column per feature (f0, f1, ...)."""
    features = pd.DataFrame(profiles.astype(np.float32),
                            columns=[f"f{i}" for i in range(profiles.shape[1])])
    return pd.concat([fields[columns].reset_index(drop=True), features], axis=1)
