"""Benchmarks of the M-CNN on this machine; prints a table and writes JSON.

    ./launch bench                                         # full-size synthetic screen
    ./launch bench -- --per_rank_batch=2 --parts=train --recompute
    ./launch bench -- --image_height=256 --image_width=384 --parts=roofline,train
    ./launch bench -- --precisions=float32,mixed_bfloat16 --parts=roofline,train,memory

Takes train_mcnn.py's flags (data, image size, batch, threads), so it measures what
training runs. Each of --precisions is measured on its own, against its own
roofline, and bf16_speedup compares them. Every figure is the median of --repeats
timed runs after warm-up:
- roofline: TensorFlow's rate on a large 5x5 convolution (32 to 32 channels, forward
  only) and a large matmul with the same threads, in that precision: the CPU's peaks,
  which no layer of the M-CNN reaches;
- train: training steps from tensors already in memory, and from the real input
  pipeline; achieved GFLOP/s (3x the forward pass's multiply-adds x 2) and its
  fraction of the convolution peak; peak memory (RSS) of the process;
- layers: each distinct layer shape of the model alone, forward and the gradients
  training needs (layer_limits.py), summed over the model's layers: the limit the
  model's own layers set, and the step's fraction of it (layer_limit_fraction);
- columns: forward and backward of each scale column alone: GFLOP/s and share of
  the time, which shows where the step falls short of the roofline;
- input: the input pipeline alone, from TFRecords and straight from TIFFs;
- memory, onednn, scaling: sweeps in processes of their own: a training rank's peak
  memory phase by phase (runtime, model state, steps alone, input pipeline) at
  several batches, a fixed part and a part per image fitted to them, and the fit's
  prediction checked at a larger batch (memory_probe.py); oneDNN off against on; 1 rank x every
  core against one rank per core placed by ./launch (scaling efficiency, the time
  of one allreduce of all gradients, and how much of it the step hides), and from
  them the time to accuracy projected over nodes (node_projection.py);
- time_to_accuracy (not by default: it trains to --target once per seed): epochs,
  steps, images and seconds to a held-out accuracy, as time_to_accuracy.py says.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import tf_env  # (before TensorFlow)
from absl import flags
import horovod.tensorflow as hvd
import tensorflow as tf

import data_pipeline
import errors
import layer_limits
import mcnn_model
import memory_probe
import node_projection
import optimization
import plates
import rank_memory
import run_plan
import synthetic_data
import threads
import time_to_accuracy
import train_mcnn  # noqa: F401  (its flags: the benchmark trains as it does)
import training_data

flags.DEFINE_list("parts", ["roofline", "train", "layers", "columns", "input", "memory",
                            "onednn", "scaling"], "What to measure.")
flags.DEFINE_list("precisions", None, "Precisions to measure (float32, mixed_bfloat16); "
                  "default: float32, and mixed_bfloat16 too where the CPU has native bf16.")
flags.DEFINE_list("memory_batches", ["1", "2", "4"], "Per-rank batches the memory fit is made "
                  "from.")
flags.DEFINE_integer("memory_check_batch", 8, "A per-rank batch, outside --memory_batches, at "
                     "which the memory fit's prediction is measured (0: none).", lower_bound=0)
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


def roofline(precision):
    """In the compute precision of `precision` (bf16 has its own roofline)."""
    dtype = tf.keras.mixed_precision.Policy(precision).compute_dtype
    images = tf.random.uniform((1, 512, 640, 32), dtype=dtype)
    kernel = tf.random.uniform((5, 5, 32, 32), dtype=dtype)
    matrix = tf.random.uniform((4096, 4096), dtype=dtype)
    conv = tf.function(lambda: tf.nn.conv2d(images, kernel, 1, "SAME")[0, 0, 0, 0])
    matmul = tf.function(lambda: tf.linalg.matmul(matrix, matrix)[0, 0])
    conv_flop = 2 * 512 * 640 * 5 * 5 * 32 * 32
    return {
        "conv5x5_gflops": conv_flop / median_seconds(lambda: float(conv()), 5) / 1e9,
        "matmul_gflops": 2 * 4096 ** 3 / median_seconds(lambda: float(matmul()), 5) / 1e9,
    }


def train_throughput(plan, make_data):
    """Training images/s of `plan` from memory and from the input pipeline, with achieved
    GFLOP/s."""
    model = plan.model.build()
    optimizer = optimization.make_optimizer(0.001, plan.recipe)
    train_step = plan.train_step(model, optimizer)  # as trained: its optimizer, micro-batches
    pipeline = iter(make_data("train", training_batches(plan)))
    in_memory = next(pipeline)

    def steps(batches, step=train_step):
        for _ in range(FLAGS.steps):
            float(step(*next(batches))[0])

    def repeat(batch):
        while True:
            yield batch

    memory_s = median_seconds(lambda: steps(repeat(in_memory)), FLAGS.repeats)
    pipeline_s = median_seconds(lambda: steps(pipeline), FLAGS.repeats)
    images = FLAGS.steps * plan.per_rank_images
    train_gflop = 3 * mcnn_model.forward_flops(model) / 1e9
    figures = {}
    if hvd.size() > 1:
        local_step = plan.train_step(model, optimizer, average=False)
        local_s = median_seconds(lambda: steps(repeat(in_memory), local_step), FLAGS.repeats)
        figures = allreduce_time(model)
        exposed = max(0.0, (memory_s - local_s) / FLAGS.steps)
        figures.update(allreduce_exposed_seconds=exposed, allreduce_hidden_fraction=max(
            0.0, 1 - exposed / figures["allreduce_seconds"]))
    return {
        **figures,
        "ranks": hvd.size(),
        "per_rank_batch": plan.per_rank_batch,
        "accumulate_steps": plan.accumulate_steps,
        "optimizer": plan.recipe.optimizer,
        "images_per_sec": images * hvd.size() / pipeline_s,  # full size, all ranks
        "train_gflop_per_image": train_gflop,
        "images_per_sec_memory": images / memory_s,
        "images_per_sec_per_rank": images / pipeline_s,
        "pipeline_vs_memory_ratio": memory_s / pipeline_s,
        "achieved_gflops": train_gflop * images / memory_s,
        "peak_rss_gb": rank_memory.peak_rss_gb(),
    }


def allreduce_time(model):
    """Seconds to average one step's gradients (all weights, fp32) across the ranks."""
    gradients = [tf.ones_like(v) for v in model.trainable_variables]
    seconds = median_seconds(
        lambda: [float(t[(0,) * t.shape.rank]) for t in hvd.grouped_allreduce(gradients)],
        FLAGS.repeats)
    return {"gradient_mb": sum(g.shape.num_elements() for g in gradients) * 4 / 2 ** 20,
            "allreduce_seconds": seconds}


def column_profile(plan):
    """Where a training step's compute goes: forward and backward of each scale
    column alone, its GFLOP/s, and its share of the columns' time."""
    model = plan.model.build()
    dtype = tf.keras.mixed_precision.Policy(plan.model.precision).compute_dtype
    batch = plan.per_rank_batch
    figures, seconds = {}, {}
    for column in (layer for layer in model.layers if isinstance(layer, mcnn_model.ScaleColumn)):
        images = tf.random.uniform((batch, *column.config["input_shape"]),
                                   dtype=dtype)
        seconds[column.name] = median_seconds(
            lambda: float(backward_of(column, images)), FLAGS.repeats)
        gflop = 3 * mcnn_model.forward_flops(column.column) * batch / 1e9
        figures[f"{column.name}_gflops"] = gflop / seconds[column.name]
    total = sum(seconds.values())
    figures.update({f"{name}_time_share": s / total for name, s in seconds.items()})
    figures["columns_seconds_per_image"] = total / batch
    return figures


@tf.function
def backward_of(layer, inputs):
    with tf.GradientTape() as tape:
        outputs = layer(inputs, training=True)
    gradients = tape.gradient(outputs, layer.trainable_variables)
    return tf.add_n([tf.reduce_sum(tf.cast(g, tf.float32)) for g in gradients])


def input_throughput(plan, manifest, make_data):
    """The input pipeline alone: TFRecords, and TIFFs decoded in tf.data (synthetic only)."""
    def rate(batches):
        return FLAGS.input_batches * plan.per_rank_images / median_seconds(
            lambda: [next(batches) for _ in range(FLAGS.input_batches)], FLAGS.repeats)

    figures = {"tfrecord_images_per_sec": rate(iter(make_data("train", training_batches(plan))))}
    screen = manifest["source"].replace("_by-compound", "_screen")
    if not FLAGS.data_dir and os.path.isdir(screen):
        fields, description = plates.prepare_fields(
            *synthetic_data.screen_tables(screen),
            synthetic_data.conversion_options(FLAGS.synthetic_compounds_per_class, FLAGS.seed))
        tiffs = {**description, "dtype": "uint8"}
        figures["tiff_images_per_sec"] = rate(iter(data_pipeline.make_tiff_dataset(
            fields[fields["split"] == "train"], tiffs, training_batches(plan))))
        figures["tiff_vs_tfrecord_ratio"] = (figures["tiff_images_per_sec"]
                                             / figures["tfrecord_images_per_sec"])
    return figures


def data_source():
    """The data the training flags name (training_data.Source)."""
    return training_data.Source.from_flags(FLAGS, FLAGS.seed)


def training_batches(plan):
    """This rank's training input as a training run reads it: a step's images at a time."""
    return data_source().feed(plan.per_rank_images, training=True, seed=plan.seed)


def run_part(command, precision, env=None):
    """Figures of benchmark.py --parts=train at `precision`, run as `command` (its own
    process or mpirun)."""
    with tempfile.TemporaryDirectory() as folder:
        output = os.path.join(folder, "figures.json")
        result = subprocess.run(
            command + ["--parts=train", f"--output={output}", f"--steps={FLAGS.steps}",
                       f"--repeats={FLAGS.repeats}", f"--precisions={precision}"]
            + passed_flags(),
            env={**os.environ, **(env or {})}, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
        with open(output) as f:
            return json.load(f)[precision]


# What run_part and the sweeps set themselves in the processes they start.
SET_BY_SWEEPS = frozenset({"parts", "output", "steps", "repeats", "per_rank_batch",
                           "memory_batches", "memory_check_batch", "input_batches", "precision",
                           "precisions"})


def passed_flags(leave_out=SET_BY_SWEEPS):
    """Every other flag this run was given (data, model, Horovod), for those processes."""
    given = {FLAGS[name] for name in FLAGS if FLAGS[name].present}
    return sorted(flag.serialize() for flag in given if flag.name not in leave_out)


def training_flags():
    """The flags this run was given that train_mcnn.py takes too: not the benchmark's."""
    own = {flag.name for module in (sys.modules[__name__], time_to_accuracy, node_projection)
           for flag in FLAGS.get_flags_for_module(module)}
    return passed_flags(own | {"precision"})


def memory_sweep(precision):
    """A training rank's peak memory, phase by phase, over --memory_batches and checked
    at --memory_check_batch (memory_probe.sweep)."""
    return memory_probe.sweep([int(b) for b in FLAGS.memory_batches], FLAGS.memory_check_batch,
                              precision, training_flags())


def onednn_sweep(precision):
    """oneDNN on against off, at batch 1: without it a full-size step takes seconds."""
    on = run_part(benchmark_process() + ["--per_rank_batch=1"],
                  precision)["images_per_sec_memory"]
    off = run_part(benchmark_process() + ["--per_rank_batch=1"], precision,
                   {"TF_ENABLE_ONEDNN_OPTS": "0"})["images_per_sec_memory"]
    return {"onednn_off_images_per_sec": off, "onednn_speedup": on / off}


def scaling_sweep(precision):
    """1 rank x every core against one rank per core, both placed by ./launch: the
    scaling efficiency, the time of one allreduce of all gradients, and how much of
    it the training step hides behind compute."""
    here = os.path.abspath(__file__)
    launch = [os.path.join(os.path.dirname(here), "launch"), "train", "--program", here]
    batch = f"--per_rank_batch={FLAGS.per_rank_batch}"
    cores = len(os.sched_getaffinity(0))
    one_rank = run_part(launch + ["--", batch], precision)
    ranks = run_part(launch + ["--ranks-per-socket", str(cores), "--", batch], precision)
    return {
        "one_rank_images_per_sec": one_rank["images_per_sec"],
        f"{cores}_ranks_images_per_sec": ranks["images_per_sec"],
        f"scaling_efficiency_{cores}ranks": (ranks["images_per_sec"]
                                             / one_rank["images_per_sec"]),
        "gradient_mb": ranks["gradient_mb"],
        f"allreduce_seconds_{cores}ranks": ranks["allreduce_seconds"],
        f"allreduce_exposed_seconds_{cores}ranks": ranks["allreduce_exposed_seconds"],
        f"allreduce_hidden_fraction_{cores}ranks": ranks["allreduce_hidden_fraction"],
    }


def benchmark_process():
    return [sys.executable, os.path.abspath(__file__)]


SWEEPS = {"memory": memory_sweep, "onednn": onednn_sweep, "scaling": scaling_sweep}


@flags.validator("precisions", message="--precisions takes float32 and mixed_bfloat16")
def _known_precisions(values):
    return set(values or ()) <= set(tf_env.PRECISIONS) - {"auto"}


def precisions():
    """--precisions, else --precision, else float32 and, where the CPU has native bf16,
    mixed_bfloat16. bf16 first: peak_rss_gb is the process's peak so far, and bf16's is
    the smaller."""
    if FLAGS.precisions:
        chosen = set(FLAGS.precisions)
    elif FLAGS["precision"].present:
        chosen = {tf_env.resolve_precision(FLAGS.precision)[0]}
    else:
        chosen = {"float32", tf_env.resolve_precision("auto")[0]}
    return sorted(chosen, reverse=True)


def measure(precision, plan, manifest, make_data):
    """The figures of --parts at `precision`, of `plan` on the data set `manifest` (both
    None when only time_to_accuracy, which opens data of its own, is measured)."""
    figures = {}
    if "roofline" in FLAGS.parts:
        figures.update(roofline(precision))
    if "train" in FLAGS.parts:
        figures.update(train_throughput(plan, make_data))
        if "conv5x5_gflops" in figures:
            figures["conv5x5_peak_fraction"] = (figures["achieved_gflops"]
                                                / figures["conv5x5_gflops"])
    if "layers" in FLAGS.parts:
        figures.update(layer_limits.layer_limit(
            plan.model.build(), plan.per_rank_batch,
            lambda run: median_seconds(run, FLAGS.repeats)))
        if "images_per_sec_memory" in figures:
            figures["layer_limit_fraction"] = (figures["images_per_sec_memory"]
                                               / figures["layer_limit_images_per_sec"])
    if "columns" in FLAGS.parts:
        figures.update(column_profile(plan))
    if "input" in FLAGS.parts:
        figures.update(input_throughput(plan, manifest, make_data))
    for name, sweep in SWEEPS.items():
        if name in FLAGS.parts:
            figures.update(sweep(precision))
    if "scaling" in FLAGS.parts:
        figures.update(node_projection.projected_time_to_accuracy(
            figures, len(os.sched_getaffinity(0)),
            node_projection.noise_scales(FLAGS.noise_scales, FLAGS.batch_study_fit)))
    if "time_to_accuracy" in FLAGS.parts:
        figures.update(time_to_accuracy.measure(
            training_flags(), precision, FLAGS.target, FLAGS.target_eval_every,
            [int(s) for s in FLAGS.seeds], FLAGS.model_dir))
    return figures


def main(argv):
    del argv
    tf.get_logger().setLevel("ERROR")
    threads.init_horovod(FLAGS.fusion_threshold_mb)
    rank_threads = threads.configure_threads(FLAGS.intra_op_threads, FLAGS.inter_op_threads)
    results = {"cpu": tf_env.cpu_description(), "tensorflow": tf.__version__,
               "intra_op_threads": rank_threads.intra_op,
               "inter_op_threads": rank_threads.inter_op,
               "recompute": FLAGS.recompute, "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS")}
    manifest, make_data = None, None
    if set(FLAGS.parts) - {"time_to_accuracy"}:  # whose runs open data of their own
        manifest, make_data = training_data.open_data(data_source(), FLAGS.seed)
        results["image_shape"] = manifest["image_shape"]
    for precision in precisions():  # each its own plan: 'auto' fits its memory anew
        plan = manifest and run_plan.resolve(run_plan.Request.from_flags(FLAGS), manifest,
                                             precision, "as measured", rank_threads)
        results[precision] = {"precision": precision, "recompute": FLAGS.recompute,
                              **measure(precision, plan, manifest, make_data)}
    if {"float32", "mixed_bfloat16"} <= results.keys() and "train" in FLAGS.parts:
        results["bf16_speedup"] = (results["mixed_bfloat16"]["images_per_sec"]
                                   / results["float32"]["images_per_sec"])
    if hvd.rank() == 0:
        report(results)


def report(results):
    """A table of the figures, one column per precision, the layers timed alone, then the
    JSON file."""
    columns = [name for name in results if isinstance(results[name], dict)]
    rows = {figure: None for name in columns for figure in results[name] if figure != "layers"}

    def cell(value):
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    width = max(map(len, [*results, *rows]))
    for name, value in results.items():
        if name not in columns:
            print(f"{name:{width}s} {cell(value)}")
    print(f"{'':{width}s} " + " ".join(f"{name:>16s}" for name in columns))
    for figure in rows:
        print(f"{figure:{width}s} " + " ".join(
            f"{cell(results[name].get(figure, '-')):>16s}" for name in columns))
    for name in columns:
        if "layers" in results[name]:
            print(f"\n{name}: the model's layers timed alone (ms per pass of the batch)")
            for row in results[name]["layers"]:
                print(f"  {row['layer']:44s} x{row['count']:<3d} {row['ms']:9.2f} ms "
                      f"{row['gflops']:8.1f} GFLOP/s  {row['time_share']:6.1%} of the sum")
    with open(FLAGS.output, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    errors.run_main(main)
