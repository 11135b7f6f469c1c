"""Trains the multi-scale CNN on full-size images, data-parallel with Horovod.

    mpirun -np 4 python train_mcnn.py --data_dir=DIR --per_rank_batch=8 --model_dir=runs/x
    ./launch train --ranks-per-socket 2 --hostfile hosts -- --flagfile=experiments/authors_8_nodes.flags

Without --data_dir it trains on the embedded synthetic screen (generated on first use).
Every rank runs this program; rank 0 alone prints, writes TensorBoard summaries,
checkpoints and summary.json.
"""
import json
import os
import sys
import time

# oneDNN makes training several times faster; TensorFlow turns it on by itself only
# on CPUs with AVX-512 VNNI and newer, so AVX2 nodes need it set. Must precede the import.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app, flags  # noqa: E402
import horovod.tensorflow as hvd  # noqa: E402
import pandas as pd  # noqa: E402
import tensorflow as tf  # noqa: E402

import data_pipeline  # noqa: E402
import evaluation  # noqa: E402
import lr_schedule  # noqa: E402
import mcnn_model  # noqa: E402
import prepare_data  # noqa: E402
import synthetic_data  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

# Data
flags.DEFINE_string("data_dir", None, "Data set folder (manifest.json + TFRecord shards). "
                    "Unset: the embedded synthetic screen.")
flags.DEFINE_string("synthetic_cache", os.path.join(HERE, "data"),
                    "Where the synthetic data set is generated and cached.")
flags.DEFINE_integer("image_height", 1024, "Synthetic image height (multiple of 128).")
flags.DEFINE_integer("image_width", 1280, "Synthetic image width (multiple of 128).")
flags.DEFINE_integer("synthetic_classes", len(synthetic_data.CLASSES),
                     "MoA classes in the synthetic screen, the DMSO control included.")
flags.DEFINE_integer("synthetic_compounds_per_class", 3,
                     "Compounds per MoA in the synthetic screen; one per MoA is held out.")
flags.DEFINE_integer("synthetic_fields_per_treatment", 4,
                     "Fields per compound and concentration in the synthetic screen.")
flags.DEFINE_integer("shuffle_buffer", 64, "Images in each rank's shuffle buffer.")
# Or straight from plates (TIFFs + tables), with no conversion step: see prepare_data.py.
prepare_data.define_conversion_flags(flags)
# Optimisation (the authors' recipe by default)
flags.DEFINE_integer("per_rank_batch", 8, "Images per rank per step.")
flags.DEFINE_float("epochs", 52, "Training epochs (may be fractional).")
flags.DEFINE_float("base_lr", 0.001, "Learning rate at --base_batch images; also the "
                   "warm-up's starting rate.")
flags.DEFINE_integer("base_batch", 32, "Global batch at which --base_lr was tuned.")
flags.DEFINE_enum("lr_scaling", "linear", lr_schedule.SCALING_RULES,
                  "How the peak rate grows with the global batch.")
flags.DEFINE_float("warmup_epochs", 5, "Linear warm-up from --base_lr to the peak.")
flags.DEFINE_enum("lr_decay", "linear", lr_schedule.DECAYS, "Decay after the warm-up.")
flags.DEFINE_list("decay_epochs", [], "Epochs at which --lr_decay=step divides the rate by 10.")
flags.DEFINE_float("end_lr", 1e-4, "Rate at the last step (linear, cosine); floor for step.")
flags.DEFINE_float("momentum", 0.9, "Nesterov momentum.")
flags.DEFINE_float("weight_decay", 5e-5, "L2 penalty on all weights.")
flags.DEFINE_float("label_smoothing", 0.1, "Label smoothing of the cross-entropy.")
flags.DEFINE_integer("seed", 0, "Seed for weights, shuffling and augmentation.")
# Execution
flags.DEFINE_enum("data_format", "channels_last", ["channels_last", "channels_first"],
                  "Layout of the convolutions.")
flags.DEFINE_integer("intra_op_threads", 0, "Threads per op; 0: the launcher's "
                     "TF_NUM_INTRAOP_THREADS, else the cores this rank is bound to.")
flags.DEFINE_integer("inter_op_threads", 0, "Ops run at once; 0: the launcher's "
                     "TF_NUM_INTEROP_THREADS, else TensorFlow's default.")
# Output
flags.DEFINE_string("model_dir", os.path.join("runs", "mcnn"),
                    "Checkpoints, TensorBoard logs, flags.txt and summary.json.")
flags.DEFINE_integer("log_every", 10, "Print progress every this many steps.")
flags.DEFINE_integer("eval_every", 1, "Evaluate on the held-out split every this many epochs.")
flags.DEFINE_integer("checkpoint_every", 1, "Checkpoint every this many epochs.")
flags.DEFINE_integer("keep_checkpoints", 3, "Checkpoints kept.")
flags.DEFINE_float("target_accuracy", 0.0, "Stop once held-out accuracy reaches this (0: never).")

FLAGS = flags.FLAGS


@flags.multi_flags_validator(["image_height", "image_width"],
                             message="--image_height and --image_width must be multiples of "
                                     f"{mcnn_model.SIZE_MULTIPLE} (the M-CNN pools by 128)")
def _image_size_fits_the_model(sizes):
    return all(size > 0 and size % mcnn_model.SIZE_MULTIPLE == 0 for size in sizes.values())


def log(message):
    if hvd.rank() == 0:
        print(message, flush=True)


def configure_threads():
    intra = FLAGS.intra_op_threads or int(os.environ.get("TF_NUM_INTRAOP_THREADS", 0))
    inter = FLAGS.inter_op_threads or int(os.environ.get("TF_NUM_INTEROP_THREADS", 0))
    if intra:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
    if inter:
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    return intra or len(os.sched_getaffinity(0)), inter or "default"


def resolve_data_dir():
    """The data set to train on: --data_dir, or the synthetic screen (generated if absent)."""
    if FLAGS.data_dir:
        synthetic_only = [name for name in ("image_height", "image_width", "synthetic_classes",
                                            "synthetic_compounds_per_class",
                                            "synthetic_fields_per_treatment")
                          if FLAGS[name].present]
        if synthetic_only:
            raise app.UsageError(f"--{', --'.join(synthetic_only)} apply to synthetic data only; "
                                 f"with --data_dir the manifest gives the image shape and classes")
        return FLAGS.data_dir
    return synthetic_data.ensure_synthetic_dataset(
        FLAGS.synthetic_cache, FLAGS.image_height, FLAGS.image_width, FLAGS.synthetic_classes,
        FLAGS.synthetic_compounds_per_class, FLAGS.synthetic_fields_per_treatment,
        seed=FLAGS.seed)


def open_data():
    """(manifest, make_data(split, training, provenance)) for shards or for plates."""
    if not FLAGS.image_table:
        data_dir = resolve_data_dir()
        manifest = {**data_pipeline.read_manifest(data_dir), "source": data_dir}
        return manifest, lambda split, training=False, provenance=False: (
            data_pipeline.make_dataset(
                data_dir, split, FLAGS.per_rank_batch, hvd.rank(), hvd.size(), training,
                FLAGS.shuffle_buffer, FLAGS.seed, manifest, provenance))
    if FLAGS.data_dir:
        raise app.UsageError("give --data_dir or --image_table, not both")
    fields, classes, image_shape, intensity = prepare_data.prepare_fields(
        **prepare_data.conversion_options(FLAGS), seed=FLAGS.seed)
    dtype = "uint8"
    manifest = {"classes": classes, "image_shape": list(image_shape), "dtype": dtype,
                "channels": FLAGS.channels, "intensity": intensity,
                "split": {"by": FLAGS.split, "eval_fraction": FLAGS.eval_fraction},
                "splits": {side: {"count": int((fields["split"] == side).sum())}
                           for side in ("train", "eval")},
                "source": os.path.abspath(FLAGS.image_table)}
    return manifest, lambda split, training=False, provenance=False: (
        data_pipeline.make_tiff_dataset(
            fields[fields["split"] == split], FLAGS.channels, intensity, classes, dtype,
            FLAGS.per_rank_batch, hvd.rank(), hvd.size(), training, FLAGS.seed, provenance))


def build_lr_schedule(global_batch, steps_per_epoch, total_steps):
    peak = lr_schedule.scaled_learning_rate(FLAGS.base_lr, global_batch, FLAGS.base_batch,
                                            FLAGS.lr_scaling)
    warmup_steps = round(FLAGS.warmup_epochs * steps_per_epoch)
    if warmup_steps >= total_steps:
        raise app.UsageError(f"--warmup_epochs={FLAGS.warmup_epochs} is not shorter than "
                             f"--epochs={FLAGS.epochs}")
    return lr_schedule.WarmupThenDecay(
        FLAGS.base_lr, peak, warmup_steps, total_steps, FLAGS.end_lr, FLAGS.lr_decay,
        [round(float(e) * steps_per_epoch) for e in FLAGS.decay_epochs])


def compute_gradients(model, images, labels, num_classes):
    """Loss of this rank's batch and gradients averaged over all ranks by allreduce."""
    cross_entropy = tf.keras.losses.CategoricalCrossentropy(
        from_logits=True, label_smoothing=FLAGS.label_smoothing)
    with tf.GradientTape() as tape:
        logits = model(images, training=True)
        loss = cross_entropy(tf.one_hot(labels, num_classes), logits)
        total = loss + FLAGS.weight_decay * tf.add_n(
            [tf.nn.l2_loss(v) for v in model.trainable_variables])
    tape = hvd.DistributedGradientTape(tape)
    return loss, tape.gradient(total, model.trainable_variables)


def make_train_step(model, optimizer, num_classes):
    @tf.function
    def train_step(images, labels):
        loss, gradients = compute_gradients(model, images, labels, num_classes)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss
    return train_step


def make_predict(model, image_shape, dtype):
    @tf.function(input_signature=[tf.TensorSpec((None, *image_shape), dtype)])
    def predict(images):
        return tf.argmax(model(images, training=False), axis=-1, output_type=tf.int32)
    return predict


def evaluate(predict, dataset, classes):
    """Metrics of the whole held-out split: each rank predicts its own shards, and
    Horovod gathers every field's result on all ranks."""
    mine = []
    for images, labels, provenance in dataset:
        columns = {"label": labels.numpy(), "prediction": predict(images).numpy(),
                   **{k: [v.decode() for v in provenance[k].numpy()] for k in provenance}}
        mine.append(pd.DataFrame(columns))
    everyone = hvd.allgather_object(pd.concat(mine) if mine else None, name="eval_fields")
    fields = pd.concat([part for part in everyone if part is not None], ignore_index=True)
    return fields, evaluation.summarize(fields, classes)


class StepTimer:
    """Loss and seconds of the training steps since it was made; other time is skipped."""

    def __init__(self):
        self.loss, self.steps, self.seconds, self.mark = 0.0, 0, 0.0, time.time()

    def add(self, loss):
        now = time.time()
        self.loss += loss
        self.steps += 1
        self.seconds += now - self.mark
        self.mark = now

    def skip(self):
        self.mark = time.time()

    def mean_loss(self):
        return self.loss / self.steps


def write_scalars(writer, step, **scalars):
    if writer:
        with writer.as_default(step=step):
            for name, value in scalars.items():
                tf.summary.scalar(name, value)


def weights_in_sync(model):
    """True when all ranks hold the same weights, as averaged gradients guarantee."""
    fingerprint = tf.stack([tf.reduce_sum(tf.cast(v, tf.float64)) for v in model.weights])
    everyone = hvd.allgather(fingerprint[tf.newaxis], name="weights_fingerprint")
    return bool(tf.reduce_all(everyone == everyone[0]))


def open_outputs(model, optimizer):
    """The model dir's TensorBoard writer and checkpoint manager; records the flags."""
    os.makedirs(FLAGS.model_dir, exist_ok=True)
    with open(os.path.join(FLAGS.model_dir, "flags.txt"), "w") as f:
        f.write(FLAGS.flags_into_string())  # a flag file: --flagfile=flags.txt reruns it
    writer = tf.summary.create_file_writer(os.path.join(FLAGS.model_dir, "tensorboard"))
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
    manager = tf.train.CheckpointManager(
        checkpoint, os.path.join(FLAGS.model_dir, mcnn_model.CHECKPOINTS),
        max_to_keep=FLAGS.keep_checkpoints)
    return writer, manager


def write_summary(model_dir, summary):
    path = os.path.join(model_dir, "summary.json")
    with open(path + ".tmp", "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(path + ".tmp", path)
    return path


def main(argv):
    del argv
    tf.get_logger().setLevel("ERROR")  # TensorFlow's Python warnings are noise here
    # Horovod 1: one process per rank, all ranks discover each other.
    hvd.init()
    # Horovod 2: each rank uses only the cores it was placed on.
    intra, inter = configure_threads()
    tf.keras.utils.set_random_seed(FLAGS.seed)

    manifest, make_data = open_data()
    image_shape, classes = tuple(manifest["image_shape"]), manifest["classes"]
    dtype = data_pipeline.DTYPES[manifest["dtype"]]
    train_count = manifest["splits"]["train"]["count"]
    # Horovod 3: the global batch grows with the ranks, and the learning rate with it.
    global_batch = FLAGS.per_rank_batch * hvd.size()
    steps_per_epoch = train_count // global_batch
    if steps_per_epoch == 0:
        raise app.UsageError(f"{train_count} training images make no full global "
                             f"batch of {global_batch} ({hvd.size()} ranks x --per_rank_batch)")
    total_steps = max(1, round(FLAGS.epochs * steps_per_epoch))
    schedule = build_lr_schedule(global_batch, steps_per_epoch, total_steps)

    train_data = make_data("train", training=True)
    eval_data = make_data("eval", provenance=True)

    model = mcnn_model.build_mcnn(image_shape, len(classes), FLAGS.data_format, dtype)
    optimizer = tf.keras.optimizers.SGD(schedule, momentum=FLAGS.momentum, nesterov=True)
    optimizer.build(model.trainable_variables)
    # Horovod 4: every rank starts from rank 0's weights and optimizer state.
    hvd.broadcast_variables(model.variables, root_rank=0)
    hvd.broadcast_variables(optimizer.variables, root_rank=0)
    # Horovod 5: gradients are averaged by allreduce inside train_step.
    train_step = make_train_step(model, optimizer, len(classes))
    predict = make_predict(model, image_shape, dtype)

    # Horovod 6: rank 0 alone writes.
    writer, manager = open_outputs(model, optimizer) if hvd.rank() == 0 else (None, None)

    log(f"M-CNN: {model.count_params():,} parameters, images {image_shape} {manifest['dtype']}, "
        f"{len(classes)} classes; data {manifest['source']}")
    log(f"{hvd.size()} rank{'s' * (hvd.size() > 1)} x {FLAGS.per_rank_batch} images = "
        f"global batch {global_batch}; "
        f"{steps_per_epoch} steps/epoch, {total_steps} steps; peak LR {schedule.peak_lr:g} "
        f"({FLAGS.lr_scaling} rule); threads per rank: {intra} intra-op, {inter} inter-op; "
        f"oneDNN {os.environ.get('TF_ENABLE_ONEDNN_OPTS')}")

    start = time.time()
    history, time_to_target, accuracy, eval_images = [], None, None, 0
    window, total = StepTimer(), StepTimer()
    batches = iter(train_data)
    for step in range(1, total_steps + 1):
        images, labels = next(batches)
        loss = float(train_step(images, labels))
        for timer in (window, total):
            if step == 1:  # tracing the graph is not training throughput
                timer.skip()
            else:
                timer.add(loss)

        epoch = step / steps_per_epoch
        if window.steps and (step % FLAGS.log_every == 0 or step == total_steps):
            mean_loss = float(hvd.allreduce(tf.constant(window.mean_loss()), name="loss"))
            global_rate = window.steps * global_batch / window.seconds
            lr = float(schedule(optimizer.iterations))
            log(f"step {step}/{total_steps}  epoch {epoch:.2f}  loss {mean_loss:.4f}  "
                f"lr {lr:.5f}  images/s {global_rate / hvd.size():.2f} per rank, "
                f"{global_rate:.2f} global")
            write_scalars(writer, step, loss=mean_loss, learning_rate=lr,
                          images_per_second=global_rate)
            window = StepTimer()

        epoch_end = step % steps_per_epoch == 0
        whole_epochs = step // steps_per_epoch
        if (epoch_end and whole_epochs % FLAGS.eval_every == 0) or step == total_steps:
            fields, metrics = evaluate(predict, eval_data, classes)
            accuracy, eval_images = metrics["accuracy"], metrics["fields"]
            history.append({"step": step, "epoch": round(epoch, 3), "accuracy": accuracy,
                            "treatment_accuracy": metrics["treatment_accuracy"]})
            log(f"epoch {epoch:.2f}: held-out accuracy {accuracy:.4f} on {eval_images} fields, "
                f"{metrics['treatment_accuracy']:.4f} on {metrics['treatments']} treatments")
            write_scalars(writer, step, eval_accuracy=accuracy,
                          eval_treatment_accuracy=metrics["treatment_accuracy"])
            if hvd.rank() == 0:
                evaluation.write_report(os.path.join(FLAGS.model_dir, "evaluation"), fields,
                                        metrics, classes, step)
            if FLAGS.target_accuracy and accuracy >= FLAGS.target_accuracy:
                time_to_target = time.time() - start
                log(f"target accuracy {FLAGS.target_accuracy} reached after "
                    f"{time_to_target:.1f} s: stopping")
            for timer in (window, total):
                timer.skip()  # evaluation is not training throughput
        if manager and ((epoch_end and whole_epochs % FLAGS.checkpoint_every == 0)
                        or step == total_steps or time_to_target):
            manager.save(checkpoint_number=step)
        if time_to_target:
            break

    train_seconds = time.time() - start
    in_sync = weights_in_sync(model)
    if hvd.rank() == 0:
        mcnn_model.export(model, FLAGS.model_dir, manifest)
        log(f"Held-out results at the end (split: {manifest.get('split', {}).get('by', 'as given')}"
            f"): {evaluation.format_per_class(metrics)}")
        images_per_sec = total.steps * global_batch / total.seconds if total.steps else None
        path = write_summary(FLAGS.model_dir, {
            "time_to_train_s": round(train_seconds, 2),
            "time_to_target_s": time_to_target and round(time_to_target, 2),
            "target_accuracy": FLAGS.target_accuracy or None,
            "final_accuracy": accuracy,
            "eval_images": eval_images,
            "images_per_sec": images_per_sec,
            "images_per_sec_per_rank": images_per_sec and images_per_sec / hvd.size(),
            "ranks": hvd.size(),
            "ranks_in_sync": in_sync,
            "global_batch": global_batch,
            "steps": step,
            "epochs": round(step / steps_per_epoch, 3),
            "data": manifest["source"],
            "classes": classes,
            "final_treatment_accuracy": metrics["treatment_accuracy"],
            "split": manifest.get("split", {}).get("by"),
            "eval_history": history,
            "flags": {f.name: f.value
                      for f in FLAGS.get_key_flags_for_module(sys.modules[__name__])},
        })
        print(f"Done in {train_seconds:.1f} s: held-out accuracy {accuracy:.4f} "
              f"({eval_images} images). Summary: {path}; TensorBoard: "
              f"tensorboard --logdir {os.path.join(FLAGS.model_dir, 'tensorboard')}", flush=True)
    if not in_sync:
        raise RuntimeError("ranks ended with different weights: gradients were not averaged "
                           "(is this TensorFlow >= 2.16 with Keras 3, which Horovod does not hook?)")


if __name__ == "__main__":
    app.run(main)
