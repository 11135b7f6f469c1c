"""Real Horovod ranks under mpirun, placed by ./launch, on small synthetic images."""
import json
import os
import shutil
import subprocess

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
import tifffile

import tf_env
import checkpoints
import model_files
import optimization
from conftest import LAUNCH, PYTHON, ROOT, launch_two_ranks, run, scalar_series, small_run



def test_two_ranks_train_and_write_checkpoint_and_summary(two_rank_run):
    model_dir, stdout = two_rank_run
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["global_batch"] == 8
    assert summary["steps"] == 120 and summary["epochs"] == 20
    assert summary["eval_images"] == 48  # every held-out field once across the ranks
    assert summary["split"] == "compound"
    assert summary["final_accuracy"] >= 0.5  # 3 classes: chance is 0.33
    assert summary["images_per_sec"] > 0
    assert summary["plan"]["cpu"] == tf_env.cpu_description()  # named beside its figures
    assert f"CPU: {tf_env.cpu_description()}" in stdout
    assert summary["flags"]["per_rank_batch"] == 4
    # every flag of the project's scripts, whichever module defines it
    assert {"split", "bin", "time_budget_minutes", "shuffle_buffer", "momentum",
            "intra_op_threads", "checkpoint_every"} <= set(summary["flags"])
    assert "logtostderr" not in summary["flags"]  # absl's own
    assert tf.train.latest_checkpoint(model_dir / "checkpoints").endswith("ckpt-120")
    assert (model_dir / "flags.txt").read_text().count("--per_rank_batch=4") == 1
    assert "held-out accuracy" in stdout and "images/s" in stdout
    # Only rank 0 prints progress.
    assert stdout.count("step 4/120") == 1


def test_each_rank_reports_its_peak_memory_beside_the_estimate(two_rank_run):
    model_dir, stdout = two_rank_run
    summary = json.loads((model_dir / "summary.json").read_text())
    parts, expected = summary["memory_expected_parts_gb"], summary["memory_expected_gb"]
    assert set(parts) == {"runtime", "state", "activations", "input"}
    assert expected == pytest.approx(sum(parts.values()))
    assert f"memory: about {expected:.1f} GB a rank expected at batch 4 (runtime" in stdout
    # The estimate is of the training step and its input; a run also evaluates,
    # profiles (copairs' mAP, duckdb under it: 0.08 GB measured) and draws, which at
    # 128 x 128 adds a third of a GB, negligible at full size (a rank's 3-4 GB).
    peaks = summary["peak_rss_gb_by_rank"]
    assert len(peaks) == 2 and all(0.8 * expected < gb < expected + 0.5 for gb in peaks), peaks
    assert f"peak memory of a rank: {max(peaks):.2f} GB" in stdout


def test_loss_falls(two_rank_run):
    losses = list(scalar_series(model_dir := two_rank_run[0] / "tensorboard", "loss").values())
    assert len(losses) == 30, model_dir
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses


def test_ranks_end_with_identical_weights(two_rank_run):
    summary = json.loads((two_rank_run[0] / "summary.json").read_text())
    assert summary["ranks_in_sync"] is True


def test_two_ranks_and_accumulation_give_the_gradient_of_the_whole_batch(tmp_path):
    """2 ranks x 4 images, 1 rank x 8, and 1 rank x 4 images x 2 accumulated: one gradient."""
    output = tmp_path / "grads"
    launch_two_ranks(os.path.join(ROOT, "tests", "horovod_gradients.py"), [str(output)])
    rank0, rank1 = (np.load(f"{output}.rank{r}.npz") for r in (0, 1))
    names = [n for n in rank0.files if n.startswith("split_")]
    assert len(names) == 48  # 24 layers with weights, kernel and bias each
    for name in names:
        whole = rank0[name.replace("split", "whole")]
        scale = np.abs(whole).max() + 1e-12
        np.testing.assert_allclose(rank0[name], whole, rtol=1e-3, atol=1e-4 * scale, err_msg=name)
        np.testing.assert_array_equal(rank0[name], rank1[name], err_msg=name)
        np.testing.assert_allclose(rank0[name.replace("split", "accumulated")], whole,
                                   rtol=1e-3, atol=1e-4 * scale, err_msg=name)
    # And the halves on their own differ: the agreement above is the averaging's doing.
    assert not np.allclose(rank0["whole_47"], 0)


def test_full_size_images_train(tmp_path):
    """Two steps on uncropped 1024 x 1280 x 3 fields, one rank on every core."""
    result = run([LAUNCH, "train", "--", f"--synthetic_cache={tmp_path / 'data'}",
                  f"--model_dir={tmp_path / 'model'}", "--synthetic_classes=2",
                  "--synthetic_compounds_per_class=1", "--synthetic_fields_per_treatment=1",
                  "--per_rank_batch=1", "--epochs=1", "--warmup_epochs=0"])
    summary = json.loads((tmp_path / "model" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["eval_images"] == 2
    assert "images (1024, 1280, 3) uint8" in result.stdout


def test_prediction_csv_from_tables_on_two_ranks(two_rank_run, tmp_path):
    model_dir, _ = two_rank_run
    screen = next((model_dir.parent / "data").glob("*_screen"))
    output = tmp_path / "predictions.csv"
    launch_two_ranks(os.path.join(ROOT, "predict.py"), [
        f"--model_dir={model_dir}", f"--output={output}", "--profiles",
        f"--image_table={screen / 'BBBC021_v1_image.csv'}", f"--image_root={screen / 'images'}"])
    fields = pd.read_csv(output)
    table = pd.read_csv(screen / "BBBC021_v1_image.csv")
    classes = json.loads((model_dir / "data_manifest.json").read_text())["classes"]
    assert len(fields) == len(table)  # every field once across the two ranks
    assert sorted(zip(fields["plate"], fields["well"])) == sorted(
        zip(table["Image_Metadata_Plate_DAPI"], table["Image_Metadata_Well_DAPI"]))
    probabilities = fields[[f"p_{c}" for c in classes]]
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert (fields["predicted_moa"] == probabilities.idxmax(axis=1).str[2:]).all()
    treatments = pd.read_csv(tmp_path / "predictions_treatments.csv")
    assert len(treatments) == table.groupby(
        ["Image_Metadata_Compound", "Image_Metadata_Concentration"]).ngroups
    assert treatments["fields"].sum() == len(table)
    profiles = pd.read_parquet(tmp_path / "predictions_profiles.parquet")
    assert len(profiles) == len(table) and profiles.columns[-1] == "Image_MCNN_fc512_511"
    assert sorted(profiles["Metadata_Site"].astype(int)) == sorted(table["Replicate"])
    assert len(pd.read_csv(tmp_path / "predictions_treatment_profiles.csv")) == len(treatments)


def test_a_new_plate_is_scaled_by_its_own_pixels_and_each_field_is_named(two_rank_run, tmp_path):
    """A plate imaged at 0.4 x the brightness, under a name training never saw, is
    predicted as the original is; each output row names its field."""
    model_dir, _ = two_rank_run
    screen = tmp_path / "screen"
    shutil.copytree(next((model_dir.parent / "data").glob("*_screen")), screen)
    table = pd.read_csv(screen / "BBBC021_v1_image.csv", dtype=str)
    plate = table["Image_Metadata_Plate_DAPI"].iloc[0]
    original = table[table["Image_Metadata_Plate_DAPI"] == plate]
    dim = original.assign(Image_Metadata_Plate_DAPI=plate + "-dim")
    (screen / "images" / (plate + "-dim")).mkdir()
    for channel in ("DAPI", "Tubulin", "Actin"):
        dim[f"Image_PathName_{channel}"] = plate + "-dim"
        for name in original[f"Image_FileName_{channel}"]:
            pixels = tifffile.imread(screen / "images" / plate / name)
            tifffile.imwrite(screen / "images" / (plate + "-dim") / name,
                             (pixels * 0.4).astype(pixels.dtype))
    pd.concat([original, dim]).to_csv(screen / "two_plates.csv", index=False)
    output = tmp_path / "predictions.csv"
    result = run([PYTHON, os.path.join(ROOT, "predict.py"), f"--model_dir={model_dir}",
                  f"--output={output}", f"--image_table={screen / 'two_plates.csv'}",
                  f"--image_root={screen / 'images'}"])
    assert (f"1 plate(s) not seen in training ({plate}-dim) corrected and scaled by their "
            f"own") in result.stdout
    fields = pd.read_csv(output)
    assert fields["table_row"].tolist() == list(range(2, 2 + 2 * len(original)))
    assert fields["file"].tolist() == [os.path.join(folder, name) for folder, name in zip(
        pd.concat([original, dim])["Image_PathName_DAPI"],
        pd.concat([original, dim])["Image_FileName_DAPI"])]
    classes = json.loads((model_dir / "data_manifest.json").read_text())["classes"]
    probabilities = fields[[f"p_{c}" for c in classes]].to_numpy()
    bright, dimmed = probabilities[:len(original)], probabilities[len(original):]
    assert np.abs(bright - dimmed).max() < 0.05


def test_prediction_reads_compressed_tiffs_as_uncompressed_ones(two_rank_run, tmp_path):
    """LZW, as ImageJ/Fiji saves: the same probabilities as the plain TIFFs give."""
    model_dir, _ = two_rank_run
    plain = next((model_dir.parent / "data").glob("*_screen"))
    packed = tmp_path / "screen"
    shutil.copytree(plain, packed)
    for path in packed.rglob("*.tif"):
        tifffile.imwrite(path, tifffile.imread(path), compression="lzw")
    predictions = []
    for screen in (plain, packed):
        output = tmp_path / f"{screen.name}.csv"
        run([PYTHON, os.path.join(ROOT, "predict.py"), f"--model_dir={model_dir}",
             f"--output={output}", f"--image_table={screen / 'BBBC021_v1_image.csv'}",
             f"--image_root={screen / 'images'}"])
        predictions.append(pd.read_csv(output))
    pd.testing.assert_frame_equal(*predictions)


def test_prediction_from_shards_matches_training_evaluation(two_rank_run, tmp_path):
    model_dir, _ = two_rank_run
    data_dir = next((model_dir.parent / "data").glob("*_by-compound"))
    output = tmp_path / "eval.csv"
    run([os.path.join(ROOT, ".venv", "bin", "python"), os.path.join(ROOT, "predict.py"),
         f"--model_dir={model_dir}", f"--output={output}", f"--data_dir={data_dir}"])
    predicted = pd.read_csv(output, dtype=str).sort_values(["plate", "well", "compound"])
    at_training = pd.read_csv(model_dir / "evaluation" / "fields.csv", dtype=str).sort_values(
        ["plate", "well", "compound"])
    assert predicted["predicted_moa"].tolist() == at_training["predicted_moa"].tolist()


def test_with_ema_decay_the_weights_moving_average_is_evaluated_and_exported(two_rank_run,
                                                                              tmp_path):
    """The export is the average the optimizer kept (restored from the last checkpoint,
    which holds the trained weights for a resumed run), and predict.py with it gives the
    training's last evaluation."""
    model_dir = tmp_path / "model"
    result = launch_two_ranks(os.path.join(ROOT, "train_mcnn.py"), small_run(
        two_rank_run, model_dir, "--epochs=2", "--warmup_epochs=1", "--ema_decay=0.8"))
    assert "= global batch 8; sgd, weights' moving average 0.8 evaluated;" in result.stdout
    assert json.loads((model_dir / "summary.json").read_text())["ranks_in_sync"] is True
    model, _ = model_files.load_trained(str(model_dir))
    exported = [v.numpy() for v in model.trainable_variables]
    optimizer = optimization.make_optimizer(0.1, optimization.Recipe(ema_decay=0.8))
    optimizer.build(model.trainable_variables)
    last = model_files.checkpoints_in(str(model_dir / "checkpoints"))[0]
    checkpoints.make_checkpoint(model, optimizer, 8).restore(last).expect_partial()
    trained = [v.numpy() for v in model.trainable_variables]
    optimizer.finalize_variable_values(model.trainable_variables)
    for average, export, weights in zip(model.trainable_variables, exported, trained):
        np.testing.assert_allclose(average.numpy(), export, rtol=1e-6, atol=1e-7)
    assert not all(np.allclose(e, w) for e, w in zip(exported, trained))
    data_dir = next((two_rank_run[0].parent / "data").glob("*_by-compound"))
    run([PYTHON, os.path.join(ROOT, "predict.py"), f"--model_dir={model_dir}",
         f"--output={tmp_path / 'eval.csv'}", f"--data_dir={data_dir}"])
    keys = ["plate", "well", "compound", "site"]
    predicted = pd.read_csv(tmp_path / "eval.csv", dtype=str).sort_values(keys)
    at_training = pd.read_csv(model_dir / "evaluation" / "fields.csv", dtype=str).sort_values(keys)
    assert predicted["predicted_moa"].tolist() == at_training["predicted_moa"].tolist()


def test_wrong_channel_count_at_prediction_is_a_clear_error(two_rank_run, tmp_path):
    model_dir, _ = two_rank_run
    screen = next((model_dir.parent / "data").glob("*_screen"))
    result = subprocess.run(
        [os.path.join(ROOT, ".venv", "bin", "python"), os.path.join(ROOT, "predict.py"),
         f"--model_dir={model_dir}", f"--output={tmp_path / 'p.csv'}", "--channels=DAPI,Actin",
         f"--image_table={screen / 'BBBC021_v1_image.csv'}", f"--image_root={screen / 'images'}"],
        capture_output=True, text=True)
    assert result.returncode != 0
    assert "--channels=DAPI,Actin, but the model was trained on" in result.stderr


def test_training_straight_from_tiffs_and_tables(two_rank_run, tmp_path):
    """No conversion step: train_mcnn.py reads the plates' TIFFs inside tf.data."""
    screen = next((two_rank_run[0].parent / "data").glob("*_screen"))
    result = run([LAUNCH, "train", "--", f"--model_dir={tmp_path / 'model'}",
                  f"--image_table={screen / 'BBBC021_v1_image.csv'}",
                  f"--moa_table={screen / 'BBBC021_v1_moa.csv'}",
                  f"--image_root={screen / 'images'}", "--include_dmso", "--eval_fraction=0.5",
                  "--per_rank_batch=4", "--accumulate_steps=2", "--epochs=2",
                  "--warmup_epochs=0"])
    summary = json.loads((tmp_path / "model" / "summary.json").read_text())
    assert summary["split"] == "compound" and summary["steps"] == 2 * (48 // 8)
    assert "1 rank (1 node) x 4 images x 2 micro-batches = global batch 8; sgd" in result.stdout
    assert summary["global_batch"] == 8 and summary["accumulate_steps"] == 2
    assert summary["eval_images"] == 48
    assert "data " + str(screen / "BBBC021_v1_image.csv") in result.stdout
    manifest = json.loads((tmp_path / "model" / "data_manifest.json").read_text())
    assert manifest["channels"] == ["DAPI", "Tubulin", "Actin"] and manifest["intensity"]["plates"]
    fields = pd.read_csv(tmp_path / "model" / "evaluation" / "fields.csv")
    table = pd.read_csv(screen / "BBBC021_v1_image.csv", dtype=str)
    named = table.loc[fields["table_row"] - 2]  # each held-out field, by its table line
    assert fields["file"].tolist() == [os.path.join(folder, name) for folder, name in zip(
        named["Image_PathName_DAPI"], named["Image_FileName_DAPI"])]
    assert fields["well"].tolist() == named["Image_Metadata_Well_DAPI"].tolist()


def test_speed_and_memory_options_train_on_two_ranks(two_rank_run, tmp_path):
    """--recompute, bf16, fp16 allreduce, a small fusion buffer, the automatic batch,
    random erasing and overlaid fields, together, on two ranks."""
    data = two_rank_run[0].parent / "data"
    result = launch_two_ranks(os.path.join(ROOT, "train_mcnn.py"), [
        f"--synthetic_cache={data}", f"--model_dir={tmp_path / 'model'}",
        "--image_height=128", "--image_width=128", "--synthetic_classes=3",
        "--synthetic_compounds_per_class=2", "--synthetic_fields_per_treatment=8",
        "--per_rank_batch=auto", "--memory_per_rank_gb=8", "--recompute",
        "--precision=mixed_bfloat16",
        "--fp16_allreduce", "--fusion_threshold_mb=1", "--optimizer=lars", "--base_lr=1",
        "--erase=0.5", "--overlay=0.5",
        "--epochs=2", "--warmup_epochs=1"])
    summary = json.loads((tmp_path / "model" / "summary.json").read_text())
    # auto: 8 GB a rank hold any batch at 128 x 128, so one rank's share of the 48 images
    assert summary["global_batch"] == 48 and summary["steps"] == 2
    assert summary["ranks_in_sync"] is True
    assert "--per_rank_batch=auto: 24 images per rank" in result.stdout
    assert "mixed_bfloat16 (as given), recompute" in result.stdout
    assert "= global batch 48; lars;" in result.stdout


def test_report_draws_the_training_curves_and_the_evaluation(two_rank_run, tmp_path):
    run([os.path.join(ROOT, ".venv", "bin", "python"), os.path.join(ROOT, "report.py"),
         f"--model_dir={two_rank_run[0]}", f"--output_dir={tmp_path}"])
    assert plt.imread(tmp_path / "training.png").shape[1] > 1000
    page = (tmp_path / "index.html").read_text()
    for picture in ("accuracy.png", "confusion.png", "per_class.png", "fields.png"):
        assert f'src="{picture}"' in page and plt.imread(tmp_path / picture).shape[1] > 500
    assert 'href="' + os.path.relpath(two_rank_run[0] / "evaluation" / "fields.csv",
                                      tmp_path) + '"' in page


def test_the_evaluation_has_profiles_nsc_and_pictures(two_rank_run):
    """NSC of the held-out compounds' treatments (one per MoA, at two concentrations),
    every evaluation; NSCB has no other batch (the synthetic plates are all of Week1).
    The profiles of every field, training ones too, per field, well and treatment."""
    model_dir, stdout = two_rank_run
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["final_nsc_queries"] == 4 and 0 <= summary["final_nsc"] <= 1
    assert summary["final_nscb"] is None and summary["final_nscb_queries"] == 0
    assert summary["final_nsc_all_queries"] == 8
    assert all("nsc" in h for h in summary["eval_history"])
    assert "NSCB (tvn) none (no treatment of another batch)" in stdout
    assert len(scalar_series(model_dir / "tensorboard", "eval_nsc")) == 20
    folder = model_dir / "evaluation"
    fields = pd.read_csv(folder / "fields.csv")
    classes = summary["classes"]
    np.testing.assert_allclose(fields[[f"p_{c}" for c in classes]].sum(axis=1), 1, rtol=1e-5)
    profiles = pd.read_csv(folder / "profiles.csv")
    manifest = json.loads((model_dir / "data_manifest.json").read_text())
    assert len(profiles) == sum(split["count"] for split in manifest["splits"].values())
    assert profiles.columns[-1] == "Image_MCNN_fc512_511"
    wells = pd.read_csv(folder / "well_profiles.csv")
    one = wells.iloc[0]
    mine = profiles[(profiles["Metadata_Plate"] == one["Metadata_Plate"])
                    & (profiles["Metadata_Well"] == one["Metadata_Well"])]
    np.testing.assert_allclose(mine["Image_MCNN_fc512_7"].mean(), one["Image_MCNN_fc512_7"],
                               rtol=1e-4, atol=1e-6)
    by_treatment = pd.read_csv(folder / "treatment_profiles.csv")
    assert by_treatment["Metadata_Count"].sum() == len(wells)
    assert "fields.png" in (folder / "index.html").read_text()


@pytest.mark.parametrize("binding", ["none", "socket"])
def test_plain_mpirun_gives_each_rank_its_share_of_the_cores(two_rank_run, tmp_path, binding):
    """mpirun -np 2 without the launcher's thread settings: unbound, or both ranks bound to
    the one socket, each rank would take every core TensorFlow sees (horovod#2295)."""
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith(("TF_NUM_", "OMP_NUM_THREADS"))}
    as_root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    result = run(["mpirun", "-np", "2", *as_root, "--bind-to", binding, PYTHON,
                  os.path.join(ROOT, "train_mcnn.py"), *small_run(two_rank_run, tmp_path),
                  "--epochs=1", "--warmup_epochs=0"], env=environment)
    cores = len(os.sched_getaffinity(0))
    share = max(1, cores // 2)
    assert (f"threads per rank: {share} intra-op (this rank's share of the {cores} cores it "
            f"may run on, with 1 other rank of this node), 2 inter-op") in result.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["threads_per_rank"]["intra_op"] == share
    assert summary["threads_per_rank"]["inter_op"] == 2
