"""Run ``python -m launch ...`` from a test: in a session of its own, killed whole on a timeout.

A session of its own means that on a timeout (or pytest-timeout's interrupt) the launcher *and*
its workers are killed, so no test leaves orphans behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def launcher_env() -> dict[str, str]:
    """This environment without torchrun's PET_* settings, this checkout first on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PET_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = "5"
    return env


def run_launcher(args: list[str], timeout: float) -> tuple[int, str, float]:
    """``python -m launch ARGS``; returns (exit code, stdout+stderr, seconds)."""
    start = time.monotonic()
    with subprocess.Popen([sys.executable, "-m", "launch", *args], cwd=REPO, env=launcher_env(),
                          text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          start_new_session=True) as child:
        try:
            out, _ = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            out, _ = child.communicate()
            pytest.fail(f"launcher did not finish in {timeout} s:\n{out[-4000:]}")
        except BaseException:  # e.g. pytest-timeout's interrupt: leave no launcher behind
            os.killpg(child.pid, signal.SIGKILL)
            raise
    return child.returncode, out, time.monotonic() - start
