"""One training step: the loss, this rank's gradients (summed over --accumulate_steps
micro-batches), their average over all ranks, and the update (the authors' SGD with
Nesterov momentum; LARS; Adam or AdamW for comparison); and the gradient noise scale
measured on the way.

The global batch is ranks x --per_rank_batch x --accumulate_steps: the learning-rate
rule, the schedule and checkpoints follow it, so one node can run the authors'
global batch of 256 exactly.
"""
import contextlib
import dataclasses

import numpy as np
import tf_env  # noqa: F401  (before TensorFlow)
from absl import flags
import horovod.tensorflow as hvd
import tensorflow as tf

import mcnn_model

@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a step turns a batch into an update: the loss's label smoothing and L2 weight
    decay, the optimizer, and how gradients travel between ranks. Its defaults are the
    authors' (Godinez et al. 2017; Datta et al. 2019, section 3: SGD with Nesterov
    momentum 0.9, label smoothing 0.1)."""
    optimizer: str = "sgd"
    momentum: float = 0.9
    lars_eta: float = 0.001
    weight_decay: float = 5e-5
    label_smoothing: float = 0.1
    fp16_allreduce: bool = False
    allreduce_groups: int = 0
    clip_norm: float = 0.0
    dense_rate_fan_in: int = 0
    fc_512_tied: bool = False
    ema_decay: float = 0.0

    @property
    def l2(self):
        """The L2 term's factor in the loss: adamw decays the weights in its update."""
        return 0.0 if self.optimizer == "adamw" else self.weight_decay

    @classmethod
    def from_flags(cls, flag_values):
        """The Recipe of this module's flags (`flag_values`: absl's FlagValues)."""
        return cls(**{field.name: flag_values[field.name].value
                      for field in dataclasses.fields(cls)})


flags.DEFINE_enum("optimizer", Recipe.optimizer, ["sgd", "lars", "adam", "adamw"], "sgd: SGD "
                  "with Nesterov momentum (the authors'); lars: layer-wise adaptive rate "
                  "scaling (You et al. 2017); adam (Kingma and Ba 2015); adamw: Adam with "
                  "decoupled weight decay (Loshchilov and Hutter 2019).")
flags.DEFINE_float("momentum", Recipe.momentum, "Momentum (Nesterov for sgd; beta_1 for adam "
                   "and adamw).")
flags.DEFINE_float("lars_eta", Recipe.lars_eta, "LARS trust coefficient: a layer's rate is the "
                   "learning rate x eta x |weights| / |gradient|.")
flags.DEFINE_float("weight_decay", Recipe.weight_decay, "L2 penalty on all weights; with adamw, "
                   "the decay each step takes off the weights instead (w -= rate x this x w).")
flags.DEFINE_float("label_smoothing", Recipe.label_smoothing, "Label smoothing of the "
                   "cross-entropy.")
flags.DEFINE_integer("accumulate_steps", 1, "Micro-batches of --per_rank_batch whose gradients "
                     "each rank adds before one allreduce and one update.", lower_bound=1)
flags.DEFINE_bool("fp16_allreduce", Recipe.fp16_allreduce, "Send gradients as fp16 in the "
                  "allreduce.")
flags.DEFINE_integer("allreduce_groups", Recipe.allreduce_groups, "0: Horovod's default, each "
                     "gradient is sent as soon as it is ready, overlapping the backward pass; "
                     "N: in N groups, each once all of its gradients are ready.")
flags.DEFINE_float("clip_norm", Recipe.clip_norm, "Clip each step's averaged gradient to this "
                   "global norm (Pascanu et al. 2013; 0: no clipping).", lower_bound=0)
flags.DEFINE_integer("dense_rate_fan_in", Recipe.dense_rate_fan_in, "SGD: a dense layer with a "
                     "larger fan-in steps at the learning rate x this / its fan-in, as one of "
                     "this fan-in would (one step moves a dense layer's output in proportion "
                     "to its fan-in, and fc_512's grows with the field: 4,096 at 256 x 256, "
                     "81,920 at full size). 0: one rate for every layer.", lower_bound=0)
flags.DEFINE_bool("fc_512_tied", Recipe.fc_512_tied, "Keep fc_512's weights the same at every "
                  "position of the merged grid (each step's gradient averaged over the 80 "
                  "positions at full size, 4 at 256 x 256), so that with "
                  "--fc_512_initializer=tiled it stays global average pooling and a dense "
                  "layer: the read-out of a field's mean phenotype, wherever its cells lie.")
flags.DEFINE_float("ema_decay", Recipe.ema_decay, "Evaluate and export an exponential moving "
                   "average of the weights (Polyak and Juditsky 1992), kept by the optimizer: "
                   "average = this x average + (1 - this) x weights after every step, from the "
                   "initial weights (whose share is this**steps: 0.98 averages about 50 steps "
                   "and leaves them 18% after 84). 0: the weights themselves.",
                   lower_bound=0, upper_bound=0.9999)
flags.register_multi_flags_validator(
    ["dense_rate_fan_in", "optimizer"],
    lambda given: not given["dense_rate_fan_in"] or given["optimizer"] == "sgd",
    message="--dense_rate_fan_in applies to --optimizer=sgd only (adam, adamw and lars step "
            "each weight tensor by its own gradient's scale already)")


def local_gradients(model, images, labels, num_classes, recipe):
    """Loss of this rank's batch and its gradients, weight decay included, not averaged."""
    cross_entropy = tf.keras.losses.CategoricalCrossentropy(
        from_logits=True, label_smoothing=recipe.label_smoothing)
    with tf.GradientTape() as tape:
        logits = model(images, training=True)
        loss = cross_entropy(tf.one_hot(labels, num_classes), logits)
        total = loss + recipe.l2 * tf.add_n([tf.nn.l2_loss(v) for v in model.trainable_variables])
    return loss, tape.gradient(total, model.trainable_variables)


def average_over_ranks(gradients, recipe):
    """The mean of each gradient over all ranks, as hvd.DistributedGradientTape sends them:
    each as soon as it is ready, or in recipe.allreduce_groups groups."""
    compression = hvd.Compression.fp16 if recipe.fp16_allreduce else hvd.Compression.none
    if not recipe.allreduce_groups:
        return [hvd.allreduce(g, op=hvd.Average, compression=compression) for g in gradients]
    groups = np.array_split(np.arange(len(gradients)), recipe.allreduce_groups)
    averaged = []
    for group in groups:
        averaged += hvd.grouped_allreduce([gradients[i] for i in group], op=hvd.Average,
                                          compression=compression)
    return averaged


def batch_gradients(model, images, labels, num_classes, recipe, accumulate=1, average=True):
    """(loss, gradients, small_norm2) of a step: the mean gradient of `accumulate`
    micro-batches that split this rank's `images`, averaged over all ranks (average=False,
    for benchmarks: this rank's own). small_norm2 is the mean squared norm of one
    micro-batch's gradient, over micro-batches and ranks: with the norm of the result,
    what the gradient noise scale is estimated from."""
    if accumulate == 1:  # no loop, so that each gradient's allreduce overlaps the backward pass
        loss, gradients = local_gradients(model, images, labels, num_classes, recipe)
        small_norm2 = tf.linalg.global_norm(gradients) ** 2
    else:
        loss, gradients, small_norm2 = accumulated_gradients(model, images, labels, num_classes,
                                                             recipe, accumulate)
    if average and hvd.size() > 1:
        gradients = average_over_ranks(gradients, recipe)
        small_norm2 = hvd.allreduce(small_norm2, op=hvd.Average, name="small_batch_norm2")
    return loss, gradients, small_norm2


def accumulated_gradients(model, images, labels, num_classes, recipe, accumulate):
    """(mean loss, mean gradients, mean squared gradient norm) of `accumulate` equal
    micro-batches of `images`, one at a time: memory for one micro-batch's activations."""
    micro_images = tf.reshape(images, [accumulate, -1, *images.shape[1:]])
    micro_labels = tf.reshape(labels, [accumulate, -1])
    total_loss, norm2 = tf.constant(0.0), tf.constant(0.0)
    sums = [tf.zeros_like(v) for v in model.trainable_variables]
    for i in tf.range(accumulate):
        loss, gradients = local_gradients(model, micro_images[i], micro_labels[i], num_classes,
                                          recipe)
        sums = [s + g for s, g in zip(sums, gradients)]
        norm2 += tf.linalg.global_norm(gradients) ** 2
        total_loss += loss
    return total_loss / accumulate, [s / accumulate for s in sums], norm2 / accumulate


def make_train_step(model, optimizer, num_classes, recipe, accumulate=1, average=True):
    """train_step(images, labels) -> (loss, small_norm2, big_norm2): one update from
    this rank's per-rank batch x `accumulate` images."""
    rate_factors = dense_rate_factors(model, recipe.dense_rate_fan_in)
    tied = fc_512_tied(model) if recipe.fc_512_tied else {}

    @tf.function
    def train_step(images, labels):
        loss, gradients, small_norm2 = batch_gradients(model, images, labels, num_classes,
                                                       recipe, accumulate, average)
        big_norm2 = tf.linalg.global_norm(gradients) ** 2
        if recipe.clip_norm:
            gradients, _ = tf.clip_by_global_norm(gradients, recipe.clip_norm,
                                                  use_norm=tf.sqrt(big_norm2))
        gradients = [g * factor if factor != 1 else g
                     for g, factor in zip(gradients, rate_factors)]
        gradients = [mcnn_model.tied_over_positions(g, tied[v.ref()]) if v.ref() in tied else g
                     for g, v in zip(gradients, model.trainable_variables)]
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss, small_norm2, big_norm2
    return train_step


def dense_rate_factors(model, fan_in):
    """Per trainable variable of `model`, the factor its SGD step is scaled by: fan_in /
    the layer's fan-in for the kernels of dense layers whose fan-in is larger, else 1
    (fan_in 0: 1 everywhere). With plain or momentum SGD, scaling a gradient scales that
    weight's rate. Why: a step of rate r moves a dense layer's output on an input x by
    r |x|^2 times its gradient there, and |x|^2 grows with the fan-in."""
    scaled = {}
    for layer in model.layers:
        if fan_in and isinstance(layer, tf.keras.layers.Dense) and layer.kernel.shape[0] > fan_in:
            scaled[layer.kernel.ref()] = fan_in / layer.kernel.shape[0]
    return [scaled.get(v.ref(), 1.0) for v in model.trainable_variables]


def fc_512_tied(model):
    """{fc_512's kernel (a variable's ref): its positions} for tied_over_positions."""
    return {model.get_layer("fc_512").kernel.ref(): mcnn_model.fc_512_positions(model)}


def make_optimizer(learning_rate, recipe):
    """The Keras optimizer of recipe.optimizer; `learning_rate` a rate or a schedule. With
    recipe.ema_decay it also keeps the weights' moving average (Keras's use_ema), which
    its checkpoints and Horovod's broadcast of its variables carry."""
    average = {"use_ema": recipe.ema_decay > 0, "ema_momentum": recipe.ema_decay or 0.99}
    if recipe.optimizer == "lars":
        return LARS(learning_rate, momentum=recipe.momentum, eta=recipe.lars_eta, **average)
    if recipe.optimizer == "adam":
        return tf.keras.optimizers.Adam(learning_rate, beta_1=recipe.momentum, **average)
    if recipe.optimizer == "adamw":
        return tf.keras.optimizers.AdamW(learning_rate, weight_decay=recipe.weight_decay,
                                         beta_1=recipe.momentum, **average)
    return FusedSGD(learning_rate, momentum=recipe.momentum, nesterov=True, **average)


@contextlib.contextmanager
def averaged_weights(model, optimizer):
    """Inside the block `model` holds the moving average of its weights that `optimizer`
    keeps (--ema_decay), and its own weights again after it; without an average, its own
    weights throughout."""
    if not optimizer.use_ema:
        yield
        return
    trained = [tf.identity(v) for v in model.trainable_variables]
    optimizer.finalize_variable_values(model.trainable_variables)
    try:
        yield
    finally:
        for variable, value in zip(model.trainable_variables, trained):
            variable.assign(value)


class FusedSGD(tf.keras.optimizers.SGD):
    """Keras's SGD with momentum (Nesterov's, as the authors'), its update done in place
    by one fused kernel per weight tensor: accum = momentum x accum - rate x g, then
    w += accum (or, Nesterov, w += momentum x accum - rate x g), the formula of Keras's
    SGD and of its legacy fused optimizer. Keras's own update builds each product as a
    new tensor, several copies of `fc_512`'s 42M weights at once at full size."""

    def update_step(self, gradient, variable):
        if isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable)
        accumulator = self.momentums[self._index_dict[self._var_key(variable)]]
        tf.raw_ops.ResourceApplyKerasMomentum(
            var=variable.handle, accum=accumulator.handle,
            lr=tf.cast(self.learning_rate, variable.dtype), grad=gradient,
            momentum=tf.cast(self.momentum, variable.dtype), use_nesterov=self.nesterov)


class LARS(tf.keras.optimizers.Optimizer):
    """Layer-wise adaptive rate scaling (You, Gitman and Ginsburg 2017): each weight
    tensor steps at learning rate x eta x |w| / |g|, with momentum; biases (and any
    other 1-D weights) take the plain learning rate. The weight decay is already in
    the gradient, as an L2 term of the loss."""

    def __init__(self, learning_rate, momentum=0.9, eta=0.001, name="LARS", **kwargs):
        super().__init__(name=name, **kwargs)
        self._learning_rate = self._build_learning_rate(learning_rate)
        self.momentum, self.eta = momentum, eta

    def build(self, var_list):
        super().build(var_list)
        if getattr(self, "_built", False):
            return
        self.velocities = [self.add_variable_from_reference(v, "velocity") for v in var_list]
        self._built = True

    def update_step(self, gradient, variable):
        rate = tf.cast(self.learning_rate, variable.dtype)
        if variable.shape.rank > 1:
            weight_norm, gradient_norm = tf.norm(variable), tf.norm(gradient)
            rate = rate * tf.where((weight_norm > 0) & (gradient_norm > 0),
                                   self.eta * weight_norm / tf.maximum(gradient_norm, 1e-30), 1.0)
        velocity = self.velocities[self._index_dict[self._var_key(variable)]]
        velocity.assign(self.momentum * velocity + rate * gradient)
        variable.assign_sub(velocity)

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum, "eta": self.eta,
                "learning_rate": self._serialize_hyperparameter(self._learning_rate)}


class GradientNoiseScale:
    """The simple noise scale B_noise = tr(Sigma) / |G|^2 of McCandlish et al. 2018,
    estimated as in their Appendix A from the squared norms of gradients of two batch
    sizes (one micro-batch of one rank, and the global batch), each step's estimates
    of |G|^2 and tr(Sigma) smoothed separately before their ratio. B_noise is the
    batch size past which a larger batch buys fewer steps (the critical batch)."""

    def __init__(self, small_batch, big_batch, decay=0.95):
        self.small, self.big, self.decay = small_batch, big_batch, decay
        self.norm2, self.trace = None, None

    def add(self, small_norm2, big_norm2):
        if self.big <= self.small:
            return  # one rank, no accumulation: a single batch size says nothing
        norm2 = (self.big * big_norm2 - self.small * small_norm2) / (self.big - self.small)
        trace = (small_norm2 - big_norm2) / (1 / self.small - 1 / self.big)
        self.norm2 = norm2 if self.norm2 is None else self.smooth(self.norm2, norm2)
        self.trace = trace if self.trace is None else self.smooth(self.trace, trace)

    def smooth(self, average, value):
        return self.decay * average + (1 - self.decay) * value

    @property
    def value(self):
        """B_noise, or None before an estimate (or while |G|^2 is estimated <= 0)."""
        if self.norm2 is None or self.norm2 <= 0:
            return None
        return self.trace / self.norm2


def weights_in_sync(model):
    """True when all ranks hold the same weights, as averaged gradients guarantee (a
    check of the allreduce, run at the end of training)."""
    fingerprint = tf.stack([tf.reduce_sum(tf.cast(v, tf.float64)) for v in model.weights])
    everyone = hvd.allgather(fingerprint[tf.newaxis], name="weights_fingerprint")
    return bool(tf.reduce_all(everyone == everyone[0]))
