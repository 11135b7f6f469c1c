"""An embedded synthetic high-content screen, written in the training format.

Three channels that look like a Cell Painting-style MCF-7 screen: nuclei (DNA),
microtubules (tubulin) and actin. Each class is a mechanism of action with its
own phenotype (nucleus size and count, micronuclei, cell shape, microtubule
texture, actin pattern); every cell varies around it, and every field has its own
cell density, illumination, intensity scale and camera noise, so the classes
overlap and must be learned, not read off one pixel.

    python synthetic_data.py --output_dir data/synthetic --height 1024 --width 1280

Deterministic by seed: image i of a split depends only on (seed, split, i).
"""
import concurrent.futures
import multiprocessing
import os

import numpy as np

CHANNELS = ("DNA", "tubulin", "actin")
VERSION = 1
REFERENCE_AREA = 1024 * 1280  # phenotype sizes below are in pixels of a full field

# Mean phenotype per class; cells vary around these. radius and nucleus in pixels,
# fibres/aster/cortex/puncta/stress are 0..1 strengths, fragments micronuclei per cell.
PHENOTYPES = {
    "DMSO": dict(cells=36, radius=44, nucleus=15, elongation=1.5, fragments=0.0,
                 fibres=0.7, aster=0.0, cortex=0.6, puncta=0.0, stress=0.3),
    "DNA damage": dict(cells=24, radius=52, nucleus=21, elongation=1.4, fragments=0.3,
                       fibres=0.7, aster=0.0, cortex=0.6, puncta=0.0, stress=0.3),
    "Microtubule destabilizers": dict(cells=34, radius=34, nucleus=14, elongation=1.1,
                                      fragments=3.0, fibres=0.0, aster=0.0, cortex=0.7,
                                      puncta=0.0, stress=0.2),
    "Microtubule stabilizers": dict(cells=32, radius=38, nucleus=13, elongation=1.2,
                                    fragments=1.5, fibres=1.0, aster=0.6, cortex=0.5,
                                    puncta=0.0, stress=0.2),
    "Actin disruptors": dict(cells=36, radius=40, nucleus=15, elongation=1.3, fragments=0.0,
                             fibres=0.6, aster=0.0, cortex=0.1, puncta=1.0, stress=0.0),
    "Eg5 inhibitors": dict(cells=34, radius=28, nucleus=12, elongation=1.0, fragments=0.0,
                           fibres=0.1, aster=1.0, cortex=0.6, puncta=0.0, stress=0.1),
}
CLASSES = tuple(PHENOTYPES)
COMPOUNDS_PER_CLASS = 2
CONCENTRATIONS = ("0.3", "1.0", "3.0")
SPLIT_IDS = {"train": 1, "eval": 2}  # part of each image's random seed


def render_field(height, width, phenotype, rng):
    """One field of view as float32 (height, width, 3) in about [0, 1]."""
    scale = np.sqrt(height * width / REFERENCE_AREA)
    p = {k: v * scale if k in ("radius", "nucleus") else v for k, v in phenotype.items()}
    field = np.zeros((height, width, 3), np.float32)
    for _ in range(rng.poisson(p["cells"] * rng.uniform(0.7, 1.3))):
        draw_cell(field, rng.uniform(0, height), rng.uniform(0, width), p, rng)

    # Uneven illumination, per-channel exposure, background and camera noise.
    yy, xx = np.meshgrid(np.linspace(-1, 1, height, dtype=np.float32),
                         np.linspace(-1, 1, width, dtype=np.float32), indexing="ij")
    tilt = rng.uniform(-0.15, 0.15, size=2)
    illumination = 1.0 - 0.25 * (yy ** 2 + xx ** 2) / 2 + tilt[0] * yy + tilt[1] * xx
    exposure = rng.uniform(0.75, 1.25, size=3).astype(np.float32)
    field = field * illumination[..., None] * exposure + rng.uniform(0.02, 0.06, size=3)
    field += rng.normal(0.0, 0.025, size=field.shape).astype(np.float32)
    return field


def draw_cell(field, cy, cx, p, rng):
    """Adds one cell (nucleus, micronuclei, microtubules, actin) centred at (cy, cx)."""
    height, width, _ = field.shape
    radius = p["radius"] * rng.uniform(0.8, 1.25)
    half = int(np.ceil(radius * 1.3)) + 2
    y0, y1 = max(int(cy) - half, 0), min(int(cy) + half, height)
    x0, x1 = max(int(cx) - half, 0), min(int(cx) + half, width)
    if y1 <= y0 or x1 <= x0:
        return
    dy, dx = np.meshgrid(np.arange(y0, y1, dtype=np.float32) - cy,
                         np.arange(x0, x1, dtype=np.float32) - cx, indexing="ij")
    angle = rng.uniform(0, np.pi)
    elongation = p["elongation"] * rng.uniform(0.85, 1.15)
    u = dy * np.cos(angle) + dx * np.sin(angle)
    v = -dy * np.sin(angle) + dx * np.cos(angle)
    cell_r = np.sqrt((u / np.sqrt(elongation)) ** 2 + (v * np.sqrt(elongation)) ** 2)
    theta = np.arctan2(v, u)
    cytoplasm = sigmoid((radius - cell_r) / (0.08 * radius))

    nucleus_r = p["nucleus"] * rng.uniform(0.8, 1.2)
    nucleus_d = np.sqrt((u / 1.15) ** 2 + (v * 1.15) ** 2)
    dna = rng.uniform(0.6, 1.0) * sigmoid((nucleus_r - nucleus_d) / (0.12 * nucleus_r))
    dna *= 0.85 + 0.15 * np.cos(dy * 0.9 / max(p["nucleus"] / 15, 0.2) + rng.uniform(0, 6))
    for _ in range(rng.poisson(p["fragments"])):
        fr = nucleus_r * rng.uniform(0.2, 0.4)
        fa, fd = rng.uniform(0, 2 * np.pi), nucleus_r * rng.uniform(1.2, 2.2)
        d2 = (dy - fd * np.sin(fa)) ** 2 + (dx - fd * np.cos(fa)) ** 2
        dna = np.maximum(dna, rng.uniform(0.7, 1.0) * np.exp(-d2 / (2 * fr ** 2)))

    # Microtubules: fibres radiating from the nucleus, a perinuclear aster, diffuse rest.
    spokes = rng.integers(10, 22)
    fibres = np.cos(spokes * theta + 3.0 * np.sin(cell_r / radius * 4 + rng.uniform(0, 6))) ** 8
    aster = np.exp(-((cell_r - 1.5 * nucleus_r) ** 2) / (2 * (0.35 * nucleus_r) ** 2))
    tubulin = cytoplasm * (0.25 + 0.6 * p["fibres"] * rng.uniform(0.7, 1.3) * fibres
                           + 0.9 * p["aster"] * aster)

    # Actin: cortical ring, stress fibres across the cell, or puncta when disrupted.
    cortex = np.exp(-((cell_r - 0.92 * radius) ** 2) / (2 * (0.06 * radius) ** 2))
    stress_angle = rng.uniform(0, np.pi)
    stress = np.cos((dy * np.cos(stress_angle) + dx * np.sin(stress_angle))
                    * (2 * np.pi / max(radius / 6, 1.5))) ** 6
    actin = cytoplasm * (0.15 + p["stress"] * 0.5 * stress) + p["cortex"] * cortex * cytoplasm
    for _ in range(rng.poisson(12 * p["puncta"])):
        pr, pa = radius * rng.uniform(0.1, 0.85), rng.uniform(0, 2 * np.pi)
        d2 = (u - pr * np.sin(pa)) ** 2 + (v - pr * np.cos(pa)) ** 2
        actin = actin + 0.9 * np.exp(-d2 / (2 * max(0.05 * radius, 0.7) ** 2))

    window = field[y0:y1, x0:x1]
    window[..., 0] = np.maximum(window[..., 0], dna)
    window[..., 1] += tubulin * (1 - 0.7 * dna)
    window[..., 2] += actin * (1 - 0.5 * dna)


def sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def field_of_view(height, width, num_classes, seed, split, index):
    """(uint8 image, label, provenance) of image `index` of `split`: deterministic."""
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    label = index % num_classes
    name = CLASSES[label]
    image = render_field(height, width, PHENOTYPES[name], rng)
    compound = f"{name.lower().replace(' ', '-')}-{int(rng.integers(COMPOUNDS_PER_CLASS)) + 1}"
    provenance = {
        "compound": compound,
        "concentration": CONCENTRATIONS[int(rng.integers(len(CONCENTRATIONS)))],
        "plate": f"Synthetic_{SPLIT_IDS[split]}{index // 60:03d}",
        "well": f"{'BCDEFG'[index % 60 // 10]}{index % 10 + 2:02d}",
    }
    return np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8), label, provenance


def synthetic_dir_name(height, width, num_classes, train_images, eval_images, seed):
    return (f"synthetic-v{VERSION}_{height}x{width}_{num_classes}cls_"
            f"{train_images}+{eval_images}_seed{seed}")


def generate(output_dir, height, width, num_classes=len(CLASSES), train_images=256,
             eval_images=64, seed=0, images_per_shard=8, workers=None):
    """Writes the synthetic set to `output_dir` (atomically) using `workers` processes."""
    # Imported here so the worker processes, which only render, need no TensorFlow.
    import data_pipeline
    import mcnn_model

    mcnn_model.check_image_shape((height, width, len(CHANNELS)))
    if not 2 <= num_classes <= len(CLASSES):
        raise ValueError(f"the synthetic set has 2 to {len(CLASSES)} classes, got {num_classes}")
    workers = workers or len(os.sched_getaffinity(0))
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        def split_examples(split, count):
            return pool.map(field_of_view, *zip(*[
                (height, width, num_classes, seed, split, i) for i in range(count)]),
                chunksize=4)

        return data_pipeline.write_dataset(
            output_dir,
            {"train": split_examples("train", train_images),
             "eval": split_examples("eval", eval_images)},
            classes=CLASSES[:num_classes], image_shape=(height, width, len(CHANNELS)),
            images_per_shard=images_per_shard,
            extra_manifest={"channels": list(CHANNELS),
                            "source": f"synthetic_data.py v{VERSION}, seed {seed}"})


def ensure_synthetic_dataset(cache_dir, height, width, num_classes, train_images, eval_images,
                             seed=0, images_per_shard=8):
    """Path of the cached synthetic set, generating it first if absent.

    Safe when many ranks call it at once: one generates under a file lock, the
    others wait for the lock and then find the finished set.
    """
    import data_pipeline

    path = os.path.join(cache_dir, synthetic_dir_name(
        height, width, num_classes, train_images, eval_images, seed))
    with data_pipeline.exclusive_lock(path + ".lock"):
        if not os.path.isdir(path):
            print(f"Generating the synthetic data set in {path}", flush=True)
            generate(path, height, width, num_classes, train_images, eval_images, seed,
                     images_per_shard)
    return path


def main(_):
    manifest = generate(FLAGS.output_dir, FLAGS.height, FLAGS.width, FLAGS.classes,
                        FLAGS.train_images, FLAGS.eval_images, FLAGS.seed, FLAGS.images_per_shard)
    print(f"{FLAGS.output_dir}: {manifest['splits']['train']['count']} train, "
          f"{manifest['splits']['eval']['count']} eval images of {manifest['image_shape']}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("output_dir", None, "Folder to create (must not exist).", required=True)
    flags.DEFINE_integer("height", 1024, "Image height (a multiple of 128).")
    flags.DEFINE_integer("width", 1280, "Image width (a multiple of 128).")
    flags.DEFINE_integer("classes", len(CLASSES), f"Number of classes, 2..{len(CLASSES)}.")
    flags.DEFINE_integer("train_images", 256, "Images in the train split.")
    flags.DEFINE_integer("eval_images", 64, "Images in the eval split.")
    flags.DEFINE_integer("images_per_shard", 8, "Images per TFRecord shard.")
    flags.DEFINE_integer("seed", 0, "Random seed; same seed, same images.")
    FLAGS = flags.FLAGS
    app.run(main)
