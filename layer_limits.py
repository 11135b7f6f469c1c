"""The M-CNN's own limit on this CPU: each distinct layer shape of the model timed alone.

A training step can be no faster than its layers run one by one, each at its best:
the forward pass and the gradients training needs (the weights', and the input's where
a trainable layer comes before it), with the model's own layer objects, in the run's
precision, at the run's per-rank batch. benchmark.py --parts=layers sums them over the
model's layers and holds the whole step to that sum (layer_limit_fraction): unlike a
single large convolution's rate, which no layer of the M-CNN reaches, the sum says
how much a better schedule of these same layers could still gain.
"""
import collections

import tf_env  # noqa: F401  (before TensorFlow)
import tensorflow as tf

import mcnn_model

SKIPPED = (tf.keras.layers.InputLayer, tf.keras.layers.Flatten, tf.keras.layers.Concatenate,
           tf.keras.layers.Rescaling, tf.keras.layers.ZeroPadding2D, tf.keras.layers.Permute)
Shape = collections.namedtuple("Shape", "kind input_shape size input_gradient")


def model_layers(model):
    """[(layer, input_gradient)] of every layer of `model` that computes, columns' layers
    included, in order; input_gradient: whether training needs the gradient of its input
    (a trainable layer comes before it)."""
    layers = []
    for layer in model.layers:
        if isinstance(layer, mcnn_model.ScaleColumn):
            trained_before = False
            for inner in layer.column.layers:
                if not isinstance(inner, SKIPPED):
                    layers.append((inner, trained_before))
                    trained_before = trained_before or bool(inner.trainable_weights)
        elif not isinstance(layer, SKIPPED):
            layers.append((layer, True))  # after the columns: every input is trained
    return layers


def shape_of(layer, input_gradient):
    """The layer's Shape: its kind, input shape, size (filters, units or pooling window)
    and whether it passes a gradient to its input."""
    size = getattr(layer, "filters", getattr(layer, "units", getattr(layer, "pool_size", None)))
    return Shape(type(layer).__name__, tuple(layer.input_shape[1:]),
                 size[0] if isinstance(size, tuple) else size, input_gradient)


def layer_step(layer, input_gradient):
    """step(inputs, upstream): the layer's forward pass and the gradients training needs,
    given the gradient arriving from above (`upstream`)."""
    @tf.function
    def step(inputs, upstream):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            outputs = layer(inputs, training=True)
        sources = [*layer.trainable_variables, *([inputs] if input_gradient else [])]
        gradients = tape.gradient(outputs, sources, output_gradients=upstream)
        return [g[(0,) * g.shape.rank] for g in gradients]
    return step


def time_layers(model, batch, seconds_of):
    """[{shape, count, seconds, gflops}] per distinct layer shape of `model` (a built
    M-CNN in its precision, channels_last): seconds of one training pass of one such
    layer over `batch` images (seconds_of(run): the time of a call of run, as the
    benchmark measures it), how many layers of the model have that shape, and their
    GFLOP/s (the forward pass's work once, and once more per gradient)."""
    shapes = collections.OrderedDict()
    for layer, input_gradient in model_layers(model):
        key = shape_of(layer, input_gradient)
        if key in shapes:
            shapes[key]["count"] += 1
        else:
            shapes[key] = {"layer": layer, "count": 1}
    rows = []
    for key, entry in shapes.items():
        layer = entry["layer"]
        inputs = tf.random.uniform((batch, *key.input_shape), dtype=layer.compute_dtype)
        upstream = tf.random.normal((batch, *layer.output_shape[1:]), dtype=layer.compute_dtype)
        step = layer_step(layer, key.input_gradient)
        seconds = seconds_of(lambda: [float(g) for g in step(inputs, upstream)])
        passes = 1 + bool(layer.trainable_weights) + key.input_gradient
        rows.append({"shape": key, "count": entry["count"], "seconds": seconds,
                     "gflops": passes * mcnn_model.layer_forward_flops(layer) * batch / seconds / 1e9})
    return rows


def describe(shape):
    """'Conv2D 16 @ 1024x1280x16 +input gradient' (16 filters on that input; a pooling
    layer's number is its window) and the like."""
    size = "x".join(str(s) for s in shape.input_shape)
    kind = shape.kind.replace("InStages", "")
    return (f"{kind}{f' {shape.size}' if shape.size else ''} @ {size}"
            + (" +input gradient" if shape.input_gradient else ""))


def layer_limit(model, batch, seconds_of):
    """{layer_limit_seconds_per_image, layer_limit_images_per_sec, layers: [...]}: the
    model's layers timed alone (time_layers), summed over every layer of the model."""
    rows = time_layers(model, batch, seconds_of)
    total = sum(r["count"] * r["seconds"] for r in rows)
    return {"layer_limit_seconds_per_image": total / batch,
            "layer_limit_images_per_sec": batch / total,
            "layers": [{"layer": describe(r["shape"]), "count": r["count"],
                        "ms": float(f"{1000 * r['seconds']:.4g}"), "gflops": float(f"{r['gflops']:.4g}"),
                        "time_share": round(r["count"] * r["seconds"] / total, 4)}
                       for r in rows]}
