"""Plots of a training run, of benchmark figures and of a batch-size study, as PNGs.

    python report.py --model_dir=runs/demo --output_dir=docs
    python report.py --benchmarks=bench_fp32.json,bench_bf16.json --output_dir=docs
    python report.py --study_dirs=runs/batch_study/a,runs/batch_study/b --output_dir=docs

From a model dir's TensorBoard logs: loss, learning rate and held-out accuracy
against the step (training.png). From benchmark.py's JSON files: images/s against
ranks (scaling.png) and peak memory against the per-rank batch (memory.png), one
line per file and precision. From the model dirs of a study: held-out accuracy and
steps to --target_accuracy against the global batch, one line per learning-rate rule
and optimizer, with the gradient noise scale measured (batch_study.png and .csv).
"""
import json
import os

import numpy as np
import pandas as pd

import tf_env  # noqa: F401  (before TensorFlow)
from absl import app, flags
import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402
import tensorflow as tf  # noqa: E402

flags.DEFINE_string("model_dir", None, "A train_mcnn.py --model_dir to plot.")
flags.DEFINE_list("benchmarks", [], "benchmark.py JSON files to plot.")
flags.DEFINE_list("study_dirs", [], "Model dirs of runs that differ in global batch and rule.")
flags.DEFINE_float("target_accuracy", 0.8, "Held-out field accuracy the study counts steps to.")
flags.DEFINE_string("output_dir", ".", "Where the PNGs go.")
FLAGS = flags.FLAGS


def read_scalars(log_dir):
    """{tag: [(step, value)]} of every scalar in a TensorBoard log folder."""
    scalars = {}
    for name in sorted(os.listdir(log_dir)):
        if not name.startswith("events.out.tfevents"):
            continue
        for event in tf.compat.v1.train.summary_iterator(os.path.join(log_dir, name)):
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append(
                    (event.step, float(tf.make_ndarray(value.tensor))))
    return scalars


def plot_training(model_dir, path):
    log_dir = os.path.join(model_dir, "tensorboard")
    if not os.path.isdir(log_dir):
        raise app.UsageError(f"{log_dir} not found: is {model_dir} a train_mcnn.py --model_dir?")
    scalars = read_scalars(log_dir)
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
    figure, ax = plt.subplots(figsize=(5, 3.8))
    for figures in benchmarks:
        if "peak_rss_gb_by_batch" not in figures:
            continue
        batches, memory = zip(*sorted((int(b), gb)
                                      for b, gb in figures["peak_rss_gb_by_batch"].items()))
        ax.plot(batches, memory, marker="o",
                label=f"{label(figures)}: {figures['memory_gb_per_image']:.2f} GB/image")
    ax.set(title="peak memory of one rank", xlabel="per-rank batch (full-size images)",
           ylabel="GB (RSS)")
    ax.grid(alpha=0.3)
    ax.legend()
    save(figure, path)


def study_table(model_dirs, target):
    """One row per run: its rule, global batch, final and best held-out accuracy, the
    epochs and steps to `target` (None if never), and the noise scale it measured."""
    return pd.DataFrame([study_row(d, target) for d in model_dirs]).sort_values(
        ["rule", "global_batch"])


def study_row(model_dir, target):
    run = {"run": os.path.basename(os.path.normpath(model_dir))}
    path = os.path.join(model_dir, "summary.json")
    if not os.path.isfile(path):  # stopped, as a diverging run does: its flags.txt says what
        with open(os.path.join(model_dir, "flags.txt")) as f:
            given = dict(line.strip()[2:].split("=", 1) for line in f if "=" in line)
        return {**run, "rule": f"{given['optimizer']}, {given['lr_scaling']}",
                "global_batch": int(given["per_rank_batch"]) * int(given["accumulate_steps"]),
                "final_accuracy": float("nan"), "diverged": True}  # the study's one rank
    with open(path) as f:
        summary = json.load(f)
    history = summary["eval_history"]
    reached = next((h for h in history if h["accuracy"] >= target), None)
    return {**run, "rule": f"{summary['flags']['optimizer']}, {summary['flags']['lr_scaling']}",
            "global_batch": summary["global_batch"], "final_accuracy": summary["final_accuracy"],
            "best_accuracy": max(h["accuracy"] for h in history), "diverged": False,
            "epochs_to_target": reached and reached["epoch"],
            "steps_to_target": reached and reached["step"], "steps": summary["steps"],
            "gradient_noise_scale": summary.get("gradient_noise_scale")}


def plot_study(table, target, path):
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    for rule, runs in table.groupby("rule"):
        line, = axes[0].plot(runs["global_batch"], runs["final_accuracy"], marker="o",
                             label=rule)
        diverged = runs[runs["diverged"]]
        axes[0].scatter(diverged["global_batch"], [0] * len(diverged), marker="x",
                        color=line.get_color())
        axes[1].plot(runs["global_batch"], runs["steps_to_target"].astype(float), marker="o",
                     label=rule)
    # The noise scale of runs that learned: one that did not measures its own stall.
    noise = table[table["steps_to_target"].notna()]["gradient_noise_scale"].dropna()
    for ax in axes:
        if len(noise):
            ax.axvline(float(np.median(noise)), color="grey", linestyle=":",
                       label=f"noise scale of the runs that reached the target "
                             f"({np.median(noise):.0f})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("global batch")
        ax.grid(alpha=0.3)
    axes[0].set(title="held-out accuracy at the epoch budget (x: diverged)",
                ylabel="field accuracy", ylim=(-0.05, 1.1))
    axes[1].set(title=f"steps to {target:g} held-out accuracy", ylabel="steps")
    if table["steps_to_target"].notna().any():
        axes[1].set_yscale("log")
    axes[0].legend(fontsize=8, loc="upper right")
    save(figure, path)


def save(figure, path):
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    print(f"wrote {path}")


def main(argv):
    del argv
    tf.get_logger().setLevel("ERROR")
    if not (FLAGS.model_dir or FLAGS.benchmarks or FLAGS.study_dirs):
        raise app.UsageError("give --model_dir, --benchmarks or --study_dirs")
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    if FLAGS.model_dir:
        plot_training(FLAGS.model_dir, os.path.join(FLAGS.output_dir, "training.png"))
    if FLAGS.benchmarks:
        benchmarks = []
        for path in FLAGS.benchmarks:
            with open(path) as f:  # one set of figures per precision measured
                benchmarks += [v for v in json.load(f).values() if isinstance(v, dict)]
        plot_scaling(benchmarks, os.path.join(FLAGS.output_dir, "scaling.png"))
        plot_memory(benchmarks, os.path.join(FLAGS.output_dir, "memory.png"))
    if FLAGS.study_dirs:
        table = study_table(FLAGS.study_dirs, FLAGS.target_accuracy)
        table.to_csv(os.path.join(FLAGS.output_dir, "batch_study.csv"), index=False)
        print(table.to_string(index=False))
        plot_study(table, FLAGS.target_accuracy, os.path.join(FLAGS.output_dir,
                                                              "batch_study.png"))


if __name__ == "__main__":
    app.run(main)
