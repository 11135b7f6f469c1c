"""train_mcnn.py's flags: the per-rank batch is a positive integer or 'auto'; the dense
layers' rate by fan-in is for SGD."""
import sys

from conftest import ROOT, fails, run

PARSE = "import sys, train_mcnn; train_mcnn.FLAGS(['train_mcnn', *sys.argv[1:]]); " \
        "print(train_mcnn.FLAGS.per_rank_batch)"


def test_per_rank_batch_must_be_a_positive_integer_or_auto():
    for good in ("auto", "3"):
        assert run([sys.executable, "-c", PARSE, f"--per_rank_batch={good}"],
                   cwd=ROOT).stdout.split()[-1] == good
    for bad in ("0", "many"):
        result = fails([sys.executable, "-c", PARSE, f"--per_rank_batch={bad}"], cwd=ROOT)
        assert "per_rank_batch" in result.stderr


def test_the_dense_rate_by_fan_in_is_refused_where_it_would_change_nothing():
    result = fails([sys.executable, "-c", PARSE, "--dense_rate_fan_in=4096", "--optimizer=adam"],
                   cwd=ROOT)
    assert "--dense_rate_fan_in applies to --optimizer=sgd only" in result.stderr
    assert run([sys.executable, "-c", PARSE, "--dense_rate_fan_in=4096"], cwd=ROOT)
