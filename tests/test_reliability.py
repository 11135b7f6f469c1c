"""Crashes, signals, lost ranks, full disks and bad input, each really made to happen."""
import glob
import json
import os
import re
import resource
import shutil
import signal
import subprocess

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

import mcnn_model
from conftest import (LAUNCH, PYTHON, ROOT, SMALL_RUN, TWO_RANKS, Run, fails, run,
                      scalar_series, small_run)

TRAIN = os.path.join(ROOT, "train_mcnn.py")


def test_a_killed_run_resumes_and_ends_as_an_uninterrupted_one(two_rank_run, tmp_path):
    model_dir = tmp_path / "model"
    args = small_run(two_rank_run, model_dir)
    interrupted = Run(args)
    seen = interrupted.wait_for_step(52)  # mid-epoch 9
    os.kill(interrupted.rank_pid(0), signal.SIGKILL)
    code, _, _ = interrupted.finish(timeout=120)
    assert code != 0
    checkpoint = tf.train.latest_checkpoint(model_dir / "checkpoints")
    resumed_at = int(checkpoint.rsplit("-", 1)[1])
    assert seen - 5 <= resumed_at  # at most one checkpoint interval (5 steps) is redone
    first_start_s = json.loads((model_dir / "history.json").read_text())["seconds"]
    assert first_start_s > 0

    result = run([LAUNCH, "train", *TWO_RANKS, "--", *args])
    assert f"resuming from {checkpoint}: step {resumed_at}" in result.stdout
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["steps"] == 120 and summary["resumed_from_step"] == resumed_at
    # Its past survives: every epoch's evaluation (one each 6 steps), the time of both starts.
    assert [e["step"] for e in summary["eval_history"]] == list(range(6, 121, 6))
    assert summary["starts"] == 2
    assert summary["time_to_train_s"] == pytest.approx(
        first_start_s + summary["time_this_start_s"], abs=0.02)
    assert re.search(r"Done in [\d.]+ s over 2 starts, [\d.]+ s in this one", result.stdout)

    reference = two_rank_run[0] / "tensorboard"
    rates = scalar_series(model_dir / "tensorboard", "learning_rate")
    expected_rates = scalar_series(reference, "learning_rate")
    common = sorted(rates.keys() & expected_rates.keys())
    # The first step after a resume compiles the graph and is not timed or logged.
    assert len(common) >= len(expected_rates) - 1
    np.testing.assert_allclose([rates[s] for s in common], [expected_rates[s] for s in common],
                               rtol=1e-6)
    final = np.mean(list(scalar_series(model_dir / "tensorboard", "loss").values())[-3:])
    expected = np.mean(list(scalar_series(reference, "loss").values())[-3:])
    assert final == pytest.approx(expected, rel=0.3)


@pytest.mark.parametrize("signum, target", [(signal.SIGTERM, 1), (signal.SIGINT, 0),
                                            (signal.SIGTERM, "launcher"),
                                            (signal.SIGINT, "launcher")])
def test_a_signal_to_any_rank_or_to_the_launcher_checkpoints_then_stops_every_rank(
        two_rank_run, tmp_path, signum, target):
    """The launcher passes a SIGTERM on to every rank as SIGUSR1 and a Ctrl-C as SIGUSR2,
    which mpirun forwards at once (it answers SIGTERM by killing the ranks within
    seconds); the stop line names what was asked."""
    model_dir = tmp_path / "model"
    interrupted = Run(small_run(two_rank_run, model_dir))
    seen = interrupted.wait_for_step(12)
    to_launcher = target == "launcher"
    os.kill(interrupted.process.pid if to_launcher else interrupted.rank_pid(target), signum)
    code, output, _ = interrupted.finish(timeout=120)  # a hang fails here
    assert code != 0
    name = {(signal.SIGTERM, True): r"SIGUSR1 \(a SIGTERM to \./launch, passed on\)",
            (signal.SIGINT, True): r"SIGUSR2 \(Ctrl-C to \./launch, passed on\)",
            (signal.SIGINT, False): r"SIGINT \(Ctrl-C\)",
            (signal.SIGTERM, False): "SIGTERM"}[signum, to_launcher]
    stopped = re.search(rf"{name}: stopped after step (\d+) and wrote "
                        rf"(\S+); rerun the same command to resume", output)
    assert stopped, output[-3000:]
    assert int(stopped.group(1)) >= seen
    assert tf.train.latest_checkpoint(model_dir / "checkpoints") == stopped.group(2)
    assert stopped.group(2).endswith(f"ckpt-{stopped.group(1)}")


def test_a_lost_rank_ends_the_job_naming_it(two_rank_run, tmp_path):
    job = Run(small_run(two_rank_run, tmp_path / "model"))
    job.wait_for_step(8)
    os.kill(job.rank_pid(1), signal.SIGKILL)
    code, output, _ = job.finish(timeout=120)  # the rank that is left does not hang
    assert code != 0
    assert re.search(r"rank 1 .*(exited on signal 9|Killed)", output), output[-3000:]


def test_a_diverging_run_stops_with_step_and_rate_and_keeps_its_good_checkpoint(
        two_rank_run, tmp_path):
    model_dir = tmp_path / "model"
    result = fails([LAUNCH, "train", "--", *small_run(
        two_rank_run, model_dir, "--per_rank_batch=8", "--base_lr=1e9", "--warmup_epochs=0",
        "--checkpoint_steps=1")])
    assert re.search(r"(loss is (nan|inf)|weights are not finite) (at|after) step \d+ "
                     r"\(learning rate [\d.e+]+\)", result.stderr), result.stderr[-3000:]
    latest = tf.train.latest_checkpoint(model_dir / "checkpoints")
    if latest:  # whatever was saved holds finite weights
        model = mcnn_model.build_mcnn((128, 128, 3), 3)
        tf.train.Checkpoint(model=model).restore(latest).expect_partial()
        assert all(np.isfinite(w).all() for w in model.get_weights())


def test_a_full_disk_while_checkpointing_is_named_and_keeps_the_previous_checkpoint(
        two_rank_run, tmp_path):
    model_dir = tmp_path / "model"
    args = small_run(two_rank_run, model_dir, "--per_rank_batch=8", "--checkpoint_steps=0",
                     "--checkpoint_every=1")
    run([PYTHON, TRAIN, *args, "--epochs=2", "--warmup_epochs=1"], cwd=ROOT)
    previous = tf.train.latest_checkpoint(model_dir / "checkpoints")
    assert previous.endswith("ckpt-12")

    # Every file this process writes stops at 6 MB, as on a full disk: room for MPI's
    # own files, not for the 9 MB checkpoint.
    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (6 << 20, 6 << 20))

    result = subprocess.run([PYTHON, TRAIN, *args, "--epochs=4", "--warmup_epochs=1"],
                            cwd=ROOT, capture_output=True, text=True, preexec_fn=small_files)
    assert result.returncode != 0
    assert re.search(rf"could not write the checkpoint of step 18 in \S+: .*File too large.* "
                     rf"The previous checkpoint, {re.escape(previous)}, is intact",
                     result.stderr), result.stderr[-3000:]
    assert tf.train.latest_checkpoint(model_dir / "checkpoints") == previous
    assert not glob.glob(str(model_dir / "checkpoints" / "ckpt-18*"))
    model = mcnn_model.build_mcnn((128, 128, 3), 3)
    restored = tf.train.Checkpoint(model=model).restore(previous).expect_partial()
    restored.assert_existing_objects_matched()


def test_a_previous_run_is_resumed_or_overwritten_only_when_asked(two_rank_run, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(two_rank_run[0], model_dir)
    args = [PYTHON, TRAIN, *small_run(two_rank_run, model_dir, "--per_rank_batch=8")]
    kept = sorted(os.listdir(model_dir / "checkpoints"))

    refused = fails([*args, "--noresume"], cwd=ROOT)
    assert "holds a previous run" in refused.stderr and "--noresume --overwrite" in refused.stderr
    assert sorted(os.listdir(model_dir / "checkpoints")) == kept
    conflicting = fails([*args, "--overwrite"], cwd=ROOT)
    assert "give --noresume with --overwrite" in conflicting.stderr
    other_batch = fails([*args, "--per_rank_batch=4"], cwd=ROOT)
    assert "trained with a global batch of 8, this run has 4" in other_batch.stderr

    # 1 rank x 8 images continues the 2 x 4 run: the same global batch, the same schedule.
    # A run with nothing to do changes nothing in its model dir.
    records = {name: (model_dir / name).read_bytes() for name in (
        "flags.txt", "data_manifest.json", "summary.json")}
    finished = run([*args, "--log_every=3"], cwd=ROOT)
    assert "has finished its 120 steps; nothing to do" in finished.stdout
    assert sorted(os.listdir(model_dir / "checkpoints")) == kept
    assert {name: (model_dir / name).read_bytes() for name in records} == records

    fresh = run([*args, "--noresume", "--overwrite", "--epochs=1", "--warmup_epochs=0"],
                cwd=ROOT)
    assert "resuming" not in fresh.stdout
    assert sorted(os.listdir(model_dir / "checkpoints"))[-1].startswith("ckpt-6")
    assert json.loads((model_dir / "summary.json").read_text())["steps"] == 6


def test_model_dirs_whose_names_a_glob_reads_keep_exactly_their_own_checkpoints(
        two_rank_run, tmp_path):
    """tensorflow/tensorflow#34290: TensorFlow's checkpoint pruning read runs/lr[1] as a
    pattern and deleted runs/lr1's checkpoints, and never its own."""
    def train(model_dir, epochs):
        return run([PYTHON, TRAIN, *small_run(
            two_rank_run, model_dir, "--per_rank_batch=8", f"--epochs={epochs}",
            "--warmup_epochs=1", "--checkpoint_steps=2", "--keep_checkpoints=2",
            "--eval_every=10")], cwd=ROOT)

    def kept(model_dir):
        return sorted(name for name in os.listdir(model_dir / "checkpoints")
                      if name.endswith(".index"))

    plain, bracketed = tmp_path / "lr1", tmp_path / "lr[1]"
    train(plain, 2)  # 6 steps an epoch at a global batch of 8: checkpoints 2, 4, ... 12
    train(bracketed, 3)
    assert kept(plain) == ["ckpt-10.index", "ckpt-12.index"]
    assert kept(bracketed) == ["ckpt-16.index", "ckpt-18.index"]
    assert "nothing to do" in train(plain, 2).stdout
    assert "nothing to do" in train(bracketed, 3).stdout
    data = next((two_rank_run[0].parent / "data").glob("*_by-compound"))
    predicted = run([PYTHON, os.path.join(ROOT, "predict.py"), f"--model_dir={bracketed}",
                     f"--data_dir={data}", f"--output={tmp_path / 'p[1].csv'}"], cwd=ROOT)
    assert "cannot be loaded" not in predicted.stdout + predicted.stderr
    assert (tmp_path / "p[1].csv").exists()


def corrupted_copy(two_rank_run, tmp_path):
    """The reference run's data set, with its first training shard cut short."""
    source = next((two_rank_run[0].parent / "data").glob("*_by-compound"))
    data = tmp_path / "data"
    shutil.copytree(source, data)
    manifest = json.loads((data / "manifest.json").read_text())
    shard = data / manifest["splits"]["train"]["files"][0]
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 1000)
    return data, shard


def test_a_truncated_shard_is_named_or_skipped_and_counted(two_rank_run, tmp_path):
    data, shard = corrupted_copy(two_rank_run, tmp_path)
    args = [PYTHON, TRAIN, f"--data_dir={data}", f"--model_dir={tmp_path / 'model'}",
            "--per_rank_batch=8", "--epochs=2", "--warmup_epochs=0"]
    result = fails(args, cwd=ROOT)
    assert f"{shard}: record" in result.stderr and "corrupt or truncated" in result.stderr
    assert "--skip_bad_records" in result.stderr
    assert "Traceback" not in result.stderr  # one line, as other bad input
    assert [line for line in result.stderr.splitlines()
            if line.startswith("train_mcnn.py: ")] == [line for line in result.stderr.splitlines()
                                                       if "corrupt or truncated" in line]

    skipped = run([*args, "--skip_bad_records"], cwd=ROOT)
    assert "--skip_bad_records: 1 bad record skipped" in skipped.stdout
    assert str(shard) in skipped.stdout
    summary = json.loads((tmp_path / "model" / "summary.json").read_text())
    assert summary["bad_records_skipped"] == 1 and summary["steps"] == 2 * (48 // 8)


def test_a_mistyped_flag_under_the_launcher_is_said_once(tmp_path):
    result = subprocess.run([LAUNCH, "train", *TWO_RANKS, "--", "--epochz=3"],
                            capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert [line for line in output.splitlines() if "epochz" in line and "launch:" not in line] == [
        "train_mcnn.py: Unknown command line flag 'epochz'. Did you mean: epochs ? (--helpshort "
        "lists the flags)"], output
    assert "terminated normally" not in output and "non-zero status" not in output  # mpirun's


def test_too_few_shards_for_the_ranks_is_said_once_before_any_work(two_rank_run, tmp_path):
    source = next((two_rank_run[0].parent / "data").glob("*_by-compound"))
    data = tmp_path / "data"
    shutil.copytree(source, data)
    manifest = json.loads((data / "manifest.json").read_text())
    held_out = manifest["splits"]["eval"]
    held_out.update(files=held_out["files"][:1], shard_counts=held_out["shard_counts"][:1],
                    count=held_out["shard_counts"][0])
    (data / "manifest.json").write_text(json.dumps(manifest))
    result = subprocess.run([LAUNCH, "train", *TWO_RANKS, "--", f"--data_dir={data}",
                             f"--model_dir={tmp_path / 'model'}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stdout + result.stderr
    said = [line for line in (result.stdout + result.stderr).splitlines()
            if "its eval split is 1 shard(s) for 2 ranks" in line]
    assert len(said) == 1 and "--images_per_shard=" in said[0], result.stdout + result.stderr
    assert "building" not in (result.stdout + result.stderr).lower()
    assert not (tmp_path / "model" / "checkpoints").exists()


def test_a_shard_cut_between_two_records_is_named_not_read_as_a_shorter_one(
        two_rank_run, tmp_path):
    """A TFRecord reader takes a cut at a record boundary for the file's end; the
    manifest's count per shard tells them apart."""
    source = next((two_rank_run[0].parent / "data").glob("*_by-compound"))
    data = tmp_path / "data"
    shutil.copytree(source, data)
    manifest = json.loads((data / "manifest.json").read_text())
    shard = data / manifest["splits"]["train"]["files"][0]
    recorded = manifest["splits"]["train"]["shard_counts"][0]
    offset = 0
    with open(shard, "rb") as f:  # a record: 8-byte length, 4-byte CRC, data, 4-byte CRC
        for _ in range(recorded // 2):
            f.seek(offset)
            offset += 16 + int.from_bytes(f.read(8), "little")
    with open(shard, "r+b") as f:
        f.truncate(offset)
    args = [PYTHON, TRAIN, f"--data_dir={data}", f"--model_dir={tmp_path / 'model'}",
            "--per_rank_batch=8", "--epochs=2", "--warmup_epochs=0"]
    result = fails(args, cwd=ROOT)
    assert (f"{shard}: {recorded // 2} records, the manifest records {recorded}: the shard "
            f"was cut short between records") in result.stderr
    assert "Traceback" not in result.stderr and "--skip_bad_records" in result.stderr


def test_elastic_training_goes_on_without_a_lost_worker(two_rank_run, tmp_path):
    """Two local 'hosts' (localhost and 127.0.0.1), one worker each: Horovod drops the
    host of a lost worker, so the other must be on a host of its own."""
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost\n127.0.0.1\n")
    model_dir = tmp_path / "model"
    job = Run(small_run(two_rank_run, model_dir, "--epochs=8"), placement=[
        "--elastic", "--min-np", "1", "--max-np", "2", "--hostfile", str(hosts), "--sockets", "1",
        "--cores-per-socket", "1"])
    job.wait_for_step(20)
    os.kill(job.rank_pid(1), signal.SIGKILL)
    code, output, _ = job.finish(timeout=600)
    assert code == 0, output[-5000:]
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["steps"] == 48 and summary["ranks"] == 1
    assert summary["final_accuracy"] is not None
    # The rule: the global batch stays (the one worker left takes 2 micro-batches of 4),
    # so the planned rate and steps still hold: 48 steps are 8 epochs of 48 fields.
    assert summary["global_batch"] == 8 and summary["accumulate_steps"] == 2
    assert summary["epochs"] == 8
    assert ("the global batch stays 8 (4 images x 2 micro-batches a rank), and with it the "
            "rate and the steps left") in output
    # from a commit (each checkpoint is one: every 5 steps, and every 2 epochs of 6 steps)
    # no older than the last before step 20, which was seen before the kill
    resumed = re.search(r"workers changed: going on with 1 from step (\d+)", output)
    assert resumed, output[-3000:]
    step = int(resumed.group(1))
    assert step >= 15 and (step % 5 == 0 or step % 12 == 0), output[-3000:]


# ---------------------------------------------------------------- damaged files

def checkpoint_files(model_dir):
    return sorted(p.name for p in (model_dir / "checkpoints").glob("ckpt-*"))


def damage(path):
    """Cuts a file to 1,000 bytes, as an interrupted copy or a failing disk leaves it."""
    with open(path, "r+b") as f:
        f.truncate(1000)


def test_damaged_checkpoints_fall_back_to_the_newest_good_one_and_never_start_afresh(
        two_rank_run, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(two_rank_run[0], model_dir)
    shutil.rmtree(model_dir / "saved_model")
    args = [PYTHON, TRAIN, *small_run(two_rank_run, model_dir, "--per_rank_batch=8")]
    folder = model_dir / "checkpoints"
    steps = sorted(int(p.stem.split("-")[1]) for p in folder.glob("ckpt-*.index"))
    newest, previous = (folder / f"ckpt-{s}" for s in steps[:-3:-1])
    damage(next(folder.glob(f"{newest.name}.data-*")))

    resumed = run(args, cwd=ROOT)
    assert f"{newest} does not restore (Read less bytes than requested): set aside in " \
           f"{folder / 'damaged'}" in resumed.stdout
    assert f"resuming from {previous}, the newest checkpoint in the folder that restores" \
           in resumed.stdout
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["resumed_from_step"] == steps[-2] and summary["steps"] == steps[-1]
    assert {p.name for p in (folder / "damaged").iterdir()} == {
        f"{newest.name}.index", f"{newest.name}.data-00000-of-00001"}
    assert (model_dir / "saved_model").is_dir()

    # A garbled index: the checkpoints in the folder are found, never a fresh start.
    (folder / "checkpoint").write_text("not a checkpoint state\n")
    found = run(args, cwd=ROOT)
    assert (f"lists no readable checkpoint; resuming from {newest}, the newest checkpoint in "
            f"the folder that restores") in found.stdout
    assert f"has finished its {steps[-1]} steps; nothing to do" in found.stdout

    # None restores: stop, say which and why, change nothing.
    for data in folder.glob("ckpt-*.data-*"):
        damage(data)
    kept = checkpoint_files(model_dir)
    refused = fails(args, cwd=ROOT)
    assert f"no checkpoint in {folder} restores into this model: {newest}: Read less bytes" \
           in refused.stderr
    assert "Nothing was changed" in refused.stderr and "Traceback" not in refused.stderr
    assert checkpoint_files(model_dir) == kept and "step 1/" not in refused.stdout


def test_prediction_and_export_with_a_damaged_model_dir_say_so_and_fall_back(
        two_rank_run, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(two_rank_run[0], model_dir)
    folder = model_dir / "checkpoints"
    newest = max(folder.glob("ckpt-*.index"), key=lambda p: int(p.stem.split("-")[1]))
    damage(next(folder.glob(f"{newest.stem}.data-*")))
    damage(next((model_dir / "saved_model" / "variables").glob("variables.data-*")))
    screen = next((two_rank_run[0].parent / "data").glob("*_screen"))
    predict = [PYTHON, os.path.join(ROOT, "predict.py"), f"--model_dir={model_dir}",
               f"--image_table={screen / 'BBBC021_v1_image.csv'}",
               f"--image_root={screen / 'images'}"]
    (tmp_path / "FILE").write_text("a file, not a folder")

    unwritable = fails([*predict, f"--output={tmp_path / 'FILE' / 'p.csv'}"], cwd=ROOT)
    assert f"{tmp_path / 'FILE'} is not a folder this program can write to" in unwritable.stderr
    assert "Traceback" not in unwritable.stderr
    predicted = run([*predict, f"--output={tmp_path / 'p.csv'}"], cwd=ROOT)
    assert f"{folder / newest.stem} does not restore (Read less bytes" in predicted.stdout
    assert re.search(rf"{model_dir / 'saved_model'} cannot be loaded \(.*\): using the weights "
                     rf"of {folder}/ckpt-\d+", predicted.stdout), predicted.stdout
    assert len(pd.read_csv(tmp_path / "p.csv")) == len(
        pd.read_csv(screen / "BBBC021_v1_image.csv"))

    # An export that cannot be written is named; the rerun of the finished run exports.
    shutil.rmtree(model_dir / "saved_model")
    (model_dir / "saved_model.partial").write_text("a file in the way")
    args = [PYTHON, TRAIN, *small_run(two_rank_run, model_dir, "--per_rank_batch=8")]
    refused = fails(args, cwd=ROOT)
    assert f"could not write {model_dir / 'saved_model'}: " in refused.stderr
    assert "is kept; free space or fix the folder, then rerun the same command to export it" \
           in refused.stderr and "Traceback" not in refused.stderr
    (model_dir / "saved_model.partial").unlink()
    exported = run(args, cwd=ROOT)
    assert f"exported the model to {model_dir / 'saved_model'}" in exported.stdout


def test_a_full_disk_during_conversion_is_named_and_the_rerun_resumes(two_rank_run, tmp_path):
    screen = next((two_rank_run[0].parent / "data").glob("*_screen"))
    convert = [PYTHON, os.path.join(ROOT, "prepare_data.py"), "--include_dmso",
               f"--image_table={screen / 'BBBC021_v1_image.csv'}", "--images_per_shard=4",
               f"--moa_table={screen / 'BBBC021_v1_moa.csv'}", f"--image_root={screen / 'images'}",
               f"--output_dir={tmp_path / 'data'}", "--workers=2"]

    def small_files():  # room for two 128 x 128 fields, not a shard of four
        resource.setrlimit(resource.RLIMIT_FSIZE, (120_000, 120_000))

    full = subprocess.run(convert, capture_output=True, text=True, preexec_fn=small_files)
    assert full.returncode != 0
    staging = next(tmp_path.glob("data.partial-*"))
    assert re.search(rf"could not write to {staging}: .*File too large\. The shards written so "
                     rf"far are kept there; .* rerun the same command to resume", full.stderr)
    assert "Traceback" not in full.stderr and not (tmp_path / "data").exists()
    run(convert)
    assert (tmp_path / "data" / "manifest.json").exists() and not staging.exists()


def screen_copy(two_rank_run, tmp_path):
    """The reference run's screen (tables and TIFFs), copied, and its image table."""
    screen = tmp_path / "screen"
    shutil.copytree(next((two_rank_run[0].parent / "data").glob("*_screen")), screen)
    return screen, pd.read_csv(screen / "BBBC021_v1_image.csv", dtype=str)


def tiff_of(screen, table, index, channel="DAPI"):
    return (screen / "images" / table.loc[index, f"Image_PathName_{channel}"]
            / table.loc[index, f"Image_FileName_{channel}"])


def from_tables(screen, model_dir, *flags):
    return [f"--image_table={screen / 'BBBC021_v1_image.csv'}",
            f"--moa_table={screen / 'BBBC021_v1_moa.csv'}", f"--image_root={screen / 'images'}",
            "--include_dmso", "--eval_fraction=0.5", "--per_rank_batch=4", "--log_every=1",
            f"--model_dir={model_dir}", *flags]


@pytest.mark.parametrize("ranks", [1, 2])
def test_missing_tiffs_end_training_from_tables_in_one_line_said_once(
        two_rank_run, tmp_path, ranks):
    screen, table = screen_copy(two_rank_run, tmp_path)
    missing = [tiff_of(screen, table, 9), tiff_of(screen, table, 30, "Actin")]
    for path in missing:
        path.unlink()
    result = fails([LAUNCH, "train", "--sockets", "1", "--cores-per-socket", "2",
                    "--ranks-per-socket", str(ranks), "--",
                    *from_tables(screen, tmp_path / "model", "--epochs=2")],
                   timeout=120)  # a hang fails here
    said = [line for line in result.stderr.splitlines() if line.startswith("train_mcnn.py: ")]
    assert len(said) == 1, result.stderr[-3000:]  # every rank finds it; rank 0 says it
    assert f"2 of its {3 * len(table)} files are missing or unreadable" in said[0]
    assert f"row 11: {missing[0]} does not exist; row 32: {missing[1]} does not exist" in said[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "model" / "checkpoints").exists()


def test_a_tiff_lost_while_training_from_tables_ends_the_run_in_one_line(two_rank_run, tmp_path):
    screen, table = screen_copy(two_rank_run, tmp_path)
    job = Run(from_tables(screen, tmp_path / "model", "--epochs=20"))
    job.wait_for_step(1)
    tiff_of(screen, table, 5).unlink()  # every field is read again each epoch
    code, output, _ = job.finish(timeout=120)  # a hang fails here
    assert code != 0 and "Traceback" not in output, output[-3000:]
    said = [line for line in output.splitlines() if line.startswith("train_mcnn.py: ")]
    assert said and set(said) == {
        f"train_mcnn.py: image table row 7: {tiff_of(screen, table, 5)} does not exist"}, said


def test_a_resume_on_other_data_is_refused_and_changed_flags_are_said(two_rank_run, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(two_rank_run[0], model_dir)
    data = tmp_path / "other"  # the same classes and fields, other intensity ranges
    shutil.copytree(next((two_rank_run[0].parent / "data").glob("*_by-compound")), data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["intensity"]["all"][0][1] *= 2
    (data / "manifest.json").write_text(json.dumps(manifest))
    recorded = (model_dir / "data_manifest.json").read_bytes()
    args = [PYTHON, TRAIN, f"--data_dir={data}", f"--model_dir={model_dir}",
            *[f for f in SMALL_RUN if not f.startswith("--synthetic_") and "image_" not in f],
            "--per_rank_batch=8"]
    refused = fails(args, cwd=ROOT)
    assert "holds a run trained on other data than this run's: other intensity" in refused.stderr
    assert "--resume_with_other_data" in refused.stderr
    assert (model_dir / "data_manifest.json").read_bytes() == recorded

    # Told so, it trains on: 2 more epochs at another rate, said at the start and recorded.
    resumed = run([*args, "--resume_with_other_data", "--epochs=22", "--base_lr=0.01"], cwd=ROOT)
    said = next(line for line in resumed.stdout.splitlines() if line.startswith("resuming"))
    assert "flags changed since its last start: --base_lr 0.02 -> 0.01, " in said
    assert "--epochs 20.0 -> 22.0" in said and f"--data_dir None -> {data}" in said
    # and what the plan decides differently from the plan.json of its last start
    assert "plan changed since its last start: ranks 2 -> 1, per_rank_batch 4 -> 8, " in said
    assert "total_steps 120 -> 132" in said and "peak_lr 0.02 -> 0.01" in said
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["plan_changed_on_resume"]["total_steps"] == [120, 132]
    assert json.loads((model_dir / "plan.json").read_text()) == summary["plan"]
    assert summary["steps"] == 132 and summary["resumed_from_step"] == 120
    assert summary["flags_changed_on_resume"]["epochs"] == ["20.0", "22.0"]
    assert summary["flags_changed_on_resume"]["base_lr"] == ["0.02", "0.01"]
    assert json.loads((model_dir / "data_manifest.json").read_text())["intensity"] == manifest[
        "intensity"]


def test_ctrl_c_while_predicting_ends_in_one_line_and_writes_nothing(two_rank_run, tmp_path):
    """SIGINT once predict.py has said what its model takes (so, inside its main): one
    line, exit 130, and no output half-written (at 128 x 128 the fields may all be
    predicted before the signal lands, so a CSV may be there, whole)."""
    model_dir, _ = two_rank_run
    screen = next((model_dir.parent / "data").glob("*_screen"))
    output = tmp_path / "predictions.csv"
    process = subprocess.Popen(
        [PYTHON, os.path.join(ROOT, "predict.py"), f"--model_dir={model_dir}",
         f"--output={output}", "--batch_size=1", "--profiles",
         f"--image_table={screen / 'BBBC021_v1_image.csv'}", f"--image_root={screen / 'images'}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert process.stdout.readline()  # the model loaded: its input described
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-3000:]
    said = stderr.strip().splitlines()
    assert len(said) == 1 and said[0].startswith("predict.py: stopped by Ctrl-C"), said
    assert "Traceback" not in stderr
    table = pd.read_csv(screen / "BBBC021_v1_image.csv")
    if output.exists():
        assert len(pd.read_csv(output)) == len(table)
    assert not list(tmp_path.glob("*.tmp"))
