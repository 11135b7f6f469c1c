"""prepare_data.py on a small screen in the BBBC021 layout, and on broken copies of it."""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tifffile

import data_pipeline
import errors
import intensity
import plates
import prepare_data
import splits
import synthetic_data
from conftest import ROOT, convert_screen


convert = convert_screen


def copy_screen(screen, tmp_path):
    shutil.copytree(screen, tmp_path / "screen")
    return tmp_path / "screen"


def records(data_dir, split):
    ds = data_pipeline.make_dataset(data_pipeline.read_manifest(str(data_dir)), split,
                                    data_pipeline.Feed(64, provenance=True))
    return [(image.numpy(), int(label), {k: v.numpy().decode() for k, v in prov.items()})
            for images, labels, provenance in ds
            for image, label, prov in zip(images, labels, [
                {k: provenance[k][i] for k in provenance} for i in range(len(labels))])]


def test_conversion_keeps_every_labelled_field_and_splits_by_compound(screen, tmp_path):
    manifest = convert(screen, tmp_path / "data", include_control=True, eval_fraction=0.5)
    assert manifest["classes"] == ["DMSO", "DNA damage", "Microtubule destabilizers"]
    assert manifest["image_shape"] == [128, 128, 3] and manifest["dtype"] == "uint8"
    assert manifest["channels"] == ["DAPI", "Tubulin", "Actin"]
    counts = {s: manifest["splits"][s]["count"] for s in ("train", "eval")}
    assert counts["train"] + counts["eval"] == 24
    fields = pd.read_csv(tmp_path / "data" / prepare_data.FIELDS_CSV, dtype=str)
    sides = fields.groupby("compound")["split"].nunique()
    assert (sides.drop("DMSO") == 1).all()  # no compound on both sides, but the control
    for moa in ("DNA damage", "Microtubule destabilizers"):  # each MoA on both sides
        assert set(fields[fields["moa"] == moa]["split"]) == {"train", "eval"}
    assert manifest["sources"]["sha256"]["image_table"] == prepare_data.file_sha256(
        screen / synthetic_data.IMAGE_TABLE)
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]


def test_pixels_round_trip_within_the_scaling(screen, tmp_path):
    manifest = convert(screen, tmp_path / "data", include_control=True, scaling="per_plate")
    table = pd.read_csv(screen / synthetic_data.IMAGE_TABLE, dtype=str)
    by_field = {(r.Image_Metadata_Plate_DAPI, r.Image_Metadata_Well_DAPI, r.Replicate): r
                for r in table.itertuples()}
    checked = 0
    for image, label, prov in records(tmp_path / "data", "eval"):
        assert manifest["classes"][label] in ("DMSO", "DNA damage", "Microtubule destabilizers")
        candidates = [r for (plate, well, _), r in by_field.items()
                      if plate == prov["plate"] and well == prov["well"]]
        raw = [np.stack([tifffile.imread(screen / "images" / r.Image_PathName_DAPI / name)
                         for name in (r.Image_FileName_DAPI, r.Image_FileName_Tubulin,
                                      r.Image_FileName_Actin)], -1) for r in candidates]
        assert raw[0].dtype == np.uint16
        expected = [intensity.scale_to(r, manifest["intensity"]["plates"][prov["plate"]],
                                          np.uint8) for r in raw]
        assert any(np.array_equal(image, e) for e in expected)
        checked += 1
    assert checked == manifest["splits"]["eval"]["count"]


def test_the_manifest_has_each_channels_mean_and_spread_over_the_training_fields(screen,
                                                                                 tmp_path):
    manifest = convert(screen, tmp_path / "data", include_control=True)
    pixels = np.stack([image for image, _, _ in records(tmp_path / "data", "train")]) / 255
    statistics = manifest["channel_statistics"]
    # from a sample of the fields' pixels (every 4th row and column), before rounding
    assert statistics["fields"] == min(32, manifest["splits"]["train"]["count"])
    np.testing.assert_allclose(statistics["mean"], pixels.mean(axis=(0, 1, 2)), atol=0.01)
    np.testing.assert_allclose(statistics["std"], pixels.std(axis=(0, 1, 2)), rtol=0.1)


def test_control_is_left_out_unless_asked_for(screen, tmp_path):
    manifest = convert(screen, tmp_path / "data")
    assert manifest["classes"] == ["DNA damage", "Microtubule destabilizers"]
    assert sum(manifest["splits"][s]["count"] for s in ("train", "eval")) == 16


@pytest.mark.parametrize("split", ["plate", "random"])
def test_other_splits(screen, tmp_path, split):
    convert(screen, tmp_path / "data", include_control=True, split=split, eval_fraction=0.5)
    fields = pd.read_csv(tmp_path / "data" / prepare_data.FIELDS_CSV, dtype=str)
    if split == "plate":
        assert (fields.groupby("plate")["split"].nunique() == 1).all()
    else:
        assert (fields.groupby("moa")["split"].nunique() == 2).all()


def test_split_is_deterministic_by_seed(screen, tmp_path):
    convert(screen, tmp_path / "a", seed=3)
    convert(screen, tmp_path / "b", seed=3)
    a, b = (pd.read_csv(tmp_path / x / prepare_data.FIELDS_CSV) for x in "ab")
    assert a.equals(b)


def test_8_bit_tiffs_and_16_bit_output(screen, tmp_path):
    copy = copy_screen(screen, tmp_path)
    for path in copy.rglob("*.tif"):
        tifffile.imwrite(path, (tifffile.imread(path) >> 8).astype(np.uint8))
    manifest = convert(copy, tmp_path / "data", dtype="uint16")
    assert manifest["dtype"] == "uint16"
    image, _, _ = records(tmp_path / "data", "train")[0]
    assert image.dtype == np.uint16 and image.max() > 255  # stretched to the 16-bit range


def test_missing_tiff_names_row_and_file_and_leaves_no_data_set(screen, tmp_path):
    copy = copy_screen(screen, tmp_path)
    table = pd.read_csv(copy / synthetic_data.IMAGE_TABLE, dtype=str)
    victim = copy / "images" / table.loc[20, "Image_PathName_Actin"] / table.loc[20, "Image_FileName_Actin"]
    victim.unlink()
    with pytest.raises(errors.InputError, match=rf"row 22: {victim} does not exist"):
        convert(copy, tmp_path / "data", include_control=True)
    assert not (tmp_path / "data").exists()


def refusal_of_prepare_data(screen, output_dir):
    """The one line prepare_data.py ends with on `screen` (it must fail, and without a
    traceback)."""
    result = subprocess.run([sys.executable, "prepare_data.py", "--include_dmso",
                             f"--image_table={screen / synthetic_data.IMAGE_TABLE}",
                             f"--moa_table={screen / synthetic_data.MOA_TABLE}",
                             f"--image_root={screen / synthetic_data.IMAGES}",
                             f"--output_dir={output_dir}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    said = [line for line in result.stderr.splitlines() if line.startswith("prepare_data.py: ")]
    assert result.returncode == 1 and len(said) == 1 and "Traceback" not in result.stderr, (
        result.stderr[-3000:])
    return said


def test_every_missing_or_unreadable_file_is_listed_before_anything_is_written(screen, tmp_path):
    copy = copy_screen(screen, tmp_path)
    table = pd.read_csv(copy / synthetic_data.IMAGE_TABLE, dtype=str)
    files = [copy / "images" / table.loc[i, f"Image_PathName_{c}"] / table.loc[i, f"Image_FileName_{c}"]
             for i in range(len(table)) for c in plates.BBBC021_CHANNELS]
    for path in files[:21]:
        path.unlink()
    files[21].write_bytes(b"II*\0 cut short")
    said = refusal_of_prepare_data(copy, tmp_path / "data")
    assert f"22 of its {len(files)} files are missing or unreadable (the first 20): " in said[0]
    assert f"row 2: {files[0]} does not exist; row 2: {files[1]} does not exist" in said[0]
    assert str(files[19]) in said[0] and str(files[20]) not in said[0]
    assert not (tmp_path / "data").exists() and not list(tmp_path.glob("data.partial-*"))


def test_a_field_listed_twice_is_refused_naming_its_rows_before_anything_is_written(
        screen, tmp_path):
    """LIVECell#26: rows repeated would leak held-out fields into training unseen."""
    copy = copy_screen(screen, tmp_path)
    table = pd.read_csv(copy / synthetic_data.IMAGE_TABLE, dtype=str)
    pd.concat([table, table.iloc[[3]]]).to_csv(copy / synthetic_data.IMAGE_TABLE, index=False)
    said = refusal_of_prepare_data(copy, tmp_path / "data")
    first = os.path.join(copy / "images", table.loc[3, "Image_PathName_DAPI"],
                         table.loc[3, "Image_FileName_DAPI"])
    assert f"the same file on more than one row, as if a field were listed twice: rows 5, " \
           f"{len(table) + 2}: {first}" in said[0]
    assert not (tmp_path / "data").exists() and not list(tmp_path.glob("data.partial-*"))


@pytest.mark.slow  # runs the programs
def test_a_class_left_without_training_fields_is_said_refused_and_reported_apart(
        screen, tmp_path):
    """evalml#760: a split by plate that holds out an MoA's only plate; conversion says
    it, training refuses it unless asked, and the evaluation gives the accuracy without it."""
    copy = copy_screen(screen, tmp_path)
    table = pd.read_csv(copy / synthetic_data.IMAGE_TABLE, dtype=str)
    plate = table.columns[table.columns.str.startswith("Image_Metadata_Plate")][0]
    held = splits.assign_split(pd.DataFrame({"plate": sorted(table[plate].unique())}),
                               "plate", 0.5, seed=0)
    held_plate = sorted(table[plate].unique())[list(held).index("eval")]
    moa = synthetic_data.CLASSES[1]
    compounds = table["Image_Metadata_Compound"].str.startswith(moa.lower().replace(" ", "-"))
    table[~compounds | (table[plate] == held_plate)].to_csv(
        copy / synthetic_data.IMAGE_TABLE, index=False)
    data = tmp_path / "data"
    converted = subprocess.run(
        [sys.executable, "prepare_data.py", "--split=plate", "--eval_fraction=0.5",
         "--images_per_shard=4", f"--image_table={copy / synthetic_data.IMAGE_TABLE}",
         f"--moa_table={copy / synthetic_data.MOA_TABLE}",
         f"--image_root={copy / synthetic_data.IMAGES}", f"--output_dir={data}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert converted.returncode == 0, converted.stderr[-3000:]
    assert f"--split=plate: {moa!r} has no training field (" in converted.stderr
    assert "held-out shards: a run trains on at most " in converted.stderr  # 4 fields a shard

    train = [sys.executable, "train_mcnn.py", f"--data_dir={data}", "--epochs=1",
             "--warmup_epochs=0", "--per_rank_batch=4", f"--model_dir={tmp_path / 'model'}"]
    refused = subprocess.run(train, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert f"no training field of {moa!r} (0 training, " in refused.stderr
    trained = subprocess.run([*train, "--allow_untrained_classes"], cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert f"without {moa} (no training field): field accuracy" in trained.stdout
    metrics = json.loads((tmp_path / "model" / "evaluation" / "metrics.json").read_text())
    assert metrics["untrained_classes"] == [moa]


def test_a_malformed_table_is_named_in_one_line_and_excel_semicolon_tables_are_read(
        screen, tmp_path):
    """steinbock#28: an unquoted comma in a row, and a MoA table as Excel writes CSV where
    the decimal mark is a comma (`;`-separated, "0,1")."""
    copy = copy_screen(screen, tmp_path)
    lines = (copy / synthetic_data.IMAGE_TABLE).read_text().splitlines()
    lines[3] = lines[3].replace("Week1_Synth", "Week1,Synth", 1)
    (copy / synthetic_data.IMAGE_TABLE).write_text("\n".join(lines) + "\n")
    said = refusal_of_prepare_data(copy, tmp_path / "data")
    columns = lines[0].count(",") + 1
    assert (f"{copy / synthetic_data.IMAGE_TABLE}, line 4: {columns + 1} values where the "
            f"header has {columns} columns; a value with a ',' in it needs double quotes") in said[0]

    excel = copy_screen(screen, tmp_path / "excel")
    moa = pd.read_csv(excel / synthetic_data.MOA_TABLE, dtype=str)
    moa.assign(concentration=moa["concentration"].str.replace(".", ",")).to_csv(
        excel / synthetic_data.MOA_TABLE, sep=";", index=False)
    assert ";1,0;" in (excel / synthetic_data.MOA_TABLE).read_text()
    convert(excel, tmp_path / "excel_data", include_control=True)
    convert(screen, tmp_path / "plain_data", include_control=True)
    assert (data_pipeline.read_manifest(str(tmp_path / "excel_data"))["splits"] ==
            data_pipeline.read_manifest(str(tmp_path / "plain_data"))["splits"])


def test_windows_paths_in_a_table_are_read_and_drive_letters_are_named(screen, tmp_path):
    """CellProfiler#1385: PathName = Week1\\Week1_Synth01 as written on Windows."""
    copy = copy_screen(screen, tmp_path)
    images = copy / synthetic_data.IMAGES
    (images / "Week1").mkdir()
    for plate in [p for p in images.iterdir() if p.name != "Week1"]:
        plate.rename(images / "Week1" / plate.name)
    table = pd.read_csv(copy / synthetic_data.IMAGE_TABLE, dtype=str)
    for channel in plates.BBBC021_CHANNELS:
        table[f"Image_PathName_{channel}"] = "Week1\\" + table[f"Image_PathName_{channel}"]
    table.to_csv(copy / synthetic_data.IMAGE_TABLE, index=False)
    convert(copy, tmp_path / "data", include_control=True)
    assert data_pipeline.read_manifest(str(tmp_path / "data"))["splits"]["train"]["count"] > 0

    table["Image_PathName_DAPI"] = "C:\\Users\\lab\\" + table["Image_PathName_DAPI"]
    table.to_csv(copy / synthetic_data.IMAGE_TABLE, index=False)
    said = refusal_of_prepare_data(copy, tmp_path / "data2")
    assert "Paths with a drive letter (C:\\...) name files on a Windows computer" in said[0]


def test_another_screens_moa_table_is_refused_unless_asked(screen, tmp_path):
    """A newcomer's trial: an older screen's MoA table converted to a 2-class data set."""
    copy = copy_screen(screen, tmp_path)
    moa = pd.read_csv(copy / synthetic_data.MOA_TABLE, dtype=str)
    lost = synthetic_data.CLASSES[1]
    moa.loc[moa["moa"] == lost, "compound"] = "older-screen-" + moa["compound"]
    moa.to_csv(copy / synthetic_data.MOA_TABLE, index=False)
    said = refusal_of_prepare_data(copy, tmp_path / "data")
    unmatched = int((moa["moa"] == lost).sum())
    assert (f"{unmatched} of its {len(moa)} treatments match no field of the image table; no "
            f"field of 1 MoA(s): {lost}. Is it this screen's MoA table? "
            f"--missing_moa=skip_any") in said[0]
    convert(copy, tmp_path / "data", include_control=True, missing_moa="skip_any")
    assert lost not in data_pipeline.read_manifest(str(tmp_path / "data"))["classes"]


@pytest.mark.slow  # runs the programs
def test_ctrl_c_during_conversion_ends_in_one_line_and_the_rerun_resumes(tmp_path):
    """Ctrl-C reaches every process of the group: the workers leave it to the parent."""
    screen = tmp_path / "screen"
    synthetic_data.write_screen(str(screen), 1024, 1024, num_classes=3, compounds_per_class=2,
                                fields_per_treatment=3, plates=2, workers=2)
    command = [sys.executable, "prepare_data.py", "--include_dmso", "--workers=2",
               "--images_per_shard=1", f"--image_table={screen / synthetic_data.IMAGE_TABLE}",
               f"--moa_table={screen / synthetic_data.MOA_TABLE}",
               f"--image_root={screen / synthetic_data.IMAGES}", f"--output_dir={tmp_path / 'data'}"]
    conversion = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in conversion.stdout:
        if "fields written" in line:
            os.killpg(conversion.pid, signal.SIGINT)
            break
    stdout, stderr = conversion.communicate(timeout=120)
    assert conversion.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    said = [line for line in stderr.splitlines() if line.startswith("prepare_data.py: ")]
    assert len(said) == 1 and "stopped by Ctrl-C: " in said[0], stderr[-3000:]
    assert "fields written are kept in " in said[0] and "rerun the same command" in said[0]
    assert not (tmp_path / "data").exists()

    resumed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming in " in resumed.stdout and (tmp_path / "data" / "manifest.json").exists()


def test_a_misspelled_compound_is_listed_and_an_moa_left_with_one_compound_is_said(
        screen, tmp_path, capsys):
    copy = copy_screen(screen, tmp_path)
    moas = pd.read_csv(copy / synthetic_data.MOA_TABLE, dtype=str)
    moas["compound"] = moas["compound"].replace({"dna-damage-2": "DNA-Damage-2 "})
    moas.to_csv(copy / synthetic_data.MOA_TABLE, index=False)
    manifest = convert(copy, tmp_path / "data", include_control=True, eval_fraction=0.5)
    err = capsys.readouterr().err
    assert ("2 row(s) match no treatment of the image table: row 5: 'DNA-Damage-2 ' @ 1.0 "
            "(the image table has 'dna-damage-2')") in err
    assert ("'DNA damage' is an MoA with one compound (dna-damage-1), so its fields are split "
            "by field: 2 train, 2 held out") in err
    assert manifest["classes_split_by_field"] == ["DMSO", "DNA damage"]


def test_an_interrupted_conversion_resumes_and_appears_only_when_complete(screen, tmp_path):
    class Interrupted(Exception):
        pass

    def interrupt(message):
        raise Interrupted(message)

    with pytest.raises(Interrupted):  # two worker processes, whose shards not begun are dropped
        convert(screen, tmp_path / "data", include_control=True, progress=interrupt, workers=2)
    assert not (tmp_path / "data").exists()
    staging = [p for p in os.listdir(tmp_path) if ".partial-" in p]
    assert len(staging) == 1 and not os.path.exists(tmp_path / staging[0] / "manifest.json")
    done = [p for p in os.listdir(tmp_path / staging[0]) if p.endswith(".tfrecord")]
    assert done

    messages = []
    manifest = convert(screen, tmp_path / "data", include_control=True,
                       progress=messages.append)
    assert messages[0].startswith(f"Resuming in {tmp_path / staging[0]}: {len(done)} of")
    assert sum(manifest["splits"][s]["count"] for s in ("train", "eval")) == 24
    assert len(records(tmp_path / "data", "train")) == manifest["splits"]["train"]["count"]
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]


def test_unreadable_tiff_and_mismatched_channel_are_named(screen, tmp_path):
    copy = copy_screen(screen, tmp_path)
    table = pd.read_csv(copy / synthetic_data.IMAGE_TABLE, dtype=str)
    broken = copy / "images" / table.loc[0, "Image_PathName_DAPI"] / table.loc[0, "Image_FileName_DAPI"]
    broken.write_bytes(b"not a tiff at all")
    with pytest.raises(errors.InputError, match=rf"row 2: {broken} cannot be read"):
        convert(copy, tmp_path / "a", include_control=True)
    shutil.copy(screen / broken.relative_to(copy), broken)
    small = copy / "images" / table.loc[3, "Image_PathName_Tubulin"] / table.loc[3, "Image_FileName_Tubulin"]
    tifffile.imwrite(small, np.zeros((64, 128), np.uint16))
    with pytest.raises(errors.InputError, match=rf"row 5: {small} is 64 x 128, but .* is 128 x 128"):
        convert(copy, tmp_path / "b", include_control=True)


def test_missing_columns_are_named(screen, tmp_path):
    copy = copy_screen(screen, tmp_path)
    table = pd.read_csv(copy / synthetic_data.IMAGE_TABLE, dtype=str)
    table.drop(columns=["Image_FileName_Actin"]).to_csv(copy / synthetic_data.IMAGE_TABLE, index=False)
    with pytest.raises(errors.InputError, match=r"missing column\(s\) Image_FileName_Actin \(--filename_column names it\)"):
        convert(copy, tmp_path / "data")


def test_treatments_without_moa_are_listed_then_skipped_or_refused(screen, tmp_path, capsys):
    copy = copy_screen(screen, tmp_path)
    moas = pd.read_csv(copy / synthetic_data.MOA_TABLE, dtype=str)
    moas[moas["compound"] != "dna-damage-1"].to_csv(copy / synthetic_data.MOA_TABLE, index=False)
    manifest = convert(copy, tmp_path / "data")
    err = capsys.readouterr().err
    assert "Skipping 4 fields: 2 treatment(s)" in err and "dna-damage-1 @ 1.0 (2 fields)" in err
    assert sum(manifest["splits"][s]["count"] for s in ("train", "eval")) == 12
    with pytest.raises(errors.InputError, match=r"2 treatment\(s\) .*dna-damage-1 @ 1.0"):
        convert(copy, tmp_path / "strict", missing_moa="error")


def test_empty_result_is_an_error(screen, tmp_path):
    copy = copy_screen(screen, tmp_path)
    pd.DataFrame({"compound": ["x"], "concentration": ["1"], "moa": ["m"]}).to_csv(
        copy / synthetic_data.MOA_TABLE, index=False)
    with pytest.raises(errors.InputError, match="1 of its 1 treatments match no field"):
        convert(copy, tmp_path / "data")
    with pytest.raises(errors.InputError, match="no labelled fields"):
        convert(copy, tmp_path / "data", missing_moa="skip_any")
    assert not (tmp_path / "data").exists()


def test_an_existing_data_set_is_not_overwritten(screen, tmp_path):
    convert(screen, tmp_path / "data")
    with pytest.raises(errors.InputError, match="already holds a data set"):
        convert(screen, tmp_path / "data")
    assert json.loads((tmp_path / "data" / "manifest.json").read_text())["format"]


@pytest.mark.parametrize("binning, illumination", [(1, "none"), (2, "none"), (2, "per_plate")])
def test_reading_tiffs_directly_gives_the_pixels_of_the_shards(screen, tmp_path, binning,
                                                                illumination):
    options = plates.ConversionOptions(include_control=True, binning=binning,
                                       illumination_method=illumination)
    manifest = convert(screen, tmp_path / "data", **dataclasses.asdict(options))
    assert manifest["image_shape"] == [128 // binning, 128 // binning, 3]
    fields, data = plates.prepare_fields(*synthetic_data.screen_tables(str(screen)), options)
    tiffs = {**data, "dtype": "uint8"}
    direct = data_pipeline.make_tiff_dataset(fields[fields["split"] == "eval"], tiffs,
                                             data_pipeline.Feed(3, provenance=True))

    def by_field(batches):
        return {(p["plate"][i].numpy(), p["well"][i].numpy(), p["compound"][i].numpy(),
                 images[i].numpy().tobytes()): int(labels[i])
                for images, labels, p in batches for i in range(len(labels))}

    from_shards = by_field(data_pipeline.make_dataset(
        data_pipeline.read_manifest(str(tmp_path / "data")), "eval",
        data_pipeline.Feed(3, provenance=True)))
    assert by_field(direct) == from_shards and len(from_shards) > 0


def rewritten_copy(screen, folder, dtype, compression=None):
    """The screen with every TIFF rewritten at `dtype` (8 bits: the top 8 of 16) and
    `compression` (tifffile's names; None: uncompressed)."""
    copy = folder / "screen"
    shutil.copytree(screen, copy)
    for path in copy.rglob("*.tif"):
        pixels = tifffile.imread(path)
        pixels = (pixels >> 8).astype(np.uint8) if dtype == np.uint8 else pixels.astype(dtype)
        tifffile.imwrite(path, pixels, compression=compression)
    return copy


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("compression", ["lzw", "zlib", "zstd", "packbits"])
def test_compressed_tiffs_convert_and_train_with_the_pixels_of_uncompressed_ones(
        screen, tmp_path_factory, compression, dtype):
    plain = rewritten_copy(screen, tmp_path_factory.mktemp("plain"), dtype)
    packed = rewritten_copy(screen, tmp_path_factory.mktemp(compression), dtype, compression)
    one = next(packed.rglob("*.tif"))
    with tifffile.TiffFile(one) as tiff:  # really compressed, as the microscope wrote it
        assert tiff.pages[0].compression.name.lower().replace("adobe_deflate", "zlib") == compression
        assert tiff.pages[0].dtype == dtype
    np.testing.assert_array_equal(tifffile.imread(one), tifffile.imread(plain / one.relative_to(packed)))

    for copy in (plain, packed):
        convert(copy, copy.parent / "data", include_control=True)
    converted = [records(copy.parent / "data", "eval") for copy in (plain, packed)]
    assert len(converted[0]) > 0 and all(
        np.array_equal(a[0], b[0]) and a[1:] == b[1:] for a, b in zip(*converted))

    fields, data = plates.prepare_fields(*synthetic_data.screen_tables(str(packed)),
                                         plates.ConversionOptions(include_control=True))
    direct = data_pipeline.make_tiff_dataset(fields[fields["split"] == "eval"],
                                             {**data, "dtype": "uint8"}, data_pipeline.Feed(64))
    assert sorted(image.numpy().tobytes() for images, _ in direct for image in images) == sorted(
        image.tobytes() for image, _, _ in converted[1])


def record_twins(data_dir, twin_dir):
    """[(record, twin's record)] of two data sets of the same fields, split by split in
    shard order; each split has records, as many in both."""
    pairs = []
    for split in ("train", "eval"):
        twins = [records(folder, split) for folder in (data_dir, twin_dir)]
        assert len(twins[0]) == len(twins[1]) > 0
        pairs += zip(*twins)
    return pairs


def loaddata_twin(screen, path):
    """The screen's image table as a CellProfiler LoadData CSV: absolute PathName_ columns,
    Metadata_ columns, ImageNumber; written to `path`."""
    table = pd.read_csv(screen / synthetic_data.IMAGE_TABLE, dtype=str)
    columns = {"ImageNumber": range(1, len(table) + 1)}
    for channel in plates.BBBC021_CHANNELS:
        columns[f"FileName_{channel}"] = table[f"Image_FileName_{channel}"]
        columns[f"PathName_{channel}"] = [str(screen / synthetic_data.IMAGES / folder)
                                          for folder in table[f"Image_PathName_{channel}"]]
    for name, bbbc021 in (("Plate", "Plate_DAPI"), ("Well", "Well_DAPI"),
                          ("Compound", "Compound"), ("Concentration", "Concentration")):
        columns[f"Metadata_{name}"] = table[f"Image_Metadata_{bbbc021}"]
    pd.DataFrame(columns).to_csv(path, index=False)
    return path


@pytest.mark.slow  # runs the programs
def test_a_cellprofiler_loaddata_table_converts_to_the_shards_of_its_bbbc021_twin(
        screen, tmp_path):
    loaddata = loaddata_twin(screen, tmp_path / "load_data.csv")
    command = [sys.executable, "prepare_data.py", "--table_layout=cellprofiler", "--images_per_shard=4",
               f"--image_table={loaddata}", f"--moa_table={screen / synthetic_data.MOA_TABLE}",
               "--include_dmso"]
    subprocess.run([*command, f"--output_dir={tmp_path / 'loaddata'}"], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    convert(screen, tmp_path / "bbbc021", include_control=True)
    for (image, label, where), (twin_image, twin_label, twin_where) in record_twins(
            tmp_path / "loaddata", tmp_path / "bbbc021"):
        np.testing.assert_array_equal(image, twin_image)
        assert label == twin_label and where["file"] == str(screen / "images" / twin_where["file"])
        assert {k: v for k, v in where.items() if k != "file"} == {
            k: v for k, v in twin_where.items() if k != "file"}

    pd.read_csv(loaddata).drop(columns="Metadata_Compound").to_csv(loaddata, index=False)
    refused = subprocess.run([*command, f"--output_dir={tmp_path / 'none'}"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert ("missing column(s) Metadata_Compound (--compound_column names it); it has "
            "['ImageNumber', 'FileName_DAPI'") in refused.stderr


def one_file_per_field(screen, folder, write):
    """The screen with each field's channels in one file, `write(path, (DAPI, Tubulin,
    Actin) planes)`, named in every channel's columns."""
    copy = folder / "screen"
    shutil.copytree(screen, copy)
    table = pd.read_csv(copy / synthetic_data.IMAGE_TABLE, dtype=str)
    for index in range(len(table)):
        planes = [tifffile.imread(copy / "images" / table.loc[index, f"Image_PathName_{c}"]
                                  / table.loc[index, f"Image_FileName_{c}"])
                  for c in plates.BBBC021_CHANNELS]
        name = f"field{index}.tif"
        write(copy / "images" / table.loc[index, "Image_PathName_DAPI"] / name, planes)
        for channel in plates.BBBC021_CHANNELS:
            table.loc[index, f"Image_FileName_{channel}"] = name
            table.loc[index, f"Image_PathName_{channel}"] = table.loc[index, "Image_PathName_DAPI"]
    table.to_csv(copy / synthetic_data.IMAGE_TABLE, index=False)
    return copy


def ome_tiff(names, order):
    def write(path, planes):
        tifffile.imwrite(path, np.stack([planes[i] for i in order]), ome=True,
                         metadata={"axes": "CYX", "Channel": {"Name": names}})
    return write


def imagej_hyperstack(path, planes):
    tifffile.imwrite(path, np.stack(planes), imagej=True,
                     metadata={"axes": "CYX", "Labels": list(plates.BBBC021_CHANNELS)})


def plain_pages(path, planes):  # Tubulin, Actin, DAPI: --channel_pages=2,0,1
    tifffile.imwrite(path, np.stack([planes[1], planes[2], planes[0]]), photometric="minisblack")


@pytest.mark.parametrize("write, channel_pages", [
    (ome_tiff(["Actin", "DAPI", "Tubulin"], [2, 0, 1]), None),  # named, in another order
    (imagej_hyperstack, None), (plain_pages, [2, 0, 1])])
def test_one_file_per_field_converts_to_the_shards_of_one_file_per_channel(
        screen, tmp_path, write, channel_pages):
    copy = one_file_per_field(screen, tmp_path, write)
    manifest = convert(copy, tmp_path / "pages", include_control=True,
                       channel_pages=channel_pages)
    assert manifest["channel_pages"] == channel_pages
    convert(screen, tmp_path / "files", include_control=True)
    for (image, label, where), (twin_image, twin_label, twin_where) in record_twins(
            tmp_path / "pages", tmp_path / "files"):
        np.testing.assert_array_equal(image, twin_image)
        assert (label, where["table_row"]) == (twin_label, twin_where["table_row"])


def test_a_file_that_does_not_hold_the_channels_is_refused_before_work(screen, tmp_path):
    copy = one_file_per_field(screen, tmp_path, ome_tiff(["DNA", "Tub", "Act"], [0, 1, 2]))
    table = pd.read_csv(copy / synthetic_data.IMAGE_TABLE, dtype=str)
    said = refusal_of_prepare_data(copy, tmp_path / "data")
    first = copy / "images" / table.loc[0, "Image_PathName_DAPI"] / "field0.tif"
    assert (f"row 2: {first} holds 3 pages named ['DNA', 'Tub', 'Act'], not the --channels "
            "DAPI,Tubulin,Actin: name them as the file does, or give --channel_pages") in said[0]
    assert f"{len(table)} of its {len(table)} files are missing or unreadable" in said[0]
    assert not (tmp_path / "data").exists()


def test_a_batch_column_names_each_plates_batch_for_nscb(screen, tmp_path):
    copy = copy_screen(screen, tmp_path)
    table = pd.read_csv(copy / synthetic_data.IMAGE_TABLE, dtype=str)
    table["Batch"] = table["Image_Metadata_Plate_DAPI"].map(
        {"Week1_Synth01": "run-a", "Week1_Synth02": "run-b"})
    table.to_csv(copy / synthetic_data.IMAGE_TABLE, index=False)
    manifest = convert(copy, tmp_path / "data", columns={"batch": "Batch"}, include_control=True)
    assert manifest["plate_batches"] == {"Week1_Synth01": "run-a", "Week1_Synth02": "run-b"}
    assert manifest["control"] == "DMSO"

    table.loc[0, "Batch"] = "run-b"  # a field of plate 1 in the other batch
    table.to_csv(copy / synthetic_data.IMAGE_TABLE, index=False)
    with pytest.raises(errors.InputError, match="plate Week1_Synth01 is in batches run-a, "
                                                 "run-b .--batch_column.: a plate is imaged"):
        convert(copy, tmp_path / "again", columns={"batch": "Batch"}, include_control=True)
