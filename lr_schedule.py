"""Learning rate for large global batches: scaling rule, warm-up and decay.

Goyal et al. (2017): with k times the batch, take k times the learning rate
(the linear rule), reached by a gradual warm-up so the first steps do not diverge.
"""
import math

import tf_env  # noqa: F401  (before TensorFlow)
import tensorflow as tf

SCALING_RULES = ("linear", "sqrt", "none")
DECAYS = ("linear", "cosine", "step")


def scaled_learning_rate(base_lr, global_batch, base_batch, rule="linear"):
    """The peak rate for `global_batch`, given `base_lr` tuned at `base_batch`."""
    if rule not in SCALING_RULES:
        raise ValueError(f"scaling rule must be one of {SCALING_RULES}, got {rule!r}")
    ratio = global_batch / base_batch
    if rule == "linear":
        return base_lr * ratio
    if rule == "sqrt":
        return base_lr * math.sqrt(ratio)
    return base_lr


class WarmupThenDecay(tf.keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from `initial_lr` to `peak_lr`, then decay until `total_steps`.

    decay="linear" (the authors') and "cosine" end at `end_lr` on the last step;
    "step" divides the peak by 10 at each of `step_boundaries` (in steps), never
    going below `end_lr`.
    """

    def __init__(self, initial_lr, peak_lr, warmup_steps, total_steps, end_lr,
                 decay="linear", step_boundaries=()):
        super().__init__()
        if decay not in DECAYS:
            raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}")
        if not 0 <= warmup_steps < total_steps:
            raise ValueError(f"need 0 <= warmup_steps < total_steps, "
                             f"got {warmup_steps} and {total_steps}")
        self.initial_lr = float(initial_lr)
        self.peak_lr = float(peak_lr)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.end_lr = float(end_lr)
        self.decay = decay
        self.step_boundaries = tuple(int(b) for b in step_boundaries)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warmup = float(max(self.warmup_steps, 1))
        warming = self.initial_lr + (self.peak_lr - self.initial_lr) * step / warmup
        progress = tf.clip_by_value(
            (step - self.warmup_steps) / float(self.total_steps - self.warmup_steps), 0.0, 1.0)
        if self.decay == "linear":
            decayed = self.peak_lr + (self.end_lr - self.peak_lr) * progress
        elif self.decay == "cosine":
            decayed = self.end_lr + (self.peak_lr - self.end_lr) * 0.5 * (
                1.0 + tf.cos(math.pi * progress))
        else:
            passed = tf.reduce_sum(tf.cast(step >= tf.constant(
                self.step_boundaries or (math.inf,), tf.float32), tf.float32))
            decayed = tf.maximum(self.peak_lr * tf.pow(0.1, passed), self.end_lr)
        return tf.where(step < self.warmup_steps, warming, decayed)

    def get_config(self):
        return {
            "initial_lr": self.initial_lr, "peak_lr": self.peak_lr,
            "warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
            "end_lr": self.end_lr, "decay": self.decay,
            "step_boundaries": list(self.step_boundaries),
        }
