"""Held-out results in the biologists' terms: per field, per MoA class, per treatment,
and NSC / NSCB / mAP of the profiles of every field (profiles.py, profile_scores.py).

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

import profile_scores
import profiles

TREATMENT = profiles.TREATMENT
# The profile figures a run keeps (metrics.json, summary.json's final_...).
PROFILE_FIGURES = [*(k for key in profile_scores.NSC_FIGURES for k in (key, key + "_queries")),
                   "profile_normalization", "nsc_by_normalization", "nsc_raw_mean",
                   *profile_scores.MAP_FIGURES, "nscb_batches", "baselines"]


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


def majority_vote(predictions, num_classes):
    """The class index most of `predictions` (class indices) name; a tie goes to the
    class listed first."""
    return int(np.argmax(np.bincount(np.asarray(predictions, np.int64), minlength=num_classes)))


def treatment_votes(fields, num_classes, means=()):
    """One row per treatment (compound and concentration): its true label (where
    `fields` have one), its fields, their majority-vote prediction and the mean of each
    of their columns in `means` (the p_<class> probabilities, say). Evaluation and
    predict.py count treatments with it."""
    grouped = fields.groupby(TREATMENT, sort=True)
    parts = [grouped["label"].first()] if "label" in fields else []
    parts += [grouped.size().rename("fields"), grouped["prediction"].agg(
        lambda votes: majority_vote(votes, num_classes)).rename("prediction")]
    parts += [grouped[list(means)].mean()] if len(means) else []
    return pd.concat(parts, axis=1).reset_index()


def summarize(fields, classes, split_by_field=(), untrained=()):
    """Metrics of a frame with label, prediction, compound and concentration per field.

    `split_by_field`: classes whose held-out fields are of compounds seen in training
    (a split by compound of a class with one compound); with any, the per-class table
    says which, and "accuracy_by_compound" is the field accuracy of the other classes
    alone, the honest figure of a split by compound. `untrained`: classes with no
    training field; with any, "accuracy_trained_classes" leaves their fields out."""
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
    if untrained:
        per_class["trained"] = [c not in untrained for c in classes]
        trained = ~fields["label"].isin([classes.index(c) for c in untrained])
        metrics["untrained_classes"] = list(untrained)
        metrics["accuracy_trained_classes"] = (float(np.mean(
            fields["label"][trained] == fields["prediction"][trained]))
            if trained.any() else None)
    return metrics


def write_report(folder, fields, metrics, classes, step=None, profile_fields=None,
                 control=None):
    """confusion.csv, per_class.csv, treatments.csv, fields.csv (with each class's
    probability) and metrics.json; with `profile_fields` (profiles.field_table of every
    field, training ones too), the field, well and treatment profiles as
    profiles.write_tables writes them, normalised against `control` as the metrics'."""
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
            "accuracy_by_compound", "untrained_classes", "accuracy_trained_classes",
            *PROFILE_FIGURES) if k in metrics}}, f, indent=2)
    if profile_fields is not None:
        profiles.write_tables(folder, profile_fields, control or profiles.CONTROL_MOA,
                              metrics.get("profile_normalization", "none"))


def format_nsc(metrics):
    """'NSC (tvn) 0.83 (12 held-out treatments); NSCB ...; mAP ...', or '' without."""
    return "; ".join(f"{name} {value}" for name, value in profile_scores.describe(metrics))


def format_per_class(metrics):
    table = metrics["per_class"].to_string(index=False, float_format=lambda x: f"{x:.3f}")
    apart = metrics["split_by_field"]
    by_compound = metrics.get("accuracy_by_compound")
    honest = (f"; without {', '.join(apart)} (split by field): field accuracy "
              + (f"{by_compound:.4f}" if by_compound is not None else "none left")) if apart else ""
    if metrics.get("untrained_classes"):
        trained = metrics["accuracy_trained_classes"]
        honest += (f"; without {', '.join(metrics['untrained_classes'])} (no training "
                   f"field): field accuracy "
                   + (f"{trained:.4f}" if trained is not None else "none left"))
    nsc = f"\n{format_nsc(metrics)}" if "nsc" in metrics else ""
    return (f"field accuracy {metrics['accuracy']:.4f} ({metrics['fields']} fields), "
            f"treatment accuracy {metrics['treatment_accuracy']:.4f} "
            f"({metrics['treatments']} treatments){honest}{nsc}\n{table}")


def make_predict(model, image_shape, dtype):
    """predict(images) -> (logits (N, classes), profiles (N, 512)), both float32: the
    model's output and its profiles.LAYER's."""
    both = tf.keras.Model(model.inputs, [model.output, model.get_layer(profiles.LAYER).output])

    @tf.function(input_signature=[tf.TensorSpec((None, *image_shape), dtype)])
    def predict(images):
        logits, features = both(images, training=False)
        return tf.cast(logits, tf.float32), tf.cast(features, tf.float32)
    return predict


def batch_predictions(predict, images, classes):
    """(a frame of prediction (class index) and p_<class> per image, their profiles
    (images x features)) of one batch; evaluation and predict.py read fields with it."""
    logits, profile = predict(images)
    probabilities = tf.nn.softmax(logits).numpy()
    predicted = pd.DataFrame({"prediction": probabilities.argmax(axis=1),
                              **{f"p_{c}": probabilities[:, k] for k, c in enumerate(classes)}})
    return predicted, profile.numpy()


def predicted_fields(predict, batches, classes, name="fields"):
    """(fields, profiles) of every rank's `batches` (images, labels, provenance),
    gathered on all ranks: a frame of label, prediction, p_<class> and provenance per
    field, and their profiles (fields x features)."""
    mine, features = [], []
    for images, labels, provenance in batches:
        predicted, profile = batch_predictions(predict, images, classes)
        mine.append(predicted.assign(
            **{k: [v.decode() for v in provenance[k].numpy()] for k in provenance}))
        mine[-1].insert(0, "label", labels.numpy())
        features.append(profile)
    part = (pd.concat(mine), np.concatenate(features)) if mine else None
    everyone = [p for p in hvd.allgather_object(part, name=name) if p is not None]
    return (pd.concat([f for f, _ in everyone], ignore_index=True),
            np.concatenate([p for _, p in everyone]))


def profile_fields(held_out, held_out_profiles, training, training_profiles, classes,
                   batches=None, names=None):
    """profiles.field_table of the held-out and training fields (frames of label and
    provenance, and their profiles, fields x features), with their MoA and split;
    `batches`: {plate: batch} where recorded; `names`: the features' (the model's)."""
    fields = pd.concat([held_out.assign(split="eval"), training.assign(split="train")],
                       ignore_index=True)
    fields["moa"] = [classes[k] for k in fields["label"]]
    return profiles.field_table(fields, np.concatenate([held_out_profiles, training_profiles]),
                                batches, names)


def evaluate(predict, batches, classes, split_by_field=(), reference=None, control=None,
             plate_batches=None, untrained=(), with_map=False):
    """(fields, every field's profile table or None, metrics) of the whole held-out
    split (summarize): each rank predicts its own `batches`, and Horovod gathers every
    field's result on all ranks. With `reference` (the training split's batches, as
    `batches`), the metrics have NSC, NSCB and NSC of all treatments too, and with
    `with_map` mAP (profile_scores.score), of the held-out and training fields'
    profiles (the table returned)."""
    fields, field_profiles = predicted_fields(predict, batches, classes, "eval_fields")
    metrics = summarize(fields, classes, split_by_field, untrained)
    table = None
    if reference is not None:
        training, training_profiles = predicted_fields(predict, reference, classes,
                                                       "train_fields")
        table = profile_fields(fields, field_profiles, training, training_profiles, classes,
                               plate_batches)
        metrics.update(profile_scores.score(table, control or profiles.CONTROL_MOA,
                                            with_map=with_map),
                       nscb_batches=profiles.batch_source(plate_batches,
                                                          table[profiles.PLATE]))
    return fields, table, metrics


def example_fields(predict, batches, num_classes, per_class=4, longest_side=640):
    """[(image, true, predicted, probability of the prediction)]: up to `per_class`
    fields of each true class from `batches` (images, labels, provenance), the wrong
    ones first, up to half; images thinned by a whole stride to `longest_side` or less
    (for pictures, so that a grid of full-size fields fits in memory)."""
    right = [[] for _ in range(num_classes)]
    wrong = [[] for _ in range(num_classes)]
    for images, labels, _ in batches:
        logits, _ = predict(images)
        probabilities = tf.nn.softmax(logits).numpy()
        stride = max(1, -(-max(images.shape[1:3]) // longest_side))
        for image, true, p in zip(images.numpy(), labels.numpy(), probabilities):
            kept = (right if p.argmax() == true else wrong)[true]
            if len(kept) < per_class:
                kept.append((image[::stride, ::stride], int(true), int(p.argmax()),
                             float(p.max())))
        if all(len(r) + len(w) >= 2 * per_class for r, w in zip(right, wrong)):
            break
    chosen = []
    for r, w in zip(right, wrong):
        wrong_ones = min(len(w), max(per_class // 2, per_class - len(r)))
        chosen += w[:wrong_ones] + r[:per_class - wrong_ones]
    return chosen
