"""Illumination correction (--illumination=per_plate, illumination.py) on plates of a
known vignetting and on evenly lit ones, through prepare_data.py, train_mcnn.py
reading TIFFs, and predict.py.

How flat a plate is: the mean of its fields (as they are trained on), the four corner
blocks of an eighth of the side against the central block of a quarter; 1 is flat.
"""
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import tifffile
from scipy import ndimage

import data_pipeline
import illumination
import synthetic_data
from conftest import PYTHON, ROOT, convert_screen, fails, run, small_screen

SIDE = 128


def vignetting(height, width, depth=0.3, centre=(0.0, 0.0)):
    """A microscope's fall-off: 1 at `centre` ([-1, 1] coordinates), 1 - `depth` at
    the corners of a centred field."""
    yy, xx = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
    return 1.0 - depth / 2 * ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2)


@pytest.fixture(scope="module")
def even_screen(tmp_path_factory):
    """96 evenly lit fields on one plate (as many as a few wells' worth of sites)."""
    path = tmp_path_factory.mktemp("even") / "screen"
    return small_screen(path, SIDE, SIDE, fields_per_treatment=8, plates=1,
                        even_illumination=True)


def lit_copy(screen, folder, light):
    """The screen with every TIFF multiplied by `light` (H, W)."""
    shutil.copytree(screen, folder)
    for path in folder.rglob("*.tif"):
        pixels = tifffile.imread(path)
        tifffile.imwrite(path, np.round(pixels * light).astype(pixels.dtype))
    return folder


def convert(screen, output, **options):
    return convert_screen(screen, output, include_control=True, images_per_shard=16, **options)


def mean_field(data_dir):
    """The mean (H, W, C) of every field of a data set, as trained on."""
    manifest = data_pipeline.read_manifest(str(data_dir))
    total = [images.numpy().astype(np.float64).sum(axis=0) for split in ("train", "eval")
             for images, _ in data_pipeline.make_dataset(manifest, split, data_pipeline.Feed(32))]
    return np.sum(total, axis=0) / sum(manifest["splits"][s]["count"] for s in ("train", "eval"))


def corner_to_centre(field):
    """Per channel: the mean of the four corner blocks (an eighth of the side) over the
    mean of the central block (a quarter of the side); 1 is flat."""
    height, width = field.shape[:2]
    a, b = height // 8, width // 8
    corners = np.mean([field[:a, :b], field[:a, -b:], field[-a:, :b], field[-a:, -b:]],
                      axis=(0, 1, 2))
    centre = field[3 * height // 8:5 * height // 8, 3 * width // 8:5 * width // 8].mean(axis=(0, 1))
    return corners / centre


def functions(data_dir):
    """{plate: (H, W, C) illumination function over the whole field} of a data set."""
    recorded = data_pipeline.read_manifest(str(data_dir))["illumination"]
    correction = illumination.load(recorded, str(data_dir))
    return {plate: illumination.full_size(entry["function"], SIDE, SIDE, correction["step"])
            for plate, entry in correction["plates"].items()}


def test_a_vignetted_plate_comes_out_flat(even_screen, tmp_path):
    light = vignetting(SIDE, SIDE)  # the corners get 70% of the centre's light
    dim_corners = lit_copy(even_screen, tmp_path / "vignetted", light)
    convert(dim_corners, tmp_path / "as_imaged")
    manifest = convert(dim_corners, tmp_path / "corrected", illumination_method="per_plate")

    before, after = (corner_to_centre(mean_field(tmp_path / d)) for d in ("as_imaged", "corrected"))
    print("corner to centre before", before, "after", after)
    assert (before < 0.85).all(), before
    assert (np.abs(after - 1) < 0.05).all(), after
    (estimated,) = functions(tmp_path / "corrected").values()
    error = np.abs(estimated - (light / light.mean())[..., None])
    print("function's error: mean", error.mean(axis=(0, 1)), "largest", error.max(axis=(0, 1)))
    assert (error.mean(axis=(0, 1)) < 0.04).all()

    # Recorded and saved where a user can look: a TIFF per plate (ImageJ opens it,
    # channels named) and its picture.
    (plate, entry), = manifest["illumination"]["plates"].items()
    assert entry == {"fields": 96, "file": "illumination/Week1_Synth01.tif"}
    assert manifest["illumination"]["sigma"] == SIDE / 8
    with tifffile.TiffFile(tmp_path / "corrected" / entry["file"]) as saved:
        assert saved.imagej_metadata["Labels"] == ["DAPI", "Tubulin", "Actin"]
        assert saved.asarray().shape == (3, 32, 32) and saved.asarray().dtype == np.float32
    assert (tmp_path / "corrected" / "illumination" / "Week1_Synth01.png").stat().st_size > 0


def test_an_evenly_lit_plate_is_left_unchanged(even_screen, tmp_path):
    convert(even_screen, tmp_path / "as_imaged")
    convert(even_screen, tmp_path / "corrected", illumination_method="per_plate")
    (estimated,) = functions(tmp_path / "corrected").values()
    before, after = (mean_field(tmp_path / d) for d in ("as_imaged", "corrected"))
    print("function from", estimated.min(), "to", estimated.max(), "; corner to centre before",
          corner_to_centre(before), "after", corner_to_centre(after), "; mean change",
          np.abs(after - before).mean())
    # Within the cells' noise in 96 fields (and their edge: cells cut off by the border
    # leave the corners of even an evenly lit plate a little darker).
    assert np.abs(estimated - 1).max() < 0.15 and np.abs(estimated - 1).mean() < 0.03
    assert np.abs(after - before).mean() < 2.0  # of 255 levels
    assert (np.abs(corner_to_centre(after) - 1) < 0.06).all()


def test_spreading_a_function_over_the_field_is_scipys_bilinear_zoom():
    grid = np.random.default_rng(0).uniform(0.5, 1.5, (32, 40, 3)).astype(np.float32)
    zoomed = ndimage.zoom(grid, (8, 8, 1), order=1, grid_mode=True, mode="nearest")
    np.testing.assert_allclose(illumination.full_size(grid, 256, 320, 8), zoomed, atol=1e-5)


@pytest.mark.slow  # runs the programs
def test_training_from_tiffs_and_prediction_correct_each_plate_by_its_own_function(
        even_screen, tmp_path):
    """train_mcnn.py reading vignetted TIFFs records the plate's function with the
    model; predict.py corrects that plate by it, and a new plate (the same fields
    imaged at 0.6 x under light centred elsewhere) by its own, and predicts the same."""
    screen = lit_copy(even_screen, tmp_path / "screen", vignetting(SIDE, SIDE))
    tables = [f"--image_table={screen / synthetic_data.IMAGE_TABLE}",
              f"--image_root={screen / synthetic_data.IMAGES}"]
    training = [PYTHON, os.path.join(ROOT, "train_mcnn.py"), *tables,
                f"--moa_table={screen / synthetic_data.MOA_TABLE}", "--include_dmso",
                f"--model_dir={tmp_path / 'model'}", "--per_rank_batch=4", "--epochs=1",
                "--warmup_epochs=0", "--eval_fraction=0.5"]
    trained = run([*training, "--illumination=per_plate"], cwd=ROOT)
    assert "fields are divided by their plate's illumination function" in trained.stdout
    recorded = json.loads((tmp_path / "model" / "data_manifest.json").read_text())
    assert recorded["illumination"]["plates"] == {
        "Week1_Synth01": {"fields": 96, "file": "illumination/Week1_Synth01.tif"}}
    assert (tmp_path / "model" / "illumination" / "Week1_Synth01.png").exists()

    table = pd.read_csv(screen / synthetic_data.IMAGE_TABLE, dtype=str)
    other = table.assign(Image_Metadata_Plate_DAPI="Week1_Synth01-other")
    light = 0.6 * vignetting(SIDE, SIDE, centre=(0.3, -0.2))
    for channel in ("DAPI", "Tubulin", "Actin"):
        other[f"Image_PathName_{channel}"] = "Week1_Synth01-other"
    lit_copy(even_screen / synthetic_data.IMAGES / "Week1_Synth01",
             screen / synthetic_data.IMAGES / "Week1_Synth01-other", light)
    pd.concat([table, other]).to_csv(tmp_path / "two_plates.csv", index=False)
    output = tmp_path / "predictions.csv"
    said = run([PYTHON, os.path.join(ROOT, "predict.py"), f"--model_dir={tmp_path / 'model'}",
                f"--output={output}", f"--image_table={tmp_path / 'two_plates.csv'}",
                tables[1]])
    assert ("1 plate(s) not seen in training (Week1_Synth01-other) corrected and scaled by "
            "their own illumination functions and intensity ranges") in said.stdout
    probabilities = pd.read_csv(output).filter(like="p_").to_numpy()
    first, second = probabilities[:len(table)], probabilities[len(table):]
    assert np.abs(first - second).max() < 0.05

    # The run cannot go on uncorrected under the same name: its pixels would change.
    refused = fails([*training, "--illumination=none"], cwd=ROOT)
    assert "other illumination (other functions)" in refused.stderr
