import sys

import numpy as np
import pytest
import tensorflow as tf

import mcnn_model
from conftest import ROOT, run

COLUMN_CHANNELS = (16, 16, 16, 32, 32, 32, 64)


def column_outputs(model):
    return [model.get_layer("merge").input[k] for k in range(mcnn_model.NUM_SCALES)]


def test_published_model_has_the_published_parameter_count_and_column_shapes():
    model = mcnn_model.build_mcnn()
    assert model.count_params() == 42_577_261
    shapes = [tuple(t.shape) for t in column_outputs(model)]
    assert shapes == [(None, 16, 20, c) for c in COLUMN_CHANNELS]
    assert model.get_layer("fc_512").input.shape[-1] == 8 * 10 * 1024
    assert model.output.shape[-1] == 13


def test_forward_pass_costs_51_gflop_at_full_size():
    # The convolutions and dense layers' multiply-adds, x 2; training is about 3x this.
    assert mcnn_model.forward_flops(mcnn_model.build_mcnn()) == pytest.approx(51.4e9, rel=1e-3)


def test_layer_names_say_what_they_are():
    names = {layer.name for layer in mcnn_model.build_mcnn((128, 128, 3), 4).layers}
    assert {"scale_0/conv_0", "scale_4/conv_2", "scale_6/conv_2", "scale_3/downsample",
            "scale_5/pool", "merge_conv", "fc_512", "logits"} <= names


def test_dense_layer_follows_the_image_size():
    model = mcnn_model.build_mcnn((256, 384, 3), 5)
    assert model.get_layer("fc_512").input.shape[-1] == (256 // 128) * (384 // 128) * 1024
    logits = model(np.zeros((2, 256, 384, 3), np.uint8))
    assert logits.shape == (2, 5)


@pytest.mark.parametrize("shape", [(1000, 1280, 3), (1024, 1300, 3), (64, 128, 3)])
def test_sizes_not_divisible_by_128_are_refused(shape):
    with pytest.raises(ValueError, match="multiples of 128"):
        mcnn_model.build_mcnn(shape)


CHANNELS_FIRST_LOGITS = """
import sys, numpy as np, mcnn_model
model = mcnn_model.build_mcnn((128, 256, 3), 4, "channels_first")
model.load_weights(sys.argv[1])
np.save(sys.argv[2], model(np.load(sys.argv[3])).numpy())
"""


def test_channels_first_matches_channels_last(tmp_path):
    last = mcnn_model.build_mcnn((128, 256, 3), 4, "channels_last")
    first = mcnn_model.build_mcnn((128, 256, 3), 4, "channels_first")
    assert first.count_params() == last.count_params()
    assert [tuple(t.shape) for t in column_outputs(first)] == [
        (None, c, 2, 4) for c in COLUMN_CHANNELS]
    # Same weights, same function (Flatten(channels_first) restores the NHWC order).
    # Run in its own process: TensorFlow 2.15's oneDNN caches pooling primitives
    # without their layout, so NHWC and NCHW pooling of one shape in one process
    # return wrong results (tensorflow/tensorflow#61482). Training uses one layout.
    images = np.random.default_rng(0).integers(0, 256, (2, 128, 256, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    last.save_weights(tmp_path / "weights.h5")
    run([sys.executable, "-c", CHANNELS_FIRST_LOGITS, str(tmp_path / "weights.h5"),
         str(tmp_path / "logits.npy"), str(tmp_path / "images.npy")], cwd=ROOT)
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), last(images),
                               rtol=1e-4, atol=1e-5)


def test_integer_pixels_are_scaled_to_the_unit_range():
    model = mcnn_model.build_mcnn((128, 128, 1), 2, input_dtype="uint16")
    scaled = tf.keras.Model(model.input, model.get_layer("to_unit_range").output)
    out = scaled(np.full((1, 128, 128, 1), 65535, np.uint16))
    np.testing.assert_allclose(out, 1.0)
