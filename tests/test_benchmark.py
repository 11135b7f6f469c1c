"""benchmark.py runs and reports every figure it promises (speed targets are not tests)."""
import json
import os
import sys

from conftest import ROOT, run


def test_benchmark_reports_its_figures(tmp_path):
    output = tmp_path / "bench.json"
    run([sys.executable, os.path.join(ROOT, "benchmark.py"), f"--output={output}",
         f"--synthetic_cache={tmp_path / 'data'}", "--image_height=128", "--image_width=128",
         "--synthetic_classes=2", "--synthetic_compounds_per_class=1",
         "--synthetic_fields_per_treatment=4", "--per_rank_batch=2", "--steps=2",
         "--input_batches=2", "--repeats=1", "--parts=roofline,train,input"])
    figures = json.loads(output.read_text())
    for name in ("conv5x5_gflops", "matmul_gflops", "images_per_sec_memory", "images_per_sec",
                 "achieved_gflops", "peak_rss_gb", "tfrecord_images_per_sec",
                 "tiff_images_per_sec"):
        assert figures[name] > 0, name
    assert 0 < figures["roofline_fraction"] and 0 < figures["pipeline_vs_memory_ratio"]
    # 3 x the forward pass of the 128 x 128 M-CNN
    assert figures["train_gflop_per_image"] > 0.5 and figures["image_shape"] == [128, 128, 3]


def test_benchmark_sweeps_run_their_own_processes_and_ranks(tmp_path):
    output = tmp_path / "sweeps.json"
    run([sys.executable, os.path.join(ROOT, "benchmark.py"), f"--output={output}",
         f"--synthetic_cache={tmp_path / 'data'}", "--image_height=128", "--image_width=128",
         "--synthetic_classes=2", "--synthetic_compounds_per_class=1",
         "--synthetic_fields_per_treatment=8", "--per_rank_batch=2", "--steps=2", "--repeats=1",
         "--memory_batches=1,4", "--parts=sweeps"])
    figures = json.loads(output.read_text())
    assert set(figures["peak_rss_gb_by_batch"]) == {"1", "4"}
    assert all(gb > 0.1 for gb in figures["peak_rss_gb_by_batch"].values())
    assert isinstance(figures["memory_gb_per_image"], float)  # its size is a figure, not a test
    assert figures["onednn_speedup"] > 0 and figures["onednn_off_images_per_sec"] > 0
    cores = len(os.sched_getaffinity(0))
    assert figures[f"scaling_efficiency_{cores}ranks"] > 0
    assert figures[f"allreduce_seconds_{cores}ranks"] > 0
    assert 4.3 < figures["gradient_mb"] < 4.5  # the 2-class 128 x 128 M-CNN: 1.15M fp32 weights
