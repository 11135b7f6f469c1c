"""The cluster path, run for real on one machine: a Slurm job pre-empted and requeued on a
one-node Slurm cluster, and mpirun across two loopback "nodes" started through a remote shell."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import pytest

from conftest import ROOT, Run, small_run

CRED_EXPIRE = 10  # seconds; Slurm's default, 120, also holds a requeued job that long

SBATCH_SCRIPT = os.path.join(ROOT, "slurm", "mcnn.sbatch")
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
SLURM_PROGRAMS = ["munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo"]


def slurm_missing():
    """Why a Slurm cluster cannot be started here, or None."""
    absent = [p for p in SLURM_PROGRAMS if not shutil.which(p, path=SBIN_PATH)]
    if absent:
        return (f"Slurm is not installed ({', '.join(absent)} missing): ./launch test installs "
                "it as root (apt-get install slurmctld slurmd slurm-client munge)")
    if os.geteuid() != 0:
        return "the one-node Slurm cluster runs its daemons as root"
    return None


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class OneNodeSlurm:
    """slurmctld, slurmd and munged of a cluster whose one node is this machine, with
    every file (key, socket, state, logs) in `folder` and ports of their own."""

    def __init__(self, folder):
        self.folder = folder
        self.conf = folder / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf), PATH=SBIN_PATH)

    def start(self):
        key = self.folder / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.daemon(["munged", "--force", f"--socket={self.folder / 'munge.socket'}",
                     f"--key-file={key}", f"--pid-file={self.folder / 'munged.pid'}",
                     f"--log-file={self.folder / 'munged.log'}",
                     f"--seed-file={self.folder / 'munged.seed'}"])
        self.write_conf()
        self.daemon(["slurmctld", "-f", str(self.conf)])
        self.daemon(["slurmd", "-f", str(self.conf)])
        deadline = time.time() + 60
        while self.command("sinfo", "--noheader", "--format=%T", check=False).strip() != "idle":
            if time.time() > deadline:
                raise AssertionError(f"the Slurm node never became idle:\n{self.logs()}")
            time.sleep(0.5)

    def write_conf(self):
        node = socket.gethostname().split(".")[0]
        self.conf.write_text("\n".join([
            "ClusterName=mcnntest", f"SlurmctldHost={node}(127.0.0.1)", "SlurmUser=root",
            "AuthType=auth/munge",
            f"AuthInfo=socket={self.folder / 'munge.socket'},cred_expire={CRED_EXPIRE}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "ReturnToService=2",
            f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
            f"StateSaveLocation={self.folder / 'state'}", f"SlurmdSpoolDir={self.folder / 'spool'}",
            f"SlurmctldPidFile={self.folder / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.folder / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.folder / 'slurmctld.log'}",
            f"SlurmdLogFile={self.folder / 'slurmd.log'}",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            f"NodeName={node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN",
            f"PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP", ""]))

    def daemon(self, command):
        subprocess.run(command, env=self.env, check=True, capture_output=True, timeout=60)

    def command(self, *command, check=True):
        result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60,
                                cwd=ROOT)
        assert result.returncode == 0 or not check, f"{command}: {result.stderr}\n{self.logs()}"
        return result.stdout

    def job(self, job_id):
        """scontrol's fields of a job, e.g. {"JobState": "RUNNING", "Restarts": "0"}."""
        fields = self.command("scontrol", "show", "job", "--oneliner", job_id).split()
        return dict(field.split("=", 1) for field in fields if "=" in field)

    def logs(self):
        return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}"
                         for log in sorted(self.folder.glob("*.log")))

    def stop(self):
        """Cancels every job and stops the daemons, whatever state they are in."""
        if self.conf.exists():
            self.command("scancel", "--full", "--user=root", check=False)
        for name in ("slurmd", "slurmctld", "munged"):
            pid_file = self.folder / f"{name}.pid"
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text()), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    why = slurm_missing()
    if why:
        pytest.skip(why)
    cluster = OneNodeSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def wait_for(condition, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_a_preempted_slurm_job_checkpoints_requeues_itself_and_resumes_to_the_end(
        slurm, two_rank_run, tmp_path):
    model_dir, output = tmp_path / "model", tmp_path / "job.out"
    # The shipped script with its #SBATCH lines overridden for this 2-core node.
    job_id = slurm.command(
        "sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
        "--time=20", f"--output={output}", "--export=ALL,RANKS_PER_SOCKET=2", SBATCH_SCRIPT,
        *small_run(two_rank_run, model_dir, "--epochs=4")).strip()

    def step_logged():
        steps = re.findall(r"\bstep (\d+)/", output.read_text()) if output.exists() else []
        return steps and int(steps[-1]) >= 8
    wait_for(step_logged, 300, f"step 8 in {output}")
    # What Slurm does before a time limit with --signal=B:TERM@...: SIGTERM to the script.
    slurm.command("scancel", "--batch", "--signal=TERM", job_id)

    def requeued():
        job = slurm.job(job_id)
        return job["Restarts"] == "1" or job["JobState"] in ("COMPLETED", "FAILED", "CANCELLED")
    wait_for(requeued, 300, f"job {job_id} to requeue itself")
    # Slurm holds a requeued job for a while (BeginTime), and a job started again before
    # its old credential expires is killed ("Job credential revoked"): wait that out,
    # then start it.
    time.sleep(CRED_EXPIRE + 2)
    slurm.command("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)

    def finished():
        job = slurm.job(job_id)
        return job if job["JobState"] in ("COMPLETED", "FAILED", "CANCELLED") else None
    job = wait_for(finished, 600, f"job {job_id} to end")
    text = output.read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", (job, text[-3000:],
                                                                       slurm.logs())

    # The script passes SIGTERM on to ./launch, which passes it to every rank as SIGUSR1.
    stopped = re.search(r"SIGUSR1 \(a SIGTERM to \./launch, passed on\): stopped after step "
                        r"(\d+) and wrote (\S+); rerun the same "
                        r"command to resume", text)
    assert stopped, text[-3000:]
    step, checkpoint = int(stopped.group(1)), stopped.group(2)
    assert step >= 8 and checkpoint.endswith(f"ckpt-{step}")
    first, second = text.index(f"job {job_id}, attempt 1"), text.index(f"job {job_id}, attempt 2")
    assert first < stopped.start() < text.index("requeueing job") < second
    assert f"resuming from {checkpoint}: step {step}" in text[second:]
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["steps"] == 24 and summary["resumed_from_step"] == step
    assert summary["ranks"] == 2 and summary["ranks_in_sync"]


SSH_STAND_IN = """#!/bin/sh
# Stands in for ssh: skips ssh's options, notes the host, then runs the command here in a
# clean environment, as ssh would start it on another node. Each "node" has a temporary
# folder of its own, as another machine would: Open MPI names its session folders by
# host name, which both share here, and two daemons writing one hwloc topology file
# crashed one in four runs.
while [ "${1#-}" != "$1" ]; do shift; done
echo "$@" >> "$(dirname "$0")/remote-shell.log"
host="$1"
shift
mkdir -p "$(dirname "$0")/tmp-$host"
exec env -i PATH="$PATH" HOME="$HOME" TMPDIR="$(dirname "$0")/tmp-$host" sh -c "$*"
"""


@pytest.mark.parametrize("hierarchical", ["0", "1"])
def test_mpirun_across_two_nodes_started_through_a_remote_shell(two_rank_run, tmp_path,
                                                                hierarchical):
    """Open MPI takes 127.0.0.2 and 127.0.0.3 for two nodes: its daemons start through
    --rsh-agent and the ranks talk TCP over loopback. Both "nodes" are this machine, so
    the two ranks are bound to the same core."""
    agent, hosts = tmp_path / "remote-shell", tmp_path / "hosts"
    agent.write_text(SSH_STAND_IN)
    agent.chmod(0o755)
    hosts.write_text("127.0.0.2\n127.0.0.3\n")
    env = dict(os.environ, OMPI_MCA_btl_tcp_if_include="lo", OMPI_MCA_oob_tcp_if_include="lo",
               PMIX_MCA_gds="hash", HOROVOD_HIERARCHICAL_ALLREDUCE=hierarchical)
    model_dir = tmp_path / "model"
    job = Run(small_run(two_rank_run, model_dir, "--epochs=4", "--warmup_epochs=1"),
              placement=["--hostfile", str(hosts), "--sockets", "1", "--cores-per-socket", "1",
                         "--rsh-agent", str(agent)], env=env)
    job.wait_for_step(4)
    for rank in (0, 1):
        _, environ = job.rank_environ(rank)
        assert environ["OMPI_COMM_WORLD_LOCAL_SIZE"] == "1"
        assert environ["HOROVOD_HIERARCHICAL_ALLREDUCE"] == hierarchical
    code, output, _ = job.finish(timeout=600)
    assert code == 0, output[-3000:]

    started = (tmp_path / "remote-shell.log").read_text().splitlines()
    assert sorted(line.split()[0] for line in started) == ["127.0.0.2", "127.0.0.3"]
    assert all("orted" in line for line in started)
    assert "2 ranks (2 nodes) x 4 images" in output
    summary = json.loads((model_dir / "summary.json").read_text())
    assert (summary["ranks"], summary["nodes"], summary["ranks_per_node"]) == (2, 2, 1)
    assert summary["steps"] == 24 and summary["ranks_in_sync"]
