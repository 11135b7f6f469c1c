"""Trains the multi-scale CNN on full-size images, data-parallel with Horovod.

    mpirun -np 4 python train_mcnn.py --data_dir=DIR --per_rank_batch=8 --model_dir=runs/x
    ./launch train --ranks-per-socket 2 --hostfile hosts -- --flagfile=experiments/authors_8_nodes.flags

Without --data_dir it trains on the embedded synthetic screen (generated on first use).
Every rank runs this program; rank 0 alone prints, writes TensorBoard summaries,
checkpoints and summary.json.
"""
import glob
import json
import math
import os
import shutil
import signal
import sys
import time

import tf_env  # (before TensorFlow)
from absl import app, flags, logging
import horovod.tensorflow as hvd
import pandas as pd
import psutil
import tensorflow as tf

import data_pipeline
import evaluation
import lr_schedule
import mcnn_model
import prepare_data
import synthetic_data
import time_budget

HERE = os.path.dirname(os.path.abspath(__file__))


class BatchParser(flags.ArgumentParser):
    """--per_rank_batch: a positive integer, or 'auto'."""
    syntactic_help = "a positive integer or 'auto'"

    def parse(self, argument):
        if argument == "auto":
            return argument
        value = int(argument)
        if value < 1:
            raise ValueError(f"must be at least 1, got {value}")
        return value

    def flag_type(self):
        return "int or 'auto'"


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
flags.DEFINE_bool("skip_bad_records", False, "Check every record first and train on the good "
                  "ones, reporting the corrupt, truncated or mislabelled ones, instead of "
                  "stopping at the first.")
# Or straight from plates (TIFFs + tables), with no conversion step: see prepare_data.py.
prepare_data.define_conversion_flags(flags)
# Optimisation (the authors' recipe by default)
flags.DEFINE(BatchParser(), "per_rank_batch", 8, "Images per rank per step, or 'auto': the "
             "most that fit this rank's share of the node's memory.",
             serializer=flags.ArgumentSerializer())
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
flags.DEFINE_enum("precision", "auto", ["auto", "float32", "mixed_bfloat16"],
                  "mixed_bfloat16: bf16 compute, fp32 weights and checkpoints; auto: "
                  "mixed_bfloat16 where the CPU has native bf16 (AMX or AVX512-BF16).")
flags.DEFINE_bool("recompute", False, "Recompute each scale column's activations in the "
                  "backward pass: about a third more compute, much less memory per image.")
flags.DEFINE_bool("fp16_allreduce", False, "Send gradients as fp16 in the allreduce.")
flags.DEFINE_integer("allreduce_groups", 0, "0: Horovod's default, each gradient is sent as "
                     "soon as it is ready, overlapping the backward pass; N: in N groups, "
                     "each once all of its gradients are ready.")
flags.DEFINE_integer("fusion_threshold_mb", None, "Horovod tensor fusion buffer in MB "
                     "(HOROVOD_FUSION_THRESHOLD; Horovod's default is 128).")
# Output
flags.DEFINE_string("model_dir", os.path.join("runs", "mcnn"),
                    "Checkpoints, TensorBoard logs, flags.txt and summary.json.")
flags.DEFINE_integer("log_every", 10, "Print progress every this many steps.")
flags.DEFINE_integer("eval_every", 1, "Evaluate on the held-out split every this many epochs.")
flags.DEFINE_integer("checkpoint_every", 1, "Checkpoint every this many epochs.")
flags.DEFINE_integer("checkpoint_steps", 0, "Also checkpoint every this many steps (0: at "
                     "epoch ends only). At most this many steps are redone after a crash.")
flags.DEFINE_integer("keep_checkpoints", 3, "Checkpoints kept.")
flags.DEFINE_bool("elastic", False, "Horovod elastic mode, under horovodrun (launch train "
                  "--elastic): training goes on when workers are lost or added.")
flags.DEFINE_bool("resume", True, "Continue from the latest checkpoint in --model_dir, if any.")
flags.DEFINE_bool("overwrite", False, "With --noresume: delete a previous run in --model_dir "
                  "and start afresh.")
flags.DEFINE_float("target_accuracy", 0.0, "Stop once held-out accuracy reaches this (0: never).")
flags.DEFINE_float("time_budget_minutes", 0, "Train for about this long: the epochs, and for "
                   "the synthetic screen the image size, follow from the speed of a few steps "
                   "measured first (0: --epochs as given).")

FLAGS = flags.FLAGS


@flags.multi_flags_validator(["resume", "overwrite"],
                             message="--overwrite deletes a previous run and --resume continues "
                                     "it: give --noresume with --overwrite")
def _overwrite_only_without_resume(values):
    return not (values["resume"] and values["overwrite"])


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


# Peak memory of a training rank, measured at 1024 x 1280 x 3 by
# `benchmark.py --parts=sweeps` (README): a fixed part (runtime, weights, gradients,
# momentum) and a part per image of the batch, which scales with its pixels.
MEMORY_FIXED_GB = 2.6
MEMORY_PER_FULL_SIZE_IMAGE_GB = {  # (precision, recompute)
    ("float32", False): 0.48, ("float32", True): 0.07,
    ("mixed_bfloat16", False): 0.20, ("mixed_bfloat16", True): 0.07,
}
FULL_SIZE_PIXELS = 1024 * 1280 * 3
MEMORY_SAFETY = 0.9  # of the memory the rank may use


def memory_gb(image_shape, batch):
    """Estimated peak memory of a training rank with this per-rank batch."""
    precision, _ = tf_env.resolve_precision(FLAGS.precision)
    per_image = MEMORY_PER_FULL_SIZE_IMAGE_GB[precision, FLAGS.recompute]
    pixels = image_shape[0] * image_shape[1] * image_shape[2]
    return MEMORY_FIXED_GB + batch * per_image * pixels / FULL_SIZE_PIXELS


def rank_memory_gb():
    """This rank's share of the memory available on its node."""
    return psutil.virtual_memory().available / 2 ** 30 / hvd.local_size()


def choose_per_rank_batch(image_shape, most):
    """--per_rank_batch, or for 'auto' the largest that fits (up to `most`); warns
    when the batch asked for will not fit."""
    usable = MEMORY_SAFETY * rank_memory_gb()
    if FLAGS.per_rank_batch == "auto":
        batch = 1
        while batch < most and memory_gb(image_shape, batch + 1) <= usable:
            batch += 1
        log(f"--per_rank_batch=auto: {batch} images per rank, estimated "
            f"{memory_gb(image_shape, batch):.1f} GB of this rank's {usable:.1f} GB")
        return batch
    if memory_gb(image_shape, FLAGS.per_rank_batch) > usable:
        log(f"WARNING: --per_rank_batch={FLAGS.per_rank_batch} needs about "
            f"{memory_gb(image_shape, FLAGS.per_rank_batch):.1f} GB per rank, more than the "
            f"{usable:.1f} GB each of the {hvd.local_size()} ranks on this node can use; "
            f"expect it to be killed. --recompute or a smaller batch would fit.")
    return FLAGS.per_rank_batch


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
    """(manifest, make_data(split, training, provenance, seed)) for shards or for plates."""
    if not FLAGS.image_table:
        data_dir = resolve_data_dir()
        manifest = {**data_pipeline.read_manifest(data_dir), "source": data_dir}
        good = good_records(data_dir, manifest) if FLAGS.skip_bad_records else None
        return manifest, lambda split, training=False, provenance=False, seed=FLAGS.seed: (
            data_pipeline.make_dataset(
                data_dir, split, FLAGS.per_rank_batch, hvd.rank(), hvd.size(), training,
                FLAGS.shuffle_buffer, seed, manifest, provenance, good))
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
    return manifest, lambda split, training=False, provenance=False, seed=FLAGS.seed: (
        data_pipeline.make_tiff_dataset(
            fields[fields["split"] == split], FLAGS.channels, intensity, classes, dtype,
            FLAGS.per_rank_batch, hvd.rank(), hvd.size(), training, seed, provenance))


def good_records(data_dir, manifest):
    """--skip_bad_records: every rank checks its own shards; rank 0 reports them all."""
    good, problems = {}, []
    for split in manifest["splits"]:
        files = data_pipeline.split_files(data_dir, manifest, split, hvd.rank(), hvd.size())
        split_good, split_problems = data_pipeline.scan_shards(files, manifest)
        good.update(split_good)
        problems += split_problems
    everyone = [p for rank in hvd.allgather_object(problems, name="bad_records") for p in rank]
    manifest["bad_records_skipped"] = len(everyone)
    log(f"--skip_bad_records: {len(everyone)} bad record{'s' * (len(everyone) != 1)} skipped"
        + "".join(f"\n  {p}" for p in everyone))
    return good


def named_data_errors(batches, manifest, split):
    """The batches of `batches`; tf.data's DataLossError, which names no file, becomes
    one naming this rank's corrupt shards."""
    while True:
        try:
            yield next(batches)
        except StopIteration:
            return
        except tf.errors.DataLossError as e:
            if FLAGS.image_table:
                raise
            files = data_pipeline.split_files(manifest["source"], manifest, split, hvd.rank(),
                                              hvd.size())
            raise data_pipeline.explain_data_loss(files, manifest, e) from None


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


def measured_rate(image_shape, num_classes, input_dtype=tf.uint8):
    """Global training images/s at `image_shape`, from a throwaway model's steps."""
    model = build_model(image_shape, num_classes, input_dtype)
    return time_budget.images_per_second(model, make_train_step, FLAGS.per_rank_batch,
                                         num_classes)


def fit_synthetic_size_to_budget():
    """--time_budget_minutes, before the synthetic screen is made: the largest image size
    at which time_budget.MIN_EPOCHS fit. Returns the rate measured at that size."""
    if FLAGS.per_rank_batch == "auto":
        raise app.UsageError("--time_budget_minutes needs a number for --per_rank_batch")
    size = (FLAGS.image_height, FLAGS.image_width)
    train, held_out = synthetic_data.split_counts(
        FLAGS.synthetic_classes, FLAGS.synthetic_compounds_per_class,
        FLAGS.synthetic_fields_per_treatment)
    rate = measured_rate((*size, 3), FLAGS.synthetic_classes)
    fitted, _ = time_budget.image_size_that_fits(size, rate, 60 * FLAGS.time_budget_minutes,
                                                 train, held_out, FLAGS.eval_every)
    if fitted == size:
        return rate
    log(f"--time_budget_minutes={FLAGS.time_budget_minutes:g}: {rate:.2f} images/s at "
        f"{size[0]} x {size[1]} ({FLAGS.precision}) leave fewer than "
        f"{time_budget.MIN_EPOCHS} epochs; the synthetic screen is made at "
        f"{fitted[0]} x {fitted[1]} instead")
    FLAGS.image_height, FLAGS.image_width = fitted
    return measured_rate((*fitted, 3), FLAGS.synthetic_classes)


def fit_epochs_to_budget(rate, manifest, global_batch):
    """--time_budget_minutes: --epochs becomes as many as fit at `rate`."""
    counts = {split: manifest["splits"][split]["count"] for split in ("train", "eval")}
    epochs = time_budget.epochs_that_fit(rate, 60 * FLAGS.time_budget_minutes,
                                         counts["train"], counts["eval"], FLAGS.eval_every)
    if epochs <= FLAGS.warmup_epochs:
        raise app.UsageError(
            f"--time_budget_minutes={FLAGS.time_budget_minutes:g} leaves {epochs} epochs at the "
            f"{rate:.2f} images/s measured here, no more than --warmup_epochs; give more time")
    minutes = epochs * counts["train"] / rate / 60
    log(f"--time_budget_minutes={FLAGS.time_budget_minutes:g}: {rate:.2f} images/s measured "
        f"at {manifest['image_shape'][0]} x {manifest['image_shape'][1]}, global batch "
        f"{global_batch}: {epochs} epochs of {counts['train']} images (about {minutes:.1f} "
        f"minutes of steps)")
    FLAGS.epochs = epochs


def init_horovod():
    if FLAGS.fusion_threshold_mb is not None:
        os.environ["HOROVOD_FUSION_THRESHOLD"] = str(FLAGS.fusion_threshold_mb * 2 ** 20)
    hvd.init()


def resolve_precision():
    """--precision=auto becomes the policy this CPU runs best; returns why."""
    FLAGS.precision, why = tf_env.resolve_precision(FLAGS.precision)
    return why


def build_model(image_shape, num_classes, input_dtype):
    return mcnn_model.build_mcnn(image_shape, num_classes, FLAGS.data_format, input_dtype,
                                 FLAGS.recompute, FLAGS.precision)


def compute_gradients(model, images, labels, num_classes, average=True):
    """Loss of this rank's batch and its gradients, averaged over all ranks by
    allreduce (average=False, for benchmarks: this rank's own)."""
    cross_entropy = tf.keras.losses.CategoricalCrossentropy(
        from_logits=True, label_smoothing=FLAGS.label_smoothing)
    with tf.GradientTape() as tape:
        logits = model(images, training=True)
        loss = cross_entropy(tf.one_hot(labels, num_classes), logits)
        total = loss + FLAGS.weight_decay * tf.add_n(
            [tf.nn.l2_loss(v) for v in model.trainable_variables])
    if average:
        tape = hvd.DistributedGradientTape(
            tape, compression=hvd.Compression.fp16 if FLAGS.fp16_allreduce
            else hvd.Compression.none, groups=FLAGS.allreduce_groups or None)
    return loss, tape.gradient(total, model.trainable_variables)


def make_train_step(model, optimizer, num_classes, average=True):
    @tf.function
    def train_step(images, labels):
        loss, gradients = compute_gradients(model, images, labels, num_classes, average)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss
    return train_step


def make_predict(model, image_shape, dtype):
    @tf.function(input_signature=[tf.TensorSpec((None, *image_shape), dtype)])
    def predict(images):
        return tf.argmax(model(images, training=False), axis=-1, output_type=tf.int32)
    return predict


def evaluate(predict, dataset, manifest):
    """Metrics of the whole held-out split: each rank predicts its own shards, and
    Horovod gathers every field's result on all ranks."""
    mine = []
    for images, labels, provenance in named_data_errors(iter(dataset), manifest, "eval"):
        columns = {"label": labels.numpy(), "prediction": predict(images).numpy(),
                   **{k: [v.decode() for v in provenance[k].numpy()] for k in provenance}}
        mine.append(pd.DataFrame(columns))
    everyone = hvd.allgather_object(pd.concat(mine) if mine else None, name="eval_fields")
    fields = pd.concat([part for part in everyone if part is not None], ignore_index=True)
    return fields, evaluation.summarize(fields, manifest["classes"])


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


# What a run leaves in --model_dir besides flags.txt; --overwrite deletes them.
RUN_OUTPUTS = (mcnn_model.CHECKPOINTS, mcnn_model.SAVED_MODEL, mcnn_model.DATA_MANIFEST,
               "tensorboard", "evaluation", "summary.json")


def open_checkpoints(model, optimizer, global_batch):
    """A manager of --model_dir's checkpoints: model, optimizer (with its step count,
    so the schedule and the data position follow) and the global batch they assume."""
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer,
                                     global_batch=tf.Variable(global_batch, dtype=tf.int64))
    return tf.train.CheckpointManager(
        checkpoint, os.path.join(FLAGS.model_dir, mcnn_model.CHECKPOINTS),
        max_to_keep=FLAGS.keep_checkpoints)


def restore_or_start(manager, global_batch):
    """Rank 0: restores the latest checkpoint (--resume), or clears a previous run
    (--overwrite), or refuses to touch it. Returns the step to continue from."""
    try:
        os.makedirs(FLAGS.model_dir, exist_ok=True)
    except OSError as e:
        raise app.UsageError(f"--model_dir={FLAGS.model_dir} cannot be created: {e.strerror}")
    latest = manager.latest_checkpoint
    if latest and FLAGS.resume:
        try:
            manager.checkpoint.restore(latest).assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as e:
            raise app.UsageError(f"{latest} does not fit this model (another image size, "
                                 f"class count or data set?): {str(e)[:300]}")
        saved_batch = int(manager.checkpoint.global_batch)
        if saved_batch != global_batch:
            raise app.UsageError(
                f"{latest} was trained with a global batch of {saved_batch}, this run has "
                f"{global_batch} (ranks x --per_rank_batch): the schedule would not continue. "
                f"Use the same, or --noresume --overwrite to start afresh")
        return int(manager.checkpoint.optimizer.iterations)
    if FLAGS.resume:
        return 0  # nothing to resume: a fresh start
    previous = [name for name in RUN_OUTPUTS if os.path.exists(os.path.join(FLAGS.model_dir, name))]
    if previous and not FLAGS.overwrite:
        raise app.UsageError(f"--model_dir={FLAGS.model_dir} holds a previous run "
                             f"({', '.join(previous)}); --resume (the default) continues it, "
                             f"--noresume --overwrite deletes it and starts afresh")
    for name in previous:
        path = os.path.join(FLAGS.model_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return 0


def agree_on_start(manager, global_batch):
    """The step every rank starts from; rank 0 decides, and its errors stop every rank."""
    step, error = 0, None
    if hvd.rank() == 0:
        try:
            step = restore_or_start(manager, global_batch)
        except app.UsageError as e:
            error = str(e)
    step, error = hvd.broadcast_object((step, error), root_rank=0, name="start")
    if error:
        raise app.UsageError(error)
    return step


def save_checkpoint(manager, model, step, lr):
    """Rank 0 writes the checkpoint of `step`. Non-finite weights are never saved, and a
    failed write leaves the previous checkpoint the latest."""
    if not all(bool(tf.reduce_all(tf.math.is_finite(w))) for w in model.weights):
        raise FloatingPointError(
            f"weights are not finite after step {step} (learning rate {lr:g}): training "
            f"diverged and was not checkpointed. The last good weights are in "
            f"{manager.latest_checkpoint or 'no checkpoint'}; lower --base_lr or lengthen "
            f"--warmup_epochs")
    try:
        manager.save(checkpoint_number=step)
    except (tf.errors.OpError, OSError) as e:
        for partial in glob.glob(os.path.join(manager.directory, f"ckpt-{step}[._]*")):
            shutil.rmtree(partial, ignore_errors=True) if os.path.isdir(partial) else os.remove(
                partial)
        reason = e.message if isinstance(e, tf.errors.OpError) else str(e)
        raise RuntimeError(
            f"could not write the checkpoint of step {step} in {manager.directory}: {reason}. "
            f"The previous checkpoint, {manager.latest_checkpoint or 'none'}, is intact; free "
            f"space or fix the folder, then rerun the same command to resume") from None


class Progress:
    """The step reached: what hvd.elastic.TensorFlowState also holds in elastic mode."""

    def __init__(self, step):
        self.step = step

    def commit(self):
        pass


class ElasticState(hvd.elastic.TensorFlowState):
    """Horovod's elastic state of TensorFlow variables. Its sync() broadcasts them only
    in graph mode; this one broadcasts them in eager mode too."""

    def sync(self):
        hvd.broadcast_variables(self.variables, root_rank=0)
        super().sync()


class StopSignals:
    """SIGTERM (a scheduler's warning before SIGKILL) or SIGINT to any rank: every rank
    stops at the same step boundary, after a checkpoint."""

    def __init__(self):
        self.received = 0
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.handle)

    def handle(self, signum, frame):
        self.received = signum

    def agreed(self):
        """Collective: the signal any rank received, or 0."""
        return int(hvd.allreduce(tf.constant(self.received), op=hvd.Max, name="stop_signal"))


def open_log(model_dir):
    """Rank 0's TensorBoard writer; records the flags of this run."""
    with open(os.path.join(model_dir, "flags.txt"), "w") as f:
        f.write(FLAGS.flags_into_string())  # a flag file: --flagfile=flags.txt reruns it
    return tf.summary.create_file_writer(os.path.join(model_dir, "tensorboard"))


def write_summary(model_dir, summary):
    path = os.path.join(model_dir, "summary.json")
    with open(path + ".tmp", "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(path + ".tmp", path)
    return path


def main(argv):
    del argv
    tf.get_logger().setLevel("ERROR")  # TensorFlow's Python warnings are noise here
    logging.set_verbosity(logging.WARNING)  # and so are the SavedModel writer's notes
    # Horovod 1: one process per rank, all ranks discover each other.
    init_horovod()
    # Horovod 2: each rank uses only the cores it was placed on.
    intra, inter = configure_threads()
    precision_why = resolve_precision()
    tf.keras.utils.set_random_seed(FLAGS.seed)

    budget_rate = None
    if FLAGS.time_budget_minutes and not (FLAGS.data_dir or FLAGS.image_table):
        budget_rate = fit_synthetic_size_to_budget()
    manifest, make_data = open_data()
    image_shape, classes = tuple(manifest["image_shape"]), manifest["classes"]
    dtype = data_pipeline.DTYPES[manifest["dtype"]]
    train_count = manifest["splits"]["train"]["count"]
    FLAGS.per_rank_batch = choose_per_rank_batch(image_shape, train_count // hvd.size())
    # Horovod 3: the global batch grows with the ranks, and the learning rate with it.
    global_batch = FLAGS.per_rank_batch * hvd.size()
    steps_per_epoch = train_count // global_batch
    if steps_per_epoch == 0:
        raise app.UsageError(f"{train_count} training images make no full global "
                             f"batch of {global_batch} ({hvd.size()} ranks x --per_rank_batch)")
    if FLAGS.time_budget_minutes:
        fit_epochs_to_budget(budget_rate or measured_rate(image_shape, len(classes), dtype),
                             manifest, global_batch)
    total_steps = max(1, round(FLAGS.epochs * steps_per_epoch))
    schedule = build_lr_schedule(global_batch, steps_per_epoch, total_steps)

    model = build_model(image_shape, len(classes), dtype)
    optimizer = tf.keras.optimizers.SGD(schedule, momentum=FLAGS.momentum, nesterov=True)
    optimizer.build(model.trainable_variables)
    manager = open_checkpoints(model, optimizer, global_batch)
    # Rank 0 restores the latest checkpoint, if any, before the broadcast below.
    start_step = agree_on_start(manager, global_batch)
    # Horovod 4: every rank starts from rank 0's weights and optimizer state.
    hvd.broadcast_variables(model.variables, root_rank=0)
    hvd.broadcast_variables(optimizer.variables, root_rank=0)
    # Horovod 5: gradients are averaged by allreduce inside train_step.
    train_step = make_train_step(model, optimizer, len(classes))
    predict = make_predict(model, image_shape, dtype)
    # Horovod 6: rank 0 alone writes.
    writer = open_log(FLAGS.model_dir) if hvd.rank() == 0 else None

    log(f"M-CNN: {model.count_params():,} parameters, images {image_shape} {manifest['dtype']}, "
        f"{len(classes)} classes; data {manifest['source']}")
    log(f"{hvd.size()} rank{'s' * (hvd.size() > 1)} x {FLAGS.per_rank_batch} images = "
        f"global batch {global_batch}; "
        f"{steps_per_epoch} steps/epoch, {total_steps} steps; peak LR {schedule.peak_lr:g} "
        f"({FLAGS.lr_scaling} rule); threads per rank: {intra} intra-op, {inter} inter-op; "
        f"oneDNN {os.environ.get('TF_ENABLE_ONEDNN_OPTS')}; {FLAGS.precision} "
        f"({precision_why}){', recompute' * FLAGS.recompute}")
    if start_step:
        log(f"resuming from {manager.latest_checkpoint}: step {start_step}, "
            f"epoch {start_step / steps_per_epoch:.2f}")
    if start_step >= total_steps:
        log(f"{FLAGS.model_dir} has finished its {total_steps} steps; nothing to do "
            f"(raise --epochs to train on, or --noresume --overwrite to start afresh)")
        return

    def train(progress):
        """Steps progress.step + 1 to total_steps, on the ranks there are now."""
        first, global_batch = progress.step, FLAGS.per_rank_batch * hvd.size()
        # A resumed run draws a new order of its data: the images of a broken-off epoch
        # are not all replayed in the order they came, but the step count and schedule are.
        train_data = named_data_errors(iter(make_data("train", training=True,
                                                      seed=FLAGS.seed + first)),
                                       manifest, "train")
        eval_data = make_data("eval", provenance=True)
        history, time_to_target, metrics = [], None, None
        window, total = StepTimer(), StepTimer()
        for step in range(first + 1, total_steps + 1):
            images, labels = next(train_data)
            loss = float(train_step(images, labels))
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"loss is {loss} at step {step} (learning rate "
                    f"{float(schedule(step - 1)):g}): training diverged. The last good weights "
                    f"are in the latest checkpoint of {manager.directory}; lower --base_lr or "
                    f"lengthen --warmup_epochs")
            for timer in (window, total):
                if step == first + 1:  # tracing the graph is not training throughput
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
                fields, metrics = evaluate(predict, eval_data, manifest)
                accuracy, eval_images = metrics["accuracy"], metrics["fields"]
                history.append({"step": step, "epoch": round(epoch, 3), "accuracy": accuracy,
                                "treatment_accuracy": metrics["treatment_accuracy"]})
                log(f"epoch {epoch:.2f}: held-out accuracy {accuracy:.4f} on {eval_images} "
                    f"fields, {metrics['treatment_accuracy']:.4f} on {metrics['treatments']} "
                    f"treatments")
                write_scalars(writer, step, eval_accuracy=accuracy,
                              eval_treatment_accuracy=metrics["treatment_accuracy"])
                if hvd.rank() == 0:
                    evaluation.write_report(os.path.join(FLAGS.model_dir, "evaluation"),
                                            fields, metrics, classes, step)
                if FLAGS.target_accuracy and accuracy >= FLAGS.target_accuracy:
                    time_to_target = time.time() - start
                    log(f"target accuracy {FLAGS.target_accuracy} reached after "
                        f"{time_to_target:.1f} s: stopping")
                for timer in (window, total):
                    timer.skip()  # evaluation is not training throughput

            progress.step = step
            signum = stop.agreed()
            if (signum or step == total_steps or time_to_target
                    or (epoch_end and whole_epochs % FLAGS.checkpoint_every == 0)
                    or (FLAGS.checkpoint_steps and step % FLAGS.checkpoint_steps == 0)):
                if hvd.rank() == 0:
                    save_checkpoint(manager, model, step, float(schedule(step - 1)))
                progress.commit()
            if signum:
                log(f"{signal.Signals(signum).name}: stopped after step {step} and wrote "
                    f"{manager.latest_checkpoint}; rerun the same command to resume")
                hvd.allreduce(tf.constant(0), name="checkpoint_written")  # none exits before
                sys.exit(128 + signum)
            if time_to_target:
                break
        return step, history, time_to_target, metrics, total, global_batch

    stop = StopSignals()
    start = time.time()
    if FLAGS.elastic:
        # When workers leave or join, the others restore the last commit (made with each
        # checkpoint) and run train() again on the ranks there are then.
        train = hvd.elastic.run(train)
        progress = ElasticState(model.variables + optimizer.variables, step=start_step)
        progress.register_reset_callbacks([lambda: log(
            f"workers changed: going on with {hvd.size()} from step {progress.step}")])
    else:
        progress = Progress(start_step)
    step, history, time_to_target, metrics, total, global_batch = train(progress)
    accuracy, eval_images = metrics["accuracy"], metrics["fields"]

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
            "resumed_from_step": start_step,
            "bad_records_skipped": manifest.get("bad_records_skipped", 0),
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
