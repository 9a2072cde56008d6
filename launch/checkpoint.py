"""Per-rank, atomic, elastic-aware checkpoints.

Layout of a checkpoint directory::

    step_000000120/
        rank_00000.pt ... rank_0000{W-1}.pt   # each rank's own state (replicas differ)
        average.pt                            # rank 0: the replica average of the model, W, extra
        COMPLETE                              # written by rank 0 after every rank has written

Every file is written to a temporary name, fsynced and renamed, so a crash leaves either the
old file or the new one. A step counts only when COMPLETE exists; `latest` picks the newest such
step, so a crash in the middle of a save falls back to the previous complete one. The last
`keep` complete steps are kept. The directory must be visible to every node (shared filesystem):
after a restart torchrun may hand a rank number to a process on another node.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed import ReduceOp

from .runtime import Runtime

__all__ = ["Checkpointer", "Resume"]

_STEP_DIR = re.compile(r"^step_(\d+)$")
MARKER = "COMPLETE"
AVERAGE = "average.pt"


def _rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP (or the module itself), whose state_dict has no 'module.'."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _fsync_dir(path: Path) -> None:
    # The rename itself is only durable once the directory entry is on disk.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Any) -> None:
    """Write a file through `write(fileobj)` to a temporary name, fsync, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def _atomic_save(obj: object, path: Path) -> None:
    """`torch.save` `obj` to `path` atomically (temporary name, fsync, rename)."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _load(path: Path) -> dict[str, Any]:
    # weights_only=False: the files hold RNG states (tuples, NumPy arrays) and loader states, and
    # are written by this module into the user's own checkpoint directory.
    return torch.load(path, map_location="cpu", weights_only=False)


class Checkpointer:
    """Save and find per-rank checkpoints of a commhooks training run.

    Args:
        directory: where the `step_*` folders live; created if missing. Shared by all nodes.
        runtime: the `Runtime` from `init_distributed`.
        keep: how many complete steps to keep (>= 1); older ones are deleted after each save.
    """

    def __init__(self, directory: str | os.PathLike, runtime: Runtime, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.runtime = runtime
        self.keep = keep
        self.directory.mkdir(parents=True, exist_ok=True)

    def step_dir(self, step: int) -> Path:
        """The folder of one step's checkpoint."""
        return self.directory / f"step_{step:09d}"

    # -- collectives -------------------------------------------------------------------------

    def _all_ok(self, ok: bool) -> bool:
        """True on every rank iff `ok` was True on every rank (one MIN all-reduce)."""
        if self.runtime.world_size == 1 and not dist.is_initialized():
            return ok
        flag = torch.tensor([1 if ok else 0], dtype=torch.int64, device=self.runtime.device)
        dist.all_reduce(flag, op=ReduceOp.MIN)
        return bool(flag.item())

    def _broadcast_ints(self, values: list[int]) -> list[int]:
        if not dist.is_initialized():
            return values
        t = torch.tensor(values, dtype=torch.int64, device=self.runtime.device)
        dist.broadcast(t, src=0)
        return [int(v) for v in t.tolist()]

    # -- scanning (rank 0) -------------------------------------------------------------------

    def _steps(self) -> list[tuple[int, Path]]:
        found = []
        for p in self.directory.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
        return sorted(found)

    @staticmethod
    def _complete_world_size(path: Path) -> int | None:
        """The world size recorded in a step's marker, or None if the step is not complete."""
        try:
            meta = json.loads((path / MARKER).read_text())
            world_size = int(meta["world_size"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        files = [_rank_file(r) for r in range(world_size)] + [AVERAGE]
        if not all((path / f).is_file() for f in files):
            return None
        return world_size

    @staticmethod
    def _remove(path: Path) -> None:
        # The marker goes first: a crash half way through never leaves a "complete" step with
        # files missing.
        (path / MARKER).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)

    def _prune(self) -> None:
        steps = self._steps()
        complete = [(s, p) for s, p in steps if self._complete_world_size(p) is not None]
        if not complete:
            return
        newest = complete[-1][0]
        kept = {s for s, _ in complete[-self.keep :]}
        for s, p in steps:
            # Older incomplete steps are leftovers of crashed saves. Newer ones (a crashed
            # earlier attempt that got further) stay until this run reaches and rewrites them.
            if s not in kept and s <= newest:
                self._remove(p)

    # -- public API --------------------------------------------------------------------------

    def save(
        self,
        step: int,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        algorithm: Any,
        loader: Any = None,
        extra: dict | None = None,
    ) -> None:
        """Write this step's checkpoint. Collective: every rank calls it at the same step.

        Args:
            step: the number of optimizer steps done (resume continues with this many done).
            model: the DDP model or the plain module (the plain module's state_dict is saved).
            optimizer: the optimizer.
            algorithm: the object `commhooks.build` returned (its `state_dict` and `consensus`).
            loader: a `torchdata.stateful_dataloader.StatefulDataLoader` (its position), or None.
            extra: picklable user state (epoch, metrics, ...), returned as `Resume.extra`.
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        rt = self.runtime
        folder = self.step_dir(step)
        error: BaseException | None = None
        if rt.is_main:
            try:
                if folder.exists():  # a crashed earlier attempt at this step (or a re-save)
                    self._remove(folder)
                folder.mkdir(parents=True)
            except OSError as e:
                error = e
        # Also a barrier: no rank writes into the folder before rank 0 has cleared it.
        if not self._all_ok(error is None):
            raise RuntimeError(f"checkpoint step {step}: rank 0 could not prepare {folder}") from error

        plain = _unwrap(model)
        # Collective (every rank takes part); the local weights come back unchanged on exit.
        with algorithm.consensus():
            average = {k: v.detach().to("cpu", copy=True) for k, v in plain.state_dict().items()}

        try:
            state = {
                "step": step,
                "rank": rt.rank,
                "world_size": rt.world_size,
                "model": plain.state_dict(),
                "optimizer": optimizer.state_dict(),
                "algorithm": algorithm.state_dict(),
                "loader": loader.state_dict() if loader is not None else None,
                "rng": _rng_state(),
                "extra": extra or {},
            }
            _atomic_save(state, folder / _rank_file(rt.rank))
            if rt.is_main:
                _atomic_save(
                    {"step": step, "world_size": rt.world_size, "model": average,
                     "extra": extra or {}},
                    folder / AVERAGE,
                )
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            error = e
        # Every rank learns whether every rank wrote its file; an error is raised everywhere
        # rather than leaving the others blocked in the next collective.
        if not self._all_ok(error is None):
            raise RuntimeError(
                f"checkpoint step {step}: "
                + (f"this rank failed: {error!r}" if error else "another rank failed to write")
            ) from error
        if rt.is_main:
            marker = {"step": step, "world_size": rt.world_size}
            _atomic_write(folder / MARKER, lambda f: f.write(json.dumps(marker).encode()))
            self._prune()

    def latest(self) -> Resume | None:
        """The newest complete checkpoint, or None. Collective: rank 0 decides, all ranks agree."""
        step, world_size = -1, 0
        if self.runtime.is_main:
            for s, p in reversed(self._steps()):
                ws = self._complete_world_size(p)
                if ws is not None:
                    step, world_size = s, ws
                    break
        step, world_size = self._broadcast_ints([step, world_size])
        if step < 0:
            return None
        return Resume(
            folder=self.step_dir(step), step=step, saved_world_size=world_size,
            runtime=self.runtime,
        )


class Resume:
    """A complete checkpoint to continue from (returned by `Checkpointer.latest`).

    Same world size: every rank gets back exactly its own state and the run continues
    bit-identically. Different world size (`resized`): every rank starts from the saved replica
    average with fresh optimizer, algorithm and data-loader state.

    Args:
        folder: the step's folder.
        step: the saved step.
        saved_world_size: the world size that wrote it.
        runtime: this process's `Runtime`.
    """

    def __init__(self, *, folder: Path, step: int, saved_world_size: int, runtime: Runtime) -> None:
        self.folder = folder
        self.step = step
        self.saved_world_size = saved_world_size
        self.runtime = runtime
        self.resized = saved_world_size != runtime.world_size
        self._own: dict[str, Any] | None = None
        self._average: dict[str, Any] | None = None

    def _own_state(self) -> dict[str, Any]:
        if self._own is None:
            self._own = _load(self.folder / _rank_file(self.runtime.rank))
        return self._own

    def _average_state(self) -> dict[str, Any]:
        if self._average is None:
            self._average = _load(self.folder / AVERAGE)
        return self._average

    @property
    def extra(self) -> dict:
        """The `extra` passed to `save` (rank 0's when resized)."""
        return (self._average_state() if self.resized else self._own_state())["extra"]

    def load_model(self, model: torch.nn.Module) -> None:
        """Load the weights: this rank's own, or the replica average when resized.

        Call after wrapping in DDP (its constructor broadcasts rank 0's weights) and before
        `commhooks.build`.

        Args:
            model: the DDP model or the plain module.
        """
        source = self._average_state() if self.resized else self._own_state()
        _unwrap(model).load_state_dict(source["model"])

    def load_training(self, *, optimizer: torch.optim.Optimizer, algorithm: Any, loader: Any = None) -> None:
        """Restore optimizer, algorithm, loader position and RNG states (fresh when resized).

        Call after `commhooks.build`. Collective (the algorithm checks that ranks agree).

        Args:
            optimizer: the optimizer.
            algorithm: the object `commhooks.build` returned.
            loader: the `StatefulDataLoader` whose position was saved, or None.
        """
        rt = self.runtime
        if self.resized:
            if rt.is_main:
                print(
                    f"resumed from step {self.step} written by {self.saved_world_size} ranks; "
                    f"world size is now {rt.world_size}: starting every rank from the replica "
                    "average with fresh optimizer and algorithm state",
                    flush=True,
                )
            return
        state = self._own_state()
        optimizer.load_state_dict(state["optimizer"])
        algorithm.load_state_dict(state["algorithm"])
        if loader is not None:
            if state["loader"] is None:
                raise ValueError(f"loader: the checkpoint in {self.folder} was saved without one")
            loader.load_state_dict(state["loader"])
        # Last: building the model, DDP and the algorithm may have drawn random numbers.
        _set_rng_state(state["rng"])
