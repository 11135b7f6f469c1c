"""Small data sets for tests, written as the converter writes them (data_pipeline's
shards, split entries and manifest), from examples made in the test."""
import itertools
import os

import data_pipeline


def write_dataset(output_dir, splits, classes, image_shape, images_per_shard, dtype="uint8"):
    """Writes `splits` ({name: iterable of (image, label, provenance)}) to `output_dir`
    as shards of `images_per_shard` and a manifest; returns the manifest."""
    staging = f"{output_dir}.partial"
    os.makedirs(staging)
    entries = {}
    for split, examples in splits.items():
        files, labels, counts, examples = [], [], [], iter(examples)
        while chunk := list(itertools.islice(examples, images_per_shard)):
            files.append(f"{split}-{len(files):05d}.tfrecord")
            data_pipeline.write_shard(os.path.join(staging, files[-1]), chunk)
            labels += [label for _, label, _ in chunk]
            counts.append(len(chunk))
        entries[split] = data_pipeline.split_entry(files, labels, len(classes), counts)
    manifest = data_pipeline.new_manifest({"classes": classes, "image_shape": image_shape},
                                          dtype, entries)
    data_pipeline.finish_dataset(staging, str(output_dir), manifest)
    return manifest
