"""Tables and plots of the studies, each a set of training runs to a target accuracy.

    python studies.py --recipe_dirs=runs/recipe_study/levers/baseline,... [--recipe_table=CSV] \
        --output_dir=DIR
    python studies.py --study_dirs=runs/batch_study/sgd_8_x1,... [--study_table=CSV] \
        --output_dir=DIR

The recipe study (experiments/recipe_study): one folder of time-to-accuracy runs per
recipe (benchmark.py --parts=time_to_accuracy), epochs to --target per seed, read
from each run's evaluations, and their median (recipes.csv, recipes.png); the runs'
folders stay out of git, and --recipe_table keeps the rows of recipes whose runs are gone.

The batch-size study (experiments/batch_study): one model dir per run, each a global
batch, optimizer and peak rate trained until --target_accuracy. For each optimizer
and batch the fastest run of its rate sweep gives the steps to the target; steps are
fitted with the model of McCandlish et al. 2018 (An Empirical Model of Large-Batch
Training, eq. 2.11): S = S_min (1 + B_noise / B), once with B_noise as the runs
measured it and once with both free; perfect scaling halves the steps as the batch
doubles (batch_study.csv, batch_study_best.csv, batch_study.png, and the fits in
batch_study_fit.json, which node_projection.py reads). The runs' folders stay out of
git: batch_study.csv is the study's record of them, and --study_table keeps its rows.
"""
import json
import math
import os

import numpy as np
import pandas as pd
from matplotlib import ticker

from absl import app, flags

import errors
import run_files
from plots import plt, save
import time_to_accuracy

flags.DEFINE_list("recipe_dirs", [], "Folders of time-to-accuracy runs, one per recipe "
                  "(benchmark.py --parts=time_to_accuracy --model_dir=FOLDER).")
flags.DEFINE_string("recipe_table", None, "A recipes.csv written before: its rows are kept "
                    "for the recipes not among --recipe_dirs (whose runs may be gone).")
flags.DEFINE_list("study_dirs", [], "Model dirs of the batch-size study's runs.")
flags.DEFINE_string("study_table", None, "A batch_study.csv written before: its rows are "
                    "kept for the runs not among --study_dirs (whose folders may be gone).")
flags.DEFINE_integer("sweeping_from", None, "The smallest global batch whose rate sweeps "
                     "have not all ended: its runs and those of larger batches go into "
                     "batch_study.csv, not into the fastest per batch, the fits or the plot.")
flags.DEFINE_string("output_dir", ".", "Where the tables and plots go.")
FLAGS = flags.FLAGS

NEVER = time_to_accuracy.NEVER  # and --target is time_to_accuracy's
FIT_FILE = "batch_study_fit.json"


# ---------------------------------------------------------------- the recipe study

def recipe_table(recipe_dirs, target, earlier=None):
    """One row per recipe: a folder of time-to-accuracy runs (benchmark.py
    --parts=time_to_accuracy --model_dir=FOLDER: PRECISION_seedN model dirs), named by
    the folder. Per seed, the epochs and seconds to `target` held-out field accuracy (the
    first evaluation at or above it, seconds from the start of training with the
    evaluations, as MLPerf counts; NEVER if none was, or the run diverged), their medians
    and the epochs' spread, and the final accuracy; then the rows of `earlier` (a table
    this function made before) for the recipes not among `recipe_dirs`, sorted by recipe.
    Raises ValueError for a run that stopped at a lower target than `target`: what came
    after is not known; errors.InputError if `earlier` was measured to another target."""
    rows = []
    for folder in recipe_dirs:
        seeds = {}
        for name in sorted(os.listdir(folder)):
            if "_seed" in name and os.path.isdir(os.path.join(folder, name)):
                precision, seed = name.rsplit("_seed", 1)
                seeds[int(seed)] = epochs_to(os.path.join(folder, name), target)
        middle, least, most = time_to_accuracy.median_and_spread(
            [None if e == NEVER else e for e, _, _ in seeds.values()])
        middle_seconds = time_to_accuracy.median_and_spread(
            [None if s == NEVER else s for _, s, _ in seeds.values()])[0]
        rows.append({"recipe": os.path.basename(os.path.normpath(folder)),
                     "precision": precision, "target": target, "median_epochs": middle,
                     "min_epochs": least, "max_epochs": most, "median_seconds": middle_seconds,
                     "reached": f"{sum(e != NEVER for e, _, _ in seeds.values())} of {len(seeds)}",
                     **{f"seed{s}_epochs": e for s, (e, _, _) in sorted(seeds.items())},
                     **{f"seed{s}_seconds": t for s, (_, t, _) in sorted(seeds.items())},
                     **{f"seed{s}_final": f for s, (_, _, f) in sorted(seeds.items())}})
    if earlier is not None:
        if len(earlier) and not np.isclose(earlier["target"], target).all():
            raise errors.InputError(f"--recipe_table: its rows were measured to "
                                    f"{earlier['target'].iloc[0]:g}, not to --target={target:g}")
        fresh = {row["recipe"] for row in rows}
        rows += [row for row in earlier.to_dict("records") if row["recipe"] not in fresh]
    table = pd.DataFrame(rows)
    if not len(table):
        return table
    seeds = sorted((c for c in table.columns if c.startswith("seed")),
                   key=lambda c: (("epochs", "seconds", "final").index(c.split("_")[1]),
                                  int(c.split("_")[0][4:])))  # one order, wherever rows came from
    return table[[c for c in table.columns if c not in seeds] + seeds].sort_values(
        "recipe").reset_index(drop=True)


def epochs_to(model_dir, target):
    """(epochs to `target` or NEVER, seconds to it or NEVER, final held-out accuracy or
    None) of one run."""
    summary = run_files.read_json(model_dir, run_files.SUMMARY)
    if summary is None:  # diverged
        return NEVER, NEVER, None
    stopped_at = (summary.get("time_to_target") or {}).get("reached") and summary["target_accuracy"]
    if stopped_at and stopped_at < target:
        raise ValueError(f"{model_dir} stopped at {stopped_at}, below {target}")
    reached = next((h for h in summary["eval_history"] if h["accuracy"] >= target), None)
    if reached is None:
        return NEVER, NEVER, summary["final_accuracy"]
    return reached["epoch"], reached["seconds"], summary["final_accuracy"]


def plot_recipes(table, path):
    """Epochs to the target per recipe: a dot per seed (x at the right: never), a bar
    at the median."""
    figure, ax = plt.subplots(figsize=(7, 0.45 * len(table) + 1.4))
    seeds = [c for c in table.columns if c.startswith("seed") and c.endswith("_epochs")]
    numbers = pd.to_numeric(table[seeds].stack(), errors="coerce")
    ceiling = float(numbers.max()) * 1.1 + 1 if numbers.notna().any() else 1.0
    for y, (_, row) in enumerate(table.iterrows()):
        for seed in seeds:
            never = row[seed] == NEVER or pd.isna(row[seed])
            ax.scatter(ceiling if never else float(row[seed]), y, marker="x" if never else "o",
                       color="tab:red" if never else "tab:blue", zorder=3)
        if row["median_epochs"] != NEVER:
            ax.plot([float(row["median_epochs"])] * 2, [y - 0.3, y + 0.3], color="black")
    ax.set_yticks(range(len(table)), [f"{r.recipe} ({r.precision})" for r in table.itertuples()])
    ax.invert_yaxis()
    ax.set(xlabel=f"epochs to {table['target'].iloc[0]:g} held-out field accuracy "
                  f"(dots: seeds; bar: median; x: never)", xlim=(0, ceiling * 1.05))
    ax.grid(axis="x", alpha=0.3)
    save(figure, path)


# ---------------------------------------------------------------- the batch-size study

STUDY_COLUMNS = ("run", "optimizer", "global_batch", "peak_lr", "target", "reached", "diverged",
                 "final_accuracy", "steps_to_target", "epochs_to_target", "images_to_target",
                 "gradient_noise_scale", "cpu")  # batch_study.csv's


def study_row(model_dir):
    """One run of the batch-size study: optimizer, global batch, peak rate, and the
    steps, epochs and images to its target (NaN if it never reached it: diverged, or
    ended below it), and the CPU it ran on (its plan.json's); None for a run still going
    or cut short (no summary.json and no `diverged` file, which experiments/batch_study/run
    leaves beside a diverged run)."""
    run = {"run": os.path.basename(os.path.normpath(model_dir))}
    summary = run_files.read_json(model_dir, run_files.SUMMARY)
    diverged = summary is None and os.path.isfile(os.path.join(model_dir, run_files.DIVERGED))
    if not (summary or diverged):
        return None
    given = run_files.recorded_flags(model_dir)
    plan = run_files.read_json(model_dir, run_files.PLAN)
    if plan is None:
        raise errors.InputError(f"{model_dir} has no {run_files.PLAN}: a run of a version "
                                f"before plans were recorded; give its row in --study_table")
    run.update(optimizer=given["optimizer"], global_batch=plan["global_batch"],
               peak_lr=plan["peak_lr"], target=float(given["target_accuracy"]), cpu=plan["cpu"])
    if diverged:
        return {**run, "reached": False, "diverged": True}
    reached = summary["time_to_target"]
    return {**run, "reached": reached["reached"], "diverged": False,
            "final_accuracy": summary["final_accuracy"],
            **{f"{m}_to_target": reached.get(m, math.nan) for m in ("steps", "epochs", "images")},
            "gradient_noise_scale": summary.get("gradient_noise_scale")}


def study_table(model_dirs, earlier=None):
    """One row per run that ended (study_row), and the rows of `earlier` (a table this
    function made before) for the runs not among them, sorted by optimizer, batch and
    rate (then name); runs that did not end are named on stdout and left out. Raises
    errors.InputError if the runs were measured to different targets."""
    rows = {d: study_row(d) for d in model_dirs}
    for model_dir in (d for d, row in rows.items() if row is None):
        print(f"left out, not ended: {model_dir}")
    ended = [row for row in rows.values() if row is not None]
    if earlier is not None:
        fresh = {row["run"] for row in ended}
        ended += [row for row in earlier.to_dict("records") if row["run"] not in fresh]
    table = pd.DataFrame(ended, columns=STUDY_COLUMNS)
    if table["target"].nunique() > 1:
        raise errors.InputError(f"the study's runs were measured to different targets "
                                f"({', '.join(map(str, sorted(table['target'].unique())))}): "
                                f"one study, one target")
    return table.sort_values(["optimizer", "global_batch", "peak_lr", "run"]).reset_index(drop=True)


def earlier_table(path, flag="study_table"):
    """The rows of a table written before (--study_table's batch_study.csv,
    --recipe_table's recipes.csv); errors.InputError naming the flag if there is no
    such file."""
    if not os.path.isfile(path):
        raise errors.InputError(f"--{flag}={path}: no such file")
    return pd.read_csv(path, float_precision="round_trip")


def best_per_batch(table):
    """The fastest run to the target of each optimizer and global batch (NaN steps
    where none of its sweep reached it)."""
    reached = table[table["reached"]].sort_values(["steps_to_target", "run"])
    best = reached.groupby(["optimizer", "global_batch"], as_index=False).first()
    every = table[["optimizer", "global_batch"]].drop_duplicates()
    return every.merge(best, how="left").sort_values(["optimizer", "global_batch"])


def fit_steps(batches, steps, noise_scale=None):
    """(S_min, B_noise) of S = S_min (1 + B_noise / B) fitted to measured steps by least
    squares on log S; with `noise_scale`, B_noise is held at it and S_min alone is
    fitted. (McCandlish et al. 2018, eq. 2.11.)"""
    batches, steps = np.asarray(batches, float), np.asarray(steps, float)

    def s_min(noise):  # the least-squares S_min for one B_noise, in closed form
        return math.exp(np.mean(np.log(steps) - np.log1p(noise / batches)))

    def residual(noise):
        return np.sum((np.log(steps) - np.log(s_min(noise)) - np.log1p(noise / batches)) ** 2)

    if noise_scale is None:
        grid = np.geomspace(batches.min() / 100, batches.max() * 100, 4000)
        noise_scale = float(grid[np.argmin([residual(b) for b in grid])])
    return s_min(noise_scale), noise_scale


def measured_noise_scale(table):
    """The median gradient noise scale of the runs that reached the target (a run that
    did not measures its own stall)."""
    noise = table[table["reached"]]["gradient_noise_scale"].dropna()
    return float(np.median(noise)) if len(noise) else None


def fits(table, best):
    """{optimizer: {measured B_noise, S_min with it, fitted S_min and B_noise}}."""
    result = {}
    for optimizer, runs in best[best["steps_to_target"].notna()].groupby("optimizer"):
        if len(runs) < 2:
            continue
        measured = measured_noise_scale(table[table["optimizer"] == optimizer])
        fitted_s_min, fitted_noise = fit_steps(runs["global_batch"], runs["steps_to_target"])
        result[optimizer] = {"global_batches": runs["global_batch"].astype(int).tolist(),
                             "target": float(table["target"].iloc[0]),
                             "fitted_s_min": fitted_s_min, "fitted_noise_scale": fitted_noise,
                             "measured_noise_scale": measured}
        if measured:
            result[optimizer]["s_min_at_measured"] = fit_steps(
                runs["global_batch"], runs["steps_to_target"], measured)[0]
    return result


def plot_batch_study(table, best, fitted, path):
    """Steps to the target against the global batch (log-log), per optimizer, with
    perfect scaling and the noise-scale model; and the best peak rate of each batch."""
    figure, (steps_ax, rate_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    batches = np.geomspace(best["global_batch"].min(), best["global_batch"].max(), 100)
    for (optimizer, runs), color in zip(best.groupby("optimizer"), ("tab:blue", "tab:orange")):
        done = runs[runs["steps_to_target"].notna()]
        steps_ax.plot(done["global_batch"], done["steps_to_target"], "o-", color=color,
                      label=f"{optimizer}: best of its rate sweep")
        never = runs[runs["steps_to_target"].isna()]
        steps_ax.scatter(never["global_batch"], [steps_ax.get_ylim()[1]] * len(never),
                         marker="x", color=color)
        if len(done):
            first = done.iloc[0]
            steps_ax.plot(batches, first["steps_to_target"] * first["global_batch"] / batches,
                          "--", color=color, alpha=0.5, label=f"{optimizer}: perfect scaling")
        fit = fitted.get(optimizer, {})
        if "s_min_at_measured" in fit:
            steps_ax.plot(batches, fit["s_min_at_measured"] * (1 + fit["measured_noise_scale"]
                                                                / batches), ":", color=color,
                          label=f"{optimizer}: S_min (1 + B_noise / B), B_noise "
                                f"{fit['measured_noise_scale']:.0f} measured")
        if fit:
            steps_ax.plot(batches, fit["fitted_s_min"] * (1 + fit["fitted_noise_scale"]
                                                           / batches), "-", color=color,
                          alpha=0.3, label=f"{optimizer}: fitted, B_noise "
                                           f"{fit['fitted_noise_scale']:.0f}")
        rate_ax.plot(done["global_batch"], done["peak_lr"], "o-", color=color,
                     label=f"{optimizer}: peak rate of the fastest run")
        if len(done):
            rate_ax.plot(batches, first["peak_lr"] * batches / first["global_batch"], "--",
                         color=color, alpha=0.5, label=f"{optimizer}: linear rule from there")
    target = table["target"].iloc[0]
    steps_ax.set(title=f"steps to {target:g} held-out field accuracy (x: never)",
                 xlabel="global batch", ylabel="steps", xscale="log", yscale="log")
    rate_ax.set(title="peak learning rate", xlabel="global batch", ylabel="rate",
                xscale="log", yscale="log")
    for ax in (steps_ax, rate_ax):
        ax.set_xticks(sorted(best["global_batch"].unique()))
        ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
        for axis in (ax.xaxis, ax.yaxis):  # plain numbers, not powers of ten
            axis.set_major_formatter(ticker.FormatStrFormatter("%g"))
            axis.set_minor_formatter(ticker.NullFormatter())
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    save(figure, path)


def main(argv):
    del argv
    if not (FLAGS.recipe_dirs or FLAGS.study_dirs or FLAGS.study_table):
        raise app.UsageError("give --recipe_dirs, or --study_dirs and/or --study_table")
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    if FLAGS.recipe_dirs:
        table = recipe_table(FLAGS.recipe_dirs, FLAGS.target,
                             earlier_table(FLAGS.recipe_table, "recipe_table")
                             if FLAGS.recipe_table else None)
        run_files.write_csv(table, os.path.join(FLAGS.output_dir, "recipes.csv"))
        print(table.to_string(index=False))
        plot_recipes(table, os.path.join(FLAGS.output_dir, "recipes.png"))
    if FLAGS.study_dirs or FLAGS.study_table:
        table = study_table(FLAGS.study_dirs,
                            earlier_table(FLAGS.study_table) if FLAGS.study_table else None)
        run_files.write_csv(table, os.path.join(FLAGS.output_dir, "batch_study.csv"))
        swept = table[table["global_batch"] < (FLAGS.sweeping_from or math.inf)]
        if len(swept):
            write_batch_study(swept, FLAGS.output_dir)


def write_batch_study(table, output_dir):
    """The fastest run per batch, the fits and the plot of the study's `table`."""
    best = best_per_batch(table)
    fitted = fits(table, best)
    run_files.write_csv(best, os.path.join(output_dir, "batch_study_best.csv"))
    print(best.to_string(index=False))
    run_files.write_json(os.path.join(output_dir, FIT_FILE), fitted)
    print(json.dumps(fitted, indent=2))
    plot_batch_study(table, best, fitted, os.path.join(output_dir, "batch_study.png"))


if __name__ == "__main__":
    errors.run_main(main)
