"""Illumination correction per plate and channel: CellProfiler's standard recipe.

Fluorescence fields are brighter in the middle than at the edges, and plates imaged on
different days differ. For each plate and channel, the mean of the plate's fields is
smoothed with a Gaussian filter much wider than a cell and scaled to mean 1: the
plate's illumination function. Each field is divided by it before its intensity range
is found and it is scaled (CellProfiler's CorrectIlluminationCalculate, "Regular"
function of all of a plate's images, Gaussian smoothing, and CorrectIlluminationApply,
"Divide"; Singh et al., "Pipeline for illumination correction of images for
high-throughput microscopy", J. Microscopy 256(3), 2014).

A function is kept on a grid of block means GRID_POINTS to the field's shorter side and
spread over the field by linear interpolation where it is applied, as the Broad's Cell
Painting pipelines compute theirs at a quarter of the resolution: smoothed this much it
changes little from one grid point to the next, and a plate's functions are a few
kilobytes to record with a data set and a model. Files: one float32 TIFF per plate
(channels as pages, ImageJ opens it) and a PNG of it, in ILLUMINATION_DIR.
"""
import functools
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tifffile
from scipy import ndimage

import plots
import tiffs
from errors import InputError

METHODS = ("none", "per_plate")
GRID_POINTS = 32
# Sigma, as a fraction of the shorter side (128 pixels on a 1024 x 1280 field): wide
# enough that the cells of a few hundred fields average out to about 1% (measured on
# the synthetic screen), narrow enough to follow a microscope's vignetting.
DEFAULT_SIGMA_FRACTION = 1 / 8
FEW_FIELDS = 50  # a plate's function of fewer fields may show its cells: said
ILLUMINATION_DIR = "illumination"
SMALLEST = 1e-3  # floor of a function, so that no pixel is divided by zero


def estimate(fields, channels, binning=1, sigma=0.0, sample_fields=0, seed=0):
    """The illumination functions of the plates of `fields` (read_fields rows with
    their files checked): {"method": "per_plate", "sigma": pixels, "step": pixels,
    "plates": {plate: {"fields": count averaged, "function": (h, w, C) float32}}}.

    `sigma` is the Gaussian's standard deviation in pixels of the (binned) field,
    0: DEFAULT_SIGMA_FRACTION of its shorter side; `sample_fields` caps the fields
    averaged per plate (0: all, as CellProfiler does; a sample is drawn with `seed`).
    A function has mean 1 in each channel, so a plate keeps its brightness."""
    first = fields.iloc[0]
    height, width, _ = tiffs.read_field(tiffs.field_planes(first, channels),
                                        first["table_row"], binning).shape
    sigma = float(sigma or DEFAULT_SIGMA_FRACTION * min(height, width))
    step = max(1, min(height, width) // GRID_POINTS)
    rng = np.random.default_rng(seed)
    plates = {}
    for plate, members in fields.groupby("plate", sort=True):
        if 0 < sample_fields < len(members):
            members = members.iloc[sorted(rng.permutation(len(members))[:sample_fields])]
        mean = mean_field(members, channels, binning)
        grid = tiffs.bin_field(mean, step)
        plates[plate] = {"fields": len(members), "function": smoothed_to_mean_one(grid, sigma / step)}
    say_few_fields(plates)
    return {"method": "per_plate", "sigma": sigma, "step": step, "plates": plates}


def say_few_fields(plates):
    """Names, on stderr, the plates whose functions average fewer than FEW_FIELDS fields."""
    few = {plate: p["fields"] for plate, p in plates.items() if p["fields"] < FEW_FIELDS}
    if few:
        listing = ", ".join(f"{plate} ({n})" for plate, n in list(few.items())[:5])
        print(f"illumination: {len(few)} plate(s) have fewer than {FEW_FIELDS} fields to average "
              f"({listing}{', ...' if len(few) > 5 else ''}): their cells may show in their "
              f"functions (look at the pictures in {ILLUMINATION_DIR}/); a larger "
              f"--illumination_sigma smooths more", file=sys.stderr)


def mean_field(members, channels, binning, batch=16):
    """The mean (H, W, C) float64 of the fields `members`, read 8 at a time (the file
    systems of clusters answer faster in parallel), `batch` in memory at once."""
    total = None
    with ThreadPoolExecutor(8) as pool:
        for start in range(0, len(members), batch):
            rows = [row for _, row in members.iloc[start:start + batch].iterrows()]
            for field in pool.map(lambda row: tiffs.read_field(
                    tiffs.field_planes(row, channels), row["table_row"], binning), rows):
                total = field.astype(np.float64) if total is None else total + field
    return total / len(members)


def smoothed_to_mean_one(grid, sigma):
    """`grid` (h, w, C) smoothed in its two spatial axes by a Gaussian of `sigma` grid
    points, its edges extended (as CellProfiler's smoothing within the image), each
    channel divided by its mean; a channel that is zero throughout is left at 1."""
    smooth = ndimage.gaussian_filter(grid, sigma=(sigma, sigma, 0), mode="nearest")
    means = smooth.mean(axis=(0, 1))
    function = np.where(means > 0, smooth / np.where(means > 0, means, 1), 1.0)
    return np.maximum(function, SMALLEST).astype(np.float32)


@functools.lru_cache(maxsize=32)
def interpolation(size, points, step):
    """(size, points) float32 weights that spread `points` grid values, each the mean of
    a `step`-pixel block, over `size` pixels: linear between block centres, constant
    beyond the outer ones (as scipy.ndimage.zoom(order=1, grid_mode=True,
    mode="nearest"), which is 40x slower for a full field)."""
    centres = (np.arange(points) + 0.5) * step - 0.5
    return np.stack([np.interp(np.arange(size), centres, unit) for unit in np.eye(points)],
                    axis=1).astype(np.float32)


def full_size(function, height, width, step):
    """A function's grid (h, w, C) spread over a (height, width) field: (H, W, C) float32."""
    rows = interpolation(height, function.shape[0], step)
    columns = interpolation(width, function.shape[1], step)
    return np.einsum("Yy,yxc,Xx->YXc", rows, function, columns, optimize=True)


def correct(field, plate, correction):
    """`field` (H, W, C) divided by the illumination function of `plate` in
    `correction` (an estimate()): float32."""
    function = correction["plates"][plate]["function"]
    return field.astype(np.float32) / full_size(function, *field.shape[:2], correction["step"])


def with_new_plates(correction, fields, channels, binning=1):
    """(correction, new plates): `correction` with functions for the plates of
    `fields` it has none for, each estimated from its own fields as estimate() does
    (same sigma)."""
    new = sorted(set(fields["plate"]) - set(correction["plates"]))
    if not new:
        return correction, []
    own = estimate(fields[fields["plate"].isin(new)], channels, binning, correction["sigma"])
    return {**correction, "plates": {**correction["plates"], **own["plates"]}}, new


def settings(correction):
    """What a correction is, without its functions (for comparing and recording)."""
    if not correction:
        return None
    return {"method": correction["method"], "sigma": correction["sigma"],
            "step": correction["step"],
            "fields": {plate: p["fields"] for plate, p in correction["plates"].items()}}


def file_stem(plate, taken):
    """A file name for `plate` (its name with characters unsafe in paths replaced),
    not in `taken`."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", str(plate)) or "plate"
    name, number = stem, 1
    while name in taken:
        number += 1
        name = f"{stem}-{number}"
    return name


def save(correction, folder, channels, source=None):
    """Writes each plate's function to `folder`/ILLUMINATION_DIR as a float32 TIFF
    (channels as pages, named) and a PNG; returns the correction as a manifest
    records it: the functions replaced by their files (relative to `folder`). A
    correction as a manifest records it is read from its data set `source` first.
    Raises OSError where the folder cannot be written."""
    if not correction:
        return None
    if any("function" not in entry for entry in correction["plates"].values()):
        correction = load(correction, source)
    os.makedirs(os.path.join(folder, ILLUMINATION_DIR), exist_ok=True)
    recorded, taken = {}, set()
    for plate, entry in correction["plates"].items():
        stem = file_stem(plate, taken)
        taken.add(stem)
        relative = os.path.join(ILLUMINATION_DIR, stem + ".tif")
        tifffile.imwrite(os.path.join(folder, relative), np.moveaxis(entry["function"], -1, 0),
                         imagej=True, metadata={"axes": "CYX", "Labels": list(channels)})
        picture(entry, plate, channels, os.path.join(folder, ILLUMINATION_DIR, stem + ".png"))
        recorded[plate] = {"fields": entry["fields"], "file": relative}
    return {**{k: v for k, v in correction.items() if k != "plates"}, "plates": recorded}


def load(recorded, folder):
    """A correction as save() recorded it, its functions read back from `folder`.
    Raises InputError naming a function file that is missing or damaged."""
    if not recorded:
        return None
    plates = {}
    for plate, entry in recorded["plates"].items():
        path = os.path.join(folder, entry["file"])
        try:
            function = np.moveaxis(tifffile.imread(path), 0, -1).astype(np.float32)
        except Exception as error:  # tifffile raises many types for damaged files
            raise InputError(f"cannot read the illumination function of plate {plate}, "
                             f"{path}: {error}") from None
        plates[plate] = {"fields": entry["fields"], "function": function}
    return {**recorded, "plates": plates}


def picture(entry, plate, channels, path):
    """A PNG of one plate's function: each channel beside the next, on one colour scale."""
    function = entry["function"]
    figure, axes = plots.plt.subplots(1, len(channels), figsize=(3.2 * len(channels), 3),
                                      squeeze=False)
    low, high = float(function.min()), float(function.max())
    for axis, channel, plane in zip(axes[0], channels, np.moveaxis(function, -1, 0)):
        shown = axis.imshow(plane, vmin=low, vmax=high, cmap="magma")
        axis.set_title(f"{channel}: {plane.min():.2f} to {plane.max():.2f}", fontsize=9)
        axis.set_axis_off()
    figure.colorbar(shown, ax=axes[0, -1], shrink=0.8)
    figure.suptitle(f"plate {plate}: illumination function (mean 1) of {entry['fields']} fields",
                    fontsize=10)
    plots.save(figure, path, say=lambda _: None)


def describe(correction):
    """'' without correction, else what is done to the fields, in words."""
    if not correction:
        return ""
    return (f"fields are divided by their plate's illumination function (per plate and "
            f"channel: the mean of {sum(p['fields'] for p in correction['plates'].values())} "
            f"fields of {len(correction['plates'])} plate(s), Gaussian sigma "
            f"{correction['sigma']:.0f} px, mean 1)")
