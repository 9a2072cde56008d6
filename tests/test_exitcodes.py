"""``launch.exitcodes.exit_final_codes_at_once``: final codes (and, for the recipes, success) leave
the process at once, skipping the interpreter's teardown; anything else is left to it."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROGRAM = """
import atexit, sys
from launch.exitcodes import exit_final_codes_at_once
atexit.register(lambda: print("teardown ran", flush=True))
def run():
    print("ran", flush=True)
    if {code!r} is not None:
        sys.exit({code!r})
exit_final_codes_at_once(run, success_too={success_too!r})
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("code", "success_too", "exit_code", "teardown"), [
    (None, False, 0, True),    # a normal end: the usual teardown
    (None, True, 0, False),    # the recipes: leave at once after closing everything
    (0, True, 0, False),
    (3, False, 3, False),      # diverged: never restarted, leave at once
    (2, True, 2, False),       # usage error
    (1, True, 1, True),        # any other code is the interpreter's (the launcher may restart)
])
def test_final_codes_leave_at_once(code, success_too, exit_code, teardown):
    r = subprocess.run([sys.executable, "-c", PROGRAM.format(code=code, success_too=success_too)],
                       capture_output=True, text=True, timeout=50)
    assert r.returncode == exit_code, r.stderr
    assert "ran" in r.stdout
    assert ("teardown ran" in r.stdout) == teardown, r.stdout
