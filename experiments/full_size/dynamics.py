"""Why the full-size M-CNN learns more slowly per epoch than a smaller field: its first
steps, measured (issue 35, item 1; docs/recipe_study.md, "At full size").

Trains as train_mcnn.py would with the same flags (one rank, the same data, model,
optimizer and schedule) for --steps steps, and records at every step the loss and each
layer's update-to-weight ratio |w_after - w_before| / |w_before| (kernels), and every
--probe_every steps the share of dead ReLU units per layer (channels whose output is
zero at every pixel of the probe fields: the first --probe_fields training fields,
unaugmented) and the spread of fc_512's output on them; the held-out field accuracy at
the end of each epoch; the gradient's global norm at every step. One JSON file per run; --tabulate prints the tables of many.

    experiments/full_size/dynamics           # both sizes, seeds 0-2, then the tables
    .venv/bin/python experiments/full_size/dynamics.py --flagfile=experiments/demo.flags \\
        --time_budget_minutes=0 --seed=0 --output=runs/dynamics/full_seed0.json
    .venv/bin/python experiments/full_size/dynamics.py --tabulate runs/dynamics/*.json
"""
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import numpy as np  # noqa: E402
import tf_env  # noqa: E402,F401  (before TensorFlow)
from absl import app, flags  # noqa: E402
import horovod.tensorflow as hvd  # noqa: E402
import tensorflow as tf  # noqa: E402

import evaluation  # noqa: E402
import mcnn_model  # noqa: E402
import optimization  # noqa: E402
import run_plan  # noqa: E402
import threads  # noqa: E402
import train_mcnn  # noqa: E402,F401  (its flags, which the demo's flag file sets)
import training_data  # noqa: E402

flags.DEFINE_integer("steps", 126, "Training steps to record (the demo's screen: 42 an epoch).")
flags.DEFINE_integer("probe_every", 10, "Steps between dead-unit probes.")
flags.DEFINE_integer("probe_fields", 4, "Training fields the dead units are probed on.")
flags.DEFINE_string("output", None, "JSON file of the run's record.")
flags.DEFINE_bool("tabulate", False, "Print the tables of the JSON files given as arguments.")
FLAGS = flags.FLAGS

RELU_LAYERS = [f"scale_{k}/conv_{i}" for k in range(mcnn_model.NUM_SCALES)
               for i in range(mcnn_model.CONVS_PER_SCALE)] + ["merge_conv"]


def kernels(model):
    """{layer name: kernel variable} of every convolution and dense layer, in RELU_LAYERS'
    names (scale_K/conv_I) plus fc_512 and logits."""
    named = {}
    for layer in model.layers:
        inner = getattr(layer, "column", None)
        for sub in (inner.layers if inner is not None else [layer]):
            if hasattr(sub, "kernel"):
                named[f"{layer.name}/{sub.name}" if inner is not None else sub.name] = sub.kernel
    return named


def relu_probe(model):
    """probe(images) -> {layer: (dead share, ...)}: the share of each ReLU layer's channels
    that are zero at every pixel of `images`, and fc_512's output spread."""
    front = tf.keras.Model(model.input, model.get_layer("scale_0").input)
    columns = []
    for k in range(mcnn_model.NUM_SCALES):
        column = model.get_layer(f"scale_{k}").column
        columns.append(tf.keras.Model(column.input, [column.get_layer(f"conv_{i}").output
                                                     for i in range(mcnn_model.CONVS_PER_SCALE)]))
    tail = tf.keras.Model(model.input, [model.get_layer("merge_conv").output,
                                        model.get_layer("fc_512").output])

    def probe(images):
        x = front(images, training=False)
        maxima = [tf.reduce_max(out, axis=(0, 1, 2)) for column in columns
                  for out in column(x, training=False)]
        merged, hidden = tail(images, training=False)
        maxima.append(tf.reduce_max(merged, axis=(0, 1, 2)))
        dead = {name: float(tf.reduce_mean(tf.cast(m <= 0, tf.float32)))
                for name, m in zip(RELU_LAYERS, maxima)}
        return dead, float(tf.math.reduce_std(tf.cast(hidden, tf.float32)))
    return probe


def held_out_accuracy(predict, make_data, source, classes, batch=4):
    """The share of held-out fields predicted right, as evaluation.py predicts them."""
    fields, _ = evaluation.predicted_fields(
        predict, make_data("eval", source.feed(batch, provenance=True)), classes)
    return float((fields["label"] == fields["prediction"]).mean())


def record_run():
    """Trains --steps steps as train_mcnn.py would and returns the record (a dict)."""
    hvd.init()
    rank_threads = threads.configure_threads(FLAGS.intra_op_threads, FLAGS.inter_op_threads)
    tf.keras.utils.set_random_seed(FLAGS.seed)
    request = run_plan.Request.from_flags(FLAGS)
    precision, why = run_plan.resolve_precision(request.precision)
    field = (FLAGS.image_height, FLAGS.image_width)
    source = training_data.Source.from_flags(FLAGS, FLAGS.seed)
    manifest, make_data = training_data.open_data(source, FLAGS.seed, field)
    plan = run_plan.resolve(request, manifest, precision, why, rank_threads)
    schedule = plan.learning_rate()
    model = plan.model.build(training_data.input_standardization(manifest,
                                                                 source.input_scaling))
    optimizer = optimization.make_optimizer(schedule, plan.recipe)
    optimizer.build(model.trainable_variables)
    train_step = plan.train_step(model, optimizer)
    named = kernels(model)
    probe = relu_probe(model)
    predict = evaluation.make_predict(model, plan.model.image_shape, plan.model.stored_dtype)
    probe_images = next(iter(make_data("train", source.feed(FLAGS.probe_fields))))[0]
    batches = iter(make_data("train", source.feed(plan.per_rank_batch, training=True,
                                                  seed=plan.seed)))
    record = {"image_shape": list(plan.model.image_shape), "seed": FLAGS.seed,
              "precision": precision, "cpu": plan.cpu, "peak_lr": plan.peak_lr,
              "global_batch": plan.global_batch, "steps_per_epoch": plan.steps_per_epoch,
              "fc_512_fan_in": int(named["fc_512"].shape[0]), "optimizer": plan.recipe.optimizer,
              "loss": [], "gradient_norm": [], "update_ratio": {name: [] for name in named},
              "probes": [], "held_out": []}

    def add_probe(step):
        dead, spread = probe(probe_images)
        record["probes"].append({"step": step, "dead": dead, "fc_512_spread": spread})

    add_probe(0)
    started = time.time()
    for step in range(1, FLAGS.steps + 1):
        before = {name: v.numpy() for name, v in named.items()}
        loss, _, norm2 = train_step(*next(batches))
        record["loss"].append(float(loss))
        record["gradient_norm"].append(float(norm2) ** 0.5)
        for name, v in named.items():
            record["update_ratio"][name].append(float(
                np.linalg.norm(v.numpy() - before[name]) / np.linalg.norm(before[name])))
        if step % FLAGS.probe_every == 0:
            add_probe(step)
        if step % plan.steps_per_epoch == 0:
            record["held_out"].append({"epoch": step // plan.steps_per_epoch,
                                       "accuracy": held_out_accuracy(
                                           predict, make_data, source, manifest["classes"])})
            print(f"{field} seed {FLAGS.seed} epoch {step // plan.steps_per_epoch}: loss "
                  f"{loss:.3f}, held-out {record['held_out'][-1]['accuracy']:.3f}, "
                  f"{time.time() - started:.0f} s", flush=True)
    return record


# ---------------------------------------------------------------- the tables

def size_name(record):
    return "x".join(str(s) for s in record["image_shape"][:2])


def layer_groups():
    """(label, layers): the columns' convolutions at full resolution and coarser, the merge
    and the two dense layers."""
    return [("columns 0-2 (16 filters)", [n for n in RELU_LAYERS if n[6] in "012"]),
            ("columns 3-6 (32-64 filters)", [n for n in RELU_LAYERS if n[6] in "3456"]),
            ("merge_conv", ["merge_conv"]), ("fc_512", ["fc_512"]), ("logits", ["logits"])]


def over_seeds(records, value, form="{:.2f}"):
    """The median over `records` (one size's seeds) of value(record), formatted; '-' where
    no record has it."""
    values = [v for v in map(value, records) if v is not None]
    return form.format(statistics.median(values)) if values else "-"


def window_mean(series, first, last, reduce=np.mean):
    """reduce() of steps first..last (1-based) of a per-step series, or None without one."""
    return reduce(series[first - 1:last]) if series else None


def dead_share(record, layers, step):
    return np.mean([p["dead"][n] for p in record["probes"] if p["step"] == step for n in layers])


def markdown(header, rows):
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for cells in rows:
        print("| " + " | ".join(cells) + " |")


def tabulate(paths):
    """Prints the runs' first steps per field size, medians over seeds, as markdown."""
    by_size = {}
    for path in paths:
        with open(path) as f:
            record = json.load(f)
        by_size.setdefault(size_name(record), []).append(record)
    sizes = sorted(by_size, key=lambda s: int(s.split("x")[0]))
    runs = [by_size[s] for s in sizes]
    first = runs[0][0]
    print(f"CPU: {first['cpu']}; {first['precision']}; {first['optimizer']} at a peak rate of "
          f"{first['peak_lr']:g}, global batch {first['global_batch']}; seeds "
          + ", ".join(f"{s}: {sorted(r['seed'] for r in by_size[s])}" for s in sizes)
          + "; medians over seeds\n")
    windows = ((1, 1), (2, 5), (6, 20), (21, 60), (61, 100))
    rows = [["fc_512 fan-in", *(f"{rs[0]['fc_512_fan_in']:,}" for rs in runs)]]
    rows += [[f"loss, steps {a}-{b} (mean)",
              *(over_seeds(rs, lambda r: window_mean(r["loss"], a, b)) for rs in runs)]
             for a, b in windows]
    rows += [[f"gradient norm, steps {a}-{b} (median)",
              *(over_seeds(rs, lambda r: window_mean(r.get("gradient_norm"), a, b, np.median),
                           "{:.3g}") for rs in runs)] for a, b in windows]
    rows += [[f"held-out accuracy, epoch {epoch} (seeds)",
              *(" / ".join(f"{h['accuracy']:.2f}" for r in sorted(rs, key=lambda r: r["seed"])
                           for h in r["held_out"] if h["epoch"] == epoch) for rs in runs)]
             for epoch in (1, 2, 3)]
    markdown(["", *sizes], rows)
    print("\nUpdate-to-weight ratio |w_after - w_before| / |w_before| per step: the median "
          "over the group's layers, steps and seeds (the largest in brackets)\n")
    spans = ((0, 10), (10, 100))
    header = ["layers", *(f"{s}, steps {a + 1}-{b}" for s in sizes for a, b in spans)]
    rows = []
    for label, layers in layer_groups():
        cells = []
        for rs in runs:
            for a, b in spans:
                ratios = [x for r in rs for n in layers for x in r["update_ratio"][n][a:b]]
                cells.append(f"{np.median(ratios):.1e} ({max(ratios):.1e})")
        rows.append([label, *cells])
    markdown(header, rows)
    print("\nShare of dead ReLU units (channels with no output on any pixel of the probe "
          "fields), the mean over the group's layers, median over seeds\n")
    probed = [p["step"] for p in first["probes"] if p["step"] in (0, 10, 20, 50, 100)]
    markdown(["layers", *(f"{s}, step {t}" for s in sizes for t in probed)],
             [[label, *(over_seeds(rs, lambda r: dead_share(r, layers, t))
                        for rs in runs for t in probed)]
              for label, layers in layer_groups()[:3]])
    print(f"\nfc_512's output spread on the probe fields at steps "
          f"{' / '.join(map(str, probed))}, per seed:\n")
    for s, rs in zip(sizes, runs):
        print(f"- {s}: " + "; ".join(" / ".join(f"{p['fc_512_spread']:.2g}" for p in r["probes"]
                                               if p["step"] in probed)
                                     for r in sorted(rs, key=lambda r: r["seed"])))


def main(argv):
    if FLAGS.tabulate:
        return tabulate(argv[1:])
    if not FLAGS.output:
        raise app.UsageError("--output is required to record a run")
    record = record_run()
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
    with open(FLAGS.output, "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    app.run(main)
