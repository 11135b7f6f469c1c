"""Plots of a training run and of benchmark figures, as PNGs (studies.py plots studies).

    python report.py --model_dir=runs/demo --output_dir=runs/demo/plots
    python report.py --benchmarks=bench_fp32.json,bench_bf16.json --output_dir=plots

From a model dir's TensorBoard logs: loss, learning rate and held-out accuracy
against the step (training.png); from its evaluation/ folder, the pictures of its
last evaluation and their page (evaluation_pictures.py: index.html), with held-out
fields of its data set where that is still there, and its NSC, NSCB and mAP by
normalisation beside the baselines' (printed). From benchmark.py's JSON files: images/s against
ranks (scaling.png) and peak memory against the per-rank batch (memory.png), one
line per file and precision.
"""
import json
import os

import tf_env  # noqa: F401  (before TensorFlow)
from absl import app, flags
import matplotlib
import pandas as pd
import tensorflow as tf

import data_pipeline
import errors
import evaluation
import evaluation_pictures
import model_files
import profile_scores
import run_files
import run_log
from plots import plt, save

flags.DEFINE_string("model_dir", None, "A train_mcnn.py --model_dir to plot.")
flags.DEFINE_list("benchmarks", [], "benchmark.py JSON files to plot.")
flags.DEFINE_string("output_dir", ".", "Where the PNGs go.")
FLAGS = flags.FLAGS


def plot_training(model_dir, path):
    log_dir = os.path.join(model_dir, run_files.TENSORBOARD)
    if not os.path.isdir(log_dir):
        raise app.UsageError(f"{log_dir} not found: is {model_dir} a train_mcnn.py --model_dir?")
    scalars = {tag: list(series.items()) for tag, series in run_log.read_scalars(log_dir).items()}
    panels = [("loss", "training loss"), ("learning_rate", "learning rate"),
              ("eval_accuracy", "held-out accuracy")]
    figure, axes = plt.subplots(1, len(panels), figsize=(13, 3.6))
    for ax, (tag, title) in zip(axes, panels):
        steps, values = zip(*scalars.get(tag, [(0, float("nan"))]))
        ax.plot(steps, values, marker="o" if tag == "eval_accuracy" else None)
        if tag == "eval_accuracy" and "eval_treatment_accuracy" in scalars:
            ax.plot(*zip(*scalars["eval_treatment_accuracy"]), marker="s", label="treatments")
            ax.legend(["fields", "treatments"])
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
    figure.suptitle(os.path.basename(os.path.normpath(model_dir)))
    save(figure, path)


def label(figures):
    return f"{figures.get('precision', 'float32')}{' recompute' * bool(figures.get('recompute'))}"


def plot_scaling(benchmarks, path):
    figure, ax = plt.subplots(figsize=(5, 3.8))
    for figures in benchmarks:
        points = sorted((int(key.split("_")[0]), value) for key, value in figures.items()
                        if key.endswith("_ranks_images_per_sec") and key[0].isdigit())
        if "one_rank_images_per_sec" not in figures or not points:
            continue
        single = figures["one_rank_images_per_sec"]
        ranks, rates = zip(*[(1, single), *points])
        ax.plot(ranks, rates, marker="o", label=label(figures))
        ax.plot(ranks, [single] * len(ranks), linestyle=":", color="grey")
    ax.set(title="one machine's cores split among ranks\n(dotted: no loss against 1 rank)",
           xlabel="ranks", ylabel="full-size images/s, all ranks")
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    save(figure, path)


def plot_memory(benchmarks, path):
    """A training rank's peak against its per-rank batch: the step alone with the fitted
    line, and with the input pipeline (memory_probe.py's phases)."""
    figure, ax = plt.subplots(figsize=(5, 3.8))
    for figures in benchmarks:
        if "peak_rss_gb_by_batch" not in figures:
            continue
        whole = sorted((int(b), gb) for b, gb in figures["peak_rss_gb_by_batch"].items())
        line, = ax.plot(*zip(*whole), marker="o", label=f"{label(figures)}: with input")
        if "step_peak_gb_by_batch" in figures:
            step = sorted((int(b), gb) for b, gb in figures["step_peak_gb_by_batch"].items())
            ax.plot(*zip(*step), marker="s", linestyle="none", color=line.get_color(),
                    label=f"step alone: {figures['memory_gb_fixed']:.2f} GB + "
                          f"{figures['memory_gb_per_image']:.2f} GB/image")
            batches = [0, step[-1][0]]
            ax.plot(batches, [figures["memory_gb_fixed"] + figures["memory_gb_per_image"] * b
                              for b in batches], linestyle=":", color=line.get_color())
    ax.set(title="peak memory of one training rank", xlabel="per-rank batch",
           ylabel="GB (peak RSS)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    save(figure, path)


def draw_evaluation(model_dir, output_dir):
    """evaluation_pictures of a finished run's last evaluation into `output_dir`; the
    page's path. Example fields come from its data set, if it was one and is there."""
    folder = os.path.join(model_dir, run_files.EVALUATION)
    try:
        with open(os.path.join(folder, "metrics.json")) as f:
            metrics = json.load(f)
        with open(os.path.join(model_dir, run_files.SUMMARY)) as f:
            summary = json.load(f)
        metrics["confusion"] = pd.read_csv(os.path.join(folder, "confusion.csv"), index_col=0)
        metrics["per_class"] = pd.read_csv(os.path.join(folder, "per_class.csv"))
    except OSError as error:
        raise errors.InputError(f"{model_dir} is not a finished train_mcnn.py run: "
                                f"{error.strerror}: {error.filename}") from None
    classes = summary["classes"]
    figures = profile_scores.comparison_table(metrics)
    if len(figures):
        print(f"NSC, NSCB and mAP by normalisation (docs/profiles.md):\n"
              f"{figures.to_string(index=False, float_format=lambda x: f'{x:.3f}', na_rep='')}")
    return evaluation_pictures.draw(
        output_dir, evaluation_pictures.about(model_dir, summary["data"], summary.get("split")),
        metrics,
        summary.get("eval_history", []), example_fields(model_dir, summary, classes), classes,
        tables=folder)


def example_fields(model_dir, summary, classes):
    """evaluation.example_fields of the run's data set's held-out split, or [] where the
    run read TIFFs or its data set is gone."""
    if not os.path.isfile(os.path.join(summary["data"], data_pipeline.MANIFEST)):
        print(f"{summary['data']} is not a data set (any more): no example fields")
        return []
    model, _ = model_files.load_trained(model_dir)
    manifest = data_pipeline.read_manifest(summary["data"])
    predict = evaluation.make_predict(model, manifest["image_shape"],
                                      data_pipeline.DTYPES[manifest["dtype"]])
    batches = data_pipeline.make_dataset(manifest, "eval", data_pipeline.Feed(8, provenance=True))
    return evaluation.example_fields(predict, iter(batches), len(classes))


def main(argv):
    del argv
    tf.get_logger().setLevel("ERROR")
    if not (FLAGS.model_dir or FLAGS.benchmarks):
        raise app.UsageError("give --model_dir or --benchmarks")
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    if FLAGS.model_dir:
        plot_training(FLAGS.model_dir, os.path.join(FLAGS.output_dir, "training.png"))
        print(f"wrote {draw_evaluation(FLAGS.model_dir, FLAGS.output_dir)}")
    if FLAGS.benchmarks:
        benchmarks = []
        for path in FLAGS.benchmarks:
            with open(path) as f:  # one set of figures per precision measured
                benchmarks += [v for v in json.load(f).values() if isinstance(v, dict)]
        plot_scaling(benchmarks, os.path.join(FLAGS.output_dir, "scaling.png"))
        plot_memory(benchmarks, os.path.join(FLAGS.output_dir, "memory.png"))


if __name__ == "__main__":
    errors.run_main(main)
