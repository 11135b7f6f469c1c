"""What tests/test_run_plan.py's check must find: two writes of flags' values."""
from absl import flags

FLAGS = flags.FLAGS


def rewrite():
    FLAGS.per_rank_batch = 4
    setattr(FLAGS, "epochs", 8)
