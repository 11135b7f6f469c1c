"""One plan per run: everything a training run decides, resolved once from its flags,
its data set's manifest and the machine, then frozen.

    flags, manifest, machine  ->  resolve()  ->  Plan  ->  the start line, plan.json
                                                           beside the checkpoints,
                                                           summary.json

The decisions: the precision every rank computes in, the per-rank batch memory
holds (--per_rank_batch=auto), the global batch and with it the peak learning rate
(Goyal et al. 2017, section 2: the linear rule with a gradual warm-up), steps per
epoch and in all, and under --time_budget_minutes the epochs and synthetic field size
the measured speed affords. The flags are read once, into a Request, by the programs
that plan a run (train_mcnn.py, benchmark.py, memory_probe.py), and never written: the
other scripts take from the plan what they need. A resumed run keeps the field size and epochs its
first run measured (measured again they could differ, and its checkpoints would not
fit), and says what else of its plan changed.
"""
import dataclasses
import json
import os

import tf_env  # (before TensorFlow)
from absl import app, flags
import horovod.tensorflow as hvd

import checkpoints
import data_pipeline
import lr_schedule
import mcnn_model
import optimization
import rank_memory
import run_files
import sizing
import synthetic_data
import threads
import training_data  # noqa: F401  (its flags, which a Request reads)
from run_log import log

flags.DEFINE(rank_memory.BatchParser(), "per_rank_batch", 8, "Images per rank per step, or "
             "'auto': the most that fit this rank's share of the node's memory.",
             serializer=flags.ArgumentSerializer())
flags.DEFINE_float("memory_per_rank_gb", 0, "The memory a rank may use, for --per_rank_batch="
                   "auto and its warning; 0: its share of what its node has available now "
                   "(a job's own limit, as Slurm's --mem, is not seen: give it here).",
                   lower_bound=0)
flags.DEFINE_float("epochs", 52, "Training epochs (may be fractional).")
flags.DEFINE_float("time_budget_minutes", 0, "Train for about this long: the epochs, and for "
                   "the synthetic screen the image size, follow from the speed of a few steps "
                   "measured first (0: --epochs as given).")
# 0.01 at a global batch of 8 learns on one node (the quick configuration's rate); the
# authors' 0.001 at 32, tuned for 8 nodes, barely moves a one-node run of batch 8
# (experiments/authors_8_nodes.flags keeps it).
flags.DEFINE_float("base_lr", 0.01, "Learning rate at --base_batch images; also the "
                   "warm-up's starting rate.")
flags.DEFINE_integer("base_batch", 8, "Global batch at which --base_lr was tuned.")
flags.DEFINE_enum("lr_scaling", "linear", lr_schedule.SCALING_RULES,
                  "How the peak rate grows with the global batch.")
flags.DEFINE_float("warmup_epochs", 5, "Linear warm-up from --warmup_initial_lr to the peak.")
flags.DEFINE_float("warmup_initial_lr", 0, "The warm-up's starting rate; 0: --base_lr (Goyal "
                   "et al. 2017), which at a global batch of --base_batch is the peak itself, "
                   "so that a run there has no warm-up.", lower_bound=0)
flags.DEFINE_enum("lr_decay", "linear", lr_schedule.DECAYS, "Decay after the warm-up.")
flags.DEFINE_list("decay_epochs", [], "Epochs at which --lr_decay=step divides the rate by 10.")
flags.DEFINE_float("end_lr", 1e-4, "Rate at the last step (linear, cosine); floor for step.")
flags.DEFINE_float("eval_every", 1, "Evaluate on the held-out split every this many epochs "
                   "(may be fractional: 0.25 evaluates four times an epoch).")
flags.DEFINE_integer("seed", 0, "Seed for weights, shuffling and augmentation.")
# Initial weights (the architecture is the published one either way)
flags.DEFINE_enum("initializer", "glorot_uniform", ["glorot_uniform", "he_normal"],
                  "Initial kernels of the convolutions (all ReLU layers): Glorot as the "
                  "authors, or He et al. 2015's for ReLU.")
flags.DEFINE_enum("fc_512_initializer", "glorot_uniform", ["glorot_uniform", "tiled"],
                  "Initial kernel of fc_512: Glorot as the authors, or tiled: one Glorot "
                  "block repeated at every position of the merged 8 x 10 grid (at full "
                  "size) over their number, so that it starts as global average pooling "
                  "and a dense layer (mcnn_model.PositionTiled).")
flags.register_multi_flags_validator(
    ["fc_512_tied", "fc_512_initializer"],
    lambda given: not given["fc_512_tied"] or given["fc_512_initializer"] == "tiled",
    message="--fc_512_tied keeps fc_512 as it starts: start it tiled too "
            "(--fc_512_initializer=tiled)")
# Execution
flags.DEFINE_enum("precision", "auto", tf_env.PRECISIONS,
                  "mixed_bfloat16: bf16 compute, fp32 weights and checkpoints; auto: "
                  "mixed_bfloat16 where the CPU has native bf16 (AMX or AVX512-BF16).")
flags.DEFINE_bool("recompute", False, "Recompute each scale column's activations in the "
                  "backward pass: about a third more compute, much less memory per image.")
flags.register_validator("eval_every", lambda epochs: epochs > 0,
                         message="--eval_every must be more than 0 epochs")


@dataclasses.dataclass(frozen=True)
class Model:
    """The M-CNN a run builds: fields of `image_shape` (height, width, channels) as
    stored in `input_dtype` (uint8, uint16, float32), computed in `precision`."""
    image_shape: tuple
    num_classes: int
    input_dtype: str
    precision: str  # float32 or mixed_bfloat16, as resolved
    recompute: bool
    initializer: str
    fc_512_initializer: str = "glorot_uniform"

    @property
    def stored_dtype(self):
        """The tf.DType of the fields as stored and fed."""
        return data_pipeline.DTYPES[self.input_dtype]

    def build(self, standardization=None):
        """The Keras model (mcnn_model.build_mcnn); `standardization` as
        training_data.input_standardization gives it, or None for pixels / 255."""
        return mcnn_model.build_mcnn(
            self.image_shape, self.num_classes, self.stored_dtype, self.recompute,
            self.precision, standardization, self.initializer, self.fc_512_initializer)


@dataclasses.dataclass(frozen=True)
class Request:
    """The run as its flags ask for it (this module's, optimization's and
    training_data's), read once by the programs that plan a run (from_flags); resolve()
    turns it, the data and the machine into the Plan."""
    precision: str
    per_rank_batch: object  # images, or "auto"
    memory_per_rank_gb: float
    accumulate_steps: int
    epochs: float
    time_budget_minutes: float
    warmup_epochs: float
    warmup_initial_lr: float
    eval_every: float
    decay_epochs: tuple
    base_lr: float
    base_batch: int
    lr_scaling: str
    lr_decay: str
    end_lr: float
    recompute: bool
    initializer: str
    fc_512_initializer: str
    seed: int
    recipe: optimization.Recipe
    image_height: int  # the synthetic screen's field size, as asked
    image_width: int
    synthetic_classes: int
    synthetic: bool  # the embedded synthetic screen, not a data set or plates
    synthetic_counts: tuple  # its (train, eval) fields, before it is made (time budget only)
    from_tiffs: bool  # plates read straight from their TIFFs (--image_table)
    shuffle_buffer: int

    @classmethod
    def from_flags(cls, flag_values):
        """The Request of the flags `flag_values` (absl's FlagValues) hold."""
        v = flag_values
        synthetic = not (v.data_dir or v.image_table)
        derived = {"decay_epochs": tuple(float(e) for e in v.decay_epochs),
                   "recipe": optimization.Recipe.from_flags(v), "synthetic": synthetic,
                   "synthetic_counts": synthetic_data.split_counts(  # for the time budget
                       v.synthetic_classes, v.synthetic_compounds_per_class,
                       v.synthetic_fields_per_treatment, v.seed, v.synthetic_batches)
                   if synthetic and v.time_budget_minutes else (),
                   "from_tiffs": bool(v.image_table)}
        return cls(**derived, **{field.name: v[field.name].value
                                 for field in dataclasses.fields(cls)
                                 if field.name not in derived})


@dataclasses.dataclass(frozen=True)
class Output:
    """Where a run writes and when it stops early: its model dir, its checkpoint policy
    and the held-out field accuracy it stops at (0: none)."""
    model_dir: str
    checkpoint_policy: checkpoints.Policy = checkpoints.Policy()
    target_accuracy: float = 0.0


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a training run decided, frozen. Batches count images; a step is one update
    of global_batch = ranks x per_rank_batch x accumulate_steps images."""
    model: Model
    precision_why: str
    ranks: int
    nodes: int
    threads: threads.Threads
    cpu: str  # rank 0's, named beside the run's figures (tf_env.cpu_description)
    per_rank_batch: int  # images of one micro-batch
    accumulate_steps: int  # micro-batches a rank adds up before each update
    global_batch: int
    train_fields: int
    steps_per_epoch: int
    epochs: float
    total_steps: int
    eval_steps: int  # the held-out split is evaluated every this many steps
    base_lr: float
    initial_lr: float  # the warm-up's first rate
    peak_lr: float
    lr_scaling: str
    warmup_steps: int
    lr_decay: str
    end_lr: float
    decay_steps: tuple
    recipe: optimization.Recipe
    memory: rank_memory.RankMemory
    seed: int
    output: Output = None  # None: a run that writes nothing (the benchmark's, the probe's)

    @property
    def per_rank_images(self):
        """Images a rank reads for one update: its batch, or its micro-batches."""
        return self.per_rank_batch * self.accumulate_steps

    def learning_rate(self):
        """The schedule: warm-up from initial_lr to peak_lr, then lr_decay to end_lr."""
        return lr_schedule.WarmupThenDecay(self.initial_lr, self.peak_lr, self.warmup_steps,
                                           self.total_steps, self.end_lr, self.lr_decay,
                                           self.decay_steps)

    def train_step(self, model, optimizer, accumulate=None, average=True):
        """optimization.make_train_step of this plan's recipe; `accumulate` micro-batches
        (default the plan's)."""
        return optimization.make_train_step(model, optimizer, self.model.num_classes,
                                            self.recipe, accumulate or self.accumulate_steps,
                                            average)

    def as_dict(self):
        return dataclasses.asdict(self)

    def write(self, model_dir):
        """plan.json in model_dir, written whole or not at all."""
        return run_files.write_json(os.path.join(model_dir, run_files.PLAN), self.as_dict())


def changes(previous, plan):
    """{field: (then, now)} of the decisions a resumed run makes differently from the
    plan.json of its last start (threads, CPU and memory, the machine's, left out)."""
    now = json.loads(json.dumps(plan.as_dict()))  # tuples as lists, as read back
    now.update(now.pop("model"))
    then = {**previous, **previous.get("model", {})}
    return {name: (then.get(name), value) for name, value in now.items()
            if name not in ("threads", "cpu", "memory", "precision_why", "output")
            and then.get(name) != value}


def resolve_precision(requested):
    """(policy, why) of --precision (`requested`): auto becomes the policy every rank's
    CPU runs best, bf16 only where all have native bf16, so that ranks of mixed nodes
    compute alike."""
    precision, why = tf_env.resolve_precision(requested)
    if requested == "auto" and len(set(hvd.allgather_object(precision,
                                                            name="precision"))) > 1:
        return "float32", "auto: not every rank's CPU has native bf16"
    return precision, why


def kept_choices(request, previous, model_dir):
    """A --time_budget_minutes run resumed: {image_height, image_width, epochs} its first
    run chose (`previous`, the plan.json of model_dir), or {} for a run that starts here."""
    if not (request.time_budget_minutes and previous):
        return {}
    height, width = previous["model"]["image_shape"][:2]
    kept = {"image_height": height, "image_width": width, "epochs": previous["epochs"]}
    log(f"--time_budget_minutes: resuming {model_dir} with the choices of its first run ("
        + ", ".join(f"--{name}={value:g}" for name, value in sorted(kept.items())) + ")")
    return kept


def field_size(request, kept, precision):
    """((height, width), images/s): the synthetic screen's field size as kept, fitted to
    --time_budget_minutes (sizing.fit_synthetic_size) with the global training images/s
    measured at it, or as given (images/s None)."""
    if "image_height" in kept:
        return (kept["image_height"], kept["image_width"]), None
    size = (request.image_height, request.image_width)
    if not (request.time_budget_minutes and request.synthetic):
        return size, None
    batch = 1 if request.per_rank_batch == "auto" else request.per_rank_batch
    return sizing.fit_synthetic_size(
        size, request.synthetic_counts,
        lambda size: measured_rate(model_of(request, (*size, 3), request.synthetic_classes,
                                            "uint8", precision), request.recipe,
                                   batch, request.accumulate_steps),
        request.eval_every, request.time_budget_minutes)


def model_of(request, image_shape, num_classes, input_dtype, precision):
    """The Model a run of `request` builds for fields of `image_shape` stored as
    `input_dtype`."""
    return Model(tuple(image_shape), num_classes, input_dtype, precision, request.recompute,
                 request.initializer, request.fc_512_initializer)


def memory_estimate(request, model, accumulate):
    """The RankMemory estimate of a training rank of `model` and `request`."""
    return rank_memory.RankMemory(
        model.image_shape, model.num_classes, model.stored_dtype.size,
        model.precision, model.recompute,
        0 if request.from_tiffs else request.shuffle_buffer,  # TIFFs: no shuffle buffer
        accumulate, averaged=request.recipe.ema_decay > 0)


def resolve(request, manifest, precision, precision_why, rank_threads, kept=None,
            images_per_sec=None, output=None):
    """The Plan of the run `request` asks for on the data set `manifest`, on the ranks
    there are. `kept`: kept_choices(); `images_per_sec`: global training images/s
    already measured at this size, for --time_budget_minutes (measured here if None);
    `output`: where it writes (Output). Raises app.UsageError when the split makes no
    global batch or the warm-up is not shorter than the run."""
    model = model_of(request, manifest["image_shape"], len(manifest["classes"]),
                     manifest["dtype"], precision)
    recipe = request.recipe
    accumulate, train_fields = request.accumulate_steps, manifest["splits"]["train"]["count"]
    memory = memory_estimate(request, model, accumulate)
    per_rank_batch = rank_memory.choose_per_rank_batch(
        request.per_rank_batch, memory, train_fields // (hvd.size() * accumulate),
        request.memory_per_rank_gb)
    global_batch = per_rank_batch * accumulate * hvd.size()
    steps_per_epoch = train_fields // global_batch
    if steps_per_epoch == 0:
        raise app.UsageError(f"{train_fields} training images make no full global batch of "
                             f"{global_batch} ({hvd.size()} ranks x --per_rank_batch x "
                             f"--accumulate_steps)")
    epochs = (kept or {}).get("epochs", request.epochs)
    if request.time_budget_minutes and not kept:
        images_per_sec = images_per_sec or measured_rate(model, recipe, per_rank_batch,
                                                         accumulate)
        epochs = sizing.fit_epochs(images_per_sec, manifest, global_batch, request.eval_every,
                                   request.warmup_epochs, request.time_budget_minutes)
    r = request
    return Plan(
        model=model, precision_why=precision_why, ranks=hvd.size(), nodes=hvd.cross_size(),
        threads=rank_threads, cpu=tf_env.cpu_description(), per_rank_batch=per_rank_batch,
        accumulate_steps=accumulate, global_batch=global_batch, train_fields=train_fields,
        steps_per_epoch=steps_per_epoch, epochs=epochs,
        **steps_of(r, epochs, steps_per_epoch), base_lr=r.base_lr,
        initial_lr=r.warmup_initial_lr or r.base_lr,
        peak_lr=lr_schedule.scaled_learning_rate(r.base_lr, global_batch, r.base_batch,
                                                 r.lr_scaling),
        lr_scaling=r.lr_scaling, lr_decay=r.lr_decay, end_lr=r.end_lr, recipe=recipe,
        memory=memory, seed=r.seed, output=output)


def steps_of(request, epochs, steps_per_epoch):
    """{total_steps, eval_steps, warmup_steps, decay_steps} of a run of `epochs` with
    `request`'s warm-up, evaluations and decay epochs."""
    total_steps = max(1, round(epochs * steps_per_epoch))
    warmup_steps = round(request.warmup_epochs * steps_per_epoch)
    if warmup_steps >= total_steps:
        raise app.UsageError(f"--warmup_epochs={request.warmup_epochs:g} is not shorter than "
                             f"--epochs={epochs:g}: lower --warmup_epochs (to "
                             f"{epochs / 10:.2g}, a tenth of the run, say) or raise --epochs")
    return {"total_steps": total_steps, "warmup_steps": warmup_steps,
            "eval_steps": max(1, round(request.eval_every * steps_per_epoch)),
            "decay_steps": tuple(round(e * steps_per_epoch) for e in request.decay_epochs)}


def measured_rate(model, recipe, per_rank_batch, accumulate):
    """Global training images/s of a throwaway `model` (a Model) stepping on random
    images as `recipe` would, with its optimizer and weights' average
    (sizing.images_per_second)."""
    return sizing.images_per_second(
        model.build(), lambda keras_model: optimization.make_train_step(
            keras_model, optimization.make_optimizer(1e-6, recipe), model.num_classes,
            recipe, accumulate),
        per_rank_batch * accumulate, model.num_classes)
