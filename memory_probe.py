"""The peak memory of one training rank, phase by phase, in a process of its own, and
its sweep over per-rank batches (`./launch bench -- --parts=memory`), whose fit
rank_memory.py's estimate rests on.

    python memory_probe.py memory.json --per_rank_batch=4 [train_mcnn.py's flags]

It runs what a training rank runs, in this order, and after each phase reads the
process's peak resident memory (ru_maxrss, which only grows):
- runtime: Python, TensorFlow, Horovod and the data set's manifest;
- state: the model, its gradients' and the optimizer's variables (--optimizer);
- step: STEPS training steps (--accumulate_steps included) on one batch held in
  memory: activations, gradients and oneDNN's scratch, without any input pipeline;
- input: STEPS more steps fed by the training input pipeline (its shuffle buffer,
  interleaved readers and prefetched batches), whose share is the growth over `step`.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile

import tf_env  # noqa: F401  (before TensorFlow)
from absl import app, flags
import horovod.tensorflow as hvd
import numpy as np
import tensorflow as tf

import data_pipeline
import errors
import optimization
import rank_memory
import run_plan
import threads
import train_mcnn  # noqa: F401  (its flags: the probe builds the run it plans)
import training_data

FLAGS = flags.FLAGS
STEPS = 2  # per phase: the first traces the step, the second runs it as every later one


def steps(train_step, batches, count):
    for _ in range(count):
        float(train_step(*next(batches))[0])


def batch_in_memory(manifest, images):
    """One batch of `images` random fields of the data set's shape and dtype, and labels."""
    rng = np.random.default_rng(0)
    dtype = data_pipeline.DTYPES[manifest["dtype"]]
    pixels = rng.integers(0, dtype.max, (images, *manifest["image_shape"]), endpoint=True)
    return (tf.constant(pixels, dtype),
            tf.constant(rng.integers(0, len(manifest["classes"]), images), tf.int32))


def measure():
    """{phase: peak RSS in GB after it} (runtime, state, step, input), with the batch and what was run."""
    threads.init_horovod(FLAGS.fusion_threshold_mb)
    rank_threads = threads.configure_threads(FLAGS.intra_op_threads, FLAGS.inter_op_threads)
    request = run_plan.Request.from_flags(FLAGS)
    precision, why = run_plan.resolve_precision(request.precision)
    source = training_data.Source.from_flags(FLAGS, FLAGS.seed)
    manifest, make_data = training_data.open_data(source, FLAGS.seed)
    peaks = {"runtime": rank_memory.peak_rss_gb()}
    plan = run_plan.resolve(request, manifest, precision, why, rank_threads)
    model = plan.model.build(training_data.input_standardization(manifest,
                                                                 source.input_scaling))
    optimizer = optimization.make_optimizer(1e-6, plan.recipe)
    optimizer.build(model.trainable_variables)
    train_step = plan.train_step(model, optimizer)
    peaks["state"] = rank_memory.peak_rss_gb()
    held = batch_in_memory(manifest, plan.per_rank_images)
    steps(train_step, iter(lambda: held, None), STEPS)
    peaks["step"] = rank_memory.peak_rss_gb()
    pipeline = make_data("train", source.feed(plan.per_rank_images, training=True,
                                              seed=plan.seed))
    steps(train_step, iter(pipeline), STEPS)
    peaks["input"] = rank_memory.peak_rss_gb()
    return {"per_rank_batch": plan.per_rank_batch, "accumulate_steps": plan.accumulate_steps,
            "precision": plan.model.precision, "recompute": plan.model.recompute,
            "image_shape": manifest["image_shape"], "dtype": manifest["dtype"],
            "parameters": model.count_params(), "shuffle_buffer": plan.memory.shuffle_buffer,
            "peak_rss_gb": peaks, "expected_gb": plan.memory.parts(plan.per_rank_batch)}


def probe(batch, precision, given):
    """measure()'s figures at per-rank `batch` and `precision`, in a process of its own
    with the training flags `given` (a list of --name=value)."""
    with tempfile.TemporaryDirectory() as folder:
        output = os.path.join(folder, "memory.json")
        result = subprocess.run(
            [sys.executable, os.path.abspath(__file__), output, *given,
             f"--per_rank_batch={batch}", f"--precision={precision}"],
            capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"memory_probe.py at batch {batch} failed:\n{result.stderr[-3000:]}")
        with open(output) as f:
            return json.load(f)


def sweep(batches, check_batch, precision, given):
    """A training rank's peak memory at each per-rank batch of `batches` (each in a
    process of its own), as figures for benchmark.py (GB):

    - memory_runtime_gb, memory_state_gb: the runtime, then the model and optimizer state;
    - step_peak_gb_by_batch: the peak of training steps alone (no input pipeline), with
      memory_gb_fixed + memory_gb_per_image x batch fitted to it (least squares);
    - input_pipeline_gb_by_batch: what the input pipeline adds to that peak;
    - peak_rss_gb_by_batch: a training rank's whole peak (step and input);
    - at `check_batch` (0: none), outside the fit: memory_check_predicted_gb (the fit's
      step peak), memory_check_measured_gb and memory_check_error (predicted / measured - 1).
    """
    figures = {b: probe(b, precision, given)["peak_rss_gb"] for b in [*batches, check_batch] if b}
    step = {b: peaks["step"] for b, peaks in figures.items()}
    fit = statistics.linear_regression(batches, [step[b] for b in batches])
    result = {
        "memory_runtime_gb": statistics.median(p["runtime"] for p in figures.values()),
        "memory_state_gb": statistics.median(p["state"] - p["runtime"] for p in figures.values()),
        "step_peak_gb_by_batch": step,
        "memory_gb_per_image": fit.slope, "memory_gb_fixed": fit.intercept,
        "input_pipeline_gb_by_batch": {b: p["input"] - p["step"] for b, p in figures.items()},
        "peak_rss_gb_by_batch": {b: p["input"] for b, p in figures.items()},
    }
    if check_batch:
        predicted = fit.intercept + fit.slope * check_batch
        result.update(memory_check_batch=check_batch, memory_check_predicted_gb=predicted,
                      memory_check_measured_gb=step[check_batch],
                      memory_check_error=predicted / step[check_batch] - 1)
    return result


def main(argv):
    if len(argv) != 2:
        raise app.UsageError("give the JSON file to write the figures to")
    tf.get_logger().setLevel("ERROR")
    figures = measure()
    if hvd.rank() == 0:
        with open(argv[1], "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    errors.run_main(main)
