"""Profiles by the reference protocol (profiles.py) and their figures (profile_scores.py)
on hand-made profiles with known answers, and the written tables read by pycytominer
and copairs unchanged."""
import numpy as np
import pandas as pd
import pycytominer
import pytest
from copairs.map import average_precision

import profile_scores
import profiles
import synthetic_data

# (compound, concentration, MoA, batch, split, angle of its profile in degrees). A at
# 1 uM and at 3 uM are each other's nearest neighbours, and the control is nearer
# still: NSC must pass over both.
TREATMENTS = [
    ("A", "1", "X", "Week1", "eval", 0.0),
    ("A", "3", "X", "Week1", "eval", 1.0),
    ("DMSO", "0", "DMSO", "Week1", "train", 0.5),
    ("B", "1", "X", "Week1", "train", 20.0),
    ("C", "1", "Y", "Week2", "train", 30.0),
    ("D", "1", "Y", "Week2", "eval", 90.0),
    ("E", "1", "X", "Week1", "train", 100.0),
    ("F", "1", "Y", "Week2", "train", 85.0),
]


def hand_made():
    """A field table: two fields per treatment, in one well of a plate of its own,
    whose mean points at the treatment's angle."""
    rows, vectors = [], []
    for compound, concentration, moa, batch, split, angle in TREATMENTS:
        for site, spread in enumerate((-2.0, 2.0), 1):
            rows.append({"compound": compound, "concentration": concentration, "moa": moa,
                         "split": split, "plate": f"{batch}_{compound}{concentration}",
                         "well": "B02", "site": site})
            theta = np.radians(angle + spread)
            vectors.append([np.cos(theta), np.sin(theta)])
    return profiles.field_table(pd.DataFrame(rows), np.array(vectors))


def raw_treatments(fields):
    return profiles.treatment_profiles(profiles.well_profiles(fields))


def screen_with_batches(seed=0, effect=3.0):
    """A field table of the synthetic screen's layout with 2 batches (synthetic_data's
    plan, 7 fields per treatment on 3 plates per batch): each MoA a direction in 32
    dimensions, each field noise about it, and each batch an offset of `effect` times
    the noise."""
    fields = pd.DataFrame(synthetic_data.plan_screen(6, 3, 7, 3, seed, batches=2))
    rng = np.random.default_rng(seed)
    centre = {moa: rng.normal(size=32) for moa in fields["moa"].unique()}
    offset = {batch: rng.normal(size=32) * effect for batch in ("Week1", "Week2")}
    features = np.stack([centre[m] + rng.normal(size=32) * 0.8 + offset[p[:5]]
                         for m, p in zip(fields["moa"], fields["plate"])])
    fields["split"] = np.where(fields["compound"].str.endswith("-3"), "eval", "train")
    return profiles.field_table(fields, features)


def test_wells_are_the_mean_of_their_fields_and_treatments_the_median_of_their_wells():
    fields = pd.DataFrame({"plate": ["P1", "P1", "P2", "P3"], "well": ["B02", "B02", "B02", "C03"],
                           "compound": "a", "concentration": "1", "moa": "X"})
    table = profiles.field_table(fields, np.array([[0.0], [2.0], [10.0], [4.0]]))
    wells = profiles.well_profiles(table)
    assert wells["Image_MCNN_fc512_0"].tolist() == [1.0, 10.0, 4.0]
    assert wells["Metadata_Count"].tolist() == [2, 1, 1]
    treatment = profiles.treatment_profiles(wells).iloc[0]
    assert treatment["Image_MCNN_fc512_0"] == 4.0  # the median of 1, 10 and 4, not the mean 5
    assert treatment["Metadata_Plate"] == "P1;P2;P3" and treatment["Metadata_Count"] == 3


def test_nsc_skips_the_same_compound_and_nscb_the_same_batch():
    figures = profile_scores.nsc_figures(raw_treatments(hand_made()))
    # Held out: A 1 and A 3 find B (an X: right), D finds F (a Y: right). Without the
    # query's batch: A's find C (a Y: wrong), D finds E (an X: wrong).
    assert figures["nsc"] == 1.0 and figures["nsc_queries"] == 3
    assert figures["nscb"] == 0.0 and figures["nscb_queries"] == 3
    # Every treatment a query: B and C find each other and E finds D (wrong); A 1, A 3,
    # D and F are right.
    assert figures["nsc_all"] == 4 / 7 and figures["nsc_all_queries"] == 7
    # The protocol before the reference one (raw field profiles' mean per treatment)
    # gives the same here, one well per treatment: kept as nsc_raw_mean.
    assert profile_scores.score(hand_made(), with_map=False)["nsc_raw_mean"] == 1.0


def test_a_query_with_no_other_batch_is_not_counted():
    fields = hand_made().assign(Metadata_Batch="Week1")
    figures = profile_scores.nsc_figures(raw_treatments(fields))
    assert figures["nscb"] is None and figures["nscb_queries"] == 0
    assert figures["nsc"] == 1.0


def test_batches_are_bbbc021_weeks_or_a_column():
    assert profiles.batch_of("Week4_27481") == "Week4"
    assert profiles.batch_of("Week10-3") == "Week10"
    assert profiles.batch_of("plate7") == "plate7"
    assert profiles.batch_of("Week4_27481", {"Week4_27481": "run2"}) == "run2"
    assert profiles.batch_source({"P1": "run2"}, ["P1"]).startswith("the image table's")
    assert profiles.batch_source(None, ["Week1_a", "Week2_b"]).startswith("the week of")
    assert profiles.batch_source(None, ["Week1_a", "plate7", "plate8"]).startswith(
        "each plate its own batch for 2 plate(s) whose names hold no week")


def test_plate_standardisation_and_tvn_make_the_control_standard():
    wells = profiles.well_profiles(screen_with_batches())
    control = profiles.is_control(wells)
    plate = profiles.normalize(wells, "plate")
    features = profiles.feature_columns(plate)
    for _, rows in plate[control].groupby("Metadata_Plate"):
        np.testing.assert_allclose(rows[features].mean(), 0, atol=1e-5)
        np.testing.assert_allclose(rows[features].std(), 1, rtol=1e-4)
    tvn = profiles.normalize(wells, "tvn")
    whitened = tvn.loc[control, profiles.feature_columns(tvn)].to_numpy(np.float64)
    # 36 control wells, each centred on its plate's 6: 30 directions of their variation.
    assert whitened.shape[1] == 30
    np.testing.assert_allclose(np.cov(whitened, rowvar=False), np.eye(30), atol=1e-4)
    with pytest.raises(ValueError, match="needs wells of the control 'none-here'"):
        profiles.normalize(wells, "tvn", "none-here")


def test_a_batch_effect_costs_nscb_and_normalising_against_the_control_wins_it_back():
    figures = profile_scores.score(screen_with_batches(), with_map=False)
    raw = figures["nsc_by_normalization"]["none"]
    assert raw["nscb"] < raw["nsc"] and raw["nsc_all"] < 1.0
    for method in ("plate", "tvn"):
        assert figures["nsc_by_normalization"][method]["nscb"] == 1.0
    assert figures["profile_normalization"] == "tvn" and figures["nscb"] == 1.0


def test_map_retrieves_active_treatments_and_not_one_that_looks_like_the_control():
    fields = screen_with_batches(effect=0.0)
    inactive = fields["Metadata_Compound"] == "dna-damage-1"
    control_like = fields.loc[profiles.is_control(fields), profiles.feature_columns(fields)]
    fields.loc[inactive, profiles.feature_columns(fields)] = control_like.sample(
        int(inactive.sum()), replace=True, random_state=0).to_numpy()
    figures = profile_scores.score(fields, normalization="none")
    # 30 treatments, all but the control-like compound's 2 retrieved against the
    # control; of the 5 MoAs, all but DNA damage (a third of it control-like) retrieved
    # from the other compounds of their MoA.
    assert figures["map_activity_retrieved"] == pytest.approx(28 / 30)
    assert figures["map_consistency_retrieved"] == pytest.approx(4 / 5)
    clean = profile_scores.score(screen_with_batches(effect=0.0), normalization="none")
    assert clean["map_activity_retrieved"] == 1.0 and clean["map_consistency_retrieved"] == 1.0
    assert clean["map_consistency"] > figures["map_consistency"]


def test_without_control_wells_only_raw_profiles_are_scored():
    fields = hand_made()
    fields = fields[fields["Metadata_MoA"] != "DMSO"].reset_index(drop=True)
    figures = profile_scores.score(fields, with_map=False)
    assert figures["profile_normalization"] == "none"
    assert list(figures["nsc_by_normalization"]) == ["none"] and figures["nsc"] == 1.0


def test_the_written_tables_are_read_by_pycytominer_and_copairs_unchanged(tmp_path):
    fields = screen_with_batches()
    paths = profiles.write_tables(tmp_path, fields, stem="run_")
    assert [p.rsplit("/", 1)[1] for p in paths] == [
        "run_profiles.parquet", "run_well_profiles.parquet", "run_treatment_profiles.parquet"]
    wells = pd.read_parquet(tmp_path / "run_well_profiles.parquet")
    assert {"Metadata_Plate", "Metadata_Well", "Metadata_Compound", "Metadata_Concentration",
            "Metadata_MoA", "Metadata_Batch"} <= set(wells.columns)
    normalised = pycytominer.normalize(wells, features="infer", image_features=True,
                                       meta_features="infer", samples="Metadata_MoA == 'DMSO'",
                                       method="standardize")
    features = profiles.feature_columns(wells)
    control = normalised["Metadata_MoA"] == "DMSO"
    np.testing.assert_allclose(normalised.loc[control, features].mean(), 0, atol=1e-4)
    assert not np.allclose(normalised.loc[~control, features].mean(), 0, atol=0.1)
    meta = wells.drop(columns=features)
    scores = average_precision(meta, wells[features].to_numpy(), ["Metadata_MoA"],
                               ["Metadata_Compound"], [], ["Metadata_MoA"], progress_bar=False)
    assert scores["average_precision"].notna().sum() > 0
    treatments = pd.read_csv(tmp_path / "run_treatment_profiles.csv")
    assert (treatments["Metadata_Normalization"] == "tvn").all()
    assert len(pd.read_csv(tmp_path / "run_profiles.csv")) == len(fields)


def test_nsc_from_the_written_treatment_profiles_in_a_few_lines_of_pandas(tmp_path):
    fields = screen_with_batches()
    figures = profile_scores.score(fields, with_map=False)
    profiles.write_tables(tmp_path, fields)
    assert nsc_by_pandas(pd.read_parquet(tmp_path / "treatment_profiles.parquet")) == (
        figures["nsc"], figures["nscb"], figures["nsc_all"])


def nsc_by_pandas(treatments, control="DMSO"):
    """(NSC, NSCB, NSC of all) of a written treatment table, as a user would redo them."""
    treatments = treatments[treatments["Metadata_MoA"] != control].reset_index(drop=True)
    x = treatments.filter(like="Image_").to_numpy()
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    similarity = pd.DataFrame(x @ x.T)
    trained = set(treatments.loc[treatments["Metadata_Split"].str.contains("train"),
                                 "Metadata_Compound"])
    held_out = ~treatments["Metadata_Compound"].isin(trained)
    batches = treatments["Metadata_Batch"].str.split(";").map(set)

    def accuracy(queries, other_batch):
        right = []
        for q in treatments.index[queries]:
            others = treatments["Metadata_Compound"] != treatments.at[q, "Metadata_Compound"]
            if other_batch:
                others &= batches.map(lambda b: not b & batches[q])
            nearest = similarity.loc[q, others].idxmax()
            right.append(treatments.at[nearest, "Metadata_MoA"] == treatments.at[q, "Metadata_MoA"])
        return float(np.mean(right))
    return (accuracy(held_out, False), accuracy(held_out, True),
            accuracy(np.ones(len(treatments), bool), False))


def test_map_is_none_where_no_treatment_has_two_wells():
    """Each hand-made treatment is one well: no replicates to retrieve each other."""
    figures = profile_scores.score(hand_made(), normalization="none")
    assert figures["map_activity"] is None and figures["map_activity_retrieved"] is None
    assert 0 < figures["map_consistency"] <= 1  # X and Y have treatments of other compounds
