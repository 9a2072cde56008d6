"""Process start-up, elastic restarts and checkpoints around `torch.distributed.run`.

- `python -m launch [torchrun options] -m MODULE [args]`: torchrun with elastic defaults (cli.py).
- `init_distributed` / `shutdown`: a training script's start and end, with or without torchrun.
- `Checkpointer` / `Resume`: per-rank atomic checkpoints; exact resume, or resume from the
  replica average when the world size changed.
"""

from .checkpoint import Checkpointer, Resume
from .runtime import Runtime, init_distributed, seed_everything, shutdown

__all__ = ["Checkpointer", "Resume", "Runtime", "init_distributed", "seed_everything", "shutdown"]
