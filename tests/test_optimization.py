"""optimization.py: the fused SGD against Keras's, LARS against its formula, the gradient
noise scale against a known noise, the dense layers' rate by fan-in and clipping, fc_512
kept tiled.
(Accumulation against 2 ranks and against one larger batch: test_horovod_training.py.)"""
import dataclasses

import numpy as np
import pytest
import tensorflow as tf

import mcnn_model
import optimization


@pytest.mark.parametrize("nesterov", [True, False])
def test_the_fused_sgd_steps_as_keras_sgd_does(nesterov):
    """The same weights and momentum after five steps, under tf.function as in training."""
    rng = np.random.default_rng(0)
    start = rng.normal(size=(30, 20)).astype(np.float32)
    gradients = [tf.constant(rng.normal(size=(30, 20)).astype(np.float32)) for _ in range(5)]
    ends = []
    for kind in (tf.keras.optimizers.SGD, optimization.FusedSGD):
        weights = tf.Variable(start)
        optimizer = kind(0.1, momentum=0.9, nesterov=nesterov)
        step = tf.function(lambda g: optimizer.apply_gradients([(g, weights)]))
        for gradient in gradients:
            step(gradient)
        ends.append((weights.numpy(), optimizer.momentums[0].numpy()))
    for keras, fused in zip(*ends):
        np.testing.assert_allclose(fused, keras, rtol=1e-6, atol=1e-7)
    assert not np.allclose(ends[1][0], start)


def test_lars_steps_each_weight_tensor_by_its_trust_ratio_and_biases_plainly():
    kernel = tf.Variable([[3.0, 0.0], [0.0, 4.0]])
    bias = tf.Variable([1.0, -1.0])
    lars = optimization.LARS(0.1, momentum=0.9, eta=0.01)
    gradients = [np.array([[0.6, 0.0], [0.0, 0.8]], np.float32), np.array([0.5, 0.5], np.float32)]
    velocity_kernel, velocity_bias = 0.0, 0.0
    expected_kernel, expected_bias = kernel.numpy(), bias.numpy()
    for _ in range(2):
        lars.apply_gradients(zip([tf.constant(g) for g in gradients], [kernel, bias]))
        trust = 0.01 * np.linalg.norm(expected_kernel) / np.linalg.norm(gradients[0])  # 0.05
        velocity_kernel = 0.9 * velocity_kernel + 0.1 * trust * gradients[0]
        velocity_bias = 0.9 * velocity_bias + 0.1 * gradients[1]
        expected_kernel, expected_bias = expected_kernel - velocity_kernel, expected_bias - velocity_bias
    np.testing.assert_allclose(kernel.numpy(), expected_kernel, rtol=1e-6)
    np.testing.assert_allclose(bias.numpy(), expected_bias, rtol=1e-6)


def test_the_noise_scale_estimate_finds_the_noise_of_a_known_problem():
    """Per-example gradients G + e with e ~ N(0, sigma^2 I) in d dimensions: the true
    B_noise = d sigma^2 / |G|^2 = 10 here."""
    rng = np.random.default_rng(0)
    d, sigma2 = 1000, 0.01
    true_gradient = np.full(d, 1 / np.sqrt(d))  # |G|^2 = 1
    noise_scale = optimization.GradientNoiseScale(small_batch=4, big_batch=32, decay=0.99)

    def batch_gradient(b):  # the mean of b per-example gradients
        return true_gradient + rng.normal(0, np.sqrt(sigma2 / b), d)

    for _ in range(2000):
        noise_scale.add(np.sum(batch_gradient(4) ** 2), np.sum(batch_gradient(32) ** 2))
    assert noise_scale.value == pytest.approx(d * sigma2, rel=0.15)


def test_one_batch_size_gives_no_noise_scale():
    noise_scale = optimization.GradientNoiseScale(small_batch=8, big_batch=8)
    noise_scale.add(2.0, 1.0)
    assert noise_scale.value is None


def test_a_wider_dense_layer_steps_at_its_scaled_rate_after_clipping():
    """--dense_rate_fan_in=16: a dense layer of fan-in 64 steps at 16/64 of the rate, one of
    fan-in 16 at the rate; --clip_norm first scales every gradient to that global norm."""
    inputs = tf.keras.Input((64,))
    logits = tf.keras.layers.Dense(3, name="logits")(tf.keras.layers.Dense(16, name="wide")(inputs))
    model = tf.keras.Model(inputs, logits)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.normal(size=(8, 64)).astype(np.float32))
    labels = tf.constant(rng.integers(0, 3, size=8))
    plain = optimization.Recipe(weight_decay=0.0, label_smoothing=0.0)
    _, gradients = optimization.local_gradients(model, images, labels, 3, plain)
    norm = float(tf.linalg.global_norm(gradients))
    start = [v.numpy() for v in model.trainable_variables]
    recipe = dataclasses.replace(plain, dense_rate_fan_in=16, clip_norm=norm / 2)
    step = optimization.make_train_step(model, tf.keras.optimizers.SGD(0.1), 3, recipe,
                                        average=False)
    _, _, big_norm2 = step(images, labels)
    assert float(big_norm2) == pytest.approx(norm ** 2, rel=1e-5)  # measured before clipping
    factors = {"wide/kernel:0": 16 / 64}  # biases and the 16-wide logits: the plain rate
    for variable, before, gradient in zip(model.trainable_variables, start, gradients):
        expected = before - 0.1 * factors.get(variable.name, 1.0) * gradient.numpy() / 2
        np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-5, atol=1e-7)


def test_a_tied_fc_512_stays_global_average_pooling_and_steps_by_the_positions_mean():
    """--fc_512_tied with a tiled start: after SGD steps with momentum and weight decay,
    every position of fc_512 still holds the same weights, and the first step moved them
    by the rate x the mean over positions of fc_512's kernel gradient."""
    tf.keras.utils.set_random_seed(0)
    model = mcnn_model.build_mcnn((256, 384, 3), 3, fc_512_initializer="tiled")
    positions = mcnn_model.fc_512_positions(model)
    assert positions == 2 * 3
    rng = np.random.default_rng(0)
    images = tf.constant(rng.integers(0, 256, (2, 256, 384, 3), np.uint8))
    labels = tf.constant([0, 2])
    recipe = optimization.Recipe(fc_512_tied=True)
    kernel = model.get_layer("fc_512").kernel
    before = kernel.numpy()
    _, gradients = optimization.local_gradients(model, images, labels, 3, recipe)
    gradient = gradients[[v.ref() for v in model.trainable_variables].index(kernel.ref())]
    blocks = gradient.numpy().reshape(positions, -1, mcnn_model.HIDDEN_UNITS)
    assert np.abs(blocks - blocks.mean(axis=0)).max() > 1e-3 * np.abs(blocks).max()

    step = optimization.make_train_step(model, optimization.FusedSGD(0.01, momentum=0.9), 3,
                                        recipe, average=False)
    step(images, labels)
    moved = (kernel.numpy() - before).reshape(blocks.shape)
    np.testing.assert_allclose(moved[0], -0.01 * blocks.mean(axis=0), rtol=1e-3, atol=1e-8)
    for _ in range(2):
        step(images, labels)
    after = kernel.numpy().reshape(blocks.shape)
    assert np.array_equal(after, np.broadcast_to(after[0], after.shape))
    assert not np.allclose(after, before.reshape(blocks.shape))


def test_the_moving_average_of_the_weights_follows_its_formula_and_is_worn_for_evaluation():
    """--ema_decay: average = d x average + (1 - d) x weights after each step, from the
    initial weights; averaged_weights puts it in the model and the trained weights back."""
    inputs = tf.keras.Input((3,))
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(2)(inputs))
    optimizer = optimization.make_optimizer(0.1, optimization.Recipe(ema_decay=0.75))
    optimizer.build(model.trainable_variables)
    average = [v.numpy() for v in model.trainable_variables]
    step = tf.function(lambda gs: optimizer.apply_gradients(zip(gs, model.trainable_variables)))
    rng = np.random.default_rng(0)
    for _ in range(4):
        step([tf.constant(rng.normal(size=v.shape).astype(np.float32))
              for v in model.trainable_variables])
        average = [0.75 * a + 0.25 * v.numpy() for a, v in zip(average, model.trainable_variables)]
    trained = [v.numpy() for v in model.trainable_variables]
    with optimization.averaged_weights(model, optimizer):
        for variable, expected in zip(model.trainable_variables, average):
            np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-6)
    for variable, expected, averaged in zip(model.trainable_variables, trained, average):
        np.testing.assert_array_equal(variable.numpy(), expected)
        assert not np.allclose(expected, averaged)
    plain = optimization.make_optimizer(0.1, optimization.Recipe())
    with optimization.averaged_weights(model, plain):
        np.testing.assert_array_equal(model.trainable_variables[0].numpy(), trained[0])
