"""Exit codes that end a job at once: the launcher does not restart a worker that exits with one.

A restart helps when a process or a peer was lost; it cannot help a command line that is wrong,
a data set that is missing or a run whose loss became NaN — those fail again, identically, after
every restart, printing the same error each time. Workers report such failures with one of these
codes; `python -m launch` then stops the job after the first attempt and exits with the same code.
Any other non-zero exit (a crash, a lost peer, a collective timeout, a signal) is restarted up to
`--max-restarts` times.
"""

from __future__ import annotations

EXIT_USAGE = 2
"""Bad command line, configuration, hyper-parameter or replica size, or missing data (argparse's code)."""

EXIT_DIVERGED = 3
"""The loss or the weights became non-finite; the last good checkpoints are kept."""

NO_RESTART: dict[int, str] = {
    EXIT_USAGE: "a usage, configuration or data error",
    EXIT_DIVERGED: "training diverged (non-finite loss or weights)",
}
"""Exit code -> what it means, for every code that is never restarted."""
