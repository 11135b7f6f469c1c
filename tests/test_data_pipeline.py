import os

import numpy as np
import pytest
import tensorflow as tf

import data_pipeline
import synthetic_data

SHAPE = (128, 160, 3)


def numbered_images(count, label_of=lambda i: i % 3):
    """Images whose first two channels hold their index, so reads can be traced back,
    and whose third channel marks the top-left corner, so flips can be seen."""
    for i in range(count):
        image = np.zeros(SHAPE, np.uint8)
        image[..., 0], image[..., 1], image[0, 0, 2] = i % 256, i // 256, 255
        yield image, label_of(i), {"well": f"W{i}"}


def image_ids(dataset):
    return [int(images[k, 0, 0, 0]) + 256 * int(images[k, 0, 0, 1])
            for images, _ in dataset for k in range(images.shape[0])]


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "small"
    data_pipeline.write_dataset(path, {"train": numbered_images(30), "eval": numbered_images(21)},
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
    per_rank = [image_ids(data_pipeline.make_dataset(small_set, "eval", 5, rank, num_ranks))
                for rank in range(num_ranks)]
    every = [i for ids in per_rank for i in ids]
    assert sorted(every) == list(range(21))  # each held-out image exactly once


@pytest.mark.parametrize("num_ranks", [1, 2, 3])
def test_training_shards_are_disjoint_across_ranks(small_set, num_ranks):
    seen = []
    for rank in range(num_ranks):
        ds = data_pipeline.make_dataset(small_set, "train", 2, rank, num_ranks, training=True,
                                        shuffle_buffer=1)
        seen.append(set(image_ids(ds.take(45))))  # repeats forever: three passes
    assert set().union(*seen) == set(range(30))
    for a in range(num_ranks):
        for b in range(a + 1, num_ranks):
            assert not seen[a] & seen[b]


def test_training_batches_are_full_uint8_and_augmented(small_set):
    ds = data_pipeline.make_dataset(small_set, "train", 4, training=True, seed=1)
    corners = set()
    for images, labels in ds.take(30):
        assert images.shape == (4, *SHAPE) and images.dtype == tf.uint8
        assert labels.dtype == tf.int32
        # Flips move the marked pixel to another corner of the field.
        for k in range(4):
            corners.update(tuple(p) for p in np.argwhere(images[k, :, :, 2].numpy() > 0))
    assert {(0, 0), (0, 159), (127, 0), (127, 159)} <= corners


def test_fewer_shards_than_ranks_is_a_clear_error(small_set):
    with pytest.raises(ValueError, match="6 shard files for 7 ranks"):
        data_pipeline.make_dataset(small_set, "eval", 2, rank=0, num_ranks=7)


def test_record_of_the_wrong_shape_names_its_file(tmp_path, small_set):
    data_pipeline.write_dataset(tmp_path / "bad", {"eval": numbered_images(3)}, ["a", "b", "c"],
                                SHAPE, images_per_shard=4)
    bad_file = tmp_path / "bad" / "eval-00000.tfrecord"
    with tf.io.TFRecordWriter(str(bad_file)) as writer:  # overwrite with a 64 x 64 image
        writer.write(data_pipeline.encode_example(np.zeros((64, 64, 3), np.uint8), 1))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"(?s)eval-00000\.tfrecord.*\[64 64 3\].*\[128, 160, 3\]"):
        list(data_pipeline.make_dataset(str(tmp_path / "bad"), "eval", 2))


def test_label_outside_the_classes_names_its_file(tmp_path):
    data_pipeline.write_dataset(tmp_path / "bad", {"eval": numbered_images(2)}, ["a", "b", "c"],
                                SHAPE, images_per_shard=4)
    with tf.io.TFRecordWriter(str(tmp_path / "bad" / "eval-00000.tfrecord")) as writer:
        writer.write(data_pipeline.encode_example(np.zeros(SHAPE, np.uint8), 7))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"(?s)eval-00000\.tfrecord.*label.*7.*3 classes"):
        list(data_pipeline.make_dataset(str(tmp_path / "bad"), "eval", 2))


def test_missing_manifest_or_shard_is_a_clear_error(tmp_path, small_set):
    with pytest.raises(FileNotFoundError, match="manifest.json not found"):
        data_pipeline.read_manifest(str(tmp_path))
    broken = tmp_path / "broken"
    data_pipeline.write_dataset(broken, {"eval": numbered_images(5)}, ["a", "b", "c"], SHAPE, 4)
    os.remove(broken / "eval-00001.tfrecord")
    with pytest.raises(FileNotFoundError, match="eval-00001.tfrecord"):
        data_pipeline.read_manifest(str(broken))


def test_manifest_inconsistent_with_its_shards_is_a_clear_error(tmp_path):
    broken = tmp_path / "broken"
    data_pipeline.write_dataset(broken, {"eval": numbered_images(5)}, ["a", "b", "c"], SHAPE, 4)
    open(broken / "eval-00001.tfrecord", "w").close()
    with pytest.raises(ValueError, match="eval-00001.tfrecord is empty"):
        data_pipeline.read_manifest(str(broken))
    (broken / "manifest.json").write_text('{"format": "mcnn-tfrecord-v1", "spl')
    with pytest.raises(ValueError, match="manifest.json is not valid JSON"):
        data_pipeline.read_manifest(str(broken))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data_pipeline.read_manifest(str(tmp_path / "nowhere"))


def test_a_failed_write_leaves_nothing_that_looks_whole(tmp_path):
    def failing():
        yield from numbered_images(5)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        data_pipeline.write_dataset(tmp_path / "out", {"train": failing()}, ["a", "b", "c"],
                                    SHAPE, 2)
    assert os.listdir(tmp_path) == []


def test_synthetic_screen_is_deterministic_by_seed(tmp_path):
    def screen_bytes(seed, name):
        synthetic_data.write_screen(str(tmp_path / name), 128, 128, num_classes=3,
                                    compounds_per_class=2, fields_per_treatment=1, seed=seed,
                                    workers=2)
        return {str(p.relative_to(tmp_path / name)): p.read_bytes()
                for p in sorted((tmp_path / name).rglob("*")) if p.is_file()}

    first, again, other = screen_bytes(0, "a"), screen_bytes(0, "b"), screen_bytes(1, "c")
    assert first == again
    assert len([p for p in first if p.endswith(".tif")]) == 3 * 3 * 2 * 2  # 3 channels
    assert first.keys() == other.keys() and first != other


def test_synthetic_classes_differ_in_their_phenotype():
    """Nuclear (DNA) area per field separates DMSO from DNA damage on average."""
    def dna_fraction(moa):
        rng = np.random.default_rng(0)
        return np.mean([(synthetic_data.render_field(256, 320, synthetic_data.PHENOTYPES[moa],
                                                     rng)[..., 0] > 0.4).mean()
                        for _ in range(10)])

    assert dna_fraction("DNA damage") > 1.3 * dna_fraction("DMSO")


def test_concurrent_callers_generate_the_synthetic_set_once(tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda _: synthetic_data.ensure_synthetic_dataset(
            str(tmp_path), 128, 128, 2, 1, 1, images_per_shard=1), range(3)))
    assert len(set(paths)) == 1
    made = sorted(p for p in os.listdir(tmp_path) if not p.endswith(".lock"))
    assert made == sorted([os.path.basename(paths[0]),
                           os.path.basename(paths[0]).replace("_by-compound", "_screen")])
