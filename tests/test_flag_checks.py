"""train_mcnn.py's bad flags, each refused in words by the check that meets it first,
before any work: checked in this process, the flags parsed as the program parses them.
Two runs of the program itself check that it says such an error in one line."""
import pytest
from absl import app, flags
from absl.testing import flagsaver

import checkpoints
import data_pipeline
import errors
import run_plan
import train_mcnn  # noqa: F401  (its flags, and those of the modules it reads them with)
import training_data
from conftest import PYTHON, ROOT, fails

FLAGS = flags.FLAGS
TRAIN = [PYTHON, f"{ROOT}/train_mcnn.py"]


@pytest.fixture
def parse():
    """parse(*flags): train_mcnn.py's command line, parsed for one test and undone after."""
    was_parsed = FLAGS.is_parsed()
    with flagsaver.flagsaver():
        yield lambda *given: FLAGS(["train_mcnn.py", *given])
    if not was_parsed:
        FLAGS.unparse_flags()


@pytest.mark.parametrize("given, message", [
    (["--no_such_flag"], "Unknown command line flag 'no_such_flag'"),
    (["--image_height=0"], "--image_height=0: 0 is not a positive integer"),
    (["--per_rank_batch=0"], "--per_rank_batch=0: must be at least 1, got 0"),
])
def test_a_flag_that_cannot_be_read_is_refused_as_it_is_parsed(parse, given, message):
    with pytest.raises(flags.Error) as error:
        parse(*given)
    assert message in " ".join(str(error.value).split())


def test_the_per_rank_batch_is_a_positive_integer_or_auto(parse):
    for good in ("auto", "3"):
        parse(f"--per_rank_batch={good}")
        assert FLAGS.per_rank_batch == (good if good == "auto" else int(good))
    with pytest.raises(flags.IllegalFlagValueError, match="--per_rank_batch=many"):
        parse("--per_rank_batch=many")


def test_the_dense_rate_by_fan_in_is_refused_where_it_would_change_nothing(parse):
    parse("--dense_rate_fan_in=4096")
    with pytest.raises(flags.IllegalFlagValueError,
                       match="--dense_rate_fan_in applies to --optimizer=sgd only"):
        parse("--dense_rate_fan_in=4096", "--optimizer=adam")


@pytest.mark.parametrize("given, message", [
    (["--data_dir=data", "--image_height=256"], "--image_height applies to synthetic data only"),
    (["--data_dir=data", "--image_table=table.csv"], "give --data_dir or --image_table, not both"),
    (["--data_dir=data", "--bin=2"], "--bin applies to plates read with --image_table"),
    (["--data_dir=data", "--illumination=per_plate"],
     "--illumination applies to plates read with --image_table"),
    (["--image_table=table.csv", "--synthetic_classes=3", "--image_width=256"],
     "--image_width, --synthetic_classes apply to synthetic data only"),
    (["--image_table=table.csv", "--shuffle_buffer=8"],
     "--shuffle_buffer applies to data sets and the synthetic screen; straight from TIFFs"),
    (["--image_table=table.csv", "--skip_bad_records"],
     "--skip_bad_records applies to data sets and the synthetic screen"),
])
def test_a_flag_for_other_data_is_refused_before_the_data_is_opened(parse, given, message):
    parse(*given)
    with pytest.raises(app.UsageError, match=message):
        training_data.check_data_flags(training_data.Source.from_flags(FLAGS))


def test_a_warm_up_as_long_as_the_run_is_refused_with_a_length_that_fits(parse):
    parse("--epochs=3")
    with pytest.raises(app.UsageError, match=r"--warmup_epochs=5 is not shorter than "
                       r"--epochs=3: lower --warmup_epochs \(to 0.3, a tenth of the run, say\)"):
        run_plan.steps_of(run_plan.Request.from_flags(FLAGS), 3, steps_per_epoch=10)


def test_a_model_dir_that_cannot_be_made_or_data_that_is_not_there_is_named(tmp_path):
    (tmp_path / "FILE").write_text("a file, not a folder")
    with pytest.raises(app.UsageError, match="cannot be created: Not a directory"):
        checkpoints.restore_or_start(None, str(tmp_path / "FILE" / "model"), 8, {},
                                     checkpoints.Policy())
    with pytest.raises(errors.InputError, match="/nonexistent/data does not exist"):
        data_pipeline.read_manifest("/nonexistent/data")


@pytest.mark.parametrize("given, message", [
    (["--no_such_flag"], "train_mcnn.py: Unknown command line flag 'no_such_flag' (--helpshort"),
    (["--data_dir=/nonexistent/data"], "train_mcnn.py: data set folder /nonexistent/data "
                                       "does not exist"),
])
def test_the_program_says_a_bad_flag_in_one_line(tmp_path, given, message):
    """A parse error, and one met inside main() after Horovod started."""
    result = fails([*TRAIN, f"--model_dir={tmp_path / 'model'}", *given], cwd=ROOT)
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
