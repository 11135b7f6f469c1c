import numpy as np
import pytest
import tensorflow as tf

import baselines
import mcnn_model
import model_files
import tf_env

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


def test_fields_of_any_size_are_zero_padded_around_their_centre_to_multiples_of_128():
    assert mcnn_model.padded_size(200, 300) == (256, 384)
    assert mcnn_model.padding(200, 300) == ((28, 28), (42, 42))
    assert mcnn_model.padding(1040, 1392) == ((56, 56), (8, 8))
    assert mcnn_model.padding(1080, 1080) == ((36, 36), (36, 36))  # to 1152 x 1152
    assert mcnn_model.padding(129, 128) == ((63, 64), (0, 0))
    assert mcnn_model.describe_padding(1024, 1280) == ""
    model = mcnn_model.build_mcnn((200, 300, 5), 3)
    assert model.get_layer("fc_512").input.shape[-1] == (256 // 128) * (384 // 128) * 1024
    padded = tf.keras.Model(model.input, model.get_layer("to_unit_range").output)
    images = np.random.default_rng(0).integers(1, 256, (2, 200, 300, 5), dtype=np.uint8)
    out = padded(images).numpy()
    assert out.shape == (2, 256, 384, 5)
    np.testing.assert_allclose(out[:, 28:228, 42:342], images / 255, rtol=1e-6)
    assert np.count_nonzero(out) == images.size  # the padding is zeros, the field intact
    assert model(images).shape == (2, 3)


def test_standardized_input_is_each_channel_to_mean_0_and_spread_1_and_exported_so(tmp_path):
    statistics = {"mean": [0.1, 0.3, 0.05], "std": [0.2, 0.25, 0.1]}
    model = mcnn_model.build_mcnn((200, 300, 3), 3, standardization=statistics)
    assert model.count_params() == mcnn_model.build_mcnn((200, 300, 3), 3).count_params()
    images = np.random.default_rng(0).integers(0, 256, (2, 200, 300, 3), dtype=np.uint8)
    scaled = tf.keras.Model(model.input, model.get_layer("standardize").output)(images).numpy()
    mean, std = np.array(statistics["mean"]), np.array(statistics["std"])
    np.testing.assert_allclose(scaled[:, 28:228, 42:342], (images / 255 - mean) / std,
                               rtol=1e-5, atol=1e-5)
    # the padding is each channel's low percentile (pixel 0), as with [0, 1] scaling
    np.testing.assert_allclose(scaled[:, :28], np.broadcast_to(-mean / std, (2, 28, 384, 3)),
                               rtol=1e-6)
    # prediction builds it from the model dir's manifest, with the same statistics
    manifest = {"image_shape": [200, 300, 3], "classes": ["a", "b", "c"], "dtype": "uint8",
                "input_standardization": statistics}
    model_files.record_data(str(tmp_path), manifest)
    model_files.export(model, str(tmp_path))
    loaded, _ = model_files.load_trained(str(tmp_path))
    np.testing.assert_allclose(loaded(images), model(images), rtol=1e-5, atol=1e-5)
    assert any("standardized per channel" in note and "mean [0.100, 0.300, 0.050]" in note
               for note in model_files.describe_input(manifest))
    with pytest.raises(ValueError, match="a positive std per channel"):
        mcnn_model.build_mcnn((128, 128, 3), 3, standardization={"mean": [0], "std": [1]})


def test_he_initialisation_gives_the_relu_layers_twice_the_variance_over_fan_in():
    """He et al. 2015: Var(w) = 2 / fan_in keeps a ReLU layer's output variance; Glorot's
    2 / (fan_in + fan_out) is smaller. The dense layers stay Glorot."""
    tf.keras.utils.set_random_seed(0)
    glorot = mcnn_model.build_mcnn((128, 128, 3), 3)
    he = mcnn_model.build_mcnn((128, 128, 3), 3, relu_initializer="he_normal")
    conv = he.get_layer("scale_0").column.get_layer("conv_1").kernel.numpy()
    fan_in, fan_out = 5 * 5 * 16, 5 * 5 * 16
    assert np.var(conv) == pytest.approx(2 / fan_in, rel=0.15)
    merge = he.get_layer("merge_conv").kernel.numpy()
    assert np.var(merge) == pytest.approx(2 / 208, rel=0.1)
    assert np.var(glorot.get_layer("scale_0").column.get_layer("conv_1").kernel.numpy()) == (
        pytest.approx(2 / (fan_in + fan_out), rel=0.15))
    fc = he.get_layer("fc_512").kernel.numpy()
    assert np.var(fc) == pytest.approx(2 / (fc.shape[0] + fc.shape[1]), rel=0.05)
    assert he.count_params() == glorot.count_params()


def test_tiled_fc_512_starts_as_global_average_pooling_and_a_dense_layer():
    """PositionTiled: fc_512 on the flattened grid equals a (channels, units) Glorot block
    applied to the channels averaged over the grid; same parameters."""
    tf.keras.utils.set_random_seed(0)
    model = mcnn_model.build_mcnn((256, 384, 3), 3, fc_512_initializer="tiled")
    kernel = model.get_layer("fc_512").kernel.numpy()
    positions = (256 // 128) * (384 // 128)
    blocks = kernel.reshape(positions, mcnn_model.MERGE_FILTERS, mcnn_model.HIDDEN_UNITS)
    assert np.array_equal(blocks, np.broadcast_to(blocks[0], blocks.shape))
    glorot_limit = np.sqrt(6 / (mcnn_model.MERGE_FILTERS + mcnn_model.HIDDEN_UNITS))
    assert np.abs(blocks[0] * positions).max() == pytest.approx(glorot_limit, rel=0.01)

    images = np.random.default_rng(0).integers(0, 256, (2, 256, 384, 3), np.uint8)
    merged = tf.keras.Model(model.input, model.get_layer("merge_pool").output)(images)
    pooled = tf.reduce_mean(merged, axis=(1, 2)).numpy()
    fc_512 = tf.keras.Model(model.input, model.get_layer("fc_512").output)(images).numpy()
    np.testing.assert_allclose(fc_512, pooled @ (blocks[0] * positions), rtol=1e-4, atol=1e-5)
    assert model.count_params() == mcnn_model.parameter_count((256, 384, 3), 3)


@pytest.mark.parametrize("shape", [(0, 128, 3), (128, 128, 0), (128, 128)])
def test_shapes_without_pixels_or_channels_are_refused(shape):
    with pytest.raises(ValueError, match="each at least 1"):
        mcnn_model.build_mcnn(shape)


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
    tf.keras.utils.set_random_seed(0)
    plain = mcnn_model.build_mcnn((128, 256, 3), 3)
    recomputed = mcnn_model.build_mcnn((128, 256, 3), 3, recompute=True)
    recomputed.set_weights(plain.get_weights())
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 128, 256, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2])
    loss, expected = gradients(plain, images, labels)
    loss_recomputed, actual = gradients(recomputed, images, labels)
    # One image at a time and three at once may take different oneDNN kernels: their fp32
    # rounding can flip which of two near-equal values a 64 x 64 max-pool window passes
    # the gradient to, so gradients agree in direction and size, not element by element.
    np.testing.assert_allclose(loss_recomputed, loss, rtol=1e-5)
    for want, got, variable in zip(expected, actual, plain.trainable_variables):
        want, got = want.numpy().ravel(), got.numpy().ravel()
        cosine = np.dot(want, got) / (np.linalg.norm(want) * np.linalg.norm(got))
        assert cosine > 0.999, (variable.name, cosine)
        assert np.linalg.norm(got) == pytest.approx(np.linalg.norm(want), rel=0.01), variable.name
    np.testing.assert_allclose(recomputed(images), plain(images), rtol=1e-5, atol=1e-6)


def test_mixed_bfloat16_computes_in_bf16_and_keeps_fp32_weights_and_logits():
    model = mcnn_model.build_mcnn((128, 128, 3), 3, precision="mixed_bfloat16")
    assert tf.keras.mixed_precision.global_policy().name == "float32"  # left as it was
    assert model.get_layer("merge_conv").compute_dtype == "bfloat16"
    assert {v.dtype for v in model.trainable_variables} == {tf.float32}
    logits = model(np.zeros((1, 128, 128, 3), np.uint8))
    assert logits.dtype == tf.float32 and logits.shape == (1, 3)


def full_resolution_column(pool_layer, precision):
    """Three 5x5 conv + ReLU at full resolution, then a 64x64 max-pool: column 0."""
    policy = tf.keras.mixed_precision.Policy(precision)
    images = tf.keras.Input((256, 256, 3))
    x = images
    for _ in range(3):
        x = tf.keras.layers.Conv2D(16, 5, padding="same", activation="relu", dtype=policy)(x)
    return tf.keras.Model(images, pool_layer(64, padding="same", dtype=policy)(x))


def column_gradient_cosines(pool_layer):
    """Cosine of each weight's gradient in bf16 with its gradient in fp32 (same weights,
    images and upstream gradient), under tf.function as in training."""
    rng = np.random.default_rng(0)
    images = tf.constant(rng.random((2, 256, 256, 3)), tf.float32)
    upstream = tf.constant(rng.standard_normal((2, 4, 4, 16)), tf.float32)
    tf.keras.utils.set_random_seed(0)
    fp32 = full_resolution_column(pool_layer, "float32")
    bf16 = full_resolution_column(pool_layer, "mixed_bfloat16")
    bf16.set_weights(fp32.get_weights())

    def weight_gradients(model):
        @tf.function
        def step():
            with tf.GradientTape() as tape:
                outputs = model(images, training=True)
            return tape.gradient(outputs, model.trainable_variables,
                                 output_gradients=tf.cast(upstream, outputs.dtype))
        return [g.numpy().ravel() for g in step()]

    return [a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
            for a, b in zip(weight_gradients(fp32), weight_gradients(bf16))]


def test_bf16_max_pool_gives_the_fp32_gradient():
    cosines = column_gradient_cosines(mcnn_model.MaxPool2DInStages)
    assert min(cosines) >= 0.98, cosines


@pytest.mark.skipif("avx512f" not in tf_env.cpu_flags(),
                    reason="TensorFlow runs bf16 pooling in oneDNN only on AVX-512 CPUs; "
                           "elsewhere Eigen's bf16 max-pool gradient is right")
def test_plain_bf16_max_pool_gradient_is_wrong_under_onednn():
    """The cause the layer above works around; when it passes no more, TensorFlow's
    oneDNN has the fix (oneDNN 3.7) and the workaround can go."""
    assert min(column_gradient_cosines(tf.keras.layers.MaxPool2D)) < 0.98


def test_every_max_pool_gradient_of_the_bf16_model_has_a_window_of_at_most_8():
    model = mcnn_model.build_mcnn((128, 128, 3), 3, precision="mixed_bfloat16")
    images = tf.zeros((1, 128, 128, 3), tf.uint8)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(images, training=True))
        return tape.gradient(loss, model.trainable_variables)

    graph = step.get_concrete_function().graph
    pool_gradients = [op for op in graph.get_operations() if op.type == "MaxPoolGrad"]
    for function in graph._functions.values():  # the layers' gradients are functions
        pool_gradients += [op for op in function.graph.get_operations()
                           if op.type == "MaxPoolGrad"]
    # columns 0-2 pool by 64, 32 and 16 in two stages each, columns 3-5 by 8, 4 and 2 in
    # one (column 6 ends at 1/64 unpooled), and the merge pools by 2
    assert len(pool_gradients) == 10
    assert {op.get_attr("T") for op in pool_gradients} == {tf.bfloat16}
    assert max(max(op.get_attr("ksize")) for op in pool_gradients) == 8


def test_pooling_in_stages_is_one_max_pool():
    assert mcnn_model.pooling_stages(64) == [8, 8]
    assert mcnn_model.pooling_stages(32) == [8, 4]
    assert mcnn_model.pooling_stages(2) == [2]
    with pytest.raises(ValueError, match="11-wide"):
        mcnn_model.pooling_stages(22)
    maps = tf.random.normal((2, 128, 192, 5))
    for padding in ("same", "valid"):
        staged = mcnn_model.MaxPool2DInStages(64, padding=padding)(maps)
        np.testing.assert_array_equal(staged, tf.nn.max_pool2d(maps, 64, 64, padding.upper()))
    np.testing.assert_array_equal(mcnn_model.MaxPool2DInStages(64)(maps[:, :100, :100]),
                                  tf.nn.max_pool2d(maps[:, :100, :100], 64, 64, "VALID"))
    with pytest.raises(ValueError, match="multiples"):
        mcnn_model.MaxPool2DInStages(64, padding="same")(maps[:, :100])
    # models exported before the layer pooled in stages load into it
    assert (tf.keras.utils.get_registered_object("mcnn>MaxPool2DWithFp32Gradient")
            is mcnn_model.MaxPool2DInStages)


@pytest.mark.parametrize("trained, predicting", [("mixed_bfloat16", "float32"),
                                                 ("float32", "mixed_bfloat16")])
def test_a_model_trained_in_one_precision_predicts_in_the_other(tmp_path, trained, predicting):
    model = mcnn_model.build_mcnn((128, 128, 3), 3, precision=trained)
    model.get_layer("logits").bias.assign([1.0, -1.0, 0.5])
    manifest = {"image_shape": [128, 128, 3], "classes": ["a", "b", "c"], "dtype": "uint8"}
    images = np.random.default_rng(0).integers(0, 256, (2, 128, 128, 3), np.uint8)
    expected = model(images).numpy()

    model_files.record_data(str(tmp_path), manifest)
    model_files.export(model, str(tmp_path))
    loaded, _ = model_files.load_trained(str(tmp_path), predicting)
    assert loaded.get_layer("merge_conv").compute_dtype == (
        "bfloat16" if predicting == "mixed_bfloat16" else "float32")
    np.testing.assert_allclose(loaded(images), expected, rtol=0.05, atol=0.05)

    # and a checkpoint of one restores into the other (its weights are fp32 in both)
    path = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    other = mcnn_model.build_mcnn((128, 128, 3), 3, precision=predicting)
    tf.train.Checkpoint(model=other).restore(path).assert_existing_objects_matched()
    for a, b in zip(model.weights, other.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_a_model_initialised_again_has_its_initial_weights_and_gets_its_own_back():
    """baselines.initialised: tf_keras's initializers draw the run's initial weights
    again; the trained ones are put back after."""
    tf.keras.utils.set_random_seed(3)
    model = mcnn_model.build_mcnn((128, 128, 3), 3)
    initial = model.get_weights()
    trained = [w + 1.0 for w in initial]
    model.set_weights(trained)
    with baselines.initialised(model, 3):
        for drawn, start in zip(model.get_weights(), initial):
            np.testing.assert_array_equal(drawn, start)
    for now, kept in zip(model.get_weights(), trained):
        np.testing.assert_array_equal(now, kept)
