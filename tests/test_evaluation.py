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


def test_profiles_are_written_per_field_and_per_treatment(tmp_path):
    fields = example().assign(plate="Week1_01", well="B02")
    field_profiles = np.arange(10 * 4, dtype=np.float32).reshape(10, 4)
    evaluation.write_report(tmp_path, fields, evaluation.summarize(fields, CLASSES), CLASSES,
                            field_profiles=field_profiles)
    profiles = pd.read_csv(tmp_path / "profiles.csv")
    assert profiles.columns.tolist() == ["plate", "well", "compound", "concentration", "moa",
                                         "f0", "f1", "f2", "f3"]
    by_treatment = pd.read_csv(tmp_path / "treatment_profiles.csv").set_index("compound")
    assert by_treatment.loc["t1", "fields"] == 3 and by_treatment.loc["t1", "moa"] == "A"
    np.testing.assert_allclose(by_treatment.loc["t1", ["f0", "f1", "f2", "f3"]].to_numpy(float),
                               field_profiles[:3].mean(axis=0))


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
    page = evaluation_pictures.draw(tmp_path, "a run", metrics, history, examples, CLASSES)
    text = open(page).read()
    for picture in ("accuracy.png", "confusion.png", "per_class.png", "fields.png"):
        assert f'src="{picture}"' in text and (tmp_path / picture).stat().st_size > 10_000
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
