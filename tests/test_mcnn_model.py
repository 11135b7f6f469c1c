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
    model = mcnn_model.build_mcnn((128, 128, 3), 4)
    assert {"scale_0", "scale_6", "merge_conv", "fc_512", "logits"} <= {
        layer.name for layer in model.layers}
    columns = {layer.name: {inner.name for inner in layer.column.layers}
               for layer in model.layers if isinstance(layer, mcnn_model.ScaleColumn)}
    assert {"conv_0", "conv_2", "pool"} <= columns["scale_0"]
    assert {"downsample", "conv_0", "conv_1", "conv_2"} <= columns["scale_6"]


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


def gradients(model, images, labels):
    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.keras.losses.sparse_categorical_crossentropy(
                labels, model(images, training=True), from_logits=True)
        return loss, tape.gradient(loss, model.trainable_variables)
    return step()


def test_recompute_gives_the_same_loss_and_gradients():
    plain = mcnn_model.build_mcnn((128, 256, 3), 3)
    recomputed = mcnn_model.build_mcnn((128, 256, 3), 3, recompute=True)
    recomputed.set_weights(plain.get_weights())
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 128, 256, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2])
    loss, expected = gradients(plain, images, labels)
    loss_recomputed, actual = gradients(recomputed, images, labels)
    np.testing.assert_allclose(loss_recomputed, loss, rtol=1e-6)
    for want, got, variable in zip(expected, actual, plain.trainable_variables):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(
            tf.reduce_max(tf.abs(want))), err_msg=variable.name)
    np.testing.assert_allclose(recomputed(images), plain(images), rtol=1e-5, atol=1e-6)


def test_mixed_bfloat16_computes_in_bf16_and_keeps_fp32_weights_and_logits():
    tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = mcnn_model.build_mcnn((128, 128, 3), 3)
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
    assert model.get_layer("merge_conv").compute_dtype == "bfloat16"
    assert {v.dtype for v in model.trainable_variables} == {tf.float32}
    logits = model(np.zeros((1, 128, 128, 3), np.uint8))
    assert logits.dtype == tf.float32 and logits.shape == (1, 3)
