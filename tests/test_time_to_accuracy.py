"""time_to_accuracy.py: training runs to a target per seed, and their median and spread."""
import json

import pytest

import time_to_accuracy
from conftest import LAUNCH, run


def test_a_run_that_never_reached_the_target_counts_as_slower_than_any_that_did():
    spread = time_to_accuracy.median_and_spread
    assert spread([3, 1, 2]) == (2, 1, 3)
    assert spread([3, None, 1]) == (3, 1, "never")
    assert spread([4, 2, None, 1]) == (3, 1, "never")
    assert spread([None, None, 1]) == ("never", 1, "never")
    assert spread([4, None, None, 1]) == ("never", 1, "never")


def test_each_seed_trains_to_the_target_and_reports_epochs_steps_images_and_seconds(tmp_path):
    output, runs = tmp_path / "tta.json", tmp_path / "runs"
    result = run([LAUNCH, "bench", "--", "--parts=time_to_accuracy", "--precisions=float32",
                  f"--output={output}", "--target=0.01", "--seeds=0,1",
                  "--target_eval_every=0.5", f"--model_dir={runs}",
                  f"--synthetic_cache={tmp_path / 'data'}", "--image_height=128",
                  "--image_width=128", "--synthetic_classes=3",
                  "--synthetic_compounds_per_class=2", "--synthetic_fields_per_treatment=4",
                  "--per_rank_batch=4", "--epochs=2", "--warmup_epochs=0", "--base_lr=0.01",
                  "--base_batch=4"])
    figures = json.loads(output.read_text())["float32"]
    assert figures["target"] == 0.01 and figures["image_shape"] == "128 x 128 x 3"
    assert figures["seeds_reaching_target"] == "2 of 2"
    steps = []
    for seed in (0, 1):
        summary = json.loads((runs / f"float32_seed{seed}" / "summary.json").read_text())
        reached = summary["time_to_target"]
        assert summary["flags"]["seed"] == seed and reached["reached"]
        # 24 training fields at a global batch of 4: 6 steps an epoch, evaluated every 3;
        # one field right of 24 reaches 0.01 at the first evaluation, and the run stops
        assert reached["steps"] == 3 == summary["steps"] and reached["epochs"] == 0.5
        assert reached["images"] == 3 * 4
        assert 0 < reached["train_seconds"] < reached["seconds"]
        assert summary["eval_history"][-1]["accuracy"] >= 0.01
        for measure in ("epochs", "steps", "images", "seconds", "train_seconds"):
            assert figures[f"seed{seed}_{measure}_to_target"] == reached[measure]
        assert f"seed {seed}: 0.01 at epoch 0.5 (step 3, 12 images)" in result.stdout
        steps.append(reached["seconds"])
    assert figures["median_seconds_to_target"] == pytest.approx(sum(steps) / 2)
    assert figures["min_seconds_to_target"] == min(steps)
