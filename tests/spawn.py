"""Run a function on several gloo ranks (forked processes), with a hard timeout.

``run_ranks(fn, world_size, *args, **kwargs)`` calls ``fn(rank, world_size, *args, **kwargs)`` in
``world_size`` processes that share a FileStore process group, and returns the list of their
return values (saved with ``torch.save``, so tensors come back intact). Pass options by keyword,
``run_ranks(train, 4, "cpsgd", hp, steps=12, replica_size=2)``; ``timeout`` is the helper's own.
A rank that raises makes the call raise with its traceback; a rank that hangs (a collective
nobody answers) is killed at ``timeout``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch._dynamo  # DDP imports it lazily (~900 modules): once here, not in every forked rank
import torch.distributed as dist


def _entry(fn: Callable[..., Any], rank: int, world_size: int, workdir: str, timeout: float,
           args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    result_path = os.path.join(workdir, f"result_{rank}.pt")
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{os.path.join(workdir, 'store')}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout),
        )
        result = fn(rank, world_size, *args, **kwargs)
        torch.save({"ok": result}, result_path)
        dist.barrier()  # no rank tears its group down while a peer still talks to it
    except BaseException:  # report everything, including assertion errors, to the parent
        torch.save({"error": traceback.format_exc()}, result_path)
        os._exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    os._exit(0)


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 60.0, **kwargs: Any) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` gloo ranks; return their results.

    A rank that raises makes this raise with every failed rank's traceback; ranks still running
    after ``timeout`` seconds are killed and this raises ``TimeoutError``.
    """
    ctx = mp.get_context("fork")
    with tempfile.TemporaryDirectory() as workdir:
        procs = [
            ctx.Process(target=_entry, args=(fn, r, world_size, workdir, timeout, args, kwargs), daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results: list[Any] = []
        errors: list[str] = []
        for r in range(world_size):
            path = os.path.join(workdir, f"result_{r}.pt")
            if not os.path.exists(path):
                results.append(None)
                continue
            out = torch.load(path, weights_only=False)
            if "error" in out:
                errors.append(f"--- rank {r} ---\n{out['error']}")
            results.append(out.get("ok"))
        if errors:
            raise RuntimeError("rank(s) failed:\n" + "\n".join(errors))
        if hung:
            raise TimeoutError(f"rank(s) {hung} still running after {timeout}s (a hung collective?)")
        return results
