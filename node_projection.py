"""Time to accuracy projected over nodes: how many nodes pay, from this machine's
speed and allreduce (benchmark.py --parts=scaling) and the gradient noise scale
B_noise of the batch study's measured curve of steps to a target against the global
batch (docs/batch_study.md, fitted by studies.py), or of --noise_scales.

Past B_noise a larger global batch needs more epochs to the same accuracy: E = E_min
(1 + B / B_noise) (McCandlish et al. 2018, An Empirical Model of Large-Batch
Training, eq. 2.11, in epochs), so more nodes stop paying somewhere past it.
"""
import json
import os

from absl import flags

import errors

HERE = os.path.dirname(os.path.abspath(__file__))

CURVE = "curve"
BATCH_STUDY_FIT = os.path.join(HERE, "docs", "batch_study_fit.json")  # the project's own
flags.DEFINE_list("noise_scales", [CURVE], "Gradient noise scales B_noise to project the time "
                  f"to accuracy at, one projection each; '{CURVE}': the B_noise fitted to the "
                  "batch study's steps to target, per optimizer (--batch_study_fit).")
flags.DEFINE_string("batch_study_fit", BATCH_STUDY_FIT,
                    "The batch study's fit of steps to target against global batch "
                    f"(studies.py writes it), read for --noise_scales={CURVE}.")


def _positive_numbers_or_curve(values):
    try:
        return all(value == CURVE or float(value) > 0 for value in values)
    except ValueError:
        return False


flags.register_validator("noise_scales", _positive_numbers_or_curve,
                         f"--noise_scales: give positive numbers or '{CURVE}'")

# The cluster and job projected, the authors' (docs/performance.md): two-socket nodes of
# 2 x 20 cores, 4 ranks of 10 cores each, 100 Gb/s links; BBBC021's ~9,900 training
# fields at 8 images per rank; 52 epochs reach the target at the global batch of 256 of
# the authors' recipe.
NODE_CORES, RANKS_PER_NODE, LINK_GBPS = 40, 4, 100
TRAIN_IMAGES, PER_RANK_BATCH, EPOCHS, AT_BATCH = 9900, 8, 52, 256
NODE_COUNTS = tuple(2 ** k for k in range(9))  # 1 to 256


def noise_scales(given=(CURVE,), fit_path=BATCH_STUDY_FIT):
    """{label: B_noise} to project at, from `given` (--noise_scales): a number as given
    ("72"), and for 'curve' the fitted B_noise of each optimizer in `fit_path`
    (--batch_study_fit), to two significant figures ("sgd_curve"). Raises
    errors.InputError if that file is missing or holds no fit."""
    scales = {f"{float(value):g}": float(value) for value in given if value != CURVE}
    if CURVE in given:
        scales.update({f"{optimizer}_{CURVE}": float(f"{fit['fitted_noise_scale']:.2g}")
                       for optimizer, fit in batch_study_fits(fit_path).items()})
    return scales


def batch_study_fits(path):
    """{optimizer: fit} of the batch study's fit at `path` (studies.py's
    batch_study_fit.json)."""
    try:
        with open(path) as f:
            fits = json.load(f)
    except (OSError, ValueError) as error:
        raise errors.InputError(f"--batch_study_fit: cannot read {path} "
                                f"({error}); give --noise_scales as numbers instead") from None
    if not fits:
        raise errors.InputError(f"--batch_study_fit: {path} holds no fit "
                                "(fewer than two batches reached the target); give "
                                "--noise_scales as numbers instead")
    return fits


def epochs_to_target(global_batch, noise_scale):
    """Epochs to the target at `global_batch`: E = E_min (1 + B / B_noise), with E_min
    such that AT_BATCH takes EPOCHS."""
    smallest = EPOCHS / (1 + AT_BATCH / noise_scale)
    return smallest * (1 + global_batch / noise_scale)


def projected_hours(figures, nodes, noise_scale, cores):
    """Time to the target accuracy on `nodes` nodes, from the compute and allreduce
    measured here on `cores` cores (benchmark.scaling_sweep's figures) and the epochs
    the global batch needs.

    Assumes a core there trains as fast as a core here, ranks within a node scale
    as 1 against `cores` ranks did here, the gradient allreduce is a ring over all
    ranks limited by one link, hidden behind compute by the fraction measured here,
    and the epochs grow with the global batch as epochs_to_target says."""
    per_core = figures["one_rank_images_per_sec"] / cores
    rank_rate = per_core * NODE_CORES / RANKS_PER_NODE * figures[f"scaling_efficiency_{cores}ranks"]
    ranks = nodes * RANKS_PER_NODE
    allreduce = (2 * (ranks - 1) / ranks * figures["gradient_mb"] * 2 ** 20 * 8
                 / (LINK_GBPS * 1e9)) if nodes > 1 else 0.0
    exposed = allreduce * (1 - figures[f"allreduce_hidden_fraction_{cores}ranks"])
    global_batch = ranks * PER_RANK_BATCH
    steps = epochs_to_target(global_batch, noise_scale) * TRAIN_IMAGES / global_batch
    return steps * (PER_RANK_BATCH / rank_rate + exposed) / 3600


def projected_time_to_accuracy(figures, cores, scales):
    """For each B_noise of `scales` ({label: B_noise}, noise_scales()), labelled B:
    projected_hours_N_nodes_noiseB for N in NODE_COUNTS, B_noise_B (its value), and the
    node count past which doubling the nodes saves less than a tenth of the time."""
    projection = {}
    for label, noise_scale in scales.items():
        hours = {n: projected_hours(figures, n, noise_scale, cores) for n in NODE_COUNTS}
        enough = next((n for n in NODE_COUNTS[:-1] if hours[2 * n] > 0.9 * hours[n]), None)
        projection.update({f"projected_hours_{n}_nodes_noise{label}": h
                           for n, h in hours.items()})
        projection[f"B_noise_{label}"] = noise_scale
        projection[f"nodes_past_which_doubling_saves_under_10pct_noise{label}"] = enough
    return projection
