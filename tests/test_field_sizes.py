"""Plates of any field size and channel count, through the commands users run:
prepare_data.py, train_mcnn.py and predict.py on screens of 200 x 300 fields, and of
400 x 600 five-channel Cell Painting fields binned 2 x 2."""
import json
import os

import numpy as np
import pandas as pd
import pytest
import tifffile

import synthetic_data
from conftest import PYTHON, ROOT, fails, run, small_screen

CELL_PAINTING = ["DNA", "ER", "RNA", "AGP", "Mito"]
SHORT_RUN = ["--per_rank_batch=4", "--epochs=1", "--warmup_epochs=0", "--eval_fraction=0.5"]


def script(name, *flags):
    return [PYTHON, os.path.join(ROOT, name), *flags]


def table_flags(screen, channels=None):
    flags = [f"--image_table={screen / synthetic_data.IMAGE_TABLE}",
             f"--image_root={screen / synthetic_data.IMAGES}"]
    return flags + ([f"--channels={','.join(channels)}"] if channels else [])


def conversion_flags(screen, channels=None):
    return [*table_flags(screen, channels), f"--moa_table={screen / synthetic_data.MOA_TABLE}",
            "--include_dmso"]


def as_cell_painting(screen):
    """The screen with five channels named as Cell Painting's: DNA, ER and AGP are its
    DNA, tubulin and actin planes; RNA and Mito are new TIFFs mixing two of them."""
    table = pd.read_csv(screen / synthetic_data.IMAGE_TABLE, dtype=str)
    sources = {"DNA": "DAPI", "ER": "Tubulin", "AGP": "Actin"}
    for channel, source in sources.items():
        for kind in ("FileName", "PathName"):
            table[f"Image_{kind}_{channel}"] = table[f"Image_{kind}_{source}"]
    for channel, (a, b) in {"RNA": ("DAPI", "Tubulin"), "Mito": ("Tubulin", "Actin")}.items():
        names = []
        for _, row in table.iterrows():
            folder = screen / synthetic_data.IMAGES / row["Image_PathName_DAPI"]
            planes = [tifffile.imread(folder / row[f"Image_FileName_{c}"]).astype(np.uint32)
                      for c in (a, b)]
            names.append(row["Image_FileName_DAPI"].replace("_w1", f"_{channel}"))
            tifffile.imwrite(folder / names[-1], ((planes[0] + planes[1]) // 2).astype(np.uint16))
        table[f"Image_FileName_{channel}"] = names
        table[f"Image_PathName_{channel}"] = table["Image_PathName_DAPI"]
    table.to_csv(screen / synthetic_data.IMAGE_TABLE, index=False)
    return screen


def predicted_fields(model_dir, screen, output):
    """predict.py on every field of the screen's TIFFs, given only its tables; (its
    stdout, the predictions)."""
    result = run(script("predict.py", f"--model_dir={model_dir}", f"--output={output}",
                        *table_flags(screen)))
    return result.stdout, pd.read_csv(output)


def test_fields_of_200_x_300_convert_train_and_predict_padded_to_256_x_384(tmp_path):
    screen = small_screen(tmp_path / "screen", 200, 300)
    fields = len(pd.read_csv(screen / synthetic_data.IMAGE_TABLE))
    converted = run(script("prepare_data.py", *conversion_flags(screen), "--eval_fraction=0.5",
                           "--images_per_shard=4", "--workers=2",
                           f"--output_dir={tmp_path / 'data'}"))
    assert "fields of [200, 300, 3] uint8" in converted.stdout

    model_dir = tmp_path / "model"
    trained = run(script("train_mcnn.py", f"--data_dir={tmp_path / 'data'}",
                         f"--model_dir={model_dir}", *SHORT_RUN[:3]), cwd=ROOT)
    assert ("200 x 300 fields are zero-padded to 256 x 384 in the model (the M-CNN pools by "
            "128; zero is each channel's low percentile)") in trained.stdout
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["image_shape"] == [200, 300, 3] and summary["padded_to"] == [256, 384]
    recorded = json.loads((model_dir / "data_manifest.json").read_text())
    assert recorded["padded_to"] == [256, 384] and recorded["padding"] == [[28, 28], [42, 42]]

    said, predictions = predicted_fields(model_dir, screen, tmp_path / "predictions.csv")
    assert "200 x 300 fields are zero-padded to 256 x 384" in said
    assert len(predictions) == fields and predictions["predicted_moa"].notna().all()


def test_five_channel_fields_binned_2_x_2_convert_train_from_tiffs_and_predict(tmp_path):
    screen = as_cell_painting(small_screen(tmp_path / "screen", 400, 600))
    converted = run(script("prepare_data.py", *conversion_flags(screen, CELL_PAINTING),
                           "--bin=2", "--dtype=uint16", "--images_per_shard=4", "--workers=2",
                           f"--output_dir={tmp_path / 'data'}"))
    assert "400 x 600 fields are binned 2 x 2 to 200 x 300" in converted.stdout
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["image_shape"] == [200, 300, 5] and manifest["channels"] == CELL_PAINTING
    assert manifest["bin"] == 2 and manifest["field_shape"] == [400, 600]

    model_dir = tmp_path / "model"
    trained = run(script("train_mcnn.py", *conversion_flags(screen, CELL_PAINTING), "--bin=2",
                         f"--model_dir={model_dir}", *SHORT_RUN), cwd=ROOT)
    assert "images (200, 300, 5) uint8" in trained.stdout
    assert "400 x 600 fields are binned 2 x 2 to 200 x 300" in trained.stdout
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["bin"] == 2 and summary["padded_to"] == [256, 384]

    # Prediction reads the table as training did (its channels from the model dir).
    said, predictions = predicted_fields(model_dir, screen, tmp_path / "predictions.csv")
    assert "400 x 600 fields are binned 2 x 2" in said
    assert len(predictions) == len(pd.read_csv(screen / synthetic_data.IMAGE_TABLE))

    # The run cannot go on with three of the channels: refused before any step, in words.
    refused = fails(script("train_mcnn.py", *conversion_flags(screen, CELL_PAINTING[:3]),
                           "--bin=2", f"--model_dir={model_dir}", *SHORT_RUN), cwd=ROOT)
    assert (f"--model_dir={model_dir} holds a run trained on other data than this run's"
            in refused.stderr)
    assert "image_shape [200, 300, 5] there, [200, 300, 3] here" in refused.stderr
    assert "Traceback" not in refused.stderr and "step 1/" not in refused.stdout


@pytest.mark.parametrize("damage, message", [
    ("no channels", "no channels: --channels names the image table's channels"),
    ("an empty TIFF", "is not a greyscale plane of at least one pixel (shape (0, 300))"),
])
def test_unusable_fields_are_refused_in_words_before_any_work(tmp_path, damage, message):
    screen = small_screen(tmp_path / "screen", 200, 300)
    flags = [*conversion_flags(screen), f"--output_dir={tmp_path / 'data'}"]
    if damage == "no channels":
        flags.append("--channels=")
    else:
        table = pd.read_csv(screen / synthetic_data.IMAGE_TABLE, dtype=str)
        folder = screen / synthetic_data.IMAGES / table["Image_PathName_DAPI"][0]
        tifffile.imwrite(folder / table["Image_FileName_DAPI"][0], np.zeros((0, 300), np.uint16))
    result = fails(script("prepare_data.py", *flags))
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()
