"""The launcher's placement, checked through --dry-run."""
import glob
import os
import shlex
import subprocess

import pytest

import threads
from conftest import LAUNCH, ROOT


def dry_run(*args, env=None):
    result = subprocess.run([LAUNCH, "train", "--dry-run", *args], capture_output=True, text=True,
                            env=env)
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout)


def option(command, name):
    return command[command.index(name) + 1]


def exported(command):
    return dict(command[i + 1].split("=", 1) for i, word in enumerate(command)
                if word == "-x" and "=" in command[i + 1])


def test_two_socket_twenty_core_node_with_two_ranks_per_socket():
    command = dry_run("--sockets", "2", "--cores-per-socket", "20", "--ranks-per-socket", "2",
                      "--", "--per_rank_batch=8")
    assert command[0] == "mpirun"
    assert option(command, "-np") == "4"
    assert option(command, "--map-by") == "ppr:2:socket:PE=10"
    assert option(command, "--bind-to") == "core"
    env = exported(command)
    assert env["OMP_NUM_THREADS"] == env["TF_NUM_INTRAOP_THREADS"] == "10"
    assert env["TF_NUM_INTEROP_THREADS"] == str(threads.INTER_OP_THREADS)  # one value
    assert env["TF_ENABLE_ONEDNN_OPTS"] == "1" and env["KMP_BLOCKTIME"] == "1"
    assert env["KMP_AFFINITY"] == "granularity=fine,compact,1,0"
    assert command[-2:] == [os.path.join(ROOT, "train_mcnn.py"), "--per_rank_batch=8"]
    assert ("--allow-run-as-root" in command) == (os.geteuid() == 0)


def test_hostfile_of_two_nodes(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two-socket nodes\nnode-a slots=4\nnode-b slots=4  # second\n\n")
    command = dry_run("--hostfile", str(hostfile), "--sockets", "2", "--cores-per-socket", "20",
                      "--ranks-per-socket", "2")
    assert option(command, "-np") == "8"
    assert option(command, "--host") == "node-a:4,node-b:4"
    assert option(command, "--map-by") == "ppr:2:socket:PE=10"


def test_slurm_allocation_sets_the_node_count():
    env = dict(os.environ, SLURM_JOB_NUM_NODES="3")
    result = subprocess.run([LAUNCH, "train", "--dry-run", "--sockets", "2",
                             "--cores-per-socket", "16"], capture_output=True, text=True, env=env)
    command = shlex.split(result.stdout)
    assert option(command, "-np") == "6" and option(command, "--map-by") == "ppr:1:socket:PE=16"


def test_slurm_allocation_with_too_few_tasks_per_node_is_a_clear_error():
    env = dict(os.environ, SLURM_JOB_NUM_NODES="2", SLURM_TASKS_PER_NODE="1(x2)")
    result = subprocess.run([LAUNCH, "train", "--dry-run", "--sockets", "2", "--cores-per-socket",
                             "16"], capture_output=True, text=True, env=env)
    assert result.returncode != 0
    assert "1 task(s) per node and the placement 2 ranks per node" in result.stderr
    assert "--ntasks-per-node=2" in result.stderr


def test_remote_shell_and_horovod_settings_reach_the_ranks_of_every_node():
    env = dict(os.environ, HOROVOD_HIERARCHICAL_ALLREDUCE="1", OMPI_MCA_btl_tcp_if_include="lo")
    command = dry_run("--rsh-agent", "/opt/agent", env=env)
    mca = {command[i + 1]: command[i + 2] for i, word in enumerate(command) if word == "--mca"}
    assert mca["plm_rsh_agent"] == "/opt/agent"
    passed_on = {command[i + 1] for i, word in enumerate(command) if word == "-x"}
    assert {"HOROVOD_HIERARCHICAL_ALLREDUCE", "OMPI_MCA_btl_tcp_if_include"} <= passed_on
    assert "plm_rsh_agent" not in dry_run()


@pytest.mark.parametrize("args, message", [
    (["--cores-per-socket", "20", "--ranks-per-socket", "3"], "does not divide the 20 cores"),
    (["--nodes", "2"], "needs --hostfile or a Slurm allocation"),
    (["--ranks-per-socket", "0"], "--ranks-per-socket must be a positive integer"),
    (["--per_rank_batch=8"], "arguments for the program go after --"),
])
def test_bad_placement_is_a_clear_error(args, message):
    result = subprocess.run([LAUNCH, "train", "--dry-run", *args], capture_output=True, text=True)
    assert result.returncode != 0 and message in result.stderr


SHIPPED_FLAG_FILES = sorted(
    os.path.relpath(path, ROOT) for path in glob.glob(
        os.path.join(ROOT, "experiments", "**", "*.flags"), recursive=True)
    if os.path.basename(path) != "common.flags")


@pytest.mark.parametrize("flagfile", SHIPPED_FLAG_FILES)
def test_shipped_flag_files_parse(flagfile):
    """Each flag file, after the common.flags of its folder if it has one."""
    import train_mcnn
    FLAGS = train_mcnn.FLAGS
    common = os.path.join(ROOT, os.path.dirname(flagfile), "common.flags")
    try:
        FLAGS(["train_mcnn.py", *([f"--flagfile={common}"] if os.path.isfile(common) else []),
               f"--flagfile={os.path.join(ROOT, flagfile)}"])
        assert FLAGS.per_rank_batch > 0 and FLAGS.warmup_epochs < FLAGS.epochs
    finally:
        FLAGS.unparse_flags()


def test_elastic_workers_get_the_environment_of_mpirun_ranks():
    bound = exported(dry_run("--", "--per_rank_batch=8"))
    elastic = dry_run("--elastic", "--", "--per_rank_batch=8")
    runner = next(i for i, word in enumerate(elastic) if word.endswith("horovodrun"))
    assert elastic[0] == "env"
    given = dict(word.split("=", 1) for word in elastic[1:runner])
    # all but the compact thread pinning, which only ranks bound to their cores get
    assert given == {k: v for k, v in bound.items() if k != "KMP_AFFINITY"}
