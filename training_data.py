"""The data a training run reads, and its flags: the embedded synthetic screen, a
converted data set (--data_dir), or plates straight from their TIFFs (--image_table
and the other table flags of prepare_data.py). Each rank reads its own share.
"""
import dataclasses
import os

import tf_env  # noqa: F401  (before TensorFlow)
from absl import app, flags
import horovod.tensorflow as hvd
import tensorflow as tf

import data_pipeline
import errors
import mcnn_model
import plates
import prepare_data
import shard_checks
import synthetic_data

HERE = os.path.dirname(os.path.abspath(__file__))

PLATES_ONLY = ("bin", "illumination", "illumination_sigma", "illumination_fields")
SHARDS_ONLY = ("shuffle_buffer", "skip_bad_records")
SYNTHETIC_ONLY = ("image_height", "image_width", "synthetic_classes",
                  "synthetic_compounds_per_class", "synthetic_fields_per_treatment",
                  "synthetic_batches")


@dataclasses.dataclass(frozen=True)
class Source:
    """The data a run reads, as this module's flags name it (Source.from_flags): the
    synthetic screen, a data set (data_dir) or plates (image_table, as `conversion`
    says), and how each rank is fed from it."""
    data_dir: str = None
    image_table: str = None
    moa_table: str = None
    image_root: str = ""
    conversion: plates.ConversionOptions = None  # for plates read straight from TIFFs
    synthetic_cache: str = os.path.join(HERE, "data")
    image_height: int = 1024  # the synthetic screen's
    image_width: int = 1280
    synthetic_classes: int = len(synthetic_data.CLASSES)
    synthetic_compounds_per_class: int = 3
    synthetic_fields_per_treatment: int = 4
    synthetic_batches: int = 1
    shuffle_buffer: int = 64
    intensity_jitter: float = 0.0
    shift: float = 0.0
    erase: float = 0.0
    overlay: float = 0.0
    input_scaling: str = "unit"
    skip_bad_records: bool = False
    allow_untrained_classes: bool = False
    given: frozenset = frozenset()  # flags given other values than their defaults

    @classmethod
    def from_flags(cls, flag_values, seed=0):
        """The Source this module's flags name (`flag_values`: absl's FlagValues); `seed`
        splits plates read straight from TIFFs."""
        v = flag_values
        names = [field.name for field in dataclasses.fields(cls)
                 if field.name not in ("conversion", "given")]
        return cls(**{name: v[name].value for name in names},
                   conversion=plates.conversion_options(v, seed) if v.image_table else None,
                   given=frozenset(name for name in (*PLATES_ONLY, *SHARDS_ONLY,
                                                     *SYNTHETIC_ONLY)
                                   if v[name].present and v[name].value != v[name].default))

    @property
    def synthetic(self):
        """Whether this is the embedded synthetic screen."""
        return not (self.data_dir or self.image_table)

    def feed(self, batch_size, training=False, provenance=False, seed=0):
        """This rank's share of a split, in batches of `batch_size`."""
        return data_pipeline.Feed(batch_size, hvd.rank(), hvd.size(), training, provenance,
                                  seed, self.shuffle_buffer, self.intensity_jitter, self.shift,
                                  self.erase, self.overlay)


flags.DEFINE_string("data_dir", None, "Data set folder (manifest.json + TFRecord shards). "
                    "Unset: the embedded synthetic screen.")
flags.DEFINE_string("synthetic_cache", Source.synthetic_cache,
                    "Where the synthetic data set is generated and cached.")
flags.DEFINE_integer("image_height", Source.image_height, "Synthetic image height.",
                     lower_bound=1)
flags.DEFINE_integer("image_width", Source.image_width, "Synthetic image width.",
                     lower_bound=1)
flags.DEFINE_integer("synthetic_classes", Source.synthetic_classes,
                     "MoA classes in the synthetic screen, the DMSO control included.")
flags.DEFINE_integer("synthetic_compounds_per_class", Source.synthetic_compounds_per_class,
                     "Compounds per MoA in the synthetic screen; one per MoA is held out.")
flags.DEFINE_integer("synthetic_fields_per_treatment", Source.synthetic_fields_per_treatment,
                     "Fields per compound and concentration in the synthetic screen.")
flags.DEFINE_integer("synthetic_batches", Source.synthetic_batches, "Batches (weeks) the "
                     "synthetic screen's compounds are imaged in, each with its own plates and "
                     "batch effect, the control in every one (for NSCB; docs/profiles.md).",
                     lower_bound=1)
flags.DEFINE_integer("shuffle_buffer", Source.shuffle_buffer,
                     "Images in each rank's shuffle buffer.")
flags.DEFINE_float("intensity_jitter", Source.intensity_jitter, "Training augmentation: each "
                   "channel of a field times a random factor between 1 / (1 + this) and "
                   "1 + this (0: off), besides the flips.", lower_bound=0)
flags.DEFINE_float("shift", Source.shift, "Training augmentation: each field moved by up to "
                   "this share of its height and width (the border mirrored; 0: off), besides "
                   "the flips.", lower_bound=0, upper_bound=0.5)
flags.DEFINE_float("erase", Source.erase, "Training augmentation: in each field a rectangle "
                   "covering up to this share of it (uniform) set to the field's background, "
                   "so that how densely cells lie is not read as an MoA (0: off), besides the "
                   "flips.", lower_bound=0, upper_bound=0.9)
flags.DEFINE_float("overlay", Source.overlay, "Training augmentation: the chance that a field "
                   "is overlaid (pixel maximum) with a copy of itself rolled round by a quarter "
                   "to three quarters of its height and width, twice its cells, so that how "
                   "densely cells lie is not read as an MoA (0: off), besides the flips.",
                   lower_bound=0, upper_bound=1)
flags.DEFINE_enum("input_scaling", Source.input_scaling, ["unit", "standardize"], "unit: "
                  "pixels / the largest value of their dtype, [0, 1] (the authors'); "
                  "standardize: each channel to mean 0 and spread 1, by the training fields' "
                  "statistics in the data set's manifest.")
flags.DEFINE_bool("skip_bad_records", Source.skip_bad_records, "Check every record first and "
                  "train on the good ones, reporting the corrupt, truncated or mislabelled "
                  "ones, instead of stopping at the first.")
flags.DEFINE_bool("allow_untrained_classes", Source.allow_untrained_classes, "Train on a data "
                  "set in which a class has no training field (refused otherwise); the "
                  "evaluation reports such classes apart.")
# Or straight from plates (TIFFs + tables), with no conversion step: see prepare_data.py.
plates.define_conversion_flags(flags)


def check_data_flags(source):
    """Refuses (app.UsageError) flags that do not apply to the data `source` names: the
    synthetic screen, a data set (--data_dir) or plates (--image_table)."""
    if source.data_dir and source.image_table:
        raise app.UsageError("give --data_dir or --image_table, not both")
    if not source.image_table:
        refuse_given(source, PLATES_ONLY, "to plates read with --image_table; a data set was "
                     "binned and corrected when it was converted (its manifest says how)")
    if source.image_table:
        refuse_given(source, SYNTHETIC_ONLY, "to synthetic data only; with --image_table the "
                     "TIFFs give the field's size and the tables the classes")
        refuse_given(source, SHARDS_ONLY, "to data sets and the synthetic screen; straight "
                     "from TIFFs every epoch reads all fields in a new order, and every file "
                     "is checked before training")
    if source.data_dir:
        refuse_given(source, SYNTHETIC_ONLY, "to synthetic data only; with --data_dir the "
                     "manifest gives the image shape and classes")


def open_data(source, seed, field_size=None):
    """(manifest, batches(split, feed)) of `source`: the synthetic screen (of
    `field_size` (height, width), or the source's size), a data set or plates."""
    check_data_flags(source)
    if source.image_table:
        return open_plates(source)
    if source.data_dir:
        data_dir = source.data_dir
    else:
        data_dir = synthetic_dataset(
            source.synthetic_cache, *(field_size or (source.image_height, source.image_width)),
            source.synthetic_classes, source.synthetic_compounds_per_class,
            source.synthetic_fields_per_treatment, seed=seed, batches=source.synthetic_batches)
    manifest = data_pipeline.read_manifest(data_dir)
    refuse_untrained_classes(manifest, data_dir, source.allow_untrained_classes)
    refuse_too_few_shards(manifest, data_dir)
    good = good_records(manifest) if source.skip_bad_records else None
    return manifest, lambda split, feed: data_pipeline.make_dataset(manifest, split, feed, good)


def refuse_too_few_shards(manifest, data_dir):
    """Every rank reads whole shards of each split: refused before any work when a split
    has fewer shards than there are ranks."""
    for split, entry in manifest["splits"].items():
        shards, ranks = len(entry["files"]), hvd.size() if hvd.is_initialized() else 1
        if shards < ranks:
            raise errors.SameOnEveryRank(
                f"{data_dir}: its {split} split is {shards} shard(s) for {ranks} ranks, and "
                f"each rank reads whole shards: convert it again with --images_per_shard="
                f"{max(entry['count'] // ranks, 1)} or less, or train on at most {shards} rank(s)")


def refuse_untrained_classes(manifest, data_dir, allowed=False):
    """A data set with a class no training field shows: refused unless `allowed`
    (--allow_untrained_classes), since its held-out fields count against the accuracy."""
    untrained = data_pipeline.untrained_classes(manifest)
    if untrained and not allowed:
        listing = ", ".join(f"{name!r} (0 training, {n} held-out fields)"
                            for name, n in untrained.items())
        raise app.UsageError(
            f"{data_dir}: no training field of {listing} (split by "
            f"{manifest.get('split', {}).get('by', '?')}): the model cannot learn it. Convert "
            f"with another --split or --seed, or --allow_untrained_classes to train anyway "
            f"(the evaluation reports such classes apart)")


def refuse_given(source, names, applies):
    """A UsageError naming the flags of `names` given other values than their defaults
    (source.given), which apply only `applies` (a phrase: 'to ...; why'). Defaults pass,
    so that a run's flags.txt, which lists every flag, reruns it."""
    given = [name for name in names if name in source.given]
    if given:
        raise app.UsageError(f"--{', --'.join(given)} appl{'ies' if len(given) == 1 else 'y'} "
                             f"{applies}")


def open_plates(source):
    """Training straight from TIFFs: the fields, split and scaled as prepare_data.py would."""
    options = source.conversion
    try:
        fields, description = plates.prepare_fields(source.image_table, source.moa_table,
                                                    source.image_root, options)
    except errors.InputError as error:  # every rank reads the same tables and files
        raise errors.SameOnEveryRank(str(error)) from None
    manifest = {**description, "dtype": "uint8",
                "split": {"by": options.split, "eval_fraction": options.eval_fraction},
                "splits": {side: {"count": int((fields["split"] == side).sum())}
                           for side in ("train", "eval")},
                "source": os.path.abspath(source.image_table)}
    return manifest, lambda split, feed: data_pipeline.make_tiff_dataset(
        fields[fields["split"] == split], manifest, feed)


def synthetic_dataset(cache_dir, height, width, num_classes=len(synthetic_data.CLASSES),
                      compounds_per_class=3, fields_per_treatment=4, seed=0, images_per_shard=8,
                      batches=1):
    """Path of the synthetic data set: the screen in BBBC021 layout, converted by
    prepare_data.py with a split by compound (the control split by field).

    Both are cached; safe when many ranks call it at once: one generates under a
    file lock, the others wait for the lock and then find the finished result.
    """
    mcnn_model.check_image_shape((height, width, len(synthetic_data.CHANNELS)))
    name = (f"synthetic-v{synthetic_data.VERSION}_{height}x{width}_{num_classes}cls_"
            f"{compounds_per_class}cpd_{fields_per_treatment}fields_seed{seed}"
            + (f"_{batches}batches" if batches > 1 else ""))
    screen = os.path.join(cache_dir, name + "_screen")
    data = os.path.join(cache_dir, name + "_by-compound")
    with data_pipeline.exclusive_lock(os.path.join(cache_dir, name + ".lock")):
        if not os.path.isdir(screen):
            print(f"Generating the synthetic screen in {screen}", flush=True)
            synthetic_data.write_screen(screen, height, width, num_classes,
                                        compounds_per_class, fields_per_treatment, seed=seed,
                                        batches=batches)
        if not os.path.isdir(data):
            print(f"Converting it with prepare_data.py to {data}", flush=True)
            prepare_data.convert(
                *synthetic_data.screen_tables(screen), data,
                synthetic_data.conversion_options(compounds_per_class, seed),
                images_per_shard=images_per_shard, progress=lambda _: None)
    return data


def good_records(manifest):
    """--skip_bad_records: every rank checks its own shards; rank 0 reports them all."""
    good, problems = {}, []
    for split in manifest["splits"]:
        files = data_pipeline.split_files(manifest, split, hvd.rank(), hvd.size())
        split_good, split_problems = shard_checks.scan_shards(files, manifest)
        good.update(split_good)
        problems += split_problems
    everyone = [p for rank in hvd.allgather_object(problems, name="bad_records") for p in rank]
    manifest["bad_records_skipped"] = len(everyone)
    if hvd.rank() == 0:
        print(f"--skip_bad_records: {len(everyone)} bad record{'s' * (len(everyone) != 1)} "
              f"skipped" + "".join(f"\n  {p}" for p in everyone), flush=True)
    return good


def named_data_errors(batches, manifest, split, from_tiffs=False):
    """The batches of `batches`; tf.data's DataLossError, which names no file, and a
    shard with fewer records than the manifest's become an InputError naming this
    rank's corrupt shards, and a TIFF that fails to read
    inside tf.data the InputError it raised there (one line, no traceback)."""
    while True:
        try:
            yield next(batches)
        except StopIteration:
            return
        except tf.errors.OpError as e:
            unreadable = data_pipeline.tiff_input_error(e)
            if unreadable:
                raise unreadable from None
            shard_cut_between_records = "expected to contain" in e.message
            if from_tiffs or not (isinstance(e, tf.errors.DataLossError)
                                         or shard_cut_between_records):
                raise
            files = data_pipeline.split_files(manifest, split, hvd.rank(), hvd.size())
            raise shard_checks.explain_data_loss(files, manifest, e) from None


def input_standardization(manifest, input_scaling):
    """The per-channel {"mean": [C], "std": [C]} (of pixels scaled to [0, 1]) the model
    standardizes its input with, or None (`input_scaling` "unit"); recorded in the model
    dir's data manifest. Raises errors.InputError for a data set converted without
    channel statistics."""
    if input_scaling == "unit":
        return None
    if "channel_statistics" not in manifest:
        raise errors.InputError(
            f"{manifest['source']}: its manifest has no channel statistics (converted before "
            f"they were recorded) for --input_scaling=standardize; convert it again, or "
            f"train with --input_scaling=unit")
    return {k: manifest["channel_statistics"][k] for k in ("mean", "std")}
