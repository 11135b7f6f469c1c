"""Trains the multi-scale CNN on full-size images, data-parallel with Horovod.

    mpirun -np 4 python train_mcnn.py --data_dir=DIR --per_rank_batch=8 --model_dir=runs/x
    ./launch train --ranks-per-socket 2 --hostfile hosts -- --flagfile=experiments/authors_8_nodes.flags

Without --data_dir it trains on the embedded synthetic screen (generated on first use).
Every rank runs this program; rank 0 alone prints, writes TensorBoard summaries,
checkpoints and summary.json. main() reads as Horovod's six steps.
"""
import dataclasses
import math
import os
import signal
import sys
import time

import tf_env  # (before TensorFlow)
from absl import app, flags, logging
import horovod.tensorflow as hvd
import tensorflow as tf

import checkpoints
import data_pipeline
import elastic
import errors
import evaluation
import lr_schedule
import mcnn_model
import model_files
import optimization
import run_end
import rank_memory
import run_log
from run_log import log
import sizing
import threads
import training_data


# Optimisation (the authors' recipe by default)
flags.DEFINE(rank_memory.BatchParser(), "per_rank_batch", 8, "Images per rank per step, or "
             "'auto': the most that fit this rank's share of the node's memory.",
             serializer=flags.ArgumentSerializer())
flags.DEFINE_float("memory_per_rank_gb", 0, "The memory a rank may use, for --per_rank_batch="
                   "auto and its warning; 0: its share of what its node has available now "
                   "(a job's own limit, as Slurm's --mem, is not seen: give it here).",
                   lower_bound=0)
flags.DEFINE_float("epochs", 52, "Training epochs (may be fractional).")
# 0.01 at a global batch of 8 learns on one node (the quick configuration's rate); the
# authors' 0.001 at 32, tuned for 8 nodes, barely moves a one-node run of batch 8
# (experiments/authors_8_nodes.flags keeps it).
flags.DEFINE_float("base_lr", 0.01, "Learning rate at --base_batch images; also the "
                   "warm-up's starting rate.")
flags.DEFINE_integer("base_batch", 8, "Global batch at which --base_lr was tuned.")
flags.DEFINE_enum("lr_scaling", "linear", lr_schedule.SCALING_RULES,
                  "How the peak rate grows with the global batch.")
flags.DEFINE_float("warmup_epochs", 5, "Linear warm-up from --base_lr to the peak.")
flags.DEFINE_enum("lr_decay", "linear", lr_schedule.DECAYS, "Decay after the warm-up.")
flags.DEFINE_list("decay_epochs", [], "Epochs at which --lr_decay=step divides the rate by 10.")
flags.DEFINE_float("end_lr", 1e-4, "Rate at the last step (linear, cosine); floor for step.")
flags.DEFINE_integer("seed", 0, "Seed for weights, shuffling and augmentation.")
# Initial weights (the architecture is the published one either way)
flags.DEFINE_enum("initializer", "glorot_uniform", ["glorot_uniform", "he_normal"],
                  "Initial kernels of the convolutions (all ReLU layers): Glorot as the "
                  "authors, or He et al. 2015's for ReLU. The dense layers stay Glorot.")
# Execution
flags.DEFINE_enum("data_format", "channels_last", ["channels_last", "channels_first"],
                  "Layout of the convolutions.")
flags.DEFINE_enum("precision", "auto", tf_env.PRECISIONS,
                  "mixed_bfloat16: bf16 compute, fp32 weights and checkpoints; auto: "
                  "mixed_bfloat16 where the CPU has native bf16 (AMX or AVX512-BF16).")
flags.DEFINE_bool("recompute", False, "Recompute each scale column's activations in the "
                  "backward pass: about a third more compute, much less memory per image.")
flags.DEFINE_integer("fusion_threshold_mb", None, "Horovod tensor fusion buffer in MB "
                     "(HOROVOD_FUSION_THRESHOLD; Horovod's default is 128).")
flags.DEFINE_bool("elastic", False, "Horovod elastic mode, under horovodrun (launch train "
                  "--elastic): training goes on when workers are lost or added.")
# Output
flags.DEFINE_string("model_dir", os.path.join("runs", "mcnn"),
                    "Checkpoints, TensorBoard logs, flags.txt and summary.json.")
flags.DEFINE_integer("log_every", 10, "Print progress every this many steps.")
flags.DEFINE_float("eval_every", 1, "Evaluate on the held-out split every this many epochs "
                   "(may be fractional: 0.25 evaluates four times an epoch).")
flags.DEFINE_bool("nsc", True, "NSC and NSCB (profiles.py) at every evaluation, which "
                  "profiles the training split too (a forward pass over it, about a third of "
                  "an epoch's compute); --nonsc: at the last step's evaluation only.")
flags.DEFINE_float("target_accuracy", 0.0, "Stop once held-out field accuracy reaches this, "
                   "and record the epochs, steps, images and seconds it took (0: never).")
FLAGS = flags.FLAGS
flags.register_validator("eval_every", lambda epochs: epochs > 0,
                         message="--eval_every must be more than 0 epochs")


# ---------------------------------------------------------------- set-up, before training

def init_horovod():
    if FLAGS.fusion_threshold_mb is not None:
        os.environ["HOROVOD_FUSION_THRESHOLD"] = str(FLAGS.fusion_threshold_mb * 2 ** 20)
    hvd.init()


def resolve_precision():
    """--precision=auto becomes the policy every rank's CPU runs best: bf16 only where
    all have native bf16, so that ranks of mixed nodes compute alike. Returns why."""
    asked = FLAGS.precision
    FLAGS.precision, why = tf_env.resolve_precision(asked)
    if asked == "auto" and len(set(hvd.allgather_object(FLAGS.precision, name="precision"))) > 1:
        FLAGS.precision, why = "float32", "auto: not every rank's CPU has native bf16"
    return why


def memory_estimate(manifest):
    """The memory estimate of a training rank of these flags on the data set `manifest`."""
    return rank_memory.RankMemory(
        tuple(manifest["image_shape"]), len(manifest["classes"]),
        data_pipeline.DTYPES[manifest["dtype"]].size, FLAGS.precision, FLAGS.recompute,
        0 if FLAGS.image_table else FLAGS.shuffle_buffer,  # TIFFs: no shuffle buffer
        FLAGS.accumulate_steps)


def measured_rate(image_shape, num_classes, input_dtype=tf.uint8):
    """Global training images/s at `image_shape`, from a throwaway model's steps."""
    model = build_model(image_shape, num_classes, input_dtype)
    return sizing.images_per_second(model, make_train_step, per_rank_images(), num_classes)


def per_rank_images():
    """Images a rank reads for one update: its batch, or its micro-batches."""
    return FLAGS.per_rank_batch * FLAGS.accumulate_steps


def make_train_step(model, optimizer, num_classes):
    return optimization.make_train_step(model, optimizer, num_classes,
                                        accumulate=FLAGS.accumulate_steps)


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


def build_model(image_shape, num_classes, input_dtype, standardization=None):
    return mcnn_model.build_mcnn(image_shape, num_classes, FLAGS.data_format, input_dtype,
                                 FLAGS.recompute, FLAGS.precision, standardization,
                                 FLAGS.initializer)


# ---------------------------------------------------------------- the training loop

@dataclasses.dataclass
class Run:
    """What the training loop works with, set up once by main()."""
    model: tf.keras.Model
    optimizer: tf.keras.optimizers.Optimizer
    schedule: lr_schedule.WarmupThenDecay
    train_step: object
    predict: object
    make_data: object
    manifest: dict
    manager: tf.train.CheckpointManager
    writer: object
    steps_per_epoch: int
    total_steps: int
    eval_steps: int
    threads: threads.Threads
    memory: rank_memory.RankMemory
    stop: checkpoints.StopSignals
    started: float
    changed_on_resume: dict = dataclasses.field(default_factory=dict)  # run_log.changed_flags


@dataclasses.dataclass
class Outcome:
    """What the training loop leaves: where it stopped, its evaluations and speed."""
    global_batch: int
    accumulate: int  # micro-batches of --per_rank_batch each rank takes per step
    step: int = 0
    history: list = dataclasses.field(default_factory=list)
    metrics: dict = None
    target: dict = None  # reached_target(), once --target_accuracy is reached
    eval_seconds: float = 0.0
    timer: run_log.StepTimer = dataclasses.field(default_factory=run_log.StepTimer)
    noise: optimization.GradientNoiseScale = None


def train(run, progress):
    """Steps progress.step + 1 to run.total_steps, on the ranks there are now, which
    make the plan's global batch (more micro-batches each when fewer)."""
    accumulate = elastic.micro_batches(progress.global_batch, FLAGS.per_rank_batch, hvd.size())
    train_step = run.train_step
    if accumulate != FLAGS.accumulate_steps:
        train_step = optimization.make_train_step(
            run.model, run.optimizer, len(run.manifest["classes"]), accumulate=accumulate)
    first = progress.step
    outcome = Outcome(progress.global_batch, accumulate, noise=optimization.GradientNoiseScale(
        FLAGS.per_rank_batch, progress.global_batch))
    # A resumed run draws a new order of its data: the images of a broken-off epoch
    # are not all replayed in the order they came, but the step count and schedule are.
    batches = training_data.named_data_errors(iter(run.make_data("train", training_data.feed(
        FLAGS.per_rank_batch * accumulate, training=True, seed=FLAGS.seed + first))),
        run.manifest, "train")
    eval_data = run.make_data("eval", training_data.feed(FLAGS.per_rank_batch, provenance=True))
    window = run_log.StepTimer()
    for step in range(first + 1, run.total_steps + 1):
        loss = train_one_step(run, train_step, step, *next(batches), outcome.noise)
        for timer in (window, outcome.timer):  # tracing the graph is not throughput
            timer.skip() if step == first + 1 else timer.add(loss)
        if window.steps and (step % FLAGS.log_every == 0 or step == run.total_steps):
            log_progress(run, step, window, outcome)
            window = run_log.StepTimer()
        if step % run.eval_steps == 0 or step == run.total_steps:
            evaluate_and_report(run, step, eval_data, outcome)
            for timer in (window, outcome.timer):
                timer.skip()  # evaluation is not training throughput
        progress.step = outcome.step = step
        signum = run.stop.agreed()
        if (signum or step == run.total_steps or outcome.target
                or checkpoints.checkpoint_due(step, run.steps_per_epoch)):
            if hvd.rank() == 0:
                checkpoints.save_checkpoint(run.manager, run.model, step,
                                            float(run.schedule(step - 1)))
            progress.commit()
        if signum:
            stop_on_signal(run, step, signum)
        if outcome.target:
            break
    return outcome


def train_one_step(run, train_step, step, images, labels, noise):
    loss, small_norm2, big_norm2 = (float(x) for x in train_step(images, labels))
    noise.add(small_norm2, big_norm2)
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"loss is {loss} at step {step} (learning rate {float(run.schedule(step - 1)):g}): "
            f"training diverged. The last good weights are in the latest checkpoint of "
            f"{run.manager.directory}; lower --base_lr or lengthen --warmup_epochs")
    return loss


def log_progress(run, step, window, outcome):
    mean_loss = float(hvd.allreduce(tf.constant(window.mean_loss()), name="loss"))
    global_rate = window.steps * outcome.global_batch / window.seconds
    lr, noise = float(run.schedule(step)), outcome.noise.value
    log(f"step {step}/{run.total_steps}  epoch {step / run.steps_per_epoch:.2f}  loss "
        f"{mean_loss:.4f}  lr {lr:.5f}  images/s {global_rate / hvd.size():.2f} per rank, "
        f"{global_rate:.2f} global" + (f"  noise scale {noise:.0f}" if noise else ""))
    run_log.write_scalars(run.writer, step, loss=mean_loss, learning_rate=lr,
                          images_per_second=global_rate,
                          **({"gradient_noise_scale": noise} if noise else {}))


def evaluate_and_report(run, step, eval_data, outcome):
    started = time.time()
    fields, profiles, metrics = evaluation.evaluate(
        run.predict, training_data.named_data_errors(iter(eval_data), run.manifest, "eval"),
        run.manifest["classes"], run.manifest.get("classes_split_by_field", ()),
        nsc_reference(run, step), run.manifest.get("control", "DMSO"),
        run.manifest.get("plate_batches"))
    outcome.eval_seconds += time.time() - started
    epoch, accuracy = step / run.steps_per_epoch, metrics["accuracy"]
    outcome.metrics = metrics
    seconds = time.time() - run.started
    nsc = {k: metrics[k] for k in ("nsc", "nscb") if k in metrics}
    outcome.history.append({"step": step, "epoch": round(epoch, 3), "accuracy": accuracy,
                            "treatment_accuracy": metrics["treatment_accuracy"], **nsc,
                            "seconds": round(seconds, 2)})
    log(f"epoch {epoch:.2f}: held-out accuracy {accuracy:.4f} on {metrics['fields']} fields, "
        f"{metrics['treatment_accuracy']:.4f} on {metrics['treatments']} treatments"
        + (f"; {evaluation.format_nsc(metrics)}" if nsc else ""))
    run_log.write_scalars(run.writer, step, eval_accuracy=accuracy,
                          eval_treatment_accuracy=metrics["treatment_accuracy"],
                          **{f"eval_{k}": v for k, v in nsc.items() if v is not None})
    if FLAGS.target_accuracy and accuracy >= FLAGS.target_accuracy:
        outcome.target = reached_target(step, epoch, seconds, outcome)
        log(f"target accuracy {FLAGS.target_accuracy:g} reached at epoch {epoch:.2f} (step "
            f"{step}, {outcome.target['images']:,} images) after {seconds:.1f} s, "
            f"{outcome.target['train_seconds']:.1f} s of it training: stopping")
    if hvd.rank() == 0:
        last = step == run.total_steps or outcome.target
        evaluation.write_report(os.path.join(FLAGS.model_dir, "evaluation"), fields, metrics,
                                run.manifest["classes"], step, profiles if last else None)


def nsc_reference(run, step):
    """The training split's batches, unaugmented, for NSC at this evaluation, or None."""
    if not (FLAGS.nsc or step == run.total_steps):
        return None
    train = run.make_data("train", training_data.feed(FLAGS.per_rank_batch, provenance=True))
    return training_data.named_data_errors(iter(train), run.manifest, "train")


def reached_target(step, epoch, seconds, outcome):
    """Time to --target_accuracy as MLPerf Training counts it: from the start of training
    to the first evaluation at or above the target, evaluations included ("seconds");
    and without the evaluations ("train_seconds"), which depend on --eval_every."""
    return {"epochs": round(epoch, 3), "steps": step, "images": step * outcome.global_batch,
            "seconds": round(seconds, 2),
            "train_seconds": round(seconds - outcome.eval_seconds, 2)}


def stop_on_signal(run, step, signum):
    log(f"{signal.Signals(signum).name}: stopped after step {step} and wrote "
        f"{run.manager.latest_checkpoint}; rerun the same command to resume")
    hvd.allreduce(tf.constant(0), name="checkpoint_written")  # none exits before
    sys.exit(128 + signum)


def log_start(run, precision_why, start_step):
    manifest, model = run.manifest, run.model
    log(f"M-CNN: {model.count_params():,} parameters, images {tuple(manifest['image_shape'])} "
        f"{manifest['dtype']}, {len(manifest['classes'])} classes; data {manifest['source']}")
    for note in model_files.describe_input(manifest):
        log(note)
    accumulated = (f" x {FLAGS.accumulate_steps} micro-batches"
                   if FLAGS.accumulate_steps > 1 else "")
    log(f"{hvd.size()} rank{'s' * (hvd.size() > 1)} ({hvd.cross_size()} "
        f"node{'s' * (hvd.cross_size() > 1)}) x {FLAGS.per_rank_batch} images"
        f"{accumulated} = global batch {per_rank_images() * hvd.size()}; {FLAGS.optimizer}; "
        f"{run.steps_per_epoch} steps/epoch, "
        f"{run.total_steps} steps; peak LR {run.schedule.peak_lr:g} ({FLAGS.lr_scaling} rule); "
        f"threads per rank: {run.threads}; oneDNN "
        f"{os.environ.get('TF_ENABLE_ONEDNN_OPTS')}; {FLAGS.precision} ({precision_why})"
        f"{', recompute' * FLAGS.recompute}")
    log(f"memory: {run.memory.describe(FLAGS.per_rank_batch)}; "
        f"summary.json records each rank's peak")
    if hvd.size() == 1 and FLAGS.accumulate_steps == 1:
        log("gradient noise scale: not measured (it compares the gradients of one rank's "
            "micro-batch and of the global batch, here the same); --accumulate_steps=2 "
            "measures it")
    if start_step:
        changed = ", ".join(f"--{name} {then} -> {now}"
                            for name, (then, now) in run.changed_on_resume.items())
        log(f"resuming from {run.manager.latest_checkpoint}: step {start_step}, "
            f"epoch {start_step / run.steps_per_epoch:.2f}"
            + (f"; flags changed since its last start: {changed} (from here on the run "
               f"follows them; summary.json records them)" if changed else ""))


def main(argv):
    del argv
    tf.get_logger().setLevel("ERROR")  # TensorFlow's Python warnings are noise here
    logging.set_verbosity(logging.WARNING)  # and so are the SavedModel writer's notes
    # Horovod 1: one process per rank, all ranks discover each other.
    init_horovod()
    # Horovod 2: each rank uses only the cores it was placed on.
    rank_threads = threads.configure_threads()
    precision_why = resolve_precision()
    tf.keras.utils.set_random_seed(FLAGS.seed)
    budget_rate = None
    fit_to_budget = FLAGS.time_budget_minutes and not (
        FLAGS.resume and sizing.keep_previous_choices(FLAGS.model_dir))
    if fit_to_budget and training_data.synthetic():
        (FLAGS.image_height, FLAGS.image_width), budget_rate = sizing.fit_synthetic_size(
            (FLAGS.image_height, FLAGS.image_width), training_data.synthetic_split_counts(FLAGS.seed),
            lambda size: measured_rate((*size, 3), FLAGS.synthetic_classes), FLAGS.eval_every)
    manifest, make_data = training_data.open_data(FLAGS.seed)
    image_shape, classes = tuple(manifest["image_shape"]), manifest["classes"]
    dtype = data_pipeline.DTYPES[manifest["dtype"]]
    train_count = manifest["splits"]["train"]["count"]
    memory = memory_estimate(manifest)
    FLAGS.per_rank_batch = rank_memory.choose_per_rank_batch(
        FLAGS.per_rank_batch, memory, train_count // (hvd.size() * FLAGS.accumulate_steps),
        FLAGS.memory_per_rank_gb)
    # Horovod 3: the global batch grows with the ranks, and the learning rate with it.
    global_batch = per_rank_images() * hvd.size()
    steps_per_epoch = train_count // global_batch
    if steps_per_epoch == 0:
        raise app.UsageError(f"{train_count} training images make no full global "
                             f"batch of {global_batch} ({hvd.size()} ranks x --per_rank_batch x "
                             f"--accumulate_steps)")
    if fit_to_budget:
        FLAGS.epochs = sizing.fit_epochs(
            budget_rate or measured_rate(image_shape, len(classes), dtype), manifest,
            global_batch, FLAGS.eval_every, FLAGS.warmup_epochs)
    total_steps = max(1, round(FLAGS.epochs * steps_per_epoch))
    schedule = build_lr_schedule(global_batch, steps_per_epoch, total_steps)
    manifest["input_standardization"] = training_data.input_standardization(manifest)
    model = build_model(image_shape, len(classes), dtype, manifest["input_standardization"])
    optimizer = optimization.make_optimizer(schedule)
    optimizer.build(model.trainable_variables)
    checkpoint = checkpoints.make_checkpoint(model, optimizer, global_batch)
    # Rank 0 restores the newest good checkpoint, if any, before the broadcast below.
    start_step = checkpoints.agree_on_start(checkpoint, FLAGS.model_dir, global_batch, manifest)
    manager = checkpoints.open_checkpoints(checkpoint, FLAGS.model_dir)
    # Horovod 4: every rank starts from rank 0's weights and optimizer state.
    hvd.broadcast_variables(model.variables, root_rank=0)
    hvd.broadcast_variables(optimizer.variables, root_rank=0)
    # Horovod 5: gradients are averaged by allreduce inside train_step.
    train_step = make_train_step(model, optimizer, len(classes))
    # Horovod 6: rank 0 alone writes, and only a run that trains changes its model dir.
    changed = run_log.changed_flags(FLAGS.model_dir) if start_step and hvd.rank() == 0 else {}
    finished = start_step >= total_steps
    if hvd.rank() == 0 and not finished:
        model_files.record_data(FLAGS.model_dir, manifest)
    writer = run_log.open_log(FLAGS.model_dir) if hvd.rank() == 0 and not finished else None
    predict = evaluation.make_predict(model, image_shape, dtype)
    run = Run(model, optimizer, schedule, train_step, predict, make_data, manifest, manager, writer,
              steps_per_epoch, total_steps, max(1, round(FLAGS.eval_every * steps_per_epoch)),
              rank_threads, memory, checkpoints.StopSignals(), time.time(), changed)
    log_start(run, precision_why, start_step)
    if finished:
        return run_end.already_finished(run)
    if FLAGS.elastic:
        outcome = elastic.run(lambda progress: train(run, progress),
                              model.variables + optimizer.variables, start_step, global_batch,
                              FLAGS.per_rank_batch)
    else:
        outcome = train(run, elastic.Progress(start_step, global_batch))
    run_end.finish(run, outcome, start_step)


if __name__ == "__main__":
    errors.run_main(main)
