"""node_projection.py: the time to accuracy over nodes, at the batch study's B_noise."""
import json

import pytest
from absl import flags
from absl.testing import flagsaver

import errors
import node_projection

FLAGS = flags.FLAGS


@pytest.fixture(autouse=True)
def parsed_flags():
    """Flags parsed for each test (a module that ran before may have unparsed them), and
    left as they were."""
    was_parsed = FLAGS.is_parsed()
    with flagsaver.flagsaver():
        FLAGS(["test"])
        yield
    if not was_parsed:
        FLAGS.unparse_flags()

# What benchmark.scaling_sweep measures on 2 cores (rounded from docs/performance.md).
FIGURES = {"one_rank_images_per_sec": 0.83, "scaling_efficiency_2ranks": 1.0,
           "gradient_mb": 162.0, "allreduce_hidden_fraction_2ranks": 0.0}


def test_the_projection_is_at_the_batch_studys_fitted_noise_scale(tmp_path):
    fit = tmp_path / "fit.json"
    fit.write_text(json.dumps({"sgd": {"fitted_noise_scale": 18.4},
                               "lars": {"fitted_noise_scale": 1234.5}}))
    scales = node_projection.noise_scales(["curve"], str(fit))
    assert scales == {"sgd_curve": 18.0, "lars_curve": 1200.0}
    projection = node_projection.projected_time_to_accuracy(FIGURES, 2, scales)
    assert projection["B_noise_sgd_curve"] == 18.0
    sgd, lars = ([projection[f"projected_hours_{n}_nodes_noise{label}_curve"]
                  for n in node_projection.NODE_COUNTS] for label in ("sgd", "lars"))
    # Both rows are held to the authors' 52 epochs at a global batch of 256 (8 nodes) ...
    assert sgd[3] == pytest.approx(lars[3])
    # ... and past it the smaller noise scale needs more epochs, so more nodes pay less.
    assert sgd[8] > lars[8]
    # (at 18, doubling past 4 nodes saves under a tenth; at 1,200, not by 256 nodes)
    assert projection["nodes_past_which_doubling_saves_under_10pct_noisesgd_curve"] == 4
    assert projection["nodes_past_which_doubling_saves_under_10pct_noiselars_curve"] is None


def test_noise_scales_given_as_numbers_need_no_fit_and_go_beside_the_curves(tmp_path):
    assert node_projection.noise_scales(["72", "8192.0"], "/nonexistent") == {
        "72": 72.0, "8192": 8192.0}
    fit = tmp_path / "fit.json"
    fit.write_text(json.dumps({"sgd": {"fitted_noise_scale": 1.847}}))
    assert node_projection.noise_scales(["curve", "1024"], str(fit)) == {
        "sgd_curve": 1.8, "1024": 1024.0}


def test_noise_scales_that_are_not_numbers_are_refused():
    with pytest.raises(flags.IllegalFlagValueError, match="give positive numbers or 'curve'"):
        FLAGS.noise_scales = ["72", "big"]
    with pytest.raises(flags.IllegalFlagValueError):
        FLAGS.noise_scales = ["0"]


def test_a_missing_or_empty_fit_is_one_line_naming_the_flag(tmp_path):
    with pytest.raises(errors.InputError, match="--batch_study_fit: cannot read .*none.json"):
        node_projection.noise_scales(["curve"], str(tmp_path / "none.json"))
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(errors.InputError, match="holds no fit"):
        node_projection.noise_scales(["curve"], str(tmp_path / "empty.json"))


def test_the_projects_own_fit_is_readable_by_default():
    labels = node_projection.noise_scales()
    assert "sgd_curve" in labels and all(value > 0 for value in labels.values())
