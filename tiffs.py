"""A field's channels read from TIFFs, exactly as stored: one file per channel, or one
file per field with all channels inside (OME-TIFFs, whose OME-XML names the channels
as tifffile and Bio-Formats write them; ImageJ hyperstacks, named by their slice
labels; plain multi-page TIFFs, by page index). Every file is checked from its header
before any work, and all that cannot be used are listed at once.

Which page holds which channel is decided per file: by name where the file names its
channels, else by the page indices the user gives (--channel_pages); PagesError says
what a file holds when they do not match.
"""
from concurrent.futures import ThreadPoolExecutor
import os
import re

import numpy as np
import tifffile

from errors import InputError


class PagesError(ValueError):
    """A TIFF whose pages are not the channels asked for: the message says what it holds."""


def page_names(tiff):
    """The names a TIFF gives its channel pages: OME-XML's Channel Name attributes, or
    ImageJ's slice labels; None where it names none (or not all)."""
    names = None
    if tiff.is_ome:
        image = tifffile.xml2dict(tiff.ome_metadata)["OME"]["Image"]
        image = image[0] if isinstance(image, list) else image
        channels = image["Pixels"].get("Channel", [])
        names = [str(c.get("Name", "")) for c in (channels if isinstance(channels, list)
                                                   else [channels])]
    elif tiff.is_imagej:
        names = [str(label) for label in (tiff.imagej_metadata or {}).get("Labels", [])]
    return names if names and all(names) else None


def page_axis(series):
    """The index of the one axis of a TIFF series besides its rows and columns (channels,
    pages, samples), or None for a single plane. PagesError if it has several."""
    others = [i for i, (axis, size) in enumerate(zip(series.axes, series.shape))
              if axis not in "YX" and size > 1]
    if len(others) > 1:
        raise PagesError(f"holds axes {series.axes} of sizes {list(series.shape)}, more "
                         f"than channels of single planes")
    return others[0] if others else None


def channel_pages(path, channels, given=None):
    """[page index per channel of `channels`] in the TIFF at `path`, from its header:
    by name where it names its channels and `given` is empty, else `given`.
    PagesError naming what the file holds where they do not match."""
    with tifffile.TiffFile(path) as tiff:
        series = tiff.series[0]
        axis = page_axis(series)
        count = 1 if axis is None else series.shape[axis]
        names = page_names(tiff)
    holds = f"{count} page{'s' * (count > 1)}" + (f" named {names}" if names else
                                                  " without channel names")
    if given:
        if len(given) != len(channels) or max(given) >= count:
            raise PagesError(f"holds {holds}; --channel_pages={','.join(map(str, given))} "
                             f"must give one page below {count} for each of --channels="
                             f"{','.join(channels)}")
        return list(given)
    if names and set(channels) <= set(names):
        return [names.index(channel) for channel in channels]
    raise PagesError(f"holds {holds}, not the --channels {','.join(channels)}: name them "
                     f"as the file does, or give --channel_pages (a page index per channel)")


def read_pages(path):
    """All channel pages of the TIFF at `path`, as (pages, H, W), exactly as stored."""
    with tifffile.TiffFile(path) as tiff:
        series = tiff.series[0]
        axis = page_axis(series)
        pixels = series.asarray()
    height, width = (series.shape[series.axes.index(side)] for side in "YX")
    pages = pixels if axis is None else np.moveaxis(pixels, axis, 0)
    return pages.reshape(-1, height, width)


def file_problem(path, channels=None, given_pages=None):
    """(why `path` cannot be read as the TIFF wanted, from its header: 'does not exist',
    'cannot be read: ...', what its pages hold; None if it can, its page per channel).
    With `channels`, the file is one field's, all channels inside."""
    if not os.path.isfile(path):
        return "does not exist", None
    try:
        if channels:
            return None, channel_pages(path, channels, given_pages)
        with tifffile.TiffFile(path) as tiff:
            tiff.pages[0].shape
    except PagesError as error:
        return str(error), None
    except Exception as error:  # tifffile raises many types for damaged files
        return f"cannot be read: {error}", None
    return None, None


def check_files(fields, channels, image_table, channel_pages=None, shown=20):
    """`fields` (read_fields rows) with page_<channel>, the page of the channel in its
    file (-1: the file is the plane). Raises InputError listing every file that is
    missing, has no readable TIFF header, or (a table of one file per field, all
    channels inside) does not hold the channels: the first `shown` with their rows,
    and the count, so that one pass finds them all before anything is written or
    trained."""
    rows = list(zip(fields["table_row"], *(fields[f"path_{c}"] for c in channels)))
    one_file_per_field = any(len(set(paths)) < len(paths) for _, *paths in rows)
    files = {path: row for row, *paths in rows for path in paths}
    with ThreadPoolExecutor(8) as pool:  # file systems of clusters answer faster in parallel
        found = dict(zip(files, pool.map(lambda path: file_problem(
            path, channels if one_file_per_field else None, channel_pages), files)))
    problems = [f"row {row}: {path} {found[path][0]}" for path, row in files.items()
                if found[path][0]]
    if problems:
        first = f" (the first {shown})" if len(problems) > shown else ""
        windows = any(re.search(r"(^|/)[A-Za-z]:/", path) for path, (problem, _) in found.items()
                      if problem)
        hint = (". Paths with a drive letter (C:\\...) name files on a Windows computer: "
                "make the table's PathNames relative to --image_root" if windows else "")
        raise InputError(f"{image_table}: {len(problems)} of its {len(files)} files are "
                         f"missing or unreadable{first}: " + "; ".join(problems[:shown]) + hint)
    for index, channel in enumerate(channels):
        fields[f"page_{channel}"] = [found[path][1][index] if one_file_per_field else -1
                                     for path in fields[f"path_{channel}"]]
    return fields


def field_planes(row, channels):
    """[(file, page)] of each channel of a field (a row of check_files); page -1: the
    file is the plane."""
    return [(row[f"path_{channel}"], int(row[f"page_{channel}"])) for channel in channels]


def read_plane(path, page, row, pages_read):
    """One channel of a field: the plane at `path`, or its page `page` (pages_read keeps
    the pages of files read already, so that a field's file is read once)."""
    try:
        if page < 0:
            return tifffile.imread(path)
        if path not in pages_read:
            pages_read[path] = read_pages(path)
        return pages_read[path][page]
    except FileNotFoundError:
        raise InputError(f"image table row {row}: {path} does not exist") from None
    except Exception as error:  # tifffile raises many types for damaged files
        raise InputError(f"image table row {row}: cannot read {path}: {error}") from None


def read_field(planes, row, binning=1, shape=None):
    """The channels of one field (field_planes) stacked as (H, W, C): exactly as
    stored, or for binning > 1 the mean of each binning x binning block (bin_field).
    With `shape`, a field of another (binned) height and width is refused."""
    stacked, pages_read = [], {}
    for path, page in planes:
        plane = read_plane(path, page, row, pages_read)
        if plane.ndim != 2 or min(plane.shape) == 0:
            raise InputError(f"image table row {row}: {path} is not a greyscale plane of at "
                             f"least one pixel (shape {plane.shape}); a file of all the "
                             f"field's channels is named in every channel's column")
        if stacked and plane.shape != stacked[0].shape:
            raise InputError(f"image table row {row}: {path} is {plane.shape[0]} x "
                             f"{plane.shape[1]}, but {planes[0][0]} is {stacked[0].shape[0]} x "
                             f"{stacked[0].shape[1]}")
        stacked.append(plane)
    field = bin_field(np.stack(stacked, axis=-1), binning)
    if shape is not None and field.shape[:2] != tuple(shape[:2]):
        binned = f" (binned {binning} x {binning})" if binning > 1 else ""
        raise InputError(f"image table row {row}: {planes[0][0]} makes a {field.shape[0]} x "
                         f"{field.shape[1]} field{binned}, not {shape[0]} x {shape[1]} as the "
                         f"others: a data set, and the fields a model predicts, are of one "
                         f"size; convert (or predict) each size separately")
    return field


def bin_field(image, binning):
    """The mean of each binning x binning block of `image` (H, W, C), in float64, so
    exact for 8- and 16-bit pixels; the last rows and columns, if they fill no
    whole block, are dropped (as ImageJ's Bin does). binning=1: `image` as it is."""
    if binning == 1:
        return image
    height, width = (side // binning for side in image.shape[:2])
    blocks = image[:height * binning, :width * binning].reshape(
        height, binning, width, binning, image.shape[2])
    return blocks.mean(axis=(1, 3), dtype=np.float64)
