"""A training rank's memory: its peak estimated part by part, the largest per-rank batch
that fits (--per_rank_batch=auto), and the peak measured.

The estimate's figures come from memory_probe.py, which measures a training rank
phase by phase (`./launch bench -- --parts=memory`; docs/benchmark.md):
- the runtime (Python, TensorFlow, Horovod), a constant;
- the model's state: PARAMETER_COPIES fp32 copies of its parameters at the step's
  peak (weights, momentum, gradients and what the update holds besides them), 98.5% of
  them in fc_512, whose size follows the image's;
- the step's activations and their gradients, per image of the step's (micro-)batch, in
  proportion to the padded pixels;
- the input pipeline: its shuffle buffer and the stored images in flight around it.
"""
import dataclasses
import math
import resource

import tf_env  # noqa: F401  (before TensorFlow)
from absl import flags
import horovod.tensorflow as hvd
import psutil

import mcnn_model
from run_log import log

# Measured at 1024 x 1280 x 3 on a 2-core AMD EPYC (AVX2), TF 2.18.1 (docs/benchmark.md).
RUNTIME_GB = 0.49
PARAMETER_COPIES = 4.0
MEMORY_PER_FULL_SIZE_IMAGE_GB = {  # (precision, recompute)
    ("float32", False): 0.47, ("float32", True): 0.07,
    ("mixed_bfloat16", False): 0.20, ("mixed_bfloat16", True): 0.07,
}
FULL_SIZE_PIXELS = 1024 * 1280 * 3
IN_FLIGHT_IMAGES, IN_FLIGHT_STEPS = 16, 4  # stored images the pipeline holds beyond its
# shuffle buffer: a few fields being read and parsed, and the images of the steps it prefetches
MEMORY_SAFETY = 0.9  # of the memory the rank may use


class BatchParser(flags.ArgumentParser):
    """train_mcnn.py's --per_rank_batch: a positive integer, or 'auto' (the largest
    batch that fits memory: choose_per_rank_batch)."""
    syntactic_help = "a positive integer or 'auto'"

    def parse(self, argument):
        if argument == "auto":
            return argument
        value = int(argument)
        if value < 1:
            raise ValueError(f"must be at least 1, got {value}")
        return value

    def flag_type(self):
        return "int or 'auto'"


@dataclasses.dataclass(frozen=True)
class RankMemory:
    """The estimated peak memory of a training rank, in GB (2**30 bytes), as a function
    of its per-rank batch. image_shape is (H, W, C) as stored, each pixel channel
    `stored_bytes` bytes; a step takes the per-rank batch `accumulate` micro-batches at
    a time from an input pipeline with a shuffle buffer of `shuffle_buffer` images; with
    `averaged` (--ema_decay) the optimizer holds one more copy of the parameters."""
    image_shape: tuple
    num_classes: int
    stored_bytes: int
    precision: str
    recompute: bool
    shuffle_buffer: int
    accumulate: int = 1
    averaged: bool = False

    def parts(self, batch):
        """{runtime, state, activations, input}: GB each, at per-rank batch `batch`."""
        padded = math.prod(mcnn_model.padded_size(*self.image_shape[:2])) * self.image_shape[2]
        per_image = MEMORY_PER_FULL_SIZE_IMAGE_GB[self.precision, self.recompute]
        parameters = mcnn_model.parameter_count(self.image_shape, self.num_classes)
        in_pipeline = (self.shuffle_buffer + IN_FLIGHT_IMAGES
                       + IN_FLIGHT_STEPS * batch * self.accumulate)
        return {"runtime": RUNTIME_GB,
                "state": (PARAMETER_COPIES + self.averaged) * 4 * parameters / 2 ** 30,
                "activations": batch * per_image * padded / FULL_SIZE_PIXELS,
                "input": in_pipeline * math.prod(self.image_shape) * self.stored_bytes / 2 ** 30}

    def gb(self, batch):
        return sum(self.parts(batch).values())

    def describe(self, batch):
        parts = self.parts(batch)
        return (f"about {sum(parts.values()):.1f} GB a rank expected at batch {batch} ("
                + ", ".join(f"{name} {gb:.2f}" for name, gb in parts.items()) + ")")


def peak_rss_gb():
    """The peak resident memory of this process so far, in GB; Linux reports ru_maxrss
    in KiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def usable_memory_gb(per_rank_gb=0.0):
    """MEMORY_SAFETY of `per_rank_gb`, or without it of this rank's share of the memory
    available on its node now."""
    share = per_rank_gb or psutil.virtual_memory().available / 2 ** 30 / hvd.local_size()
    return MEMORY_SAFETY * share


def largest_batch(memory, most, usable_gb):
    """The largest per-rank batch, up to `most`, whose RankMemory estimate fits
    `usable_gb` (at least 1)."""
    batch = 1
    while batch < most and memory.gb(batch + 1) <= usable_gb:
        batch += 1
    return batch


def choose_per_rank_batch(requested, memory, most, per_rank_gb=0.0):
    """`requested`, or for 'auto' the largest batch whose RankMemory `memory` estimate
    fits (up to `most`); warns when the batch asked for will not fit. per_rank_gb: the
    memory a rank may use (0: its share of its node's available memory)."""
    usable = usable_memory_gb(per_rank_gb)
    if requested == "auto":
        batch = largest_batch(memory, most, usable)
        log(f"--per_rank_batch=auto: {batch} images per rank, estimated "
            f"{memory.gb(batch):.1f} GB of this rank's {usable:.1f} GB")
        return batch
    needs = memory.gb(requested)
    if needs > usable:
        log(f"WARNING: --per_rank_batch={requested} needs about {needs:.1f} GB per rank, more "
            f"than the {usable:.1f} GB each of the {hvd.local_size()} ranks on this node can "
            f"use; expect it to be killed. --recompute or a smaller batch would fit.")
    return requested
