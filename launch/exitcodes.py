"""Exit codes that end a job at once: the launcher does not restart a worker that exits with one.

A restart helps when a process or a peer was lost; it cannot help a command line that is wrong,
a data set that is missing or a run whose loss became NaN — those fail again, identically, after
every restart, printing the same error each time. Workers report such failures with one of these
codes; `python -m launch` then stops the job after the first attempt and exits with the same code.
Any other non-zero exit (a crash, a lost peer, a collective timeout, a signal) is restarted up to
`--max-restarts` times.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

EXIT_USAGE = 2
"""Bad command line, configuration, hyper-parameter or replica size, or missing data (argparse's code)."""

EXIT_DIVERGED = 3
"""The loss or the weights became non-finite; the last good checkpoints are kept."""

NO_RESTART: dict[int, str] = {
    EXIT_USAGE: "a usage, configuration or data error",
    EXIT_DIVERGED: "training diverged (non-finite loss or weights)",
}
"""Exit code -> what it means, for every code that is never restarted."""


def exit_final_codes_at_once(run: Callable[[], object], *, success_too: bool = False) -> None:
    """Run ``run()``; if it ends with one of the ``NO_RESTART`` codes, leave the process at once.

    By then the worker has printed its message, kept its checkpoints and destroyed its process
    group. What remains is the interpreter's teardown, and there a C++ destructor can still abort
    on gloo work left in flight ("terminate called without an active exception", exit -6, seen on
    one rank of a diverged 2-rank run, and on one rank of a finished 4-rank run): the launcher
    would read that as a crash and restart a run that can only fail again, or that is done. So
    flush and ``os._exit`` with the code instead.

    Args:
        run: the worker's whole program.
        success_too: also leave at once after a normal end (exit code 0). Only for programs that
            close everything themselves before returning (the recipes: results, TensorBoard,
            checkpoints, the process group); ``atexit`` handlers do not run.
    """
    try:
        run()
    except SystemExit as stop:
        code = stop.code
        final = isinstance(code, int) and code in NO_RESTART or success_too and code in (0, None)
        if not final:
            raise
        _leave(code if isinstance(code, int) else 0)
    if success_too:
        _leave(0)


def _leave(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
