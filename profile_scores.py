"""The field's figures of profiles (profiles.py): NSC, NSCB and mAP.

NSC, not-same-compound (Ljosa et al., J. Biomol. Screen. 18(10):1321, 2013): each query
treatment's MoA is that of its nearest neighbour by cosine similarity among the
treatments of other compounds; the control is neither query nor neighbour. NSCB,
not-same-compound-or-batch (Ando et al. 2017), also leaves out the treatments imaged in
a batch of the query's. mAP (Kalinin et al., Nat. Commun. 2025, with their `copairs`):
the mean average precision of retrieving a treatment's replicate wells against the
control's (phenotypic activity), and a treatment's MoA among other compounds'
(consistency), each with the share of treatments (or MoAs) whose mAP is significant.

Queries: a supervised model's honest NSC asks only about compounds it never trained on
(the held-out ones), matched against every other compound; "nsc_all" asks about every
treatment, as unsupervised features are reported.
"""
import logging

import numpy as np
import pandas as pd
from copairs.map import average_precision, mean_average_precision
from copairs.matching import UnpairedException

import profiles
from profiles import BATCH, COMPOUND, JOIN, MOA, SPLIT

# Each NSC figure: its name, its queries, and why it can be None.
NSC_FIGURES = {
    "nsc": ("NSC", "held-out treatments", "no held-out compound"),
    "nscb": ("NSCB", "held-out treatments", "no treatment of another batch"),
    "nsc_all": ("NSC of all treatments", "treatments", "one compound"),
}
# mAP's significance: copairs' examples' and Kalinin et al.'s (FDR-corrected p < 0.05),
# the p-value's null distribution of NULL_SIZE draws.
SIGNIFICANCE, NULL_SIZE = 0.05, 10000
MAP_FIGURES = ("map_activity", "map_activity_retrieved", "map_consistency",
               "map_consistency_retrieved")
TREATMENT_ID = "Metadata_Treatment"
REFERENCE = "Metadata_Reference"
logging.getLogger("copairs").setLevel(logging.WARNING)


def nearest_neighbour_accuracy(treatments, queries, control=profiles.CONTROL_MOA,
                               other_batch=False):
    """(accuracy, queries answered): the share of `queries` (a boolean mask over the
    rows of a treatment table) whose nearest neighbour by cosine similarity, among the
    treatments of other compounds (and, with `other_batch`, of no batch of the
    query's), has the query's MoA. The control's treatments are neither queries nor
    neighbours; a query left with no neighbour is not counted. accuracy is None
    without any."""
    values = treatments[profiles.feature_columns(treatments)].to_numpy(np.float64)
    unit = values / np.maximum(np.linalg.norm(values, axis=1, keepdims=True), 1e-12)
    similarity = unit @ unit.T
    moas, compounds = treatments[MOA].to_numpy(), treatments[COMPOUND].to_numpy()
    batches = [frozenset(b.split(JOIN)) for b in treatments[BATCH]]
    usable = ~profiles.is_control(treatments, control)
    hits = answered = 0
    for q in np.flatnonzero(np.asarray(queries) & usable):
        allowed = usable & (compounds != compounds[q])
        if other_batch:
            allowed &= np.array([not (b & batches[q]) for b in batches])
        if not allowed.any():
            continue
        neighbour = np.flatnonzero(allowed)[np.argmax(similarity[q, allowed])]
        hits += moas[neighbour] == moas[q]
        answered += 1
    return (hits / answered if answered else None), answered


def held_out_compounds(treatments):
    """Boolean mask: treatments of compounds none of whose wells were trained on
    (Metadata_Split without "train"); all False in a table without a split."""
    if SPLIT not in treatments:
        return np.zeros(len(treatments), bool)
    trained = set(treatments.loc[treatments[SPLIT].str.contains("train"), COMPOUND])
    return (~treatments[COMPOUND].isin(trained)).to_numpy()


def nsc_figures(treatments, control=profiles.CONTROL_MOA):
    """{"nsc", "nsc_queries", "nscb", "nscb_queries", "nsc_all", "nsc_all_queries"} of
    a treatment table (module docstring); a figure is None where no query had a
    neighbour (a split by field has no unseen compound)."""
    held_out = held_out_compounds(treatments)
    figures = {}
    for name, queries, other_batch in (("nsc", held_out, False), ("nscb", held_out, True),
                                       ("nsc_all", np.ones(len(treatments), bool), False)):
        figures[name], figures[f"{name}_queries"] = nearest_neighbour_accuracy(
            treatments, queries, control, other_batch)
    return figures


def map_figures(wells, treatments, control=profiles.CONTROL_MOA, seed=0):
    """{"map_activity", "map_activity_retrieved", "map_consistency",
    "map_consistency_retrieved"}: copairs' mAP (cosine) of each treatment's wells
    against the control's wells, and of each MoA's treatments against other MoAs'
    (positives of other compounds only), and the share of treatments (MoAs) with an
    FDR-corrected p below SIGNIFICANCE. A figure is None where there are no pairs to
    rank (one well per treatment, one compound per MoA)."""
    figures = dict.fromkeys(MAP_FIGURES)
    wells = wells.assign(**{TREATMENT_ID: wells[COMPOUND] + "@" + wells[
        profiles.CONCENTRATION]})
    controls = profiles.is_control(wells, control)
    # copairs' recipe for phenotypic activity: every control well a reference of its
    # own, so that control wells pair only as negatives.
    wells[REFERENCE] = np.where(controls, np.arange(len(wells)), -1)
    activity = mean_ap(wells, [TREATMENT_ID, REFERENCE], [], [TREATMENT_ID, REFERENCE],
                       [TREATMENT_ID], seed, keep=~controls)
    if activity is not None:
        figures["map_activity"], figures["map_activity_retrieved"] = activity
    kept = treatments[~profiles.is_control(treatments, control)]
    consistency = mean_ap(kept, [MOA], [COMPOUND], [MOA], [MOA], seed)
    if consistency is not None:
        figures["map_consistency"], figures["map_consistency_retrieved"] = consistency
    return figures


def mean_ap(table, pos_sameby, pos_diffby, neg_diffby, groups, seed, keep=None):
    """(mean of the groups' mAP, share of groups significant) of copairs' average
    precision of `table`'s rows, or None where it finds no positive or negative pairs."""
    features = profiles.feature_columns(table)
    meta = table.drop(columns=features).reset_index(drop=True)
    try:
        scores = average_precision(meta, table[features].to_numpy(np.float64), pos_sameby,
                                   pos_diffby, [], neg_diffby, progress_bar=False)
    except UnpairedException:
        return None
    scores = scores[keep if keep is not None else slice(None)].dropna(
        subset=["average_precision"])
    if scores.empty:
        return None
    groups = mean_average_precision(scores, groups, NULL_SIZE, SIGNIFICANCE, seed,
                                    progress_bar=False)
    return (float(groups["mean_average_precision"].mean()),
            float(groups["below_corrected_p"].mean()))


def score(fields, control=profiles.CONTROL_MOA, normalization=profiles.DEFAULT_NORMALIZATION,
          with_map=True, seed=0):
    """Every figure of a field table (profiles.field_table, with MoA): NSC, NSCB and
    NSC of all treatments under `normalization` at the top level, the same under each
    of profiles.NORMALIZATIONS ("nsc_by_normalization"), "nsc_raw_mean" (the
    treatment mean of the raw field profiles, this project's protocol before the
    reference one), and with `with_map` the mAP figures (map_figures) under
    `normalization`. Without control wells, only "none" can be computed, and
    "profile_normalization" says so."""
    wells = profiles.well_profiles(fields)
    usable = (profiles.NORMALIZATIONS if profiles.is_control(wells, control).any()
              else ("none",))
    normalization = normalization if normalization in usable else "none"
    by_normalization, normalised = {}, {}
    for method in usable:
        normalised[method] = profiles.normalize(wells, method, control)
        by_normalization[method] = nsc_figures(profiles.treatment_profiles(
            normalised[method]), control)
    raw_means = profiles.aggregate(fields, profiles.TREATMENT_KEYS,
                                   profiles.CARRIED["treatments"], "mean")
    figures = {**by_normalization[normalization], "profile_normalization": normalization,
               "nsc_by_normalization": by_normalization,
               "nsc_raw_mean": nsc_figures(raw_means, control)["nsc"]}
    if with_map:
        figures.update(map_figures(normalised[normalization], profiles.treatment_profiles(
            normalised[normalization]), control, seed))
    return figures


def describe(metrics):
    """[(name, 'value (N queries)' or 'none (why)')] of the NSC and mAP figures in
    `metrics`, for the run's output and its evaluation page."""
    normalised = (f" ({metrics['profile_normalization']})"
                  if "profile_normalization" in metrics else "")
    lines = [(name + normalised, f"{metrics[key]:.4f} ({metrics[key + '_queries']} {queries})"
              if metrics[key] is not None else f"none ({why_none})")
             for key, (name, queries, why_none) in NSC_FIGURES.items() if key in metrics]
    for key, name, of in (("map_activity", "mAP of activity", "treatments"),
                          ("map_consistency", "mAP of MoA consistency", "MoAs")):
        if metrics.get(key) is not None:
            lines.append((name, f"{metrics[key]:.4f} ({metrics[key + '_retrieved']:.0%} of "
                                f"{of} retrieved at p < {SIGNIFICANCE})"))
    return lines


def comparison_table(metrics):
    """A frame of NSC, NSCB and NSC of all treatments, one row per normalisation of
    `metrics` (score's), then the baselines' rows where `metrics` has them; the mAP
    figures on the rows of the normalisation they were computed under."""
    rows = []
    for name, figures in [("model", metrics), *metrics.get("baselines", {}).items()]:
        for method, nsc in figures.get("nsc_by_normalization", {}).items():
            mine = method == figures.get("profile_normalization")
            rows.append({"profiles": name, "normalisation": method,
                         **{k: nsc[k] for k in NSC_FIGURES},
                         **{k: figures.get(k) if mine else None for k in MAP_FIGURES}})
    return pd.DataFrame(rows)
