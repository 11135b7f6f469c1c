"""The end of a training run: the held-out results printed, summary.json, the
evaluation drawn (evaluation_pictures.py), the model exported, the ranks' weights
checked alike; and a rerun of a finished run. train_mcnn.py's Run and Outcome are what
it reads."""
import dataclasses
import os
import sys

import horovod.tensorflow as hvd

import checkpoints
import evaluation
import evaluation_pictures
import mcnn_model
import optimization
import rank_memory
import run_files
import run_log
from run_log import log


def write_summary(run, outcome, start_step, seconds, in_sync, peaks, expected):
    """summary.json, written whole or not at all, with every flag of the project's
    scripts; `peaks` is each rank's peak resident memory in GB, `expected` the
    estimate's parts (RankMemory.parts)."""
    global_batch, timer, metrics = outcome.global_batch, outcome.timer, outcome.metrics
    images_per_sec = timer.steps * global_batch / timer.seconds if timer.steps else None
    summary = {
        "time_to_train_s": round(seconds, 2),  # over all the run's starts
        "time_this_start_s": round(seconds - run.past[1], 2),  # at the same moment
        "starts": run.past[2] + 1,
        "target_accuracy": run.plan.output.target_accuracy or None,
        "time_to_target": ({"reached": bool(outcome.target), **(outcome.target or {})}
                           if run.plan.output.target_accuracy else None),
        "final_accuracy": metrics["accuracy"],
        "eval_images": metrics["fields"],
        "images_per_sec": images_per_sec,
        "images_per_sec_per_rank": images_per_sec and images_per_sec / hvd.size(),
        "ranks": hvd.size(),
        "nodes": hvd.cross_size(),
        "ranks_per_node": hvd.local_size(),
        "threads_per_rank": dataclasses.asdict(run.plan.threads),
        "peak_rss_gb_by_rank": peaks,
        "memory_expected_gb": sum(expected.values()),
        "memory_expected_parts_gb": expected,
        "ranks_in_sync": in_sync,
        "resumed_from_step": start_step,
        "flags_changed_on_resume": run.changed_on_resume,
        "plan_changed_on_resume": run.plan_changed_on_resume,
        "bad_records_skipped": run.manifest.get("bad_records_skipped", 0),
        "global_batch": global_batch,
        "accumulate_steps": outcome.accumulate,
        "peak_lr": run.schedule.peak_lr,
        "gradient_noise_scale": outcome.noise.value,
        "critical_batch": outcome.noise.value and round(outcome.noise.value),
        # Its parts: a |G|^2 at or below 0 means the noise swamps the gradient at these
        # batch sizes, and B_noise is beyond them.
        "gradient_norm2_estimate": outcome.noise.norm2,
        "gradient_noise_trace_estimate": outcome.noise.trace,
        "steps": outcome.step,
        "epochs": round(outcome.step / run.plan.steps_per_epoch, 3),
        "data": run.manifest["source"],
        "image_shape": run.manifest["image_shape"],
        "bin": run.manifest.get("bin", 1),
        "padded_to": list(mcnn_model.padded_size(*run.manifest["image_shape"][:2])),
        "classes": run.manifest["classes"],
        "final_treatment_accuracy": metrics["treatment_accuracy"],
        "final_accuracy_by_compound": metrics.get("accuracy_by_compound"),
        **{f"final_{k}": metrics[k] for k in evaluation.PROFILE_FIGURES if k in metrics},
        "classes_split_by_field": metrics["split_by_field"],
        "split": run.manifest.get("split", {}).get("by"),
        "eval_history": outcome.history,
        "plan": run.plan.as_dict(),
        "flags": run_log.project_flags(),
    }
    return run_files.write_json(os.path.join(run.plan.output.model_dir, run_files.SUMMARY),
                                summary)


def finish(run, outcome, start_step):
    """Rank 0 exports the model (the moving average of its weights with --ema_decay, as
    evaluated), writes the summary and draws the evaluation; every rank checks the
    weights."""
    seconds = run.seconds()
    in_sync = optimization.weights_in_sync(run.model)
    run.optimizer.finalize_variable_values(run.model.trainable_variables)  # --ema_decay's
    peaks = hvd.allgather_object(round(rank_memory.peak_rss_gb(), 3), name="peak_rss_gb")
    expected = run.plan.memory.parts(run.plan.per_rank_batch)
    if hvd.rank() == 0:
        log(f"Held-out results at the end (split: "
            f"{run.manifest.get('split', {}).get('by', 'as given')}): "
            f"{evaluation.format_per_class(outcome.metrics)}")
        log(f"peak memory of a rank: {max(peaks):.2f} GB"
            + (f" (the least {min(peaks):.2f})" if len(peaks) > 1 else "")
            + f"; expected {sum(expected.values()):.2f} GB")
        path = write_summary(run, outcome, start_step, seconds, in_sync, peaks, expected)
        log(f"Pictures of the evaluation: {draw_evaluation(run, outcome)}")
        checkpoints.export_finished(run.manager, run.model, run.plan.output.model_dir)
        starts = (f" over {run.past[2] + 1} starts, {seconds - run.past[1]:.1f} s in this "
                  f"one" if run.past[2] else "")
        log(f"Done in {seconds:.1f} s{starts}: held-out accuracy "
            f"{outcome.metrics['accuracy']:.4f} "
            f"({outcome.metrics['fields']} images). Summary: {path}; TensorBoard: "
            f"{os.path.join(os.path.dirname(sys.executable), 'tensorboard')} --logdir "
            f"{os.path.join(run.plan.output.model_dir, run_files.TENSORBOARD)}")
    if not in_sync:
        raise RuntimeError("ranks ended with different weights: gradients were not averaged "
                           "(is tf.keras Keras 3, which Horovod does not hook?)")


def draw_evaluation(run, outcome):
    """Rank 0: evaluation_pictures of the last evaluation, with held-out fields of its
    own share as examples; the page's path."""
    classes = run.manifest["classes"]
    eval_data = run.make_data("eval", run.source.feed(run.plan.per_rank_batch,
                                                      provenance=True))
    examples = evaluation.example_fields(run.predict, iter(eval_data), len(classes))
    model_dir = run.plan.output.model_dir
    return evaluation_pictures.draw(
        os.path.join(model_dir, run_files.EVALUATION),
        evaluation_pictures.about(model_dir, run.manifest["source"],
                                  run.manifest.get("split", {}).get("by")),
        outcome.metrics, outcome.history, examples, classes)


def already_finished(run):
    """A rerun of a finished run: nothing to train; the export, if it failed before."""
    model_dir = run.plan.output.model_dir
    log(f"{model_dir} has finished its {run.plan.total_steps} steps; nothing to do "
        f"(raise --epochs to train on, or --noresume --overwrite to start afresh)")
    if hvd.rank() == 0 and not os.path.isdir(os.path.join(model_dir, run_files.SAVED_MODEL)):
        run.optimizer.finalize_variable_values(run.model.trainable_variables)
        checkpoints.export_finished(run.manager, run.model, model_dir)
