"""Shared test set-up: the project's scripts on sys.path, TensorFlow configured as in training,
and one real 2-rank training run that several test modules read."""
import dataclasses
import os
import re
import signal
import subprocess
import sys
import time

import psutil

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tf_env  # noqa: F401,E402  (before TensorFlow, as in every script)

# The Ctrl-C tests send SIGINT to the programs. A suite started in the background of a
# non-interactive shell (nohup ... &, a batch job) has SIGINT ignored, which every
# program it starts would inherit; with a handler here they start with the default.
signal.signal(signal.SIGINT, signal.default_int_handler)
import plates  # noqa: E402
import prepare_data  # noqa: E402
import run_log  # noqa: E402
import synthetic_data  # noqa: E402

LAUNCH = os.path.join(ROOT, "launch")
PYTHON = os.path.join(ROOT, ".venv", "bin", "python")


# The suite in three tiers, by what a test needs (CI and ./launch test run them all):
#   -m "not slow"            in this process: planning, conversion, every flag check ...
#   -m "slow and not ranks"  the programs run as one process each
#   -m ranks                 ranks under mpirun or horovodrun, and Slurm
# Modules whose tests run programs are marked here, single tests where they are.
PROGRAM_MODULES = {"test_field_sizes", "test_profile_exports"}
RANKS_MODULES = {"test_benchmark", "test_cluster", "test_horovod_training", "test_reliability",
                 "test_time_to_accuracy"}


def pytest_collection_modifyitems(items):
    for item in items:
        ranks = (item.module.__name__ in RANKS_MODULES
                 or "two_rank_run" in getattr(item, "fixturenames", ()))
        if ranks:
            item.add_marker(pytest.mark.ranks)
        if ranks or item.module.__name__ in PROGRAM_MODULES:
            item.add_marker(pytest.mark.slow)


def small_screen(path, height=128, width=128, **options):
    """The synthetic screen written small to `path`: 3 classes, 2 compounds each, 2 fields
    per treatment on 2 plates, of height x width (`options`: write_screen's others)."""
    synthetic_data.write_screen(str(path), height, width, **{
        "num_classes": 3, "compounds_per_class": 2, "fields_per_treatment": 2, "plates": 2,
        "workers": 2, **options})
    return path


@pytest.fixture(scope="session")
def screen(tmp_path_factory):
    """One small_screen of 128 x 128 fields for the session; copy it to change it."""
    return small_screen(tmp_path_factory.mktemp("screen") / "screen")


def convert_screen(screen, output, **settings):
    """prepare_data.convert of the synthetic screen written to `screen` into `output`;
    `settings` are plates.ConversionOptions fields or convert's own (dtype,
    images_per_shard: 4, workers: 1 (in this process), progress: silent)."""
    fields = {field.name for field in dataclasses.fields(plates.ConversionOptions)}
    options = plates.ConversionOptions(**{k: v for k, v in settings.items() if k in fields})
    own = {"images_per_shard": 4, "workers": 1, "progress": lambda _: None,
           **{k: v for k, v in settings.items() if k not in fields}}
    return prepare_data.convert(*synthetic_data.screen_tables(str(screen)), str(output),
                                options, **own)


def run(command, timeout=900, **kwargs):
    """Runs a command, failing the test with its output if it fails."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, (
        f"{' '.join(command)} exited {result.returncode}\n"
        f"--- stdout\n{result.stdout[-5000:]}\n--- stderr\n{result.stderr[-5000:]}")
    return result


def fails(command, timeout=900, **kwargs):
    """Runs a command that must fail; returns it, for its messages."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode != 0, (
        f"{' '.join(command)} succeeded but should have failed\n"
        f"--- stdout\n{result.stdout[-5000:]}\n--- stderr\n{result.stderr[-5000:]}")
    return result


def launch_two_ranks(program, args, timeout=900):
    """`./launch train` of `program` with 2 ranks of 1 core each (CI has 2 cores)."""
    return run([LAUNCH, "train", "--program", program, "--sockets", "1",
                "--cores-per-socket", "2", "--ranks-per-socket", "2", "--", *args],
               timeout=timeout)


# A small run: 128 x 128 synthetic fields, 3 classes, 48 training images; 2 ranks x 4
# images, so 6 steps an epoch and 120 in all. Checkpoints every 5 steps and every 2 epochs.
SMALL_RUN = ["--image_height=128", "--image_width=128", "--synthetic_classes=3",
             "--synthetic_compounds_per_class=2", "--synthetic_fields_per_treatment=8",
             "--per_rank_batch=4", "--epochs=20", "--warmup_epochs=2", "--base_lr=0.02",
             "--base_batch=8", "--log_every=4", "--eval_every=1", "--checkpoint_every=2",
             "--checkpoint_steps=5"]


@pytest.fixture(scope="session")
def two_rank_run(tmp_path_factory):
    """(model dir, stdout) of SMALL_RUN on 2 ranks, uninterrupted."""
    out = tmp_path_factory.mktemp("run")
    result = launch_two_ranks(os.path.join(ROOT, "train_mcnn.py"), [
        f"--synthetic_cache={out / 'data'}", f"--model_dir={out / 'model'}", *SMALL_RUN])
    return out / "model", result.stdout


TWO_RANKS = ["--sockets", "1", "--cores-per-socket", "2", "--ranks-per-socket", "2"]


def small_run(two_rank_run, model_dir, *flags):
    """SMALL_RUN's train_mcnn.py flags, on the reference run's data, into model_dir."""
    data = two_rank_run[0].parent / "data"
    return [f"--synthetic_cache={data}", f"--model_dir={model_dir}", *SMALL_RUN, *flags]


class Run:
    """A 2-rank training run in the background, read line by line."""

    def __init__(self, args, placement=TWO_RANKS, env=None):
        self.process = subprocess.Popen([LAUNCH, "train", *placement, "--", *args],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, env=env)
        self.lines = []

    def wait_for_step(self, step, timeout=300):
        """Reads output until rank 0 logs a step >= `step`; returns that step."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            logged = re.search(r"\bstep (\d+)/", line)
            if logged and int(logged.group(1)) >= step:
                return int(logged.group(1))
        raise AssertionError(f"step {step} never logged:\n{''.join(self.lines[-40:])}")

    def rank_environ(self, rank):
        """(pid, environment) of rank `rank`'s process."""
        for child in psutil.Process(self.process.pid).children(recursive=True):
            try:
                environ = child.environ()
                if "train_mcnn.py" in " ".join(child.cmdline()) and str(rank) in (
                        environ.get("OMPI_COMM_WORLD_RANK"), environ.get("HOROVOD_RANK")):
                    return child.pid, environ
            except psutil.NoSuchProcess:
                continue
        raise AssertionError(f"no rank {rank} process")

    def rank_pid(self, rank):
        return self.rank_environ(rank)[0]

    def finish(self, timeout):
        """(exit code, all output, seconds it took to exit)."""
        start = time.time()
        rest, _ = self.process.communicate(timeout=timeout)
        return self.process.returncode, "".join(self.lines) + rest, time.time() - start


def scalar_series(event_dir, tag):
    """{step: value} of a TensorBoard scalar; a step logged twice keeps its last value."""
    return run_log.read_scalars(event_dir, tag).get(tag, {})
