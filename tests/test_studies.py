"""studies.py: the recipe study's table and the batch-size study's fit and plot."""
import json
import os
import shutil

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

import errors
import studies
from conftest import PYTHON, ROOT, fails, run



def test_the_noise_scale_model_is_recovered_from_steps_that_follow_it():
    batches = np.array([8, 16, 32, 64, 128, 256, 512, 1024])
    steps = 40 * (1 + 100 / batches)  # S_min 40, B_noise 100
    s_min, noise = studies.fit_steps(batches, steps)
    assert s_min == pytest.approx(40, rel=0.01) and noise == pytest.approx(100, rel=0.01)
    s_min, noise = studies.fit_steps(batches, steps * 1.1, noise_scale=100)
    assert noise == 100 and s_min == pytest.approx(44, rel=1e-6)


def write_run(folder, optimizer, batch, base_lr, steps=None, noise=None, ended=True,
              cpu="Xeon; avx2"):
    """A model dir as train_mcnn.py and experiments/batch_study/run leave it: flags.txt,
    plan.json, and summary.json unless it diverged (steps None and noise None: a
    `diverged` file) or has not `ended`, with or without reaching the target."""
    folder.mkdir(parents=True)
    (folder / "flags.txt").write_text(
        f"--optimizer={optimizer}\n--per_rank_batch=8\n--accumulate_steps={batch // 8}\n"
        f"--base_lr={base_lr}\n--base_batch=8\n--lr_scaling=linear\n--target_accuracy=0.8\n")
    (folder / "plan.json").write_text(json.dumps({"cpu": cpu, "global_batch": batch,
                                                  "peak_lr": base_lr * batch / 8}))
    if not ended:
        return folder
    if steps is None and noise is None:
        (folder / "diverged").touch()
        return folder
    reached = {"reached": steps is not None}
    if steps:
        reached.update(steps=steps, epochs=steps * batch / 1000, images=steps * batch)
    (folder / "summary.json").write_text(json.dumps({
        "time_to_target": reached, "final_accuracy": 0.9 if steps else 0.5,
        "gradient_noise_scale": noise}))
    return folder


def test_the_batch_study_takes_each_batchs_fastest_rate_and_plots_the_model(tmp_path):
    dirs = [write_run(tmp_path / "a", "sgd", 8, 0.01, 440, 100),
            write_run(tmp_path / "b", "sgd", 8, 0.02, 500, 100),
            write_run(tmp_path / "c", "sgd", 64, 0.01, 100, 120),
            write_run(tmp_path / "d", "sgd", 64, 0.02, cpu="EPYC; avx2"),  # diverged
            write_run(tmp_path / "e", "sgd", 512, 0.005, 48, 90),
            write_run(tmp_path / "f", "sgd", 1024, 0.01, None, 70),  # never reached
            write_run(tmp_path / "g", "sgd", 1024, 0.02, ended=False)]  # still going
    printed = run([PYTHON, os.path.join(ROOT, "studies.py"), f"--output_dir={tmp_path / 'out'}",
                   f"--study_dirs={','.join(str(d) for d in dirs)}"]).stdout
    assert f"left out, not ended: {tmp_path / 'g'}" in printed
    best = pd.read_csv(tmp_path / "out" / "batch_study_best.csv")
    assert best["global_batch"].tolist() == [8, 64, 512, 1024]
    assert best["steps_to_target"].tolist()[:3] == [440, 100, 48]
    assert np.isnan(best["steps_to_target"].iloc[3])
    assert best["peak_lr"].tolist()[:3] == pytest.approx([0.01, 0.08, 0.32])
    table = pd.read_csv(tmp_path / "out" / "batch_study.csv")
    assert table["diverged"].tolist() == [False, False, False, True, False, False]
    assert table["cpu"].tolist() == ["Xeon; avx2"] * 3 + ["EPYC; avx2"] + ["Xeon; avx2"] * 2
    fit = json.loads((tmp_path / "out" / "batch_study_fit.json").read_text())["sgd"]
    assert fit["global_batches"] == [8, 64, 512] and fit["measured_noise_scale"] == 100
    assert fit["fitted_s_min"] > 0 and fit["fitted_noise_scale"] > 0
    assert plt.imread(tmp_path / "out" / "batch_study.png").shape[1] > 1000


def test_the_batch_studys_table_is_its_record_of_runs_whose_folders_are_gone(tmp_path):
    study = [PYTHON, os.path.join(ROOT, "studies.py"), f"--output_dir={tmp_path}"]
    first = [write_run(tmp_path / "sgd_8_x1", "sgd", 8, 0.01, 440, 100, cpu="EPYC; avx2"),
             write_run(tmp_path / "sgd_64_x1", "sgd", 64, 0.01, 100, 120)]
    run([*study, f"--study_dirs={','.join(str(d) for d in first)}"])
    for folder in first:  # a new machine: the runs' folders are not in git
        shutil.rmtree(folder)
    again = [write_run(tmp_path / "sgd_64_x1", "sgd", 64, 0.01, 90, 120),  # run again
             write_run(tmp_path / "sgd_512_x1", "sgd", 512, 0.01, 30, 110),
             write_run(tmp_path / "sgd_1024_x1", "sgd", 1024, 0.01, 20, 110)]
    run([*study, f"--study_dirs={','.join(str(d) for d in again)}",
         f"--study_table={tmp_path / 'batch_study.csv'}", "--sweeping_from=512"])
    table = pd.read_csv(tmp_path / "batch_study.csv")
    assert table[["run", "steps_to_target"]].values.tolist() == [
        ["sgd_8_x1", 440], ["sgd_64_x1", 90], ["sgd_512_x1", 30], ["sgd_1024_x1", 20]]
    assert table["cpu"].tolist() == ["EPYC; avx2"] + ["Xeon; avx2"] * 3  # where each ran
    best = pd.read_csv(tmp_path / "batch_study_best.csv")  # 512's sweep is still going
    assert best[["run", "steps_to_target"]].values.tolist() == [["sgd_8_x1", 440],
                                                               ["sgd_64_x1", 90]]
    fit = json.loads((tmp_path / "batch_study_fit.json").read_text())["sgd"]
    assert fit["global_batches"] == [8, 64] and fit["measured_noise_scale"] == 110

    earlier = table.assign(target=0.6)
    with pytest.raises(errors.InputError, match="different targets"):
        studies.study_table([str(d) for d in again], earlier)
    missing = fails([*study, f"--study_table={tmp_path / 'none.csv'}"])
    assert f"--study_table={tmp_path / 'none.csv'}: no such file" in missing.stderr
    assert "Traceback" not in missing.stderr


def write_seed(folder, accuracies, target=0.95):
    """A time-to-accuracy run's model dir: its evaluations once an epoch, stopped at
    `target` if it reached it."""
    folder.mkdir(parents=True)
    history = [{"epoch": e + 1.0, "accuracy": a, "seconds": 60.0 * (e + 1)}
               for e, a in enumerate(accuracies)]
    (folder / "summary.json").write_text(json.dumps({
        "eval_history": history, "final_accuracy": accuracies[-1], "target_accuracy": target,
        "time_to_target": {"reached": accuracies[-1] >= target}}))


def test_the_recipe_table_counts_epochs_to_the_target_from_each_seeds_evaluations(tmp_path):
    recipe = tmp_path / "faster"
    write_seed(recipe / "float32_seed0", [0.5, 0.91, 0.96])
    write_seed(recipe / "float32_seed1", [0.3, 0.6, 0.8, 0.92, 0.97])
    write_seed(recipe / "float32_seed2", [0.2, 0.4, 0.7, 0.8, 0.85])  # ended below both
    run([PYTHON, os.path.join(ROOT, "studies.py"), f"--recipe_dirs={recipe}", "--target=0.9",
         f"--output_dir={tmp_path}"])
    table = pd.read_csv(tmp_path / "recipes.csv", dtype=str)
    assert table[["recipe", "median_epochs", "seed0_epochs", "seed1_epochs",
                  "seed2_epochs", "reached"]].values.tolist() == [
        ["faster", "4.0", "2.0", "4.0", "never", "2 of 3"]]
    assert table[["median_seconds", "seed0_seconds", "seed1_seconds", "seed2_seconds"]
                 ].values.tolist() == [["240.0", "120.0", "240.0", "never"]]
    assert plt.imread(tmp_path / "recipes.png").shape[1] > 500
    write_seed(tmp_path / "lower" / "float32_seed0", [0.5, 0.85], target=0.8)
    with pytest.raises(ValueError, match="stopped at 0.8, below 0.9"):
        studies.recipe_table([str(tmp_path / "lower")], 0.9)


def test_the_recipe_table_keeps_the_rows_of_recipes_whose_runs_are_gone(tmp_path):
    for recipe, accuracies in (("gone", [0.5, 0.93]), ("kept", [0.4, 0.6, 0.8])):
        write_seed(tmp_path / "runs" / recipe / "float32_seed0", accuracies)
    docs = tmp_path / "docs"
    study = [PYTHON, os.path.join(ROOT, "studies.py"), "--target=0.9", f"--output_dir={docs}"]
    run([*study, f"--recipe_dirs={tmp_path / 'runs' / 'gone'},{tmp_path / 'runs' / 'kept'}"])
    write_seed(tmp_path / "runs" / "new" / "float32_seed0", [0.95])
    write_seed(tmp_path / "runs" / "kept" / "float32_seed1", [0.91])
    run([*study, f"--recipe_dirs={tmp_path / 'runs' / 'kept'},{tmp_path / 'runs' / 'new'}",
         f"--recipe_table={docs / 'recipes.csv'}"])
    table = pd.read_csv(docs / "recipes.csv", dtype=str)
    assert table[["recipe", "median_epochs", "reached"]].values.tolist() == [
        ["gone", "2.0", "1 of 1"], ["kept", "never", "1 of 2"], ["new", "1.0", "1 of 1"]]
    assert list(table.columns)[8:] == ["seed0_epochs", "seed1_epochs", "seed0_seconds",
                                       "seed1_seconds", "seed0_final", "seed1_final"]
    other_target = fails([*study, f"--recipe_dirs={tmp_path / 'runs' / 'new'}", "--target=0.8",
                          f"--recipe_table={docs / 'recipes.csv'}"])
    assert "--recipe_table: its rows were measured to 0.9, not to --target=0.8" in other_target.stderr
    assert "Traceback" not in other_target.stderr
