"""Pictures of a held-out evaluation, and one page that ties them together.

Written into MODEL_DIR/evaluation/ beside its CSVs at the end of training, and by
report.py for any finished run: the confusion matrix as a row-normalised heatmap with
counts (confusion.png), each MoA's precision and recall (per_class.png), held-out
accuracy over epochs by field, treatment, NSC and NSCB (accuracy.png), a grid of
held-out fields per MoA as false-colour composites with their true and predicted MoA
(fields.png), and index.html, which opens offline: what its accuracy counts, NSC and
NSCB under each normalisation beside the baselines', and links to the tables.
"""
import html
import os

import numpy as np

import profile_scores
from plots import plt, save

PAGE = "index.html"


def confusion_picture(confusion, path):
    """`confusion` (counts, true classes as rows) as a heatmap of each row's shares,
    every cell labelled with its count."""
    counts = confusion.to_numpy()
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = max(4.5, 2.5 + 0.5 * len(counts))
    figure, axis = plt.subplots(figsize=(size + 1.2, size))
    image = axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (row, column), count in np.ndenumerate(counts):
        axis.text(column, row, str(count), ha="center", va="center", fontsize=8,
                  color="white" if shares[row, column] > 0.6 else "black")
    axis.set_xticks(range(len(counts)), confusion.columns, rotation=45, ha="right", fontsize=8)
    axis.set_yticks(range(len(counts)), confusion.index, fontsize=8)
    axis.set(xlabel="predicted MoA", ylabel="true MoA",
             title="held-out fields by true MoA\ncolour: share of the row; numbers: counts")
    figure.colorbar(image, ax=axis, shrink=0.8)
    save(figure, path, say=lambda _: None)


def per_class_picture(per_class, path):
    """Precision and recall of each MoA as paired horizontal bars."""
    rows = np.arange(len(per_class))
    figure, axis = plt.subplots(figsize=(8, 1.2 + 0.4 * len(per_class)))
    axis.barh(rows - 0.2, per_class["precision"], height=0.4, label="precision")
    axis.barh(rows + 0.2, per_class["recall"], height=0.4, label="recall")
    axis.set_yticks(rows, [f"{c} ({n})" for c, n in zip(per_class["class"], per_class["support"])],
                    fontsize=8)
    axis.invert_yaxis()
    axis.set(xlim=(0, 1), xlabel="precision, recall",
             title="per MoA (its held-out fields in brackets)")
    axis.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    axis.grid(axis="x", alpha=0.3)
    save(figure, path, say=lambda _: None)


def accuracy_picture(history, path):
    """Held-out accuracy of fields, treatments, NSC and NSCB at each evaluation."""
    figure, axis = plt.subplots(figsize=(7, 4))
    epochs = [h["epoch"] for h in history]
    # NSCB dashed over NSC's solid line, so that equal curves both show.
    for key, name, style in (("accuracy", "fields", "-o"), ("treatment_accuracy", "treatments",
                                                            "-o"),
                             ("nsc", "NSC", "-s"), ("nscb", "NSCB", "--^")):
        points = [(e, h[key]) for e, h in zip(epochs, history) if h.get(key) is not None]
        if points:
            axis.plot(*zip(*points), style, markersize=4, label=name, fillstyle="none")
    axis.set(xlabel="epoch", ylabel="held-out accuracy", ylim=(0, 1.02),
             title="held-out accuracy over training")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    save(figure, path, say=lambda _: None)


def composite(image):
    """A field (H, W, C) as RGB in [0, 1]: its first three channels as blue, green and
    red (DNA blue, as microscopists show BBBC021), each stretched between its 1st and
    99.5th percentile."""
    image = np.asarray(image, np.float32)
    planes = [image[..., k] for k in range(min(3, image.shape[-1]))]
    planes += [np.zeros_like(planes[0])] * (3 - len(planes))
    stretched = []
    for plane in planes:
        low, high = np.percentile(plane, [1, 99.5])
        stretched.append(np.clip((plane - low) / max(high - low, 1e-6), 0, 1))
    blue, green, red = stretched
    return np.stack([red, green, blue], axis=-1)


def fields_picture(examples, classes, path, tile_inches=2.4):
    """A grid of held-out fields, a row per true MoA: `examples` is [(image, true,
    predicted, probability of the prediction)], class indices; a wrong one is framed
    red."""
    rows = [[e for e in examples if e[1] == k] for k in range(len(classes))]
    rows = [(k, row) for k, row in enumerate(rows) if row]
    columns = max(len(row) for _, row in rows)
    figure, axes = plt.subplots(len(rows), columns, squeeze=False,
                                figsize=(tile_inches * columns, tile_inches * len(rows) + 0.3))
    for axis in axes.flat:
        axis.set_axis_off()
    for (k, row), line in zip(rows, axes):
        for axis, (image, true, predicted, probability) in zip(line, row):
            axis.imshow(composite(image), interpolation="nearest")
            right = predicted == true
            axis.set_title(f"{classes[true]}\n-> {classes[predicted]} ({probability:.2f})",
                           fontsize=7, color="black" if right else "red")
            if not right:
                axis.set_axis_on()
                axis.set_xticks([])
                axis.set_yticks([])
                for spine in axis.spines.values():
                    spine.set(color="red", linewidth=3)
    figure.suptitle("held-out fields: true MoA -> predicted (probability); wrong ones in red",
                    fontsize=9)
    save(figure, path, say=lambda _: None)


def page(folder, title, figures, pictures, tables=None, frames=()):
    """index.html in `folder`: `figures` ([(name, value)]) as a table, `frames`
    ([(heading, DataFrame)]) as tables, then `pictures` ([(file, caption)]) that exist,
    and links to the CSV, JSON and Parquet files in `tables` (default `folder`);
    relative links only, so it opens offline."""
    tables = tables or folder
    rows = "".join(f"<tr><th>{html.escape(n)}</th><td>{html.escape(str(v))}</td></tr>"
                   for n, v in figures)
    shown = "".join(f'<figure><img src="{html.escape(f)}" alt="{html.escape(c)}">'
                    f"<figcaption>{html.escape(c)}</figcaption></figure>"
                    for f, c in pictures if os.path.exists(os.path.join(folder, f)))
    csvs = " · ".join(
        f'<a href="{html.escape(os.path.relpath(os.path.join(tables, n), folder))}">{n}</a>'
        for n in sorted(os.listdir(tables)) if n.endswith((".csv", ".json", ".parquet")))
    shown = "".join(f"<h2>{html.escape(heading)}</h2>" + frame.to_html(
        index=False, float_format=lambda x: f"{x:.3f}", na_rep="none", border=0)
        for heading, frame in frames if len(frame)) + shown
    with open(os.path.join(folder, PAGE), "w") as f:
        f.write(f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}
table{{border-collapse:collapse}}
th,td{{padding:.2em .8em;text-align:left;border-bottom:1px solid #ddd}}
figure{{margin:1.5em 0}}img{{max-width:100%}}figcaption{{color:#555;font-size:.9em}}</style>
</head><body><h1>{html.escape(title)}</h1><table>{rows}</table>{shown}
<p>Tables: {csvs}</p></body></html>
""")
    return os.path.join(folder, PAGE)


def about(model_dir, data, split):
    """draw's `about` of a run: its model dir's and its data's names (the last part of
    each path) and its split."""
    def name(path):
        return os.path.basename(os.path.normpath(str(path))) if path else "?"
    return {"run": name(model_dir), "data": name(data), "split": split}


def headline(metrics, about, classes):
    """The page's first rows: the data set, its MoAs and split, and what each accuracy
    counts (the control's fields, split by field, counted and left out)."""
    apart = metrics.get("split_by_field") or []
    rows = [("data set", about.get("data", "?")),
            ("MoAs", f"{len(classes)}: {', '.join(classes)}"),
            ("held-out fields", f"{metrics['fields']} (split by {about.get('split') or '?'}"
                                + (f"; {', '.join(apart)} split by field" if apart else "")
                                + ")"),
            ("field accuracy, all held-out fields" + (f" ({', '.join(apart)} included)"
                                                      if apart else ""),
             f"{metrics['accuracy']:.4f}")]
    if metrics.get("accuracy_by_compound") is not None:
        rows.append((f"field accuracy without {', '.join(apart)} (compounds never trained "
                     f"on)", f"{metrics['accuracy_by_compound']:.4f}"))
    rows.append(("treatment accuracy", f"{metrics['treatment_accuracy']:.4f} "
                                       f"({metrics['treatments']} treatments)"))
    rows += profile_scores.describe(metrics)
    if metrics.get("nscb_batches"):
        rows.append(("NSCB's batches", metrics["nscb_batches"]))
    return rows


def draw(folder, about, metrics, history, examples, classes, tables=None):
    """Every picture of an evaluation into `folder`, and the page; returns its path.
    `about`: {"run": model dir's name, "data": data set, "split": how it was split};
    `metrics` as evaluation.summarize (profile figures where computed); `history`
    [{epoch, accuracy, treatment_accuracy, nsc, nscb}]; `examples` as fields_picture's;
    `tables`: the folder of the evaluation's CSVs, where not `folder`."""
    os.makedirs(folder, exist_ok=True)
    confusion_picture(metrics["confusion"], os.path.join(folder, "confusion.png"))
    per_class_picture(metrics["per_class"], os.path.join(folder, "per_class.png"))
    if history:
        accuracy_picture(history, os.path.join(folder, "accuracy.png"))
    if examples:
        fields_picture(examples, classes, os.path.join(folder, "fields.png"))
    title = f"{about.get('data', '?')}: held-out evaluation of {about.get('run', '?')}"
    return page(folder, title, headline(metrics, about, classes), [
        ("accuracy.png", "Held-out accuracy over training"),
        ("confusion.png", "Confusion matrix of held-out fields (rows: true MoA)"),
        ("per_class.png", "Precision and recall per MoA"),
        ("fields.png", "Held-out fields (DNA blue, 2nd channel green, 3rd red)")], tables,
        [("NSC, NSCB and NSC of all treatments by normalisation (docs/profiles.md)",
          profile_scores.comparison_table(metrics))])
