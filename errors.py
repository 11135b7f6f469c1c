"""The programs' bad-input and output errors, and how a program ends on one: a single
line naming the file, row or flag at fault, and a prompt exit of every rank."""
import os
import sys
import traceback

from absl import app


class InputError(ValueError):
    """Bad input: the message names the table, row or file at fault."""


class OutputError(RuntimeError):
    """A folder that cannot be written (a full disk, no permission): the message names
    it, the reason, and what is kept."""


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
            print(f"{os.path.basename(sys.argv[0])}: {error}", file=sys.stderr, flush=True)
        except Exception:  # a bug: its traceback, and the same prompt exit
            traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    app.run(main_reporting_bad_input)
