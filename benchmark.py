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
- input: the input pipeline alone, from TFRecords and straight from TIFFs.
"""
import json
import os
import resource
import statistics
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

flags.DEFINE_list("parts", ["roofline", "train", "input"], "What to measure.")
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
    return {
        "per_rank_batch": FLAGS.per_rank_batch,
        "train_gflop_per_image": train_gflop,
        "images_per_sec_memory": images / memory_s,
        "images_per_sec": images / pipeline_s,
        "pipeline_vs_memory_ratio": memory_s / pipeline_s,
        "achieved_gflops": train_gflop * images / memory_s,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
    }


def input_throughput(manifest, make_data):
    """The input pipeline alone: TFRecords, and TIFFs decoded in tf.data (synthetic only)."""
    def rate(batches):
        return FLAGS.input_batches * FLAGS.per_rank_batch / median_seconds(
            lambda: [next(batches) for _ in range(FLAGS.input_batches)], FLAGS.repeats)

    figures = {"tfrecord_images_per_sec": rate(iter(make_data("train", training=True)))}
    screen = manifest["source"].replace("_by-compound", "_screen")
    if not FLAGS.data_dir and os.path.isdir(screen):
        fields, classes, _, intensity = prepare_data.prepare_fields(
            os.path.join(screen, synthetic_data.IMAGE_TABLE),
            os.path.join(screen, synthetic_data.MOA_TABLE),
            os.path.join(screen, synthetic_data.IMAGES), include_control=True,
            eval_fraction=1 / max(FLAGS.synthetic_compounds_per_class, 2), seed=FLAGS.seed)
        figures["tiff_images_per_sec"] = rate(iter(data_pipeline.make_tiff_dataset(
            fields[fields["split"] == "train"], list(prepare_data.BBBC021_CHANNELS), intensity,
            classes, "uint8", FLAGS.per_rank_batch, training=True)))
        figures["tiff_vs_tfrecord_ratio"] = (figures["tiff_images_per_sec"]
                                             / figures["tfrecord_images_per_sec"])
    return figures


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
    for name, value in figures.items():
        print(f"{name:28s} {value:.3f}" if isinstance(value, float) else f"{name:28s} {value}")
    with open(FLAGS.output, "w") as f:
        json.dump(figures, f, indent=2)


if __name__ == "__main__":
    app.run(main)
