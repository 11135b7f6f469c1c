import pandas as pd
import pytest

import evaluation

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
