"""Elastic runs (`launch train --elastic`, horovodrun): the state the workers go back to
when workers leave or join, and the rule they keep: the global batch stays the run's,
each worker taking more or fewer micro-batches, so that the learning rate, the steps
per epoch and the steps left stay as planned.
"""
import tf_env  # noqa: F401  (before TensorFlow)
from absl import app
import horovod.tensorflow as hvd

from run_log import log


class Progress:
    """The step reached and the run's global batch: what State also holds (and syncs
    from rank 0 to a joining worker) in elastic mode."""

    def __init__(self, step, global_batch):
        self.step, self.global_batch = step, global_batch

    def commit(self):
        pass


class State(hvd.elastic.TensorFlowState):
    """Horovod's elastic state of TensorFlow variables, with `step` and `global_batch`.
    Its sync() broadcasts the variables only in graph mode; this one broadcasts them in
    eager mode too."""

    def sync(self):
        hvd.broadcast_variables(self.variables, root_rank=0)
        super().sync()


def micro_batches(global_batch, per_rank_batch, ranks):
    """Micro-batches of `per_rank_batch` images each of `ranks` ranks takes for one step
    of `global_batch` images. Raises UsageError, naming the rank counts that can, when
    they cannot make it."""
    if global_batch % (per_rank_batch * ranks):
        counts = [n for n in range(1, global_batch // per_rank_batch + 1)
                  if global_batch % (per_rank_batch * n) == 0]
        raise app.UsageError(
            f"{ranks} workers of --per_rank_batch={per_rank_batch} cannot make the run's "
            f"global batch of {global_batch} images; an elastic run keeps it, so its worker "
            f"counts must be among {counts} (--min-np, --max-np)")
    return global_batch // (per_rank_batch * ranks)


def run(train, variables, start_step, global_batch, per_rank_batch):
    """train(progress) on the workers there are, again from the last commit (made with
    each checkpoint) whenever workers leave or join."""
    state = State(variables, step=start_step, global_batch=global_batch)
    state.register_reset_callbacks([lambda: log(
        f"workers changed: going on with {hvd.size()} from step {state.step}; the global "
        f"batch stays {state.global_batch} ({per_rank_batch} images x "
        f"{micro_batches(state.global_batch, per_rank_batch, hvd.size())} micro-batches a "
        f"rank), and with it the rate and the steps left")])
    return hvd.elastic.run(train)(state)
