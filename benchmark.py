"""Benchmarks of the M-CNN on this machine; prints a table and writes JSON.

    .venv/bin/python benchmark.py                          # full-size synthetic screen
    .venv/bin/python benchmark.py --per_rank_batch=2 --parts=train
    .venv/bin/python benchmark.py --image_height=256 --image_width=384

Takes train_mcnn.py's flags (data, image size, batch, threads), so it measures what
training runs. Every figure is the median of --repeats timed runs after warm-up:
- roofline: TensorFlow's rate on a large 5x5 convolution and a large matmul with
  the same threads; the convolution rate is the roofline the model is held to;
- train: training steps from tensors already in memory, and from the real input
  pipeline; achieved GFLOP/s (3x the forward pass's multiply-adds x 2) and its
  fraction of the roofline; peak memory (RSS) of the process;
- input: the input pipeline alone, from TFRecords and straight from TIFFs;
- sweeps: in processes of their own, peak memory at several batches and its slope
  per image, oneDNN off against on, and 1 rank x every core against one rank per
  core placed by ./launch (scaling efficiency, and the time of one allreduce of
  all gradients).
"""
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as in train_mcnn.py
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
import horovod.tensorflow as hvd  # noqa: E402
import tensorflow as tf  # noqa: E402

import data_pipeline  # noqa: E402
import mcnn_model  # noqa: E402
import prepare_data  # noqa: E402
import synthetic_data  # noqa: E402
import train_mcnn  # noqa: E402

flags.DEFINE_list("parts", ["roofline", "train", "input", "sweeps"], "What to measure.")
flags.DEFINE_list("memory_batches", ["1", "2", "4"], "Per-rank batches for the memory slope.")
flags.DEFINE_integer("steps", 5, "Timed training steps per repeat.")
flags.DEFINE_integer("input_batches", 20, "Timed input batches per repeat (input alone).")
flags.DEFINE_integer("repeats", 3, "Timed repeats; figures are their medians.")
flags.DEFINE_string("output", "benchmark.json", "JSON file for the figures.")
FLAGS = flags.FLAGS


def median_seconds(run, repeats):
    """Median wall time of `run()` over `repeats` calls, after one untimed call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def roofline():
    images = tf.random.uniform((1, 512, 640, 32))
    kernel = tf.random.uniform((5, 5, 32, 32))
    matrix = tf.random.uniform((4096, 4096))
    conv = tf.function(lambda: tf.nn.conv2d(images, kernel, 1, "SAME")[0, 0, 0, 0])
    matmul = tf.function(lambda: tf.linalg.matmul(matrix, matrix)[0, 0])
    conv_flop = 2 * 512 * 640 * 5 * 5 * 32 * 32
    return {
        "conv5x5_gflops": conv_flop / median_seconds(lambda: float(conv()), 5) / 1e9,
        "matmul_gflops": 2 * 4096 ** 3 / median_seconds(lambda: float(matmul()), 5) / 1e9,
    }


def train_throughput(manifest, make_data):
    """Training images/s from memory and from the input pipeline, with achieved GFLOP/s."""
    classes = manifest["classes"]
    model = mcnn_model.build_mcnn(tuple(manifest["image_shape"]), len(classes),
                                  FLAGS.data_format, data_pipeline.DTYPES[manifest["dtype"]])
    optimizer = tf.keras.optimizers.SGD(0.001, momentum=FLAGS.momentum, nesterov=True)
    train_step = train_mcnn.make_train_step(model, optimizer, len(classes))
    pipeline = iter(make_data("train", training=True))
    in_memory = next(pipeline)

    def steps(batches):
        for _ in range(FLAGS.steps):
            float(train_step(*next(batches)))

    def repeat(batch):
        while True:
            yield batch

    memory_s = median_seconds(lambda: steps(repeat(in_memory)), FLAGS.repeats)
    pipeline_s = median_seconds(lambda: steps(pipeline), FLAGS.repeats)
    images = FLAGS.steps * FLAGS.per_rank_batch
    train_gflop = 3 * mcnn_model.forward_flops(model) / 1e9
    figures = allreduce_time(model) if hvd.size() > 1 else {}
    return {
        **figures,
        "ranks": hvd.size(),
        "per_rank_batch": FLAGS.per_rank_batch,
        "images_per_sec_global": images * hvd.size() / pipeline_s,
        "train_gflop_per_image": train_gflop,
        "images_per_sec_memory": images / memory_s,
        "images_per_sec": images / pipeline_s,
        "pipeline_vs_memory_ratio": memory_s / pipeline_s,
        "achieved_gflops": train_gflop * images / memory_s,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
    }


def allreduce_time(model):
    """Seconds to average one step's gradients (all weights, fp32) across the ranks."""
    gradients = [tf.ones_like(v) for v in model.trainable_variables]
    seconds = median_seconds(
        lambda: [float(t[(0,) * t.shape.rank]) for t in hvd.grouped_allreduce(gradients)],
        FLAGS.repeats)
    return {"gradient_mb": sum(g.shape.num_elements() for g in gradients) * 4 / 2 ** 20,
            "allreduce_seconds": seconds}


def input_throughput(manifest, make_data):
    """The input pipeline alone: TFRecords, and TIFFs decoded in tf.data (synthetic only)."""
    def rate(batches):
        return FLAGS.input_batches * FLAGS.per_rank_batch / median_seconds(
            lambda: [next(batches) for _ in range(FLAGS.input_batches)], FLAGS.repeats)

    figures = {"tfrecord_images_per_sec": rate(iter(make_data("train", training=True)))}
    screen = manifest["source"].replace("_by-compound", "_screen")
    if not FLAGS.data_dir and os.path.isdir(screen):
        fields, classes, _, intensity = prepare_data.prepare_fields(
            **synthetic_data.conversion_options(screen, FLAGS.synthetic_compounds_per_class,
                                                FLAGS.seed))
        figures["tiff_images_per_sec"] = rate(iter(data_pipeline.make_tiff_dataset(
            fields[fields["split"] == "train"], list(prepare_data.BBBC021_CHANNELS), intensity,
            classes, "uint8", FLAGS.per_rank_batch, training=True)))
        figures["tiff_vs_tfrecord_ratio"] = (figures["tiff_images_per_sec"]
                                             / figures["tfrecord_images_per_sec"])
    return figures


def run_part(command, env=None):
    """Figures of benchmark.py --parts=train run as `command` (its own process or mpirun)."""
    with tempfile.TemporaryDirectory() as folder:
        output = os.path.join(folder, "figures.json")
        result = subprocess.run(
            command + ["--parts=train", f"--output={output}", f"--steps={FLAGS.steps}",
                       f"--repeats={FLAGS.repeats}"] + passed_flags(),
            env={**os.environ, **(env or {})}, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
        with open(output) as f:
            return json.load(f)


def passed_flags():
    """The data and model flags this run was given, for the processes it starts."""
    names = ("data_dir", "synthetic_cache", "image_height", "image_width", "synthetic_classes",
             "synthetic_compounds_per_class", "synthetic_fields_per_treatment", "data_format")
    return [f"--{n}={FLAGS[n].value}" for n in names if FLAGS[n].present]


def sweeps():
    """Figures that need other processes: memory per image, oneDNN off, 1 vs 2 ranks."""
    here = os.path.abspath(__file__)
    single = [sys.executable, here]
    batches = [int(b) for b in FLAGS.memory_batches]
    memory = [run_part(single + [f"--per_rank_batch={b}"])["peak_rss_gb"] for b in batches]
    slope = statistics.linear_regression(batches, memory).slope
    # At batch 1: without oneDNN a full-size step takes several seconds per image.
    on = run_part(single + ["--per_rank_batch=1"])["images_per_sec_memory"]
    off = run_part(single + ["--per_rank_batch=1"],
                   {"TF_ENABLE_ONEDNN_OPTS": "0"})["images_per_sec_memory"]
    batch = f"--per_rank_batch={FLAGS.per_rank_batch}"
    launch = [os.path.join(os.path.dirname(here), "launch"), "train", "--program", here]
    cores = len(os.sched_getaffinity(0))
    one_rank = run_part(launch + ["--", batch])
    two_ranks = run_part(launch + ["--ranks-per-socket", str(cores), "--", batch])
    return {
        "peak_rss_gb_by_batch": dict(zip(batches, memory)),
        "memory_gb_per_image": slope,
        "onednn_off_images_per_sec": off,
        "onednn_speedup": on / off,
        "one_rank_images_per_sec": one_rank["images_per_sec_global"],
        f"{cores}_ranks_images_per_sec": two_ranks["images_per_sec_global"],
        f"scaling_efficiency_{cores}ranks": (two_ranks["images_per_sec_global"]
                                             / one_rank["images_per_sec_global"]),
        "gradient_mb": two_ranks["gradient_mb"],
        f"allreduce_seconds_{cores}ranks": two_ranks["allreduce_seconds"],
    }


def main(argv):
    del argv
    tf.get_logger().setLevel("ERROR")
    hvd.init()
    intra, inter = train_mcnn.configure_threads()
    manifest, make_data = train_mcnn.open_data()
    figures = {"image_shape": manifest["image_shape"], "intra_op_threads": intra,
               "inter_op_threads": inter,
               "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS")}
    if "roofline" in FLAGS.parts:
        figures.update(roofline())
    if "train" in FLAGS.parts:
        figures.update(train_throughput(manifest, make_data))
        if "conv5x5_gflops" in figures:
            figures["roofline_fraction"] = figures["achieved_gflops"] / figures["conv5x5_gflops"]
    if "input" in FLAGS.parts:
        figures.update(input_throughput(manifest, make_data))
    if "sweeps" in FLAGS.parts:
        figures.update(sweeps())
    if hvd.rank() == 0:
        report(figures)


def report(figures):
    for name, value in figures.items():
        print(f"{name:32s} {value:.3f}" if isinstance(value, float) else f"{name:32s} {value}")
    with open(FLAGS.output, "w") as f:
        json.dump(figures, f, indent=2)


if __name__ == "__main__":
    app.run(main)
