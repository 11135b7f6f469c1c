import os

import numpy as np
import pytest
import tensorflow as tf

import data_pipeline
import errors
from small_datasets import write_dataset

SHAPE = (128, 160, 3)


def numbered_images(count, label_of=lambda i: i % 3):
    """Images whose first two channels hold their index, so reads can be traced back,
    and whose third channel marks the top-left corner, so flips can be seen."""
    for i in range(count):
        image = np.zeros(SHAPE, np.uint8)
        image[..., 0], image[..., 1], image[0, 0, 2] = i % 256, i // 256, 255
        yield image, label_of(i), {"well": f"W{i}"}


def batches(data_dir, split, batch_size, rank=0, num_ranks=1, **feed):
    return data_pipeline.make_dataset(data_pipeline.read_manifest(data_dir), split,
                                      data_pipeline.Feed(batch_size, rank, num_ranks, **feed))


def image_ids(dataset):
    return [int(images[k, 0, 0, 0]) + 256 * int(images[k, 0, 0, 1])
            for images, _ in dataset for k in range(images.shape[0])]


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "small"
    write_dataset(path, {"train": numbered_images(30), "eval": numbered_images(21)},
                                ["a", "b", "c"], SHAPE, images_per_shard=4)
    return str(path)


def test_manifest_describes_the_shards(small_set):
    manifest = data_pipeline.read_manifest(small_set)
    assert manifest["image_shape"] == list(SHAPE) and manifest["classes"] == ["a", "b", "c"]
    assert manifest["splits"]["eval"]["count"] == 21
    assert manifest["splits"]["eval"]["class_counts"] == [7, 7, 7]
    assert len(manifest["splits"]["eval"]["files"]) == 6  # 21 images, 4 a shard
    assert sorted(os.listdir(small_set)) == sorted(
        ["manifest.json"] + manifest["splits"]["train"]["files"]
        + manifest["splits"]["eval"]["files"])


@pytest.mark.parametrize("num_ranks", [1, 2, 3])
def test_evaluation_sharding_is_disjoint_and_complete(small_set, num_ranks):
    per_rank = [image_ids(batches(small_set, "eval", 5, rank, num_ranks))
                for rank in range(num_ranks)]
    every = [i for ids in per_rank for i in ids]
    assert sorted(every) == list(range(21))  # each held-out image exactly once


@pytest.mark.parametrize("num_ranks", [1, 2, 3])
def test_training_shards_are_disjoint_across_ranks(small_set, num_ranks):
    seen = []
    for rank in range(num_ranks):
        ds = batches(small_set, "train", 2, rank, num_ranks, training=True,
                                        shuffle_buffer=1)
        seen.append(set(image_ids(ds.take(45))))  # repeats forever: three passes
    assert set().union(*seen) == set(range(30))
    for a in range(num_ranks):
        for b in range(a + 1, num_ranks):
            assert not seen[a] & seen[b]


def test_training_batches_are_full_uint8_and_augmented(small_set):
    ds = batches(small_set, "train", 4, training=True, seed=1)
    corners = set()
    for images, labels in ds.take(30):
        assert images.shape == (4, *SHAPE) and images.dtype == tf.uint8
        assert labels.dtype == tf.int32
        # Flips move the marked pixel to another corner of the field.
        for k in range(4):
            corners.update(tuple(p) for p in np.argwhere(images[k, :, :, 2].numpy() > 0))
    assert {(0, 0), (0, 159), (127, 0), (127, 159)} <= corners


def test_intensity_jitter_scales_each_channel_of_a_field_by_its_own_factor():
    field = tf.constant(np.full((4, 6, 3), 100, np.uint8))
    tf.random.set_seed(0)
    jittered = np.stack([data_pipeline.augment(field, 0.3).numpy() for _ in range(300)])
    assert jittered.dtype == np.uint8
    per_channel = jittered[:, 0, 0, :].astype(float)  # one factor per field and channel
    assert (jittered == per_channel[:, None, None, :]).all()
    assert per_channel.min() >= 100 / 1.3 - 0.5 and per_channel.max() <= 130.5
    assert per_channel.min() < 80 and per_channel.max() > 125  # the whole range is drawn
    assert np.corrcoef(per_channel[:, 0], per_channel[:, 1])[0, 1] < 0.3  # independently
    assert (data_pipeline.augment(field).numpy() == 100).all()  # off by default
    bright = tf.constant(np.full((4, 6, 1), 250, np.uint8))
    assert np.stack([data_pipeline.augment(bright, 0.3).numpy() for _ in range(50)]).max() == 255


def test_shift_moves_a_field_by_up_to_its_share_of_each_side_and_keeps_its_size():
    """A single bright pixel moves by up to the shift either way, and every offset in
    that range is drawn; the field keeps its size and dtype."""
    field = np.zeros((16, 20, 1), np.uint8)
    field[8, 10] = 255
    tf.random.set_seed(0)
    moved = np.stack([data_pipeline.augment(tf.constant(field), shift=0.25).numpy()
                      for _ in range(400)])
    assert moved.shape == (400, 16, 20, 1) and moved.dtype == np.uint8
    bright = [np.argwhere(m[..., 0] == 255) for m in moved]
    centres = np.array([b[np.abs(b - [8, 10]).sum(axis=1).argmin()] for b in bright])
    # Up to 4 rows and 5 columns either way, flips aside (which mirror 8 -> 7, 10 -> 9).
    assert centres[:, 0].min() >= 3 and centres[:, 0].max() <= 12
    assert centres[:, 1].min() >= 4 and centres[:, 1].max() <= 15
    assert len({tuple(c) for c in centres}) > 50  # offsets drawn over the whole range
    # Nothing else comes in: the mirrored border is dark here, and no pixel is lost.
    assert (moved.astype(int).sum(axis=(1, 2, 3)) == 255).all()


def test_erase_sets_one_rectangle_of_up_to_its_share_to_the_fields_background():
    """A field of background 10 (per channel: 10 and 20) with cells of 200 on a quarter of
    it: one rectangle of the field's aspect is set to the background, covering shares
    spread over [0, 0.5]; the rest is untouched, dtype and size kept."""
    rng = np.random.default_rng(0)
    field = np.stack([np.full((40, 50), 10), np.full((40, 50), 20)], axis=-1).astype(np.uint16)
    cells = rng.random((40, 50)) < 0.25
    field[cells] = 200
    tf.random.set_seed(0)
    np.testing.assert_array_equal(data_pipeline.erased_background(tf.constant(field)), [10, 20])
    shares = []
    for _ in range(300):
        erased = data_pipeline.erase_rectangle(tf.constant(field), 0.5).numpy()
        assert erased.dtype == np.uint16 and erased.shape == field.shape
        changed = np.argwhere((erased != field).any(axis=-1))
        assert (erased[tuple(changed.T)] == [10, 20]).all()
        if len(changed):
            (top, left), (bottom, right) = changed.min(axis=0), changed.max(axis=0)
            box = erased[top:bottom + 1, left:right + 1]
            assert (box == [10, 20]).all()  # one rectangle, all of it background
            shares.append((bottom + 1 - top) * (right + 1 - left) / (40 * 50))
    assert max(shares) <= 0.5 and min(shares) < 0.05 and max(shares) > 0.4
    assert 0.2 < np.mean(shares) < 0.3  # uniform in [0, 0.5]: mean 0.25


def test_overlay_doubles_a_fields_cells_each_kept_whole_in_about_its_share_of_fields():
    """A field of background 10 with one cell (a 4 x 4 square of 200): overlaid, it holds
    that cell and one copy of it, a quarter to three quarters of the field's height and
    width round from it, nothing else changed; about half the fields at a chance of 0.5."""
    field = np.full((40, 48, 1), 10, np.uint8)
    field[2:6, 2:6] = 200  # its copy cannot wrap round the edge
    tf.random.set_seed(0)
    offsets = []
    for _ in range(300):
        overlaid = data_pipeline.overlay_rolled(tf.constant(field), 0.5).numpy()
        assert overlaid.dtype == np.uint8 and overlaid.shape == field.shape
        assert (overlaid >= field).all()  # the field's own cells are all kept
        copy = np.argwhere((overlaid != field)[..., 0])
        if len(copy):
            assert len(copy) == 16 and (overlaid[tuple(copy.T)] == 200).all()
            rows, columns = copy.min(axis=0) - 2
            assert 10 <= rows <= 30 and 12 <= columns <= 36
            offsets.append((rows, columns))
    assert 120 < len(offsets) < 180
    assert len(set(offsets)) > 50  # offsets drawn over the whole range
    assert (data_pipeline.augment(tf.constant(field)).numpy().sum()
            == field.sum())  # off by default


def test_fewer_shards_than_ranks_is_a_clear_error(small_set):
    with pytest.raises(ValueError, match="6 shard files for 7 ranks"):
        batches(small_set, "eval", 2, rank=0, num_ranks=7)


def test_record_of_the_wrong_shape_names_its_file(tmp_path, small_set):
    write_dataset(tmp_path / "bad", {"eval": numbered_images(3)}, ["a", "b", "c"],
                                SHAPE, images_per_shard=4)
    bad_file = tmp_path / "bad" / "eval-00000.tfrecord"
    with tf.io.TFRecordWriter(str(bad_file)) as writer:  # overwrite with a 64 x 64 image
        writer.write(data_pipeline.encode_example(np.zeros((64, 64, 3), np.uint8), 1))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"(?s)eval-00000\.tfrecord.*\[64 64 3\].*\[128, 160, 3\]"):
        list(batches(str(tmp_path / "bad"), "eval", 2))


def test_label_outside_the_classes_names_its_file(tmp_path):
    write_dataset(tmp_path / "bad", {"eval": numbered_images(2)}, ["a", "b", "c"],
                                SHAPE, images_per_shard=4)
    with tf.io.TFRecordWriter(str(tmp_path / "bad" / "eval-00000.tfrecord")) as writer:
        writer.write(data_pipeline.encode_example(np.zeros(SHAPE, np.uint8), 7))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"(?s)eval-00000\.tfrecord.*label.*7.*3 classes"):
        list(batches(str(tmp_path / "bad"), "eval", 2))


def test_missing_manifest_or_shard_is_a_clear_error(tmp_path, small_set):
    with pytest.raises(errors.InputError, match="manifest.json not found"):
        data_pipeline.read_manifest(str(tmp_path))
    broken = tmp_path / "broken"
    write_dataset(broken, {"eval": numbered_images(5)}, ["a", "b", "c"], SHAPE, 4)
    os.remove(broken / "eval-00001.tfrecord")
    with pytest.raises(errors.InputError, match="eval-00001.tfrecord"):
        data_pipeline.read_manifest(str(broken))


def test_manifest_inconsistent_with_its_shards_is_a_clear_error(tmp_path):
    broken = tmp_path / "broken"
    write_dataset(broken, {"eval": numbered_images(5)}, ["a", "b", "c"], SHAPE, 4)
    open(broken / "eval-00001.tfrecord", "w").close()
    with pytest.raises(ValueError, match="eval-00001.tfrecord is empty"):
        data_pipeline.read_manifest(str(broken))
    (broken / "manifest.json").write_text('{"format": "mcnn-tfrecord-v1", "spl')
    with pytest.raises(ValueError, match="manifest.json is not valid JSON"):
        data_pipeline.read_manifest(str(broken))
    with pytest.raises(errors.InputError, match="does not exist"):
        data_pipeline.read_manifest(str(tmp_path / "nowhere"))
