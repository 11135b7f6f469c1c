"""The programs' bad-input and output errors, and how a program ends on one: a single
line naming the file, row or flag at fault, and a prompt exit of every rank."""
import os
import re
import sys
import time
import traceback

from absl import app, flags


class InputError(ValueError):
    """Bad input: the message names the table, row or file at fault."""


class OutputError(RuntimeError):
    """A folder that cannot be written (a full disk, no permission): the message names
    it, the reason, and what is kept."""


class Interrupted(Exception):
    """Ctrl-C, caught where the program knows what it kept: the message says that, and
    how to resume."""


class SameOnEveryRank(app.UsageError):
    """A usage error every rank of a job finds alike (the data set's manifest against the
    job's size): rank 0 alone says it."""


def rank_in_job():
    """This process's rank as the launcher set it (Open MPI, Horovod's), 0 outside a job;
    readable before Horovod starts."""
    for name in ("OMPI_COMM_WORLD_RANK", "HOROVOD_RANK", "PMI_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def error_text(error):
    """An error's message in one line; a TensorFlow error's (its `message`) without its
    graph decorations."""
    text = re.sub(r"\{\{function_node [^}]*\}\}", "", getattr(error, "message", None) or str(error))
    text = text.split("Summarized data: ")[-1]  # a failed tf.debugging.Assert, run eagerly
    text = text.split(" [Op:")[0].split("\n\t")[0]
    text = re.sub(r"b'([^']*)'|b\"([^\"]*)\"", lambda m: m.group(1) or m.group(2), text)
    return " ".join(text.split())


def run_main(main):
    """absl's app.run(main), but bad input, an unwritable folder, bad flags or a
    diverging run end the program with their message alone, which names what is at
    fault: a traceback, or absl's list of every flag, would only hide it.

    A failed program ends at once, skipping exit handlers: Horovod's shutdown would
    wait for ranks that are waiting in a collective for this one, and the job would
    hang instead of mpirun ending it."""
    def main_reporting_bad_input(argv):
        try:
            return main(argv)
        except (InputError, OutputError, app.UsageError, FloatingPointError) as error:
            if not (isinstance(error, SameOnEveryRank) and rank_in_job() != 0):
                print(f"{os.path.basename(sys.argv[0])}: {error}", file=sys.stderr, flush=True)
            else:  # so that mpirun, ending the job at the first exit, lets rank 0 say it
                time.sleep(2)
        except (Interrupted, KeyboardInterrupt) as stop:
            print(f"{os.path.basename(sys.argv[0])}: {str(stop) or 'stopped by Ctrl-C'}",
                  file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(130)
        except Exception:  # a bug: its traceback, and the same prompt exit
            traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    app.run(main_reporting_bad_input, flags_parser=parse_flags_once)


def parse_flags_once(argv):
    """absl's flag parsing, but a bad flag is said in one line, by rank 0 alone: every
    rank of a job parses the same command line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        if rank_in_job() == 0:
            print(f"{os.path.basename(argv[0])}: {' '.join(str(error).split())} (--helpshort "
                  f"lists the flags)", file=sys.stderr, flush=True)
        sys.exit(1)
