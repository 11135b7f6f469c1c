"""Train and held-out splits of a screen's fields: by compound (the honest split for
MoA accuracy: no compound on both sides), by plate, or by field; and the classes a
split by compound can only divide field by field, said loudly."""
import sys

import numpy as np
import pandas as pd

SPLITS = ("compound", "plate", "random")


def split_by_field(fields, how):
    """The classes whose fields a split by compound divides field by field, as it must
    when a class has a single compound (the control, or an MoA left with one): their
    held-out fields are of compounds seen in training."""
    if how != "compound":
        return []
    compounds = fields.groupby("moa", sort=True)["compound"].nunique()
    return list(compounds.index[compounds == 1])


def announce_split_by_field(fields, classes, control):
    """Says loudly, on stderr, which MoAs a split by compound could not divide by compound."""
    for moa in classes:
        members = fields[fields["moa"] == moa]
        counts = members["split"].value_counts()
        what = "the control" if moa == control else "an MoA with one compound"
        print(f"--split=compound: {moa!r} is {what} ({members['compound'].iloc[0]}), so its "
              f"fields are split by field: {counts.get('train', 0)} train, "
              f"{counts.get('eval', 0)} held out; held-out results report it apart"
              + ("" if moa == control else ": for an honest split, give it a second compound "
                 "or leave it out"), file=sys.stderr)


def announce_untrained_classes(fields, how):
    """Says on stderr, one line each, which MoAs the split left without a training field."""
    counts = fields.groupby("moa", sort=True)["split"].value_counts().unstack(fill_value=0)
    for moa, row in counts.iterrows():
        if row.get("train", 0) == 0:
            print(f"--split={how}: {moa!r} has no training field ({row.get('eval', 0)} "
                  f"held out, 0 training): no model can learn it; train_mcnn.py refuses "
                  f"this data set unless --allow_untrained_classes", file=sys.stderr)


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
