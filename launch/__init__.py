"""Process start-up, elastic restarts and checkpoints around `torch.distributed.run`.

- `python -m launch [torchrun options] -m MODULE [args]`: torchrun with elastic defaults (cli.py).
- `init_distributed` / `shutdown`: a training script's start and end, with or without torchrun.
- `Checkpointer` / `Resume`: per-rank atomic checkpoints; exact resume, or resume from the
  replica average when the world size changed.

The names are imported on first use, so that `python -m launch.tether` (every worker's first
step) arms its parent-death signal before torch is imported.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Checkpointer", "Resume", "Runtime", "init_distributed", "seed_everything", "shutdown"]

_HOME = {"Checkpointer": "checkpoint", "Resume": "checkpoint", "Runtime": "runtime",
         "init_distributed": "runtime", "seed_everything": "runtime", "shutdown": "runtime"}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
