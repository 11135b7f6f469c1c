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
import sys
import time

import tf_env  # (before TensorFlow)
from absl import flags, logging
import horovod.tensorflow as hvd
import tensorflow as tf

import baselines
import checkpoints
import data_pipeline
import elastic
import errors
import evaluation
import lr_schedule
import model_files
import optimization
import profile_scores
import run_plan
import run_end
import run_files
import run_log
from run_log import log
import threads
import training_data


# Execution
flags.DEFINE_integer("fusion_threshold_mb", None, "Horovod tensor fusion buffer in MB "
                     "(HOROVOD_FUSION_THRESHOLD; Horovod's default is 128).")
flags.DEFINE_bool("elastic", False, "Horovod elastic mode, under horovodrun (launch train "
                  "--elastic): training goes on when workers are lost or added.")
# Output
flags.DEFINE_string("model_dir", os.path.join("runs", "mcnn"),
                    "Checkpoints, TensorBoard logs, flags.txt and summary.json.")
flags.DEFINE_integer("log_every", 10, "Print progress every this many steps.")
flags.DEFINE_bool("nsc", True, "NSC and NSCB (profiles.py) at every evaluation, which "
                  "profiles the training split too (a forward pass over it, about a third of "
                  "an epoch's compute); --nonsc: at the last step's evaluation only.")
flags.DEFINE_bool("profile_baselines", True, "At the last evaluation, NSC, NSCB and mAP of "
                  "the untrained M-CNN's profiles and of intensity statistics too (a forward "
                  "pass over every field), beside the trained model's.")
flags.DEFINE_float("target_accuracy", 0.0, "Stop once held-out field accuracy reaches this, "
                   "and record the epochs, steps, images and seconds it took (0: never).")
flags.adopt_module_key_flags(run_plan)  # --help lists the run's decisions with these
FLAGS = flags.FLAGS


# ---------------------------------------------------------------- the training loop

@dataclasses.dataclass
class Run:
    """What the training loop works with, set up once by main() from the plan."""
    plan: run_plan.Plan
    model: tf.keras.Model
    optimizer: tf.keras.optimizers.Optimizer
    schedule: lr_schedule.WarmupThenDecay
    train_step: object
    predict: object
    make_data: object
    source: training_data.Source
    manifest: dict
    manager: tf.train.CheckpointManager
    writer: object
    stop: checkpoints.StopSignals
    started: float
    past: tuple = ([], 0.0, 0)  # run_files.read_history: evaluations, seconds and starts before
    changed_on_resume: dict = dataclasses.field(default_factory=dict)  # run_log.changed_flags
    plan_changed_on_resume: dict = dataclasses.field(default_factory=dict)  # run_plan.changes

    def seconds(self):
        """Training time over all the run's starts, to now."""
        return self.past[1] + time.time() - self.started

    def record_history(self, evaluations):
        """Rank 0: history.json, so that a resumed run keeps its past."""
        if hvd.rank() == 0:
            run_files.write_history(self.plan.output.model_dir, evaluations, self.seconds(),
                                    self.past[2] + 1)


@dataclasses.dataclass
class Outcome:
    """What the training loop leaves: where it stopped, its evaluations and speed."""
    global_batch: int
    accumulate: int  # micro-batches of the per-rank batch each rank takes per step
    step: int = 0
    history: list = dataclasses.field(default_factory=list)
    metrics: dict = None
    target: dict = None  # reached_target(), once --target_accuracy is reached
    eval_seconds: float = 0.0
    timer: run_log.StepTimer = dataclasses.field(default_factory=run_log.StepTimer)
    noise: optimization.GradientNoiseScale = None


def train(run, progress):
    """Steps progress.step + 1 to the plan's total_steps, on the ranks there are now, which
    make the plan's global batch (more micro-batches each when fewer)."""
    plan = run.plan
    accumulate = elastic.micro_batches(progress.global_batch, plan.per_rank_batch, hvd.size())
    train_step = run.train_step
    if accumulate != plan.accumulate_steps:
        train_step = plan.train_step(run.model, run.optimizer, accumulate)
    first = progress.step
    outcome = Outcome(progress.global_batch, accumulate, noise=optimization.GradientNoiseScale(
        plan.per_rank_batch, progress.global_batch), history=list(run.past[0]))
    # A resumed run draws a new order of its data: the images of a broken-off epoch
    # are not all replayed in the order they came, but the step count and schedule are.
    batches = named_data_errors(run, "train", run.source.feed(
        plan.per_rank_batch * accumulate, training=True, seed=plan.seed + first))
    eval_data = run.make_data("eval", run.source.feed(plan.per_rank_batch, provenance=True))
    window = run_log.StepTimer()
    for step in range(first + 1, plan.total_steps + 1):
        loss = train_one_step(run, train_step, step, *next(batches), outcome.noise)
        for timer in (window, outcome.timer):  # tracing the graph is not throughput
            timer.skip() if step == first + 1 else timer.add(loss)
        if window.steps and (step % FLAGS.log_every == 0 or step == plan.total_steps):
            log_progress(run, step, window, outcome)
            window = run_log.StepTimer()
        if step % plan.eval_steps == 0 or step == plan.total_steps:
            evaluate_and_report(run, step, eval_data, outcome)
            for timer in (window, outcome.timer):
                timer.skip()  # evaluation is not training throughput
        progress.step = outcome.step = step
        signum = run.stop.agreed()
        if (signum or step == plan.total_steps or outcome.target
                or checkpoints.checkpoint_due(step, plan.steps_per_epoch,
                                              plan.output.checkpoint_policy)):
            if hvd.rank() == 0:
                checkpoints.save_checkpoint(run.manager, run.model, step,
                                            float(run.schedule(step - 1)))
                run.record_history(outcome.history)
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
    log(f"step {step}/{run.plan.total_steps}  epoch {step / run.plan.steps_per_epoch:.2f}  loss "
        f"{mean_loss:.4f}  lr {lr:.5f}  images/s {global_rate / hvd.size():.2f} per rank, "
        f"{global_rate:.2f} global" + (f"  noise scale {noise:.0f}" if noise else ""))
    run_log.write_scalars(run.writer, step, loss=mean_loss, learning_rate=lr,
                          images_per_second=global_rate,
                          **({"gradient_noise_scale": noise} if noise else {}))


def evaluate_and_report(run, step, eval_data, outcome):
    started = time.time()
    last = step == run.plan.total_steps
    with optimization.averaged_weights(run.model, run.optimizer):
        fields, profile_fields, metrics = evaluation.evaluate(
            run.predict, training_data.named_data_errors(iter(eval_data), run.manifest, "eval",
                                                         run.source.image_table is not None),
            run.manifest["classes"], run.manifest.get("classes_split_by_field", ()),
            nsc_reference(run, step), run.manifest.get("control", "DMSO"),
            run.manifest.get("plate_batches"),
            list(data_pipeline.untrained_classes(run.manifest)), with_map=last)
    outcome.eval_seconds += time.time() - started
    epoch, accuracy = step / run.plan.steps_per_epoch, metrics["accuracy"]
    outcome.metrics = metrics
    seconds = run.seconds()
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
    target = run.plan.output.target_accuracy
    if target and accuracy >= target:
        outcome.target = reached_target(step, epoch, seconds, outcome)
        log(f"target accuracy {target:g} reached at epoch {epoch:.2f} (step "
            f"{step}, {outcome.target['images']:,} images) after {seconds:.1f} s, "
            f"{outcome.target['train_seconds']:.1f} s of it training: stopping")
    if profile_fields is not None and (last or outcome.target):
        last_profile_figures(run, metrics, profile_fields, with_map=not last)
    run.record_history(outcome.history)
    if hvd.rank() == 0:
        evaluation.write_report(os.path.join(run.plan.output.model_dir, run_files.EVALUATION),
                                fields, metrics, run.manifest["classes"], step,
                                profile_fields if last or outcome.target else None,
                                run.manifest.get("control", "DMSO"))


def last_profile_figures(run, metrics, profile_fields, with_map):
    """The run's last evaluation: mAP too where it stops early at its target (`with_map`;
    the last step's evaluation has it), and with --profile_baselines the baselines'."""
    if with_map:
        metrics.update(profile_scores.score(profile_fields, run.manifest.get("control", "DMSO")))
    log(f"NSCB's batches: {metrics['nscb_batches']}")
    if FLAGS.profile_baselines:
        metrics["baselines"] = profile_baselines(run)
        for name, figures in metrics["baselines"].items():
            log(f"baseline, {name} profiles: {evaluation.format_nsc(figures)}")


def profile_baselines(run):
    """baselines.scores of the same fields: the run's M-CNN with its initial weights
    (baselines.initialised), and each field's intensity statistics."""
    feed = run.source.feed(run.plan.per_rank_batch, provenance=True)
    channels = run.manifest.get("channels") or range(run.plan.model.image_shape[-1])
    with baselines.initialised(run.model, run.plan.seed):
        return baselines.scores(run.predict, lambda split: named_data_errors(run, split, feed),
                                run.manifest["classes"], channels,
                                run.manifest.get("control", "DMSO"),
                                run.manifest.get("plate_batches"))


def nsc_reference(run, step):
    """The training split's batches, unaugmented, for NSC at this evaluation, or None."""
    if not (FLAGS.nsc or step == run.plan.total_steps):
        return None
    return named_data_errors(run, "train", run.source.feed(run.plan.per_rank_batch,
                                                           provenance=True))


def named_data_errors(run, split, feed):
    """The batches of `split` as `feed` says (training_data.named_data_errors)."""
    return training_data.named_data_errors(iter(run.make_data(split, feed)), run.manifest,
                                           split, run.source.image_table is not None)


def reached_target(step, epoch, seconds, outcome):
    """Time to --target_accuracy as MLPerf Training counts it: from the start of training
    to the first evaluation at or above the target, evaluations included ("seconds");
    and without the evaluations ("train_seconds"), which depend on --eval_every."""
    return {"epochs": round(epoch, 3), "steps": step, "images": step * outcome.global_batch,
            "seconds": round(seconds, 2),
            "train_seconds": round(seconds - outcome.eval_seconds, 2)}


def stop_on_signal(run, step, signum):
    said, status = checkpoints.StopSignals.describe(signum)
    log(f"{said}: stopped after step {step} and wrote "
        f"{run.manager.latest_checkpoint}; rerun the same command to resume")
    hvd.allreduce(tf.constant(0), name="checkpoint_written")  # none exits before
    sys.exit(status)


def log_start(run, start_step):
    manifest, model, plan = run.manifest, run.model, run.plan
    log(f"M-CNN: {model.count_params():,} parameters, images {plan.model.image_shape} "
        f"{manifest['dtype']}, {plan.model.num_classes} classes; data {manifest['source']}")
    for note in model_files.describe_input(manifest):
        log(note)
    accumulated = (f" x {plan.accumulate_steps} micro-batches"
                   if plan.accumulate_steps > 1 else "")
    averaged = (f", weights' moving average {plan.recipe.ema_decay:g} evaluated"
                if plan.recipe.ema_decay else "")
    log(f"{plan.ranks} rank{'s' * (plan.ranks > 1)} ({plan.nodes} "
        f"node{'s' * (plan.nodes > 1)}) x {plan.per_rank_batch} images"
        f"{accumulated} = global batch {plan.global_batch}; {plan.recipe.optimizer}{averaged}; "
        f"{plan.steps_per_epoch} steps/epoch, {plan.total_steps} steps; peak LR "
        f"{plan.peak_lr:g} ({plan.lr_scaling} rule); threads per rank: {plan.threads}; oneDNN "
        f"{os.environ.get('TF_ENABLE_ONEDNN_OPTS')}; {plan.model.precision} "
        f"({plan.precision_why}){', recompute' * plan.model.recompute}")
    log(f"CPU: {plan.cpu}")
    log(f"memory: {plan.memory.describe(plan.per_rank_batch)}; "
        f"summary.json records each rank's peak")
    if plan.ranks == 1 and plan.accumulate_steps == 1:
        log("gradient noise scale: not measured (it compares the gradients of one rank's "
            "micro-batch and of the global batch, here the same); --accumulate_steps=2 "
            "measures it")
    if start_step:
        log(f"resuming from {run.manager.latest_checkpoint}: step {start_step}, "
            f"epoch {start_step / plan.steps_per_epoch:.2f}"
            + changed_since("flags", run.changed_on_resume)
            + changed_since("plan", run.plan_changed_on_resume))


def changed_since(what, changed):
    """'; flags changed since ...' for the start line of a resumed run, or ''."""
    if not changed:
        return ""
    listed = ", ".join(f"{'--' * (what == 'flags')}{name} {then} -> {now}"
                       for name, (then, now) in changed.items())
    return (f"; {what} changed since its last start: {listed} (from here on the run follows "
            f"them; summary.json records them)")


def plan_run(rank_threads):
    """(the Plan, its data's Source, manifest and batches, the plan.json of the run's
    last start or None): the flags read once into values, and what the run decides from
    them, its data and the machine (run_plan.py)."""
    request = run_plan.Request.from_flags(FLAGS)
    precision, precision_why = run_plan.resolve_precision(request.precision)
    output = run_plan.Output(FLAGS.model_dir, checkpoints.Policy.from_flags(FLAGS),
                             FLAGS.target_accuracy)
    previous = (run_files.read_json(output.model_dir, run_files.PLAN)
                if output.checkpoint_policy.resume else None)
    kept = run_plan.kept_choices(request, previous, output.model_dir)
    field_size, images_per_sec = run_plan.field_size(request, kept, precision)
    source = training_data.Source.from_flags(FLAGS, FLAGS.seed)
    manifest, make_data = training_data.open_data(source, FLAGS.seed, field_size)
    plan = run_plan.resolve(request, manifest, precision, precision_why, rank_threads, kept,
                            images_per_sec, output)
    return plan, source, manifest, make_data, previous


def main(argv):
    del argv
    tf.get_logger().setLevel("ERROR")  # TensorFlow's Python warnings are noise here
    logging.set_verbosity(logging.WARNING)  # and so are the SavedModel writer's notes
    # Horovod 1: one process per rank, all ranks discover each other.
    threads.init_horovod(FLAGS.fusion_threshold_mb)
    # Horovod 2: each rank uses only the cores it was placed on.
    rank_threads = threads.configure_threads(FLAGS.intra_op_threads, FLAGS.inter_op_threads)
    tf.keras.utils.set_random_seed(FLAGS.seed)
    # Horovod 3: the global batch grows with the ranks, and the learning rate with it
    # (everything the run decides, once: run_plan.py).
    plan, source, manifest, make_data, previous = plan_run(rank_threads)
    model_dir = plan.output.model_dir
    schedule = plan.learning_rate()
    manifest["input_standardization"] = training_data.input_standardization(
        manifest, source.input_scaling)
    model = plan.model.build(manifest["input_standardization"])
    optimizer = optimization.make_optimizer(schedule, plan.recipe)
    optimizer.build(model.trainable_variables)
    checkpoint = checkpoints.make_checkpoint(model, optimizer, plan.global_batch)
    # Rank 0 restores the newest good checkpoint, if any, before the broadcast below.
    start_step = checkpoints.agree_on_start(checkpoint, model_dir, plan.global_batch, manifest,
                                            plan.output.checkpoint_policy)
    manager = checkpoints.open_checkpoints(checkpoint, model_dir, plan.output.checkpoint_policy)
    # Horovod 4: every rank starts from rank 0's weights and optimizer state.
    hvd.broadcast_variables(model.variables, root_rank=0)
    hvd.broadcast_variables(optimizer.variables, root_rank=0)
    # Horovod 5: gradients are averaged by allreduce inside train_step.
    train_step = plan.train_step(model, optimizer)
    # Horovod 6: rank 0 alone writes, and only a run that trains changes its model dir.
    run = Run(plan, model, optimizer, schedule, train_step,
              evaluation.make_predict(model, plan.model.image_shape, plan.model.stored_dtype),
              make_data, source, manifest, manager, None, checkpoints.StopSignals(),
              time.time())
    run.past = hvd.broadcast_object(run_files.read_history(model_dir, start_step)
                                    if hvd.rank() == 0 else None, root_rank=0, name="history")
    finished = start_step >= plan.total_steps
    if hvd.rank() == 0 and start_step:
        run.changed_on_resume = run_log.changed_flags(model_dir)
        run.plan_changed_on_resume = run_plan.changes(previous, plan) if previous else {}
    if hvd.rank() == 0 and not finished:
        model_files.record_data(model_dir, manifest)
        plan.write(model_dir)
        run.writer = run_log.open_log(model_dir)
    log_start(run, start_step)
    if finished:
        return run_end.already_finished(run)
    if FLAGS.elastic:
        outcome = elastic.run(lambda progress: train(run, progress),
                              model.variables + optimizer.variables, start_step,
                              plan.global_batch, plan.per_rank_batch)
    else:
        outcome = train(run, elastic.Progress(start_step, plan.global_batch))
    run_end.finish(run, outcome, start_step)


if __name__ == "__main__":
    errors.run_main(main)
