"""Benchmarks; prints a table and writes JSON. For now: the input pipeline.

    python benchmark.py                  # the full-size synthetic screen of the demo
    python benchmark.py --cache DIR --height 256 --width 384

Reads the same fields as training would, with the same cores, once from TFRecord
shards (data_pipeline.make_dataset) and once straight from the plates' TIFFs
(data_pipeline.make_tiff_dataset), and reports images/s of each: the cost of
skipping prepare_data.py. Figures are medians over --repeats timed passes.
"""
import json
import os
import statistics
import time

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

import data_pipeline  # noqa: E402
import prepare_data  # noqa: E402
import synthetic_data  # noqa: E402

flags.DEFINE_string("cache", os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"),
                    "Where the synthetic screen is (or is made).")
flags.DEFINE_integer("height", 1024, "Synthetic image height.")
flags.DEFINE_integer("width", 1280, "Synthetic image width.")
flags.DEFINE_integer("classes", 6, "Synthetic classes.")
flags.DEFINE_integer("compounds_per_class", 3, "Synthetic compounds per class.")
flags.DEFINE_integer("fields_per_treatment", 7, "Synthetic fields per treatment.")
flags.DEFINE_integer("batch_size", 4, "Images per batch.")
flags.DEFINE_integer("batches", 16, "Batches per timed pass.")
flags.DEFINE_integer("repeats", 3, "Timed passes (after one warm-up pass).")
flags.DEFINE_string("output", "benchmark.json", "JSON file for the figures.")
FLAGS = flags.FLAGS


def images_per_second(make_dataset):
    """Median rate of --repeats passes of --batches training batches, after a warm-up."""
    rates = []
    for attempt in range(FLAGS.repeats + 1):
        batches = iter(make_dataset())
        next(batches)
        start = time.perf_counter()
        for _ in range(FLAGS.batches):
            next(batches)
        if attempt:
            rates.append(FLAGS.batches * FLAGS.batch_size / (time.perf_counter() - start))
    return statistics.median(rates)


def main(_):
    data_dir = synthetic_data.ensure_synthetic_dataset(
        FLAGS.cache, FLAGS.height, FLAGS.width, FLAGS.classes, FLAGS.compounds_per_class,
        FLAGS.fields_per_treatment)
    screen = data_dir.replace("_by-compound", "_screen")
    fields, classes, _, intensity = prepare_data.prepare_fields(
        os.path.join(screen, synthetic_data.IMAGE_TABLE),
        os.path.join(screen, synthetic_data.MOA_TABLE),
        os.path.join(screen, synthetic_data.IMAGES), include_control=True,
        eval_fraction=1 / max(FLAGS.compounds_per_class, 2))
    train_fields = fields[fields["split"] == "train"]
    figures = {
        "image_shape": [FLAGS.height, FLAGS.width, 3],
        "cores": len(os.sched_getaffinity(0)),
        "tfrecord_images_per_sec": images_per_second(lambda: data_pipeline.make_dataset(
            data_dir, "train", FLAGS.batch_size, training=True)),
        "tiff_images_per_sec": images_per_second(lambda: data_pipeline.make_tiff_dataset(
            train_fields, list(prepare_data.BBBC021_CHANNELS), intensity, classes, "uint8",
            FLAGS.batch_size, training=True)),
    }
    figures["tiff_vs_tfrecord_ratio"] = (figures["tiff_images_per_sec"]
                                         / figures["tfrecord_images_per_sec"])
    for name, value in figures.items():
        print(f"{name:28s} {value:.3f}" if isinstance(value, float) else f"{name:28s} {value}")
    with open(FLAGS.output, "w") as f:
        json.dump(figures, f, indent=2)


if __name__ == "__main__":
    app.run(main)
