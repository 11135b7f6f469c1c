"""NSC and NSCB (profiles.py) on hand-made profiles with known answers."""
import numpy as np
import pandas as pd

import profiles

# (compound, concentration, MoA label, batch, split, angle of its profile in degrees).
# X = 0, Y = 1, the control = 2. A at 1 uM and at 3 uM are each other's nearest
# neighbours, and the control is nearer still: NSC must pass over both.
TREATMENTS = [
    ("A", "1", 0, "Week1", "eval", 0.0),
    ("A", "3", 0, "Week1", "eval", 1.0),
    ("DMSO", "0", 2, "Week1", "train", 0.5),
    ("B", "1", 0, "Week1", "train", 20.0),
    ("C", "1", 1, "Week2", "train", 30.0),
    ("D", "1", 1, "Week2", "eval", 90.0),
    ("E", "1", 0, "Week1", "train", 100.0),
    ("F", "1", 1, "Week2", "train", 85.0),
]


def hand_made():
    """Two fields per treatment whose mean points at the treatment's angle."""
    rows, vectors = [], []
    for compound, concentration, label, batch, split, angle in TREATMENTS:
        for spread in (-2.0, 2.0):
            rows.append({"compound": compound, "concentration": concentration, "label": label,
                         "split": split, "plate": f"{batch}_{compound}{concentration}"})
            theta = np.radians(angle + spread)
            vectors.append([np.cos(theta), np.sin(theta)])
    return pd.DataFrame(rows), np.array(vectors)


def test_treatment_profiles_are_the_mean_of_their_fields_with_their_batches():
    fields, vectors = hand_made()
    treatments, means = profiles.treatment_profiles(fields, vectors)
    assert len(treatments) == len(TREATMENTS) and (treatments["fields"] == 2).all()
    a3 = treatments.index[(treatments["compound"] == "A") & (treatments["concentration"] == "3")][0]
    np.testing.assert_allclose(means[a3], vectors[2:4].mean(axis=0))
    assert treatments.loc[a3, "batches"] == {"Week1"} and treatments.loc[a3, "split"] == "eval"


def test_nsc_skips_the_same_compound_and_nscb_the_same_batch():
    treatments, means = profiles.treatment_profiles(*hand_made())
    figures = profiles.nsc_metrics(treatments, means, control_label=2)
    # Held out: A 1 and A 3 find B (an X: right), D finds F (a Y: right). Without the
    # query's batch: A's find C (a Y: wrong), D finds E (an X: wrong).
    assert figures["nsc"] == 1.0 and figures["nsc_queries"] == 3
    assert figures["nscb"] == 0.0 and figures["nscb_queries"] == 3
    # Every treatment a query: B and C find each other and E finds D (wrong); A 1, A 3,
    # D and F are right.
    assert figures["nsc_all"] == 4 / 7 and figures["nsc_all_queries"] == 7


def test_a_query_with_no_other_batch_is_not_counted():
    fields, vectors = hand_made()
    fields["plate"] = "Week1_01"  # one batch: NSCB has nothing to match against
    treatments, means = profiles.treatment_profiles(fields, vectors)
    figures = profiles.nsc_metrics(treatments, means, control_label=2)
    assert figures["nscb"] is None and figures["nscb_queries"] == 0
    assert figures["nsc"] == 1.0


def test_batches_are_bbbc021_weeks_or_a_column():
    assert profiles.batch_of("Week4_27481") == "Week4"
    assert profiles.batch_of("Week10-3") == "Week10"
    assert profiles.batch_of("plate7") == "plate7"
    assert profiles.batch_of("Week4_27481", {"Week4_27481": "run2"}) == "run2"
