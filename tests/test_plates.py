"""plates.py: tables joined to their MoA, the split, and the intensity scaling."""
import numpy as np
import pandas as pd
import pytest
import tifffile

import errors
import intensity
import plates
import splits
import tiffs

COLUMNS = {**plates.DEFAULT_COLUMNS, "filename": "File_{}", "pathname": "Path_{}"}


def write_tables(tmp_path, treatments, moas):
    """An image table with one DNA-only field per (compound, concentration, plate), an
    MoA table, and 2 x 2 TIFFs."""
    rows = []
    for i, (compound, concentration, plate) in enumerate(treatments):
        (tmp_path / plate).mkdir(exist_ok=True)
        tifffile.imwrite(tmp_path / plate / f"f{i}.tif", np.full((2, 2), i, np.uint16))
        rows.append({"File_DNA": f"f{i}.tif", "Path_DNA": plate,
                     COLUMNS["compound"]: compound, COLUMNS["concentration"]: concentration,
                     COLUMNS["plate"]: plate, COLUMNS["well"]: f"B{i:02d}"})
    pd.DataFrame(rows).to_csv(tmp_path / "images.csv", index=False)
    pd.DataFrame(moas, columns=["compound", "concentration", "moa"]).to_csv(
        tmp_path / "moa.csv", index=False)
    return str(tmp_path / "images.csv"), str(tmp_path / "moa.csv")


def test_fields_join_their_moa_on_the_concentration_as_a_number(tmp_path):
    images, moas = write_tables(tmp_path, [("taxol", "0.10", "P1"), ("taxol", "1", "P1")],
                                [("taxol", "0.1", "Microtubule stabilizers"),
                                 ("taxol", "1.000", "Microtubule stabilizers")])
    fields = plates.read_fields(images, str(tmp_path), ["DNA"], COLUMNS, moas)
    assert fields["moa"].tolist() == ["Microtubule stabilizers"] * 2
    assert fields["table_row"].tolist() == [2, 3]  # line numbers in the table, for messages
    assert tiffs.read_field([(fields["path_DNA"][1], -1)], 3)[..., 0].tolist() == [[1, 1], [1, 1]]
    with pytest.raises(errors.InputError, match="row 7: .*nowhere.tif does not exist"):
        tiffs.read_field([(str(tmp_path / "nowhere.tif"), -1)], 7)


def test_binning_averages_whole_blocks_exactly_and_drops_the_rest():
    image = np.array([[65535, 65534, 7], [65533, 65535, 7], [9, 9, 9]], np.uint16)[..., None]
    binned = tiffs.bin_field(image, 2)
    assert binned.shape == (1, 1, 1) and binned[0, 0, 0] == (65535 + 65534 + 65533 + 65535) / 4
    assert tiffs.bin_field(image, 1) is image
    planes = np.arange(4 * 6 * 5, dtype=np.uint16).reshape(4, 6, 5)
    np.testing.assert_array_equal(tiffs.bin_field(planes, 2)[1, 2],
                                  planes[2:4, 4:6].reshape(4, 5).mean(0))


def test_a_field_of_another_size_or_without_pixels_is_named(tmp_path):
    tifffile.imwrite(tmp_path / "wide.tif", np.zeros((4, 6), np.uint16))
    tifffile.imwrite(tmp_path / "empty.tif", np.zeros((0, 6), np.uint16))
    assert tiffs.read_field([(str(tmp_path / "wide.tif"), -1)], 2, 2, (2, 3, 1)).shape == (2, 3, 1)
    with pytest.raises(errors.InputError, match=r"row 2: .*wide.tif makes a 4 x 6 field, "
                                                r"not 4 x 4 as the others"):
        tiffs.read_field([(str(tmp_path / "wide.tif"), -1)], 2, 1, (4, 4, 1))
    with pytest.raises(errors.InputError, match=r"row 3: .*empty.tif is not a greyscale plane "
                                                r"of at least one pixel"):
        tiffs.read_field([(str(tmp_path / "empty.tif"), -1)], 3)


def test_the_split_by_compound_keeps_each_compound_on_one_side():
    fields = pd.DataFrame({"moa": ["A"] * 8 + ["DMSO"] * 4,
                           "compound": [f"a{i % 4}" for i in range(8)] + ["DMSO"] * 4,
                           "plate": ["P1", "P2"] * 6})
    split = splits.assign_split(fields, "compound", 0.25, seed=0)
    for compound, sides in split.groupby(fields["compound"]):
        assert compound == "DMSO" or sides.nunique() == 1, compound
    assert (split[fields["moa"] == "A"] == "eval").sum() == 2  # one compound of four
    assert (split[fields["moa"] == "DMSO"] == "eval").sum() == 1  # one compound: by field
    by_plate = splits.assign_split(fields, "plate", 0.5, seed=0)
    assert by_plate.groupby(fields["plate"]).nunique().max() == 1


def test_scaling_maps_the_range_to_the_dtype_and_unseen_plates_take_the_overall_range():
    image = np.array([[[100], [550], [1000], [5000]]], np.uint16)
    scaled = intensity.scale_to(image, [[100, 1000]], np.uint8)
    assert scaled[0, :, 0].tolist() == [0, 128, 255, 255]
    ranges = {"all": [[0, 1]], "plates": {"P1": [[5, 6]]}}
    assert intensity.ranges_for("P1", ranges) == [[5, 6]]
    assert intensity.ranges_for("P9", ranges) == [[0, 1]]
