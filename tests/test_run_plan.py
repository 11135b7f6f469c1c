"""run_plan.py: one plan per run, resolved once from the flags, the data set's manifest
and the machine, and never written back into the flags."""
import ast
import glob
import json
import os
import sys

import pytest

from conftest import ROOT, fails, run

# In a process of its own: Horovod is initialised there, not in pytest's process.
RESOLVE = """
import dataclasses, json, sys
import train_mcnn, run_plan, threads
import horovod.tensorflow as hvd
FLAGS = train_mcnn.FLAGS
FLAGS(["train_mcnn.py", *sys.argv[2:]])
hvd.init()
given = {name: FLAGS[name].value for name in ("per_rank_batch", "epochs", "precision")}
manifest = json.loads(sys.argv[1])
plan = run_plan.resolve(run_plan.Request.from_flags(FLAGS), manifest, "float32", "as given",
                        threads.Threads(1, 1, "test", "0"))
schedule = plan.learning_rate()
after = {name: FLAGS[name].value for name in given}
print(json.dumps({"plan": plan.as_dict(), "flags_before": given, "flags_after": after,
                  "rates": {s: float(schedule(s)) for s in (0, plan.warmup_steps, plan.total_steps)}}))
"""
BBBC021_LIKE = {"image_shape": [1024, 1280, 3], "dtype": "uint8",
                "classes": [f"moa{i}" for i in range(12)], "splits": {"train": {"count": 10240}}}


def resolve(*flags, manifest=BBBC021_LIKE):
    result = run([sys.executable, "-c", RESOLVE, json.dumps(manifest), *flags], cwd=ROOT)
    return json.loads(result.stdout.splitlines()[-1])


def test_the_authors_flag_file_plans_their_global_batch_and_schedule():
    """8 nodes x 4 ranks x 8 images of the authors, as one rank of 32 micro-batches."""
    resolved = resolve(f"--flagfile={os.path.join(ROOT, 'experiments', 'authors_8_nodes.flags')}",
                       "--accumulate_steps=32", "--memory_per_rank_gb=64")
    plan = resolved["plan"]
    assert (plan["global_batch"], plan["per_rank_batch"], plan["accumulate_steps"]) == (256, 8, 32)
    # ~10,240 training fields: 40 steps an epoch, 52 epochs, 5 of warm-up
    assert (plan["steps_per_epoch"], plan["total_steps"], plan["warmup_steps"]) == (40, 2080, 200)
    # 0.001 at 32 scaled linearly to 256, then linear decay to 1e-4
    assert plan["peak_lr"] == pytest.approx(0.008)
    assert [round(r, 6) for r in resolved["rates"].values()] == [0.001, 0.008, 0.0001]
    assert plan["recipe"] == {"optimizer": "sgd", "momentum": 0.9, "lars_eta": 0.001,
                              "weight_decay": 5e-5, "label_smoothing": 0.1,
                              "fp16_allreduce": False, "allreduce_groups": 0,
                              "clip_norm": 0.0, "dense_rate_fan_in": 0,
                              "fc_512_tied": False, "ema_decay": 0.0}
    assert plan["model"]["image_shape"] == [1024, 1280, 3] and plan["model"]["num_classes"] == 12
    assert plan["memory"]["accumulate"] == 32


def test_a_warm_up_on_one_rank_ramps_from_its_own_initial_rate():
    """At a global batch of --base_batch the warm-up would start at the peak; with
    --warmup_initial_lr it starts there."""
    flat = resolve("--per_rank_batch=4", "--base_batch=4", "--base_lr=0.002", "--epochs=10",
                   "--warmup_epochs=1")
    assert [round(r, 6) for r in flat["rates"].values()] == [0.002, 0.002, 0.0001]
    ramp = resolve("--per_rank_batch=4", "--base_batch=4", "--base_lr=0.002", "--epochs=10",
                   "--warmup_epochs=1", "--warmup_initial_lr=0.0002")
    assert [round(r, 6) for r in ramp["rates"].values()] == [0.0002, 0.002, 0.0001]
    assert ramp["plan"]["initial_lr"] == 0.0002 and ramp["plan"]["base_lr"] == 0.002


def test_an_automatic_batch_is_resolved_in_the_plan_not_in_the_flags():
    resolved = resolve("--per_rank_batch=auto", "--memory_per_rank_gb=4", "--epochs=10",
                       "--warmup_epochs=1")
    assert resolved["flags_before"] == resolved["flags_after"]
    assert resolved["flags_after"]["per_rank_batch"] == "auto"
    plan = resolved["plan"]
    assert 1 <= plan["per_rank_batch"] < 8  # 0.9 x 4 GB holds a few full-size fields
    assert plan["global_batch"] == plan["per_rank_batch"]
    assert plan["steps_per_epoch"] == 10240 // plan["global_batch"]


def test_a_split_without_a_global_batch_is_refused_naming_it():
    tiny = {**BBBC021_LIKE, "splits": {"train": {"count": 6}}}
    result = fails([sys.executable, "-c", RESOLVE, json.dumps(tiny), "--per_rank_batch=8"],
                   cwd=ROOT)
    assert "6 training images make no full global batch of 8" in result.stderr


def assigned_flags(path):
    """(line, text) of each statement in `path` that writes a flag's value."""
    tree = ast.parse(open(path).read(), path)
    found = []
    for node in ast.walk(tree):
        targets = (node.targets if isinstance(node, ast.Assign)
                   else [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
        for target in targets:
            for part in ast.walk(target):
                if (isinstance(part, ast.Attribute) and isinstance(part.value, ast.Name)
                        and part.value.id == "FLAGS"):
                    found.append((node.lineno, ast.unparse(node)))
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id == "setattr" and ast.unparse(node.args[0]).endswith("FLAGS")):
            found.append((node.lineno, ast.unparse(node)))
    return found


def test_no_script_writes_a_flag():
    writes = {os.path.basename(path): assigned_flags(path)
              for path in glob.glob(os.path.join(ROOT, "*.py"))}
    assert {name: found for name, found in writes.items() if found} == {}
    # and the check sees a write where there is one
    assert assigned_flags(__file__) == []
    assert len(assigned_flags(os.path.join(ROOT, "tests", "flag_writer_example.py"))) == 2


# The programs users run: each reads its flags once into values (a Plan, a Policy,
# ConversionOptions ...) that the library modules take as arguments.
ENTRY_POINTS = {"train_mcnn", "prepare_data", "predict", "benchmark", "report", "studies",
                "synthetic_data", "memory_probe"}
# Library modules that still read flags, and why.
READ_FLAGS = {
    "run_log": "records the run's flags (flags.txt, summary.json) and what changed on resume",
    "run_files": "reads a flags.txt, knowing which flags are booleans",
    "errors": "parses a program's flags for run_main, a bad one said in one line",
}


def flag_reads(path):
    """Lines of `path` that read absl's global FLAGS (FLAGS.x, FLAGS[x], flags.FLAGS),
    its `FLAGS = flags.FLAGS` alias aside."""
    tree = ast.parse(open(path).read(), path)
    aliases = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Assign)
               and [ast.unparse(t) for t in node.targets] == ["FLAGS"]}
    return sorted({node.lineno for node in ast.walk(tree) if id(node) not in aliases and (
        (isinstance(node, ast.Name) and node.id == "FLAGS" and isinstance(node.ctx, ast.Load))
        or (isinstance(node, ast.Attribute) and ast.unparse(node) == "flags.FLAGS"))})


def test_library_modules_take_values_not_flags():
    readers = {os.path.basename(path)[:-3] for path in glob.glob(os.path.join(ROOT, "*.py"))
               if flag_reads(path)}
    assert readers - ENTRY_POINTS == set(READ_FLAGS)
    # and the check sees a read where there is one, and not in a parameter named otherwise
    assert flag_reads(os.path.join(ROOT, "tests", "flag_writer_example.py"))
    assert not flag_reads(os.path.join(ROOT, "node_projection.py"))
