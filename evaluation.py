"""Held-out results in the biologists' terms: per field, per MoA class, per treatment.

A treatment is one compound at one concentration; its prediction is the majority
vote of its fields (ties go to the class listed first), as in the MoA literature.
"""
import json
import os

import tf_env  # noqa: F401  (before TensorFlow)
import horovod.tensorflow as hvd
import numpy as np
import pandas as pd
import tensorflow as tf

TREATMENT = ["compound", "concentration"]


def per_class_table(labels, predictions, classes):
    """Precision, recall and support per class (precision 0 where nothing was predicted)."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    rows = []
    for k, name in enumerate(classes):
        hits = int(np.sum((labels == k) & (predictions == k)))
        predicted, support = int(np.sum(predictions == k)), int(np.sum(labels == k))
        rows.append({"class": name, "precision": hits / predicted if predicted else 0.0,
                     "recall": hits / support if support else 0.0, "support": support})
    return pd.DataFrame(rows)


def confusion_table(labels, predictions, classes):
    """Counts with true classes as rows and predicted classes as columns."""
    counts = np.zeros((len(classes), len(classes)), np.int64)
    np.add.at(counts, (np.asarray(labels), np.asarray(predictions)), 1)
    return pd.DataFrame(counts, index=pd.Index(classes, name="true \\ predicted"),
                        columns=list(classes))


def treatment_votes(fields, num_classes):
    """One row per treatment: its true label, its fields and the majority-vote prediction."""
    def vote(group):
        counts = np.bincount(group["prediction"], minlength=num_classes)
        return pd.Series({"label": group["label"].iloc[0], "fields": len(group),
                          "prediction": int(np.argmax(counts))})

    return fields.groupby(TREATMENT, sort=True)[["label", "prediction"]].apply(vote).reset_index()


def summarize(fields, classes, split_by_field=()):
    """Metrics of a frame with label, prediction, compound and concentration per field.

    `split_by_field`: classes whose held-out fields are of compounds seen in training
    (a split by compound of a class with one compound); with any, the per-class table
    says which, and "accuracy_by_compound" is the field accuracy of the other classes
    alone, the honest figure of a split by compound."""
    treatments = treatment_votes(fields, len(classes))
    per_class = per_class_table(fields["label"], fields["prediction"], classes)
    metrics = {
        "fields": len(fields),
        "accuracy": float(np.mean(fields["label"] == fields["prediction"])),
        "treatments": len(treatments),
        "treatment_accuracy": float(np.mean(treatments["label"] == treatments["prediction"])),
        "per_class": per_class,
        "confusion": confusion_table(fields["label"], fields["prediction"], classes),
        "treatment_table": treatments,
        "split_by_field": list(split_by_field),
    }
    if split_by_field:
        per_class["split"] = ["field" if c in split_by_field else "compound" for c in classes]
        by_compound = ~fields["label"].isin([classes.index(c) for c in split_by_field])
        metrics["accuracy_by_compound"] = (float(np.mean(
            fields["label"][by_compound] == fields["prediction"][by_compound]))
            if by_compound.any() else None)
    return metrics


def write_report(folder, fields, metrics, classes, step=None):
    """confusion.csv, per_class.csv, treatments.csv, fields.csv and metrics.json."""
    os.makedirs(folder, exist_ok=True)
    metrics["confusion"].to_csv(os.path.join(folder, "confusion.csv"))
    metrics["per_class"].to_csv(os.path.join(folder, "per_class.csv"), index=False)
    named = metrics["treatment_table"].assign(
        true_moa=lambda t: [classes[k] for k in t["label"]],
        predicted_moa=lambda t: [classes[k] for k in t["prediction"]])
    named.drop(columns=["label", "prediction"]).to_csv(
        os.path.join(folder, "treatments.csv"), index=False)
    fields.assign(true_moa=[classes[k] for k in fields["label"]],
                  predicted_moa=[classes[k] for k in fields["prediction"]]).drop(
        columns=["label", "prediction"]).to_csv(os.path.join(folder, "fields.csv"), index=False)
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump({"step": step, **{k: metrics[k] for k in (
            "fields", "accuracy", "treatments", "treatment_accuracy", "split_by_field",
            "accuracy_by_compound") if k in metrics}}, f, indent=2)


def format_per_class(metrics):
    table = metrics["per_class"].to_string(index=False, float_format=lambda x: f"{x:.3f}")
    apart = metrics["split_by_field"]
    by_compound = metrics.get("accuracy_by_compound")
    honest = (f"; without {', '.join(apart)} (split by field): field accuracy "
              + (f"{by_compound:.4f}" if by_compound is not None else "none left")) if apart else ""
    return (f"field accuracy {metrics['accuracy']:.4f} ({metrics['fields']} fields), "
            f"treatment accuracy {metrics['treatment_accuracy']:.4f} "
            f"({metrics['treatments']} treatments){honest}\n{table}")


def make_predict(model, image_shape, dtype):
    @tf.function(input_signature=[tf.TensorSpec((None, *image_shape), dtype)])
    def predict(images):
        return tf.argmax(model(images, training=False), axis=-1, output_type=tf.int32)
    return predict


def evaluate(predict, batches, classes, split_by_field=()):
    """Metrics of the whole held-out split (summarize): each rank predicts its own
    `batches` (images, labels, provenance), and Horovod gathers every field's result on
    all ranks."""
    mine = []
    for images, labels, provenance in batches:
        columns = {"label": labels.numpy(), "prediction": predict(images).numpy(),
                   **{k: [v.decode() for v in provenance[k].numpy()] for k in provenance}}
        mine.append(pd.DataFrame(columns))
    everyone = hvd.allgather_object(pd.concat(mine) if mine else None, name="eval_fields")
    fields = pd.concat([part for part in everyone if part is not None], ignore_index=True)
    return fields, summarize(fields, classes, split_by_field)
