"""Workers that die with their launcher: no orphans training on after `kill -9` of the launcher.

torchelastic starts every worker in a session of its own (`start_new_session=True`), so neither a
SIGKILL of the launcher nor one of its process group reaches the workers; they kept training as
orphans, and a rerun raced them in the checkpoint folder. `python -m launch` therefore starts each
worker as ``python -u -m launch.tether [-m] TARGET ARGS...``, which, before the target (and torch)
is even imported:

1. asks the kernel to SIGKILL this process when its parent dies (Linux `prctl(PR_SET_PDEATHSIG)`;
   the agent starts workers directly, from its main thread, so the parent is the launcher);
2. checks that the parent still is the launcher (`LAUNCH_AGENT_PID`): it may have died before 1;
3. starts a daemon thread that checks the parent once a second, the fallback where 1 is not
   available (it catches the re-parenting on macOS and other Unixes too).

Windows: `os.getppid()` keeps returning a dead parent's pid, so neither works there; run under a
job object (or WSL) if orphans matter. `init_distributed` applies the same tie to workers started
by plain `torchrun`, once their process group starts.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys
import threading
import time

from launch.exitcodes import exit_final_codes_at_once

__all__ = ["AGENT_PID_ENV", "die_with_parent", "main"]

AGENT_PID_ENV = "LAUNCH_AGENT_PID"
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_POLL_S = 1.0
_tied = False


def _set_parent_death_signal(sig: int) -> bool:
    """Linux only: deliver `sig` to this process when its parent dies. True if the kernel agreed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        status: int = libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        return status == 0
    except (OSError, AttributeError):
        return False


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(_POLL_S)
    os.kill(os.getpid(), signal.SIGKILL)


def die_with_parent(parent: int | None = None) -> None:
    """Make this process end (SIGKILL) within about a second of its parent's death.

    Idempotent. If the parent is already gone (it is not `parent`), the process ends now.

    Args:
        parent: the pid of the process that started this one (the launcher's agent); None: the
            current parent.
    """
    global _tied
    if _tied or os.name != "posix":
        return
    if parent is None:
        parent = os.getppid()
    _set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent:  # the launcher died before the death signal was armed
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=_watch, args=(parent,), name="launch-tether", daemon=True).start()
    _tied = True


def main(argv: list[str] | None = None) -> None:
    """`python -m launch.tether [-m] TARGET ARGS...`: tie to the parent, then run TARGET as
    `python [-m] TARGET ARGS...` would (as `__main__`, with `sys.argv` and `sys.path[0]` set)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # The launcher sets its pid just before it starts the agent, so it is never a stale value.
    agent = os.environ.get(AGENT_PID_ENV)
    die_with_parent(int(agent) if agent else None)
    if not argv:
        raise SystemExit("usage: python -m launch.tether [-m] TARGET [ARGS...]")
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        exit_final_codes_at_once(lambda: runpy.run_module(argv[1], run_name="__main__", alter_sys=True))
    else:
        sys.argv = argv
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
        exit_final_codes_at_once(lambda: runpy.run_path(argv[0], run_name="__main__"))


if __name__ == "__main__":
    main()
