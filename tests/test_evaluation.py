import numpy as np
import pandas as pd
import pytest

import evaluation
import evaluation_pictures

CLASSES = ["A", "B", "C"]


def example():
    # Two treatments of A (t1: 3 fields, t2: 2), one of B (3 fields), one of C (2 fields).
    return pd.DataFrame({
        "compound":      ["t1", "t1", "t1", "t2", "t2", "t3", "t3", "t3", "t4", "t4"],
        "concentration": ["1"] * 10,
        "label":         [0, 0, 0, 0, 0, 1, 1, 1, 2, 2],
        "prediction":    [0, 0, 1, 1, 2, 1, 1, 0, 2, 2],
    })


def test_per_class_precision_and_recall_by_hand():
    table = evaluation.per_class_table(example()["label"], example()["prediction"], CLASSES)
    # A: 2 of 5 found; 3 predicted A, 2 right.  B: 2 of 3 found; 4 predicted, 2 right.
    # C: 2 of 2 found; 3 predicted, 2 right.
    assert table["recall"].tolist() == pytest.approx([2 / 5, 2 / 3, 1.0])
    assert table["precision"].tolist() == pytest.approx([2 / 3, 1 / 2, 2 / 3])
    assert table["support"].tolist() == [5, 3, 2]


def test_confusion_matrix_has_true_rows_and_predicted_columns():
    confusion = evaluation.confusion_table(example()["label"], example()["prediction"], CLASSES)
    assert confusion.columns.tolist() == CLASSES and confusion.index.tolist() == CLASSES
    assert confusion.values.tolist() == [[2, 2, 1], [1, 2, 0], [0, 0, 2]]


def test_treatment_accuracy_is_the_majority_vote_of_fields():
    metrics = evaluation.summarize(example(), CLASSES)
    votes = metrics["treatment_table"].set_index("compound")["prediction"].to_dict()
    # t2 ties between B and C: the class listed first wins.
    assert votes == {"t1": 0, "t2": 1, "t3": 1, "t4": 2}
    assert metrics["accuracy"] == pytest.approx(0.6)
    assert metrics["treatment_accuracy"] == pytest.approx(0.75)


def test_report_files(tmp_path):
    fields = example()
    evaluation.write_report(tmp_path, fields, evaluation.summarize(fields, CLASSES), CLASSES, 7)
    confusion = pd.read_csv(tmp_path / "confusion.csv", index_col=0)
    assert confusion.columns.tolist() == CLASSES and confusion.loc["A", "B"] == 2
    assert pd.read_csv(tmp_path / "treatments.csv")["predicted_moa"].tolist() == ["A", "B", "B", "C"]
    assert set(pd.read_csv(tmp_path / "fields.csv").columns) >= {"true_moa", "predicted_moa"}
    assert '"step": 7' in (tmp_path / "metrics.json").read_text()


def test_classes_split_by_field_are_reported_apart(tmp_path):
    # C (2 of 2 right) had one compound, so its held-out fields are of a compound seen in
    # training: without it, 4 of 8 fields are right.
    metrics = evaluation.summarize(example(), CLASSES, split_by_field=["C"])
    assert metrics["accuracy"] == pytest.approx(0.6)
    assert metrics["accuracy_by_compound"] == pytest.approx(0.5)
    assert metrics["per_class"]["split"].tolist() == ["compound", "compound", "field"]
    assert "without C (split by field): field accuracy 0.5000" in evaluation.format_per_class(
        metrics)
    evaluation.write_report(tmp_path, example(), metrics, CLASSES)
    assert '"accuracy_by_compound": 0.5' in (tmp_path / "metrics.json").read_text()
    assert "accuracy_by_compound" not in evaluation.summarize(example(), CLASSES)


def test_every_fields_profiles_are_written_per_field_well_and_treatment(tmp_path):
    held_out = example().assign(plate="Week1_01", well="B02", site="1")
    training = held_out.assign(compound=held_out["compound"] + "x", well="C03")
    rng = np.random.default_rng(0)
    table = evaluation.profile_fields(held_out, rng.normal(size=(10, 4)), training,
                                      rng.normal(size=(10, 4)), CLASSES)
    evaluation.write_report(tmp_path, held_out, evaluation.summarize(held_out, CLASSES),
                            CLASSES, profile_fields=table)
    fields = pd.read_parquet(tmp_path / "profiles.parquet")
    assert fields.columns.tolist()[:8] == [
        "Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_Compound",
        "Metadata_Concentration", "Metadata_MoA", "Metadata_Split", "Metadata_Batch"]
    assert len(fields) == 20 and fields["Metadata_Split"].value_counts().to_dict() == {
        "eval": 10, "train": 10}
    assert fields.columns[-1] == "Image_MCNN_fc512_3"
    wells = pd.read_csv(tmp_path / "well_profiles.csv")
    assert len(wells) == 8 and wells["Metadata_Count"].sum() == 20
    by_treatment = pd.read_csv(tmp_path / "treatment_profiles.csv").set_index(
        "Metadata_Compound")
    assert len(by_treatment) == 8 and by_treatment.loc["t1", "Metadata_MoA"] == "A"
    # No control among A, B and C: the treatments' profiles are their wells' raw ones.
    assert (by_treatment["Metadata_Normalization"] == "none").all()


def test_the_evaluation_page_shows_every_picture(tmp_path):
    fields = example()
    metrics = evaluation.summarize(fields, CLASSES)
    metrics.update(nsc=0.75, nsc_queries=4, nscb=None, nscb_queries=0, nsc_all=0.5,
                   nsc_all_queries=8)
    history = [{"epoch": 1, "accuracy": 0.4, "treatment_accuracy": 0.5, "nsc": 0.5},
               {"epoch": 2, "accuracy": 0.6, "treatment_accuracy": 0.75, "nsc": 0.75}]
    rng = np.random.default_rng(0)
    examples = [(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8), k % 3, (k + k // 3) % 3, 0.9)
                for k in range(9)]
    evaluation.write_report(tmp_path, fields, metrics, CLASSES)
    page = evaluation_pictures.draw(tmp_path, evaluation_pictures.about(
        "runs/a_run", "data/screen_by-compound", "compound"), metrics, history, examples,
        CLASSES)
    text = open(page).read()
    for picture in ("accuracy.png", "confusion.png", "per_class.png", "fields.png"):
        assert f'src="{picture}"' in text and (tmp_path / picture).stat().st_size > 10_000
    assert "<title>screen_by-compound: held-out evaluation of a_run</title>" in text
    assert "<td>3: A, B, C</td>" in text and "(split by compound)" in text
    assert "<td>0.7500 (4 held-out treatments)</td>" in text
    assert "<td>none (no treatment of another batch)</td>" in text
    assert '<a href="fields.csv">fields.csv</a>' in text


def test_a_treatment_takes_its_fields_majority_and_a_tie_the_class_listed_first():
    """(predict.py's treatments take the same vote.)"""
    fields = pd.DataFrame({"compound": ["x"] * 4 + ["y"] * 3, "concentration": ["1"] * 7,
                           "label": [1] * 4 + [2] * 3, "prediction": [2, 1, 2, 1, 0, 2, 2]})
    votes = evaluation.treatment_votes(fields, 3)
    assert votes["prediction"].tolist() == [1, 2] and votes["fields"].tolist() == [4, 3]
    assert evaluation.majority_vote([2, 1, 2, 1], 3) == 1
