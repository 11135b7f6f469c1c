"""experiments/batch_study/run: the sweep of peak rates that finds each batch's fastest,
on known curves of steps against the rate (its runs are the study's hours)."""
import importlib.machinery
import importlib.util
import math
import os

import pytest

from conftest import ROOT


@pytest.fixture
def study(tmp_path, monkeypatch):
    """The run script as a module, with its runs' folders and record in tmp_path."""
    path = os.path.join(ROOT, "experiments", "batch_study", "run")
    loader = importlib.machinery.SourceFileLoader("batch_study_run", path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    monkeypatch.setattr(module, "RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(module, "RECORD", str(tmp_path / "batch_study.csv"))
    os.makedirs(module.RUNS)
    return module


def trained_on(study, monkeypatch, steps_at):
    """The factors the sweep trains at, in order, with `steps_at(factor)` as each run's
    steps to the target (math.inf: never), cut at its budget."""
    trained = []

    def train(optimizer, batch, factor, budget_steps, eval_steps=None):
        trained.append(factor if eval_steps is None else ("fine", factor))
        steps = steps_at(factor)
        return steps if steps <= budget_steps else math.inf

    monkeypatch.setattr(study, "train", train)
    return trained


def test_where_the_linear_rule_fails_the_sweep_starts_from_the_batch_befores_rate(
        study, monkeypatch):
    # SGD at 1,024 as at 128 and up: only rates near x1/32 reach the target
    curve = {1 / 16: 90, 1 / 32: 60, 1 / 64: 80}
    trained = trained_on(study, monkeypatch, lambda f: curve.get(f, math.inf))
    steps, factor = study.sweep("sgd", 1024, 150, earlier_factor=1 / 32)
    assert (steps, factor) == (60, 1 / 32)
    # the linear rule's three, the batch before's rate, then both its neighbours; no
    # halving down from x0.5 through x1/4 and x1/8
    assert trained == [1, 0.5, 2, 1 / 32, 1 / 64, 1 / 16]


def test_the_sweep_grows_past_its_edge_until_the_fastest_rate_is_inside(study, monkeypatch):
    # LARS at 32: faster up to x8
    trained = trained_on(study, monkeypatch, lambda f: {0.5: math.inf, 1: 240, 2: 160, 4: 112,
                                                        8: 64, 16: math.inf}[f])
    assert study.sweep("lars", 32, 240) == (64, 8)
    assert trained == [1, 0.5, 2, 4, 8, 16, ("fine", 8)]  # rerun: evaluated every 16 of 64

    trained = trained_on(study, monkeypatch, lambda f: {0.5: math.inf, 1: 100, 2: 60,
                                                        4: math.inf}[f])
    assert study.sweep("lars", 1024, 150) == (60, 2)
    assert trained == [1, 0.5, 2, 4]  # no rerun: evaluated every step at 1,024 already

    trained = trained_on(study, monkeypatch, lambda f: {0.5: 256, 1: 256, 2: 128, 4: 128}[f])
    assert study.sweep("sgd", 8, 256) == (128, 2)  # a tie goes to the lower rate
    assert trained == [1, 0.5, 2, 4, ("fine", 2)]  # rerun: evaluated every 64 steps of 128


def test_a_sweep_that_never_reaches_the_target_stops_at_its_limits(study, monkeypatch):
    trained = trained_on(study, monkeypatch, lambda f: math.inf)
    assert study.sweep("sgd", 1024, 150) == (math.inf, None)
    assert trained == [1, 0.5, 2, *[2.0 ** -k for k in range(2, 8)]]  # down to x1/128


def test_a_resumed_sweep_knows_the_runs_that_ended_before(study, monkeypatch):
    with open(study.RECORD, "w") as record:  # a new machine: the record, and no folders
        record.write("run,reached,steps_to_target\n"
                     "sgd_256_x1,False,\nsgd_256_x0.5,False,\nsgd_256_x2,False,\n"
                     "sgd_256_x0.25,False,\nsgd_256_x0.125,True,76.0\nsgd_128_x0.125,True,76.0\n")
    os.makedirs(os.path.join(study.RUNS, "sgd_256_x0.0625"))  # cut short: not ended
    assert study.sweep_so_far("sgd", 256) == {1: math.inf, 0.5: math.inf, 2: math.inf,
                                              0.25: math.inf, 0.125: 76}
    trained = trained_on(study, monkeypatch, lambda f: {0.0625: 70, 0.03125: 90}.get(f, math.inf))
    assert study.sweep("sgd", 256, 152, earlier_factor=0.0625) == (70, 0.0625)
    assert trained == [0.0625, 0.03125]
