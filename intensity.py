"""A field's pixels as the model sees them: read from its TIFFs and binned
(tiffs.py), divided by its plate's illumination function (illumination.py), and
scaled between its plate's intensity ranges, robust percentiles per channel found
from a sample of the plate's fields (a new plate at prediction by its own); and the
channel statistics the model may standardize its input with.
"""
import numpy as np

import illumination
import tiffs

SAMPLE_FIELDS = 8  # fields of a plate its intensity ranges are found from, by default


def corrected_field(planes, table_row, plate, binning=1, correction=None, shape=None):
    """One field (H, W, C): its planes (tiffs.field_planes) read and binned
    (tiffs.read_field, which refuses another `shape`) and, with `correction` (an
    illumination.estimate), divided by its plate's illumination function."""
    field = tiffs.read_field(planes, table_row, binning, shape)
    return illumination.correct(field, plate, correction) if correction else field


def field_reader(channels, binning=1, correction=None):
    """read(row): the corrected_field of a read_fields row."""
    return lambda row: corrected_field(tiffs.field_planes(row, channels), row["table_row"],
                                       row["plate"], binning, correction)


def prepared_field(planes, table_row, plate, data, dtype):
    """A field as it is trained on and predicted: read, binned and corrected as `data`
    (a data set's description or manifest) says, and scaled to `dtype` with its
    plate's intensity ranges."""
    field = corrected_field(planes, table_row, plate, data.get("bin", 1),
                            data.get("illumination"), data["image_shape"])
    return scale_to(field, ranges_for(plate, data["intensity"]), np.dtype(dtype))


def sampled_pixels(fields, read, sample_fields, seed):
    """(pixels, channels) of up to `sample_fields` of `fields`, each `read`
    (field_reader) and subsampled 4 x 4."""
    rng = np.random.default_rng(seed)
    chosen = fields.iloc[sorted(rng.permutation(len(fields))[:sample_fields])]
    planes = [read(row)[::4, ::4] for _, row in chosen.iterrows()]
    return np.concatenate([plane.reshape(-1, plane.shape[-1]) for plane in planes])


def channel_percentiles(fields, read, percentiles, sample_fields, seed):
    """[[low, high] per channel] over up to `sample_fields` fields (sampled_pixels)."""
    pixels = sampled_pixels(fields, read, sample_fields, seed)
    lows = np.percentile(pixels, percentiles[0], axis=0)
    highs = np.percentile(pixels, percentiles[1], axis=0)
    return [[float(lo), float(max(hi, lo + 1))] for lo, hi in zip(lows, highs)]


def intensity_ranges(fields, read, percentiles, scaling, sample_fields, seed):
    """{"all": ranges, "plates": {plate: ranges}} (plates only with per_plate scaling)."""
    ranges = {"scaling": scaling, "percentiles": list(percentiles),
              "all": channel_percentiles(fields, read, percentiles, sample_fields * 4, seed)}
    if scaling == "per_plate":
        ranges["plates"] = {plate: channel_percentiles(members, read, percentiles,
                                                       sample_fields, seed)
                            for plate, members in fields.groupby("plate", sort=True)}
    return ranges


def unit_scale(image, ranges):
    """Maps each channel's [low, high] to [0, 1] (float32), clipping outside."""
    low, high = np.asarray(ranges, np.float32).T
    return np.clip((image.astype(np.float32) - low) / (high - low), 0.0, 1.0)


def scale_to(image, ranges, dtype):
    """Maps each channel's [low, high] to the full range of `dtype`, clipping outside."""
    return (unit_scale(image, ranges) * np.iinfo(dtype).max + 0.5).astype(dtype)


def channel_statistics(fields, read, intensity, sample_fields, seed):
    """{"mean": [...], "std": [...], "fields": n}: each channel's mean and standard
    deviation over up to `sample_fields` training fields (sampled_pixels), as scaled
    for training (unit_scale with their plate's ranges: 0 is the low percentile, 1
    the high). The model standardizes its input with them (train_mcnn.py
    --input_scaling=standardize); held-out fields are not looked at."""
    train = fields[fields["split"] == "train"]
    pixels = sampled_pixels(train, lambda row: unit_scale(
        read(row), ranges_for(row["plate"], intensity)), sample_fields, seed)
    return {"mean": pixels.mean(axis=0, dtype=np.float64).tolist(),
            "std": np.maximum(pixels.std(axis=0, dtype=np.float64), 1e-3).tolist(),
            "fields": min(len(train), sample_fields)}


def with_new_plates(data, fields, sample_fields=SAMPLE_FIELDS, seed=0):
    """(data, new plates): a run's data description (a manifest) with illumination
    functions and intensity ranges for the plates of `fields` it has none for,
    found from their own pixels as prepare_fields finds a plate's. A plate imaged
    brighter or dimmer, or under other light, than the training plates is corrected
    and scaled as they were, not by theirs. Per-channel scaling (one range for all
    plates) is kept as it is."""
    intensity, correction = data["intensity"], data.get("illumination")
    channels, binning = data["channels"], data.get("bin", 1)
    lit = []
    if correction:
        correction, lit = illumination.with_new_plates(correction, fields, channels, binning)
    unranged = []
    if intensity.get("scaling") == "per_plate":
        unranged = sorted(set(fields["plate"]) - set(intensity["plates"]))
        read = field_reader(channels, binning, correction)
        intensity = {**intensity, "plates": {**intensity["plates"], **{
            plate: channel_percentiles(fields[fields["plate"] == plate], read,
                                       intensity["percentiles"], sample_fields, seed)
            for plate in unranged}}}
    return ({**data, "intensity": intensity, "illumination": correction},
            sorted(set(lit) | set(unranged)))


def ranges_for(plate, intensity):
    """The ranges a field of `plate` is scaled with (the overall ones for unseen plates)."""
    return intensity.get("plates", {}).get(plate, intensity["all"])
