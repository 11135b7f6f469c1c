"""A rank's set-up before its first op: Horovod started, its tensor fusion buffer
sized (init_horovod), then how many threads the rank's TensorFlow runs:
--intra_op_threads, else the launcher's TF_NUM_INTRAOP_THREADS, else this rank's share
of the cores it may run on.

TensorFlow by itself takes every core it sees, so ranks started by a plain mpirun
that share cores (unbound, or several bound to one socket) would oversubscribe them
(horovod#2295).
"""
import dataclasses
import os

import tf_env  # noqa: F401  (before TensorFlow)
from absl import flags
import horovod.tensorflow as hvd
import psutil
import tensorflow as tf

flags.DEFINE_integer("intra_op_threads", 0, "Threads per op; 0: the launcher's "
                     "TF_NUM_INTRAOP_THREADS, else this rank's share of the cores it may "
                     "run on (shared with the other ranks of the node that may run on them).")
flags.DEFINE_integer("inter_op_threads", 0, "Ops run at once; 0: the launcher's "
                     "TF_NUM_INTEROP_THREADS, else 2.")

# Ops run at once without the launcher's TF_NUM_INTEROP_THREADS: the launcher's own
# value (two let the seven scale columns overlap; launch's set_rank_environment sets
# it, and tests/test_launch.py checks that the two agree).
INTER_OP_THREADS = 2


@dataclasses.dataclass(frozen=True)
class Threads:
    """A rank's thread pools, where the intra-op count came from, and the cores the rank
    may run on (its binding)."""
    intra_op: int
    inter_op: int
    why: str
    cores: str = ""

    def __str__(self):
        return (f"{self.intra_op} intra-op ({self.why}), {self.inter_op} inter-op"
                + (f"; rank {hvd.rank()} on cores {self.cores}" if self.cores else ""))


def init_horovod(fusion_threshold_mb=None):
    """Horovod's step 1: this process joins the job's ranks. `fusion_threshold_mb`, if
    given, sizes the buffer allreduce fuses small tensors into (MB; Horovod's default
    is 128)."""
    if fusion_threshold_mb is not None:
        os.environ["HOROVOD_FUSION_THRESHOLD"] = str(fusion_threshold_mb * 2 ** 20)
    hvd.init()


def core_list(cores):
    """'0-3,8' for {0, 1, 2, 3, 8}: the cores as taskset and lscpu write them."""
    spans, ordered = [], sorted(cores)
    for core in ordered:
        if spans and core == spans[-1][1] + 1:
            spans[-1][1] = core
        else:
            spans.append([core, core])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)


def configure_threads(intra_op_threads=0, inter_op_threads=0):
    """Sets TensorFlow's thread pools (before its first op) to the counts given (the
    flags), else the launcher's, else this rank's share of its cores; returns them as
    Threads."""
    intra = intra_op_threads or int(os.environ.get("TF_NUM_INTRAOP_THREADS", 0))
    inter = (inter_op_threads or int(os.environ.get("TF_NUM_INTEROP_THREADS", 0))
             or INTER_OP_THREADS)
    why = "--intra_op_threads" if intra_op_threads else "TF_NUM_INTRAOP_THREADS"
    if not intra:
        cores = os.sched_getaffinity(0)
        sharing = ranks_sharing_cores(cores)
        intra = max(1, len(cores) // sharing)
        why = (f"this rank's share of the {len(cores)} cores it may run on, with "
               f"{sharing - 1} other rank{'s' * (sharing > 2)} of this node" if sharing > 1
               else f"the {len(cores)} cores this rank may run on")
    tf.config.threading.set_intra_op_parallelism_threads(intra)
    tf.config.threading.set_inter_op_parallelism_threads(inter)
    return Threads(intra, inter, why, core_list(os.sched_getaffinity(0)))


def ranks_sharing_cores(cores):
    """How many ranks on this machine (this one included) may run on any of `cores`.
    TensorFlow's threads must be set before its first op, so before any Horovod
    collective: the ranks here are the processes beside this one (children of the same
    MPI daemon, started before hvd.init() returned) running the same command."""
    me = psutil.Process()
    try:
        ranks = [p for p in me.parent().children() if p.cmdline() == me.cmdline()]
        return max(1, sum(bool(cores & set(p.cpu_affinity())) for p in ranks))
    except (psutil.Error, AttributeError):  # no parent, or /proc not readable
        return hvd.local_size()
