"""The multi-scale CNN (M-CNN) of Godinez et al., Bioinformatics 33(13), 2017.

Seven columns read the same image at seven scales: column k max-pools the input
by 2**k, applies three 5x5 convolutions, then max-pools by 64 / 2**k so that
every column ends at H/64 x W/64. The columns are concatenated, mixed by a 1x1
convolution, pooled once more and classified by two dense layers. At 1024 x 1280
x 3 with 13 classes it has 42,577,261 parameters, 98.5% of them in `fc_512`.

The pooling needs sides that are multiples of 128; fields of other sizes (2160 x
2160, 1392 x 1040, ...) are zero-padded to the next multiple by the model's first
layer, around the field's centre, so prediction on new fields of the same size
needs nothing extra. After the data's intensity scaling, zero is each channel's
low percentile: the padding is dark background, no invented signal.
"""

import itertools

import numpy as np
import tf_env  # noqa: F401  (before TensorFlow)
import tensorflow as tf
import tf_keras


if tf.keras.Model is not tf_keras.Model:
    raise ImportError("tf.keras is not Keras 2 (tf_keras): TensorFlow was imported before "
                      "tf_env set TF_USE_LEGACY_KERAS=1. Horovod does not average Keras 3's "
                      "gradients; import tf_env first")

NUM_SCALES = 7
FILTERS_PER_SCALE = (16, 16, 16, 32, 32, 32, 64)
CONVS_PER_SCALE = 3
KERNEL_SIZE = 5
COLUMN_REDUCTION = 2 ** (NUM_SCALES - 1)  # every column ends at 1/64 of the input
SIZE_MULTIPLE = 2 * COLUMN_REDUCTION  # then one more 2x2 pooling after the merge
MERGE_FILTERS = 1024
HIDDEN_UNITS = 512


def check_image_shape(image_shape):
    """Raises ValueError unless image_shape is (height, width, channels), all positive."""
    if len(image_shape) != 3 or min(image_shape) <= 0:
        raise ValueError(f"image_shape must be (height, width, channels), each at least 1; "
                         f"got {tuple(image_shape)}")


def padded_size(height, width):
    """The size the model computes at: each side rounded up to a multiple of 128."""
    return tuple(-(-side // SIZE_MULTIPLE) * SIZE_MULTIPLE for side in (height, width))


def padding(height, width):
    """((top, bottom), (left, right)) zero rows and columns that centre a field in its
    padded size (the extra one, if odd, at the bottom or right)."""
    return tuple((extra // 2, extra - extra // 2)
                 for extra in (p - s for p, s in zip(padded_size(height, width), (height, width))))


def describe_padding(height, width):
    """'' for sides that need no padding, else what the model does to them, in words."""
    padded = padded_size(height, width)
    if padded == (height, width):
        return ""
    padding_share = 1 - height * width / (padded[0] * padded[1])
    return (f"{height} x {width} fields are zero-padded to {padded[0]} x {padded[1]} in the "
            f"model (the M-CNN pools by {SIZE_MULTIPLE}; zero is each channel's low "
            f"percentile); {padding_share:.0%} of the pixels it computes on are padding")


LARGEST_STAGE = 8  # oneDNN's bf16 max-pooling gradient is right up to 8 x 8 windows


def pooling_stages(window):
    """The windows, each at most LARGEST_STAGE, whose max-pools in turn make one of
    `window` (stride equal to the window): 64 -> [8, 8], 32 -> [8, 4], 2 -> [2].
    Raises ValueError for a window with a prime factor above LARGEST_STAGE."""
    stages = []
    while window > 1:
        stage = max(s for s in range(1, LARGEST_STAGE + 1) if window % s == 0)
        if stage == 1:
            raise ValueError(f"a {window}-wide max-pool window cannot be made of windows of "
                             f"at most {LARGEST_STAGE}")
        stages.append(stage)
        window //= stage
    return stages


@tf.keras.utils.register_keras_serializable("mcnn")
# Models exported before December 2026 name the layer by its earlier fp32 workaround.
@tf.keras.utils.register_keras_serializable("mcnn", "MaxPool2DWithFp32Gradient")
class MaxPool2DInStages(tf.keras.layers.MaxPool2D):
    """Keras's MaxPool2D (stride equal to the window), but below fp32 as max-pools of at
    most 8 x 8 in turn: a 64 x 64 pool is two of 8 x 8, the same maximum with the same
    gradient (ties aside, which either picks among).

    On CPUs with AVX-512, TensorFlow 2.15 to 2.18 run bf16 pooling in oneDNN, whose JIT
    max-pooling backward is wrong for small data types and large windows (fixed in
    oneDNN 3.7, uxlfoundation/oneDNN#2386): with the M-CNN's 64 x 64 windows the
    convolutions' gradients came out with a cosine of 0.01-0.5 to fp32's, and bf16
    training learned far less. Measured on an AVX512-BF16 EPYC (TF 2.18.1), the bf16
    gradient of one pool matches fp32's for windows of 2, 4 and 8 and not for 16 to 64;
    in stages of 8, column 0's pool with its gradient takes 20 ms a batch of 4 at full
    size against 108 ms for the earlier workaround (fp32's MaxPoolGrad on the values
    cast up; docs/performance.md). Sides must be multiples of the window under "same"
    padding (the model's are); raises ValueError otherwise."""

    def build(self, input_shape):
        uneven = self.padding == "same" and any(
            side is not None and side % window
            for side, window in zip(input_shape[1:3], self.pool_size))
        if self.strides != self.pool_size or uneven:
            raise ValueError(f"{self.name}: pooling in stages needs strides equal to the "
                             f"window {self.pool_size} and, with same padding, sides that "
                             f"are multiples of it; got strides {self.strides}, input "
                             f"{tuple(input_shape)}")
        super().build(input_shape)

    def call(self, inputs):
        if inputs.dtype == tf.float32:  # right in one pool: column 0's 28 ms, 32 in stages
            return super().call(inputs)
        stages = itertools.zip_longest(*map(pooling_stages, self.pool_size), fillvalue=1)
        x = inputs
        for window in stages:
            x = tf.nn.max_pool2d(x, window, window, "VALID")
        return x


@tf.keras.utils.register_keras_serializable("mcnn")
class PositionTiled(tf.keras.initializers.Initializer):
    """fc_512's kernel, (positions x channels, units), with one Glorot-uniform block
    for (channels, units) repeated at every position of the flattened grid and divided
    by the number of positions: at initialisation fc_512 is global average pooling
    followed by a Glorot dense layer, which reads each merged channel averaged over the
    field, instead of 80 independent random read-outs of the 8 x 10 grid (4 at 256 x 256)
    that training must first overcome; its output spread stays near Glorot's (0.07
    against 0.12 on a random full-size field). Same layer, same parameters; training moves each
    position's weights on its own from there. Flatten orders positions outermost."""

    def __init__(self, positions, seed=None):
        self.positions, self.seed = positions, seed

    def __call__(self, shape, dtype=None, **kwargs):
        rows, units = shape
        if rows % self.positions:
            raise ValueError(f"fc_512's {rows} inputs are not {self.positions} positions "
                             f"of equal channels")
        block = tf.keras.initializers.GlorotUniform(self.seed)((rows // self.positions, units),
                                                              dtype=dtype)
        return tf.tile(block, [self.positions, 1]) / self.positions

    def get_config(self):
        return {"positions": self.positions, "seed": self.seed}


def fc_512_positions(model):
    """The positions of the merged grid fc_512 reads (8 x 10 = 80 at full size, 2 x 2 at
    256 x 256): its kernel's rows are these x the merged channels, positions outermost."""
    return int(np.prod(model.get_layer("merge_pool").output.shape[1:3]))


def tied_over_positions(kernel_gradient, positions):
    """fc_512's kernel gradient, (positions x channels, units), replaced by its mean over
    the positions at every position. Every step then moves each position's weights
    alike, so a PositionTiled kernel stays tiled (weight decay and momentum are linear
    in it): fc_512 stays global average pooling and a dense layer through training,
    with the published layer's parameters and the same step for what they share."""
    rows, units = kernel_gradient.shape
    per_position = tf.reshape(kernel_gradient, [positions, rows // positions, units])
    mean = tf.reduce_mean(per_position, axis=0, keepdims=True)
    return tf.reshape(tf.broadcast_to(mean, per_position.shape), [rows, units])


def scale_column(input_shape, scale, kernel_initializer="glorot_uniform"):
    """Column `scale` as a model of its own: pool by 2**scale, three 5x5
    convolutions, pool to 1/64."""
    pre_pool = 2 ** scale
    post_pool = COLUMN_REDUCTION // pre_pool
    images = tf.keras.Input(shape=input_shape,
                            dtype=tf.keras.mixed_precision.global_policy().compute_dtype)
    x = images
    if pre_pool > 1:
        x = MaxPool2DInStages(pre_pool, name="downsample")(x)
    for i in range(CONVS_PER_SCALE):
        x = tf.keras.layers.Conv2D(
            FILTERS_PER_SCALE[scale], KERNEL_SIZE, padding="same", activation="relu",
            kernel_initializer=kernel_initializer, name=f"conv_{i}")(x)
    if post_pool > 1:
        x = MaxPool2DInStages(post_pool, padding="same", name="pool")(x)
    return tf.keras.Model(images, x, name=f"scale_{scale}")


def recompute_per_image(function, images):
    """function(images) one image at a time, with a backward pass that keeps none of
    the forward pass's activations but recomputes them, again one image at a time.
    A batch then costs memory for the function's inputs and outputs alone, and
    one more forward pass of compute."""
    def one_by_one(step, elements, signature):
        return tf.map_fn(step, elements, fn_output_signature=signature, parallel_iterations=1)

    @tf.custom_gradient
    def forward(images):
        outputs = one_by_one(lambda image: function(image[tf.newaxis], training=True)[0],
                             images, tf.TensorSpec(None, images.dtype))

        def backward(upstream, variables):
            def one_image(image_and_upstream):
                image, image_upstream = image_and_upstream
                with tf.GradientTape() as tape:
                    tape.watch(image)
                    output = function(image[tf.newaxis], training=True)
                return tape.gradient(output, [image, *variables],
                                     output_gradients=image_upstream[tf.newaxis])

            grads = one_by_one(one_image, (images, upstream), [
                tf.TensorSpec(images.shape[1:], images.dtype),
                *(tf.TensorSpec(v.shape, v.dtype) for v in variables)])
            return grads[0], [tf.reduce_sum(g, axis=0) for g in grads[1:]]
        return outputs, backward
    return forward(images)


@tf.keras.utils.register_keras_serializable("mcnn")
class ScaleColumn(tf.keras.layers.Layer):
    """One scale column; with recompute=True, training recomputes its activations
    in the backward pass (gradient checkpointing per column, one image at a time)."""

    def __init__(self, input_shape, scale, recompute=False, kernel_initializer="glorot_uniform",
                 **kwargs):
        kwargs.pop("data_format", None)  # models exported before 3 Dec 2026 name it: NHWC
        super().__init__(**{"name": f"scale_{scale}", **kwargs})
        self.config = {"input_shape": tuple(input_shape), "scale": scale,
                       "recompute": recompute, "kernel_initializer": kernel_initializer}
        self.column = scale_column(input_shape, scale, kernel_initializer)
        self.recompute = recompute

    def call(self, images, training=False):
        if self.recompute and training:
            return recompute_per_image(self.column, images)
        return self.column(images, training=training)

    def get_config(self):
        return {**super().get_config(), **self.config}


def build_mcnn(image_shape=(1024, 1280, 3), num_classes=13, input_dtype="uint8",
               recompute=False, precision="float32",
               standardization=None, relu_initializer="glorot_uniform",
               fc_512_initializer="glorot_uniform"):
    """Returns the uncompiled M-CNN; it outputs logits.

    The model takes images as stored, (batch, H, W, C) of `input_dtype`, and scales
    them itself (scale_input), so the input pipeline can stay in uint8: integer
    pixels to [0, 1], or with `standardization` ({"mean": [...], "std": [...]} per
    channel, in that [0, 1] unit) each channel to mean 0 and spread 1.
    recompute=True trades a third more compute for memory (see ScaleColumn).
    precision is a Keras policy: under "mixed_bfloat16" the layers compute in bf16,
    and the weights and logits stay float32, so checkpoints fit either precision.
    relu_initializer initialises the kernels of the convolutions, which all feed a
    ReLU: "glorot_uniform" as the authors (Keras's default), or "he_normal" (He et
    al. 2015, derived for ReLU layers). fc_512_initializer: "glorot_uniform" as the
    authors, or "tiled" (PositionTiled: the same weights at every position of the
    merged grid); the logits stay Glorot.
    """
    previous = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy(precision)
    try:
        return mcnn_layers(image_shape, num_classes, input_dtype, recompute, standardization,
                           relu_initializer, fc_512_initializer)
    finally:
        tf.keras.mixed_precision.set_global_policy(previous)


def parameter_count(image_shape, num_classes):
    """The parameters of build_mcnn(image_shape, num_classes), without building it: each
    column's three 5x5 convolutions, the 1x1 merge, fc_512 (whose input grows with the
    padded field) and the logits."""
    channels = image_shape[2]
    height, width = padded_size(*image_shape[:2])
    columns = sum(KERNEL_SIZE ** 2 * (channels + (CONVS_PER_SCALE - 1) * filters) * filters
                  + CONVS_PER_SCALE * filters for filters in FILTERS_PER_SCALE)
    merge = (sum(FILTERS_PER_SCALE) + 1) * MERGE_FILTERS
    merged_pixels = (height // SIZE_MULTIPLE) * (width // SIZE_MULTIPLE)
    hidden = (merged_pixels * MERGE_FILTERS + 1) * HIDDEN_UNITS
    return columns + merge + hidden + (HIDDEN_UNITS + 1) * num_classes


def scale_input(x, input_dtype, standardization=None):
    """Pixels as stored to what the columns see: pixels / the dtype's largest value
    (integer dtypes; [0, 1]), then, with `standardization`, (x - mean) / std per channel.
    Zero padding before this stays each channel's low percentile, the background."""
    top = tf.as_dtype(input_dtype).max if tf.as_dtype(input_dtype).is_integer else 1.0
    if standardization is None:
        return (tf.keras.layers.Rescaling(1.0 / top, name="to_unit_range")(x)
                if top != 1.0 else x)
    mean, std = (np.asarray(standardization[k], np.float64) for k in ("mean", "std"))
    if mean.shape != (x.shape[-1],) or std.shape != mean.shape or np.any(std <= 0):
        raise ValueError(f"standardization needs a mean and a positive std per channel "
                         f"({x.shape[-1]}), got {standardization}")
    return tf.keras.layers.Rescaling((1.0 / (top * std)).tolist(), (-mean / std).tolist(),
                                     name="standardize")(x)


def mcnn_layers(image_shape, num_classes, input_dtype, recompute, standardization,
                relu_initializer, fc_512_initializer):
    check_image_shape(image_shape)

    images = tf.keras.Input(shape=image_shape, dtype=input_dtype, name="image")
    x = images
    if padded_size(*image_shape[:2]) != tuple(image_shape[:2]):
        x = tf.keras.layers.ZeroPadding2D(padding(*image_shape[:2]), name="pad_to_128")(x)
    x = scale_input(x, input_dtype, standardization)

    columns = [ScaleColumn(x.shape[1:], scale, recompute, relu_initializer)(x)
               for scale in range(NUM_SCALES)]
    x = tf.keras.layers.Concatenate(name="merge")(columns)
    x = tf.keras.layers.Conv2D(MERGE_FILTERS, 1, activation="relu",
                               kernel_initializer=relu_initializer, name="merge_conv")(x)
    x = MaxPool2DInStages(2, name="merge_pool")(x)
    positions = int(np.prod(x.shape[1:3]))
    x = tf.keras.layers.Flatten(name="flatten")(x)
    if fc_512_initializer == "tiled":
        fc_512_initializer = PositionTiled(positions)
    # No activation between the two dense layers, as in the authors' code.
    x = tf.keras.layers.Dense(HIDDEN_UNITS, kernel_initializer=fc_512_initializer,
                              name="fc_512")(x)
    logits = tf.keras.layers.Dense(num_classes, dtype="float32", name="logits")(x)
    return tf.keras.Model(images, logits, name="mcnn")


def forward_flops(model):
    """Floating-point operations of one image's forward pass: 2 per multiply-add of
    the convolutions and dense layers (pooling and activations are negligible)."""
    return sum(layer_forward_flops(layer) for layer in model.submodules)


def layer_forward_flops(layer):
    """2 x the multiply-adds of one image through `layer`, a built convolution or dense
    layer; 0 for any other layer."""
    if isinstance(layer, tf.keras.layers.Conv2D):
        kh, kw, cin, cout = layer.kernel.shape
        height, width = layer.output.shape[1:3]
        return 2 * height * width * kh * kw * cin * cout
    if isinstance(layer, tf.keras.layers.Dense):
        return 2 * layer.kernel.shape[0] * layer.kernel.shape[1]
    return 0
