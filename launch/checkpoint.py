"""Per-rank, atomic, elastic-aware checkpoints.

Layout of a checkpoint directory::

    step_000000120/
        rank_00000.pt ... rank_0000{W-1}.pt   # each rank's own state (replicas differ)
        average.pt                            # rank 0: the replica average of the model, W, extra
        COMPLETE                              # written by rank 0 after every rank has written

Every file is written to a temporary name, fsynced and renamed, so a crash leaves either the
old file or the new one. A step counts only when COMPLETE exists, and COMPLETE is written only
after every rank has checked that its state is finite (a diverged run raises `NonFiniteError`
instead of saving). `latest` picks the newest complete step whose files every rank can load;
a crash in the middle of a save, a truncated or corrupt file, or a file that is not a plain
checkpoint falls back, on every rank together, to the previous complete step, and says which
file was skipped and why. After a save, that step and the `keep - 1` complete steps before it
are kept, so a good step is never rotated out by leftovers of another attempt.

Files are read with `torch.load(weights_only=True)`: tensors, numbers, strings and plain
containers, nothing that can run code. Everything this module writes is of those types (the
NumPy RNG state is stored as a tensor); `extra` must be too, or its types be named in
`Checkpointer(safe_globals=...)`. The directory must be visible to every node (shared
filesystem): after a restart torchrun may hand a rank number to a process on another node.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import zipfile
from collections.abc import Iterable, Mapping
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from commhooks import rank_min

from .finite import NonFiniteError, named_tensors, nonfinite
from .runtime import Runtime

__all__ = ["Checkpointer", "NonFiniteError", "Resume"]

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
    # NumPy's state holds an ndarray: stored as a tensor, it loads without allow-listing NumPy.
    legacy = np.random.get_state(legacy=True)
    assert isinstance(legacy, tuple)  # a dict only for bit generators other than the global MT19937
    name, keys, pos, has_gauss, cached = legacy
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                  float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_PLAIN = (str, int, float, bool, type(None), torch.Tensor, torch.dtype, torch.device, torch.Size)


def _check_plain(obj: Any, where: str, allowed: tuple[type, ...]) -> None:
    """Raise TypeError if `obj` holds something `torch.load(weights_only=True)` would refuse."""
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            _check_plain(k, where, allowed)
            _check_plain(v, f"{where}[{k!r}]", allowed)
    elif isinstance(obj, (list, tuple, set)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]", allowed)
    elif not isinstance(obj, _PLAIN + allowed):
        raise TypeError(
            f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}: checkpoints hold only "
            "tensors, numbers, strings and dicts/lists/tuples of them (pass the type in "
            "Checkpointer(safe_globals=[...]) to allow it)"
        )


def _load(path: Path, safe_globals: Iterable[Any] = ()) -> Any:
    """Read a checkpoint file with weights-only unpickling: data only, never code.

    Whatever the file holds comes back (`Checkpointer` writes dicts; `_try_load` checks)."""
    with torch.serialization.safe_globals(list(safe_globals)):
        return torch.load(path, map_location="cpu", weights_only=True)


def _why_unloadable(path: Path, error: BaseException) -> str:
    """A one-line reason why `_load(path)` failed, for the message naming the skipped file."""
    text = str(error)
    for line in text.splitlines():
        if "Unsupported global" in line:  # a pickle that asks to import something
            what = line.split("GLOBAL", 1)[-1].split()[0] if "GLOBAL" in line else line.strip()
            return (f"refused by weights-only loading: it asks for {what}, which no checkpoint "
                    "written here contains (a foreign or tampered file)")
    first = (text.strip().splitlines() or [""])[0][:200]
    if path.is_file() and not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        return (f"truncated or corrupt: not a complete torch.save archive "
                f"({path.stat().st_size} bytes)")
    return f"{type(error).__name__}: {first}"


class Checkpointer:
    """Save and find per-rank checkpoints of a commhooks training run.

    Args:
        directory: where the `step_*` folders live; created if missing. Shared by all nodes.
        runtime: the `Runtime` from `init_distributed`.
        keep: how many complete steps to keep (>= 1): after a save, that step and the `keep - 1`
            complete steps before it; older ones are deleted.
        safe_globals: classes beyond tensors, numbers, strings and plain containers that `extra`
            may hold (allow-listed for weights-only loading); none by default.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        runtime: Runtime,
        keep: int = 2,
        safe_globals: Iterable[type] = (),
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.runtime = runtime
        self.keep = keep
        self.safe_globals = tuple(safe_globals)
        self.directory.mkdir(parents=True, exist_ok=True)

    def step_dir(self, step: int) -> Path:
        """The folder of one step's checkpoint."""
        return self.directory / f"step_{step:09d}"

    # -- collectives -------------------------------------------------------------------------

    def _all_ok(self, ok: bool) -> bool:
        """True on every rank iff `ok` was True on every rank (one MIN all-reduce)."""
        return rank_min(int(ok)) == 1

    def _gather(self, value: Any) -> list[Any]:
        """Every rank's `value` (picklable), on every rank; only on the rare failure paths."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return [value]
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, value)
        return out

    def _say(self, message: str) -> None:
        if self.runtime.is_main:
            print(f"checkpoint: {message}", file=sys.stderr, flush=True)

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
    def _completeness(path: Path) -> tuple[int | None, str]:
        """(world size in the step's marker, "") if the step is complete, else (None, why not)."""
        if not (path / MARKER).exists():
            return None, f"incomplete (no {MARKER} marker: its save was interrupted)"
        try:
            meta = json.loads((path / MARKER).read_text())
            world_size = int(meta["world_size"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            return None, f"unreadable {MARKER} marker ({type(e).__name__})"
        files = [_rank_file(r) for r in range(world_size)] + [AVERAGE]
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            return None, f"incomplete ({', '.join(missing)} missing)"
        return world_size, ""

    @classmethod
    def _complete_world_size(cls, path: Path) -> int | None:
        """The world size recorded in a step's marker, or None if the step is not complete."""
        return cls._completeness(path)[0]

    @staticmethod
    def _remove(path: Path) -> None:
        # The marker goes first: a crash half way through never leaves a "complete" step with
        # files missing.
        (path / MARKER).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)

    def _prune(self, saved: int) -> None:
        """Keep `saved` and the `keep - 1` complete steps before it; delete older steps.

        Counting back from the step just written (finite, complete) means a good step is never
        pushed out by newer folders that this run did not write. Newer ones (an earlier attempt
        that got further, a file that would not load) stay until this run rewrites them.
        """
        steps = self._steps()
        complete = [s for s, p in steps if s <= saved and self._complete_world_size(p) is not None]
        kept = set(complete[-self.keep :]) | {saved}
        for s, p in steps:
            if s < saved and s not in kept:  # also older incomplete steps: crashed saves
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
        try:
            _check_plain(extra or {}, "extra", self.safe_globals)
        except TypeError as e:
            error = e
        if rt.is_main and error is None:
            try:
                if folder.exists():  # a crashed earlier attempt at this step (or a re-save)
                    self._remove(folder)
                folder.mkdir(parents=True)
            except OSError as e:
                error = e
        # Also a barrier: no rank writes into the folder before rank 0 has cleared it.
        if not self._all_ok(error is None):
            self._abandon(folder)
            if isinstance(error, TypeError):
                raise error
            raise RuntimeError(
                f"checkpoint step {step}: "
                + (f"could not prepare {folder}: {error!r}" if error else "failed on another rank")
            ) from error

        plain = _unwrap(model)
        # Collective (every rank takes part); the local weights come back unchanged on exit.
        with algorithm.consensus():
            average = {k: v.detach().to("cpu", copy=True) for k, v in plain.state_dict().items()}

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
        # A diverged state is never written: it would become the step a restart resumes from.
        bad = nonfinite(chain(
            named_tensors(state["model"], "model"),
            named_tensors(state["optimizer"]["state"], "optimizer.state"),
            named_tensors(state["algorithm"], "algorithm"),
            named_tensors(average if rt.is_main else {}, "average"),
        ))
        if not self._all_ok(not bad):
            reports = self._gather(bad)
            self._abandon(folder)
            where = "; ".join(f"rank {r}: {_some(names)}" for r, names in enumerate(reports) if names)
            raise NonFiniteError(f"step {step}: non-finite values, checkpoint not written ({where})")

        try:
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
            marker = {"step": step, "world_size": rt.world_size, "finite": True}
            _atomic_write(folder / MARKER, lambda f: f.write(json.dumps(marker).encode()))
            self._prune(step)

    def _abandon(self, folder: Path) -> None:
        """Rank 0 removes a step folder a failed save created (a no-op elsewhere)."""
        if self.runtime.is_main and folder.exists():
            self._remove(folder)

    def _try_load(self, path: Path, step: int, world_size: int) -> tuple[dict | None, str | None]:
        """(state, None) if `path` loads and is the expected file of this step, else (None, why)."""
        try:
            state = _load(path, self.safe_globals)
        except Exception as e:  # noqa: BLE001 - any reason makes the file unusable; named below
            return None, _why_unloadable(path, e)
        expect: dict[str, Any] = {"step": step, "world_size": world_size}
        keys = {"model", "extra"}
        if path.name != AVERAGE:
            expect["rank"] = self.runtime.rank
            keys |= {"optimizer", "algorithm", "loader", "rng"}
        if not isinstance(state, dict):
            return None, f"holds a {type(state).__name__}, not a checkpoint"
        wrong = [f"{k} {state.get(k)!r} (expected {v!r})" for k, v in expect.items() if state.get(k) != v]
        missing = sorted(keys - set(state))
        if wrong or missing:
            return None, "not this step's file: " + ", ".join(wrong + [f"no {k!r}" for k in missing])
        return state, None

    def latest(self) -> Resume | None:
        """The newest complete checkpoint that every rank can load, or None. Collective.

        Rank 0 proposes complete steps, newest first; every rank loads the file it needs (its
        own, or the replica average after a resize) and all agree on the first step that loads
        everywhere. Skipped steps are named on rank 0's stderr, with the file and the reason.
        """
        rt = self.runtime
        entries = list(reversed(self._steps())) if rt.is_main else []
        tried = 0
        while True:
            step, world_size = -1, 0
            while entries:  # rank 0: the next complete step; incomplete newer ones are reported
                s, p = entries.pop(0)
                ws, incomplete = self._completeness(p)
                if ws is not None:
                    step, world_size = s, ws
                    break
                self._say(f"skipping {p.name}: {incomplete}")
            step, world_size = self._broadcast_ints([step, world_size])
            if step < 0:
                if tried:
                    self._say("no usable checkpoint left: starting from scratch")
                return None
            folder = self.step_dir(step)
            name = AVERAGE if world_size != rt.world_size else _rank_file(rt.rank)
            state, why = self._try_load(folder / name, step, world_size)
            if self._all_ok(why is None):
                if tried:
                    self._say(f"resuming from {folder.name}, the newest step every rank can load")
                return Resume(folder=folder, step=step, saved_world_size=world_size,
                              runtime=rt, state=state, safe_globals=self.safe_globals)
            for r, (file, reason) in enumerate(self._gather((name, why))):
                if reason is not None:
                    self._say(f"skipping {folder.name}: {file} (needed by rank {r}): {reason}")
            tried += 1

    def newest_step(self) -> int | None:
        """The newest complete step on disk (rank 0's view; no collective), or None."""
        for s, p in reversed(self._steps()):
            if self._complete_world_size(p) is not None:
                return s
        return None


def _some(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


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
        state: the file this rank needs, already loaded (its own, or the average when resized).
        safe_globals: extra classes allowed when a file is loaded here.
    """

    def __init__(
        self,
        *,
        folder: Path,
        step: int,
        saved_world_size: int,
        runtime: Runtime,
        state: dict[str, Any] | None = None,
        safe_globals: Iterable[type] = (),
    ) -> None:
        self.folder = folder
        self.step = step
        self.saved_world_size = saved_world_size
        self.runtime = runtime
        self.resized = saved_world_size != runtime.world_size
        self.safe_globals = tuple(safe_globals)
        self._own: dict[str, Any] | None = None if self.resized else state
        self._average: dict[str, Any] | None = state if self.resized else None

    def _own_state(self) -> dict[str, Any]:
        if self._own is None:
            self._own = _load(self.folder / _rank_file(self.runtime.rank), self.safe_globals)
        return self._own

    def _average_state(self) -> dict[str, Any]:
        if self._average is None:
            self._average = _load(self.folder / AVERAGE, self.safe_globals)
        return self._average

    @property
    def extra(self) -> dict[str, Any]:
        """The `extra` passed to `save` (rank 0's when resized)."""
        extra: dict[str, Any] = (self._average_state() if self.resized else self._own_state())["extra"]
        return extra

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
