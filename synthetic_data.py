"""An embedded synthetic high-content screen, in the layout of the real BBBC021 set.

Three channels that look like an MCF-7 screen: nuclei (DNA), microtubules
(tubulin) and actin. Each class is a mechanism of action (MoA) with its own
phenotype (nucleus size and count, micronuclei, cell shape, microtubule texture,
actin pattern); each compound of an MoA shows it in its own way, more at a higher
concentration; every cell varies, and every field has its own cell density,
illumination, exposure and camera noise, so the classes must be learned. With
batches (weeks, as BBBC021's), each compound is imaged in one batch of its own plates,
the control on every plate, and every batch after the first scales its plates'
intensity per channel and tilts their illumination: a batch effect, for NSCB and
for normalisation against the control to remove (docs/profiles.md).

The screen is written as real screens come: one folder per plate of 16-bit
single-channel TIFFs, BBBC021_v1_image.csv and BBBC021_v1_moa.csv. Training data
is made from it by prepare_data.py, the path users' own plates take.

    python synthetic_data.py --output_dir data/screen --height 1024 --width 1280

Deterministic by seed.
"""
import concurrent.futures
import multiprocessing
import os

import numpy as np
import pandas as pd
import tifffile

from plates import BBBC021_CHANNELS, DEFAULT_COLUMNS, ConversionOptions
import splits

CHANNELS = ("DNA", "tubulin", "actin")
VERSION = 3  # 3: converted with channel statistics in the manifest
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
CONTROL = "DMSO"
CONCENTRATIONS = ("1.0", "3.0")
PLATES = 3  # plates a screen's fields are spread over, by default
IMAGE_TABLE, MOA_TABLE, IMAGES = "BBBC021_v1_image.csv", "BBBC021_v1_moa.csv", "images"


def render_field(height, width, phenotype, rng, even_illumination=False):
    """One field of view as float32 (height, width, 3) in about [0, 1]; lit as through
    a microscope (brighter in the middle, tilted), or evenly."""
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
    if even_illumination:
        illumination = np.ones_like(illumination)
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


def plan_screen(num_classes, compounds_per_class, fields_per_treatment, plates, seed,
                batches=1):
    """One row per field: plate, well, site, compound, concentration, moa, phenotype.

    Every MoA but the control has `compounds_per_class` compounds at each of
    CONCENTRATIONS; each compound perturbs its MoA's phenotype in its own way and a
    lower concentration shows less of it, so a model must generalise to compounds it
    has not seen. The control (DMSO) has as many fields as an MoA, in each batch.
    With `batches` > 1, compound k of each MoA is imaged in batch (k - 1) % batches + 1,
    on `plates` plates of that batch's own (WeekB_SynthNN), and the control on all.
    """
    if not 2 <= num_classes <= len(CLASSES):
        raise ValueError(f"the synthetic screen has 2 to {len(CLASSES)} classes, got {num_classes}")
    rng = np.random.default_rng([seed, 0])
    treatments = []
    for moa in CLASSES[1:num_classes]:
        for k in range(1, compounds_per_class + 1):
            compound = f"{moa.lower().replace(' ', '-')}-{k}"
            quirk = rng.uniform(0.85, 1.15, size=len(PHENOTYPES[moa]))
            for strength, concentration in zip((0.75, 1.0), CONCENTRATIONS):
                treatments.append((compound, concentration, moa, strength, quirk,
                                   (k - 1) % batches + 1))
    for batch in range(1, batches + 1):
        for _ in range(compounds_per_class * len(CONCENTRATIONS)):
            treatments.append((CONTROL, "0", CONTROL, 0.0, np.ones(len(PHENOTYPES[CONTROL])),
                               batch))
    rows = []
    for t, (compound, concentration, moa, strength, quirk, batch) in enumerate(treatments):
        well = f"{'BCDEFG'[t // 10 % 6]}{t % 10 + 2:02d}"
        for site in range(fields_per_treatment):
            rows.append({"plate": f"Week{batch}_Synth{site % plates + 1:02d}", "well": well,
                         "site": site + 1, "compound": compound, "concentration": concentration,
                         "moa": moa, "phenotype": treated_phenotype(moa, strength, quirk)})
    return rows


def split_counts(num_classes, compounds_per_class, fields_per_treatment, seed=0, batches=1):
    """(train, eval) fields of the screen as conversion_options splits it, known before
    the screen exists: the split needs only the plan."""
    options = conversion_options(compounds_per_class, seed)
    fields = pd.DataFrame(plan_screen(num_classes, compounds_per_class, fields_per_treatment,
                                      PLATES, seed, batches))
    split = splits.assign_split(fields, options.split, options.eval_fraction, seed)
    return int((split == "train").sum()), int((split == "eval").sum())


def treated_phenotype(moa, strength, quirk):
    """The control's phenotype moved `strength` of the way to `moa`'s, with a compound's quirk."""
    control, target = PHENOTYPES[CONTROL], PHENOTYPES[moa]
    return {name: (control[name] + strength * (target[name] - control[name])) * q
            for q, name in zip(quirk, control)}


def write_field(root, height, width, field, seed, index, even_illumination=False):
    """Renders one field and writes its three 16-bit TIFFs; returns their file names."""
    rng = np.random.default_rng([seed, 1, index])
    image = render_field(height, width, field["phenotype"], rng, even_illumination)
    plate_gain = 0.8 + 0.1 * (int(field["plate"][-2:]) % 5)  # plates differ in brightness
    batch = int(field["plate"][4:field["plate"].index("_")])
    if batch > 1:
        image = image * batch_effect(batch, seed, height, width)
    pixels = np.clip(300 + image * 12000 * plate_gain, 0, 65535).astype(np.uint16)
    names = []
    for c, channel in enumerate(CHANNELS):
        name = f"{field['plate']}_{field['well']}_s{field['site']}_w{c + 1}.tif"
        tifffile.imwrite(os.path.join(root, field["plate"], name), pixels[..., c])
        names.append(name)
    return names


def batch_effect(batch, seed, height, width):
    """(height, width, 3) float32: the factor batch `batch` (2, 3, ...) multiplies its
    fields by, drawn once per batch from `seed`: each channel 1.35-1.8 times as bright or
    0.55-0.74 times (a week's staining and exposure), and an illumination tilted by up
    to 40% across the field (another lamp alignment)."""
    rng = np.random.default_rng([seed, 2, batch])
    gain = np.exp(rng.choice([-1, 1], size=3) * rng.uniform(0.3, 0.6, size=3))
    tilt = rng.uniform(-0.4, 0.4, size=2)
    yy, xx = np.meshgrid(np.linspace(-1, 1, height, dtype=np.float32),
                         np.linspace(-1, 1, width, dtype=np.float32), indexing="ij")
    return (1.0 + tilt[0] * yy + tilt[1] * xx)[..., None] * gain.astype(np.float32)


def write_screen(output_dir, height, width, num_classes=len(CLASSES), compounds_per_class=3,
                 fields_per_treatment=4, plates=PLATES, seed=0, workers=None,
                 even_illumination=False, batches=1):
    """Writes a screen in the BBBC021 layout: one folder per plate of single-channel
    16-bit TIFFs, plus BBBC021_v1_image.csv and BBBC021_v1_moa.csv. Atomically.
    even_illumination: every field lit evenly (no vignetting, no tilt); batches: weeks
    of their own plates and batch effect (plan_screen, batch_effect)."""
    fields = plan_screen(num_classes, compounds_per_class, fields_per_treatment, plates, seed,
                         batches)
    staging = f"{output_dir}.partial-{os.getpid()}"
    for plate in sorted({f["plate"] for f in fields}):
        os.makedirs(os.path.join(staging, IMAGES, plate), exist_ok=True)
    workers = workers or len(os.sched_getaffinity(0))
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        names = list(pool.map(write_field, *zip(*[
            (os.path.join(staging, IMAGES), height, width, f, seed, i, even_illumination)
            for i, f in enumerate(fields)]), chunksize=4))
    column = DEFAULT_COLUMNS  # BBBC021's own, CHANNELS named as its tables name them
    pd.DataFrame([{
        "TableNumber": 1, "ImageNumber": i + 1,
        **{name: value for c, channel in enumerate(BBBC021_CHANNELS) for name, value in (
            (column["filename"].format(channel), files[c]),
            (column["pathname"].format(channel), f["plate"]))},
        column["plate"]: f["plate"], column["well"]: f["well"], "Replicate": f["site"],
        column["compound"]: f["compound"], column["concentration"]: f["concentration"],
    } for i, (f, files) in enumerate(zip(fields, names))]).to_csv(
        os.path.join(staging, IMAGE_TABLE), index=False)
    pd.DataFrame(sorted({(f["compound"], f["concentration"], f["moa"]) for f in fields}),
                 columns=["compound", "concentration", "moa"]).to_csv(
        os.path.join(staging, MOA_TABLE), index=False)
    os.rename(staging, output_dir)


def screen_tables(screen):
    """(image table, MoA table, image root) of the screen written to `screen`."""
    return (os.path.join(screen, IMAGE_TABLE), os.path.join(screen, MOA_TABLE),
            os.path.join(screen, IMAGES))


def conversion_options(compounds_per_class, seed=0):
    """The ConversionOptions that make a screen's data set: split by compound (one held
    out per MoA), the DMSO control kept as a class."""
    return ConversionOptions(split="compound", eval_fraction=1 / max(compounds_per_class, 2),
                             include_control=True, control=CONTROL, seed=seed)


def main(_):
    write_screen(FLAGS.output_dir, FLAGS.height, FLAGS.width, FLAGS.classes,
                 FLAGS.compounds_per_class, FLAGS.fields_per_treatment, FLAGS.plates, FLAGS.seed,
                 batches=FLAGS.batches)
    print(f"{FLAGS.output_dir}: {IMAGE_TABLE}, {MOA_TABLE} and {IMAGES}/; convert with\n"
          f"  python prepare_data.py --image_table={FLAGS.output_dir}/{IMAGE_TABLE} "
          f"--moa_table={FLAGS.output_dir}/{MOA_TABLE} --image_root={FLAGS.output_dir}/{IMAGES} "
          f"--include_dmso --output_dir=DIR")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("output_dir", None, "Folder to create (must not exist).", required=True)
    flags.DEFINE_integer("height", 1024, "Image height (a multiple of 128 to train on).")
    flags.DEFINE_integer("width", 1280, "Image width (a multiple of 128 to train on).")
    flags.DEFINE_integer("classes", len(CLASSES), f"MoA classes with the control, 2..{len(CLASSES)}.")
    flags.DEFINE_integer("compounds_per_class", 3, "Compounds per MoA.")
    flags.DEFINE_integer("fields_per_treatment", 4, "Fields of view per compound and concentration.")
    flags.DEFINE_integer("plates", 3, "Plates the fields are spread over (in each batch).")
    flags.DEFINE_integer("batches", 1, "Batches (weeks) the compounds are imaged in, each "
                         "with its own plates and batch effect; the control in every one.",
                         lower_bound=1)
    flags.DEFINE_integer("seed", 0, "Random seed; same seed, same screen.")
    FLAGS = flags.FLAGS
    app.run(main)
