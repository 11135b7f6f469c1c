"""benchmark.py runs and reports every figure it promises (speed targets are not tests)."""
import json
import os
import sys

import matplotlib.pyplot as plt
import pytest

import tf_env
from conftest import LAUNCH, ROOT, run


def test_benchmark_reports_its_figures_per_precision(tmp_path):
    output = tmp_path / "bench.json"
    result = run([sys.executable, os.path.join(ROOT, "benchmark.py"), f"--output={output}",
                  f"--synthetic_cache={tmp_path / 'data'}", "--image_height=128",
                  "--image_width=128", "--synthetic_classes=2", "--synthetic_compounds_per_class=1",
                  "--synthetic_fields_per_treatment=4", "--per_rank_batch=2", "--steps=2",
                  "--accumulate_steps=2", "--optimizer=lars",
                  "--input_batches=2", "--repeats=1",
                  "--parts=roofline,train,layers,columns,input",
                  "--precisions=float32,mixed_bfloat16"])
    results = json.loads(output.read_text())
    assert results["cpu"] == tf_env.cpu_description() and results["cpu"] in result.stdout
    assert results["image_shape"] == [128, 128, 3]
    assert results["bf16_speedup"] == pytest.approx(
        results["mixed_bfloat16"]["images_per_sec"] / results["float32"]["images_per_sec"])
    assert "bf16_speedup" in result.stdout and "layer_limit_fraction" in result.stdout
    assert "Conv2D 16 @ 128x128x16 +input gradient" in result.stdout
    for precision in ("float32", "mixed_bfloat16"):
        check_figures(results[precision])
        assert results[precision]["precision"] == precision
        # what training runs: its optimizer, and 2 micro-batches of 2 per step
        assert results[precision]["optimizer"] == "lars"
        assert results[precision]["accumulate_steps"] == 2


def check_figures(figures):
    for name in ("conv5x5_gflops", "matmul_gflops", "images_per_sec_memory", "images_per_sec",
                 "achieved_gflops", "peak_rss_gb", "tfrecord_images_per_sec",
                 "tiff_images_per_sec", "images_per_sec_per_rank"):
        assert figures[name] > 0, name
    assert 0 < figures["conv5x5_peak_fraction"] and 0 < figures["pipeline_vs_memory_ratio"]
    # Every layer that computes, timed alone: per column a pre-pool (not column 0), three
    # convolutions (the first without its input's gradient) and a post-pool (not column
    # 6); then the merge, its pool and the two dense layers.
    layers = figures["layers"]
    assert sum(row["count"] for row in layers) == 6 + 7 * 3 + 6 + 4
    assert "MaxPool2D 64 @ 128x128x3" in [row["layer"] for row in layers]  # column 6's pre-pool
    assert abs(sum(row["time_share"] for row in layers) - 1) < 1e-3
    assert all(row["ms"] > 0 for row in layers)
    assert all(row["gflops"] > 0 for row in layers if row["layer"].startswith(("Conv", "Dense")))
    assert [row["layer"] for row in layers][:2] == ["Conv2D 16 @ 128x128x3",
                                                   "Conv2D 16 @ 128x128x16 +input gradient"]
    assert figures["layer_limit_fraction"] == pytest.approx(
        figures["images_per_sec_memory"] / figures["layer_limit_images_per_sec"])
    shares = [figures[f"scale_{k}_time_share"] for k in range(7)]
    assert abs(sum(shares) - 1) < 1e-6 and all(figures[f"scale_{k}_gflops"] > 0 for k in range(7))
    # 3 x the forward pass of the 128 x 128 M-CNN
    assert figures["train_gflop_per_image"] > 0.5


def test_benchmark_sweeps_run_their_own_processes_and_ranks(tmp_path):
    output = tmp_path / "sweeps.json"
    run([LAUNCH, "bench", "--", f"--output={output}",
         f"--synthetic_cache={tmp_path / 'data'}", "--image_height=128", "--image_width=128",
         "--synthetic_classes=2", "--synthetic_compounds_per_class=1",
         "--synthetic_fields_per_treatment=8", "--per_rank_batch=2", "--steps=2", "--repeats=1",
         "--memory_batches=1,4", "--memory_check_batch=2", "--parts=memory,onednn,scaling", "--precisions=float32",
         "--noise_scales=curve,72,8192"])
    figures = json.loads(output.read_text())["float32"]
    # A training rank's phases, each in a process of its own: the runtime, the model's
    # state, the step alone and with its input pipeline, each peak above the last.
    assert set(figures["peak_rss_gb_by_batch"]) == {"1", "2", "4"}
    assert figures["memory_runtime_gb"] > 0.1 and figures["memory_state_gb"] >= 0
    for batch, whole in figures["peak_rss_gb_by_batch"].items():
        step = figures["step_peak_gb_by_batch"][batch]
        assert figures["memory_runtime_gb"] < step <= whole
        assert figures["input_pipeline_gb_by_batch"][batch] == pytest.approx(whole - step)
    # the fit of batches 1 and 4 predicts batch 2, and says how well
    fitted = figures["memory_gb_fixed"] + 2 * figures["memory_gb_per_image"]
    assert figures["memory_check_predicted_gb"] == pytest.approx(fitted)
    assert figures["memory_check_measured_gb"] == figures["step_peak_gb_by_batch"]["2"]
    assert abs(figures["memory_check_error"]) < 0.25
    assert figures["onednn_speedup"] > 0 and figures["onednn_off_images_per_sec"] > 0
    cores = len(os.sched_getaffinity(0))
    assert figures[f"scaling_efficiency_{cores}ranks"] > 0
    assert figures[f"allreduce_seconds_{cores}ranks"] > 0
    assert 0 <= figures[f"allreduce_hidden_fraction_{cores}ranks"] <= 1
    assert 4.3 < figures["gradient_mb"] < 4.5  # the 2-class 128 x 128 M-CNN: 1.15M fp32 weights
    nodes = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    # 'curve': the batch study's fitted B_noise (docs/batch_study_fit.json), beside numbers
    assert figures["B_noise_sgd_curve"] > 0 and figures["B_noise_72"] == 72
    for noise in ("sgd_curve", "72", "8192"):
        hours = [figures[f"projected_hours_{n}_nodes_noise{noise}"] for n in nodes]
        assert hours[0] > hours[3] > 0  # 8 nodes train to the target sooner than 1
        enough = figures[f"nodes_past_which_doubling_saves_under_10pct_noise{noise}"]
        if enough is not None:  # past it, doubling saves under a tenth; before it, more
            k = enough.bit_length() - 1
            assert hours[k + 1] > 0.9 * hours[k] and all(
                hours[i + 1] <= 0.9 * hours[i] for i in range(k))
    # A larger noise scale lets large batches train in fewer epochs: 256 nodes sooner.
    assert (figures["projected_hours_256_nodes_noise8192"]
            < figures["projected_hours_256_nodes_noise72"])
    # and report.py plots them
    run([sys.executable, os.path.join(ROOT, "report.py"), f"--benchmarks={output}",
         f"--output_dir={tmp_path}"])
    for plot in ("scaling.png", "memory.png"):
        assert plt.imread(tmp_path / plot).shape[0] > 300, plot
