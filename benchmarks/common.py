"""Shared pieces of the benchmarks: start-up, timing, rank-0 printing, and memory accounting.

The memory accounting is also what the tests check memory with (one place for it):
:func:`held_bytes` counts the tensor storage an algorithm keeps beyond the model and the
optimizer, :class:`AllocationRecorder` records every tensor allocated while it is active. Both
work on a CPU, where torch keeps no allocator statistics.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import commhooks


def init() -> tuple[int, int]:
    """Join torchrun's gloo process group, or make a world of one when not under torchrun.

    The benchmarks run on CPU ranks; ``BENCH_THREADS`` sets the intra-op threads (default 1).
    """
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    if "RANK" in os.environ:
        dist.init_process_group("gloo", timeout=timedelta(minutes=5))
    else:
        store = os.path.join(tempfile.mkdtemp(prefix="bench-"), "store")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1,
                                timeout=timedelta(minutes=5))
    return dist.get_rank(), dist.get_world_size()


def timed(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` runs, ranks aligned by a barrier each time.

    Whatever ``fn`` returns (a collective's work handle, say) is dropped."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    # The slowest rank decides a collective's time: take the max of the medians.
    t = torch.tensor([statistics.median(samples)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def ddp_without_buffer_sync(model: torch.nn.Module) -> DDP:
    """``model`` in DDP without the forward broadcast of rank 0's buffers (which would overwrite
    the replicas that every algorithm but SSGD keeps apart)."""
    kwargs: dict[str, Any] = commhooks.ddp_buffer_sync_kwargs(False)  # the keyword's name depends on torch
    return DDP(model, **kwargs)


def say(*args: object) -> None:
    if dist.get_rank() == 0:
        print(*args, flush=True)


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def model_bytes(module: torch.nn.Module) -> int:
    """``S``: bytes of the model's parameters."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def held_bytes(algo: Any) -> int:
    """Bytes of tensor storage an algorithm object keeps, beyond the model and the optimizer.

    Walks the algorithm's components and every object of the algorithm's own package they
    reference (lists, dicts and dataclasses included) and sums each distinct storage once.
    Storages of the model's parameters, buffers and gradients are left out (the flat buffers
    the model lives in are the model), and the optimizer is not walked (its state is the
    user's). Works for any version of the library: it only follows attributes.
    """
    module = algo.model.module
    excluded = {_storage_key(t)[0] for t in list(module.parameters()) + list(module.buffers())}
    excluded |= {_storage_key(p.grad)[0] for p in module.parameters() if p.grad is not None}
    package = type(algo).__module__.split(".")[0]
    found: dict[int, int] = {}
    seen: set[int] = set()

    def walk(obj: Any) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            ptr, nbytes = _storage_key(obj)
            if ptr and ptr not in excluded:
                found[ptr] = nbytes
        elif isinstance(obj, (list, tuple, set)):
            for item in obj:
                walk(item)
        elif isinstance(obj, dict):
            for item in obj.values():
                walk(item)
        elif type(obj).__module__.split(".")[0] == package and hasattr(obj, "__dict__"):
            for item in vars(obj).values():
                walk(item)

    walk(algo.components)
    return sum(found.values())


class AllocationRecorder(TorchDispatchMode):
    """Records the size of every tensor storage allocated by an operator while active.

    An operator's output counts as an allocation when its storage is none of its inputs'
    (views and in-place results share an input's storage; ``out=`` tensors are inputs). Works on
    any device, without allocator statistics. Use :meth:`paused` around code that is not to be
    counted (for instance the user's optimizer step: :meth:`exclude_optimizer`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []
        self._paused = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self._paused:
            inputs = {_storage_key(t)[0] for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    ptr, nbytes = _storage_key(t)
                    if nbytes and ptr not in inputs:
                        self.sizes.append(nbytes)
                        inputs.add(ptr)
        return out

    @contextmanager
    def paused(self) -> Iterator[None]:
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    @contextmanager
    def exclude_optimizer(self, optimizer: torch.optim.Optimizer) -> Iterator[None]:
        """Do not count what ``optimizer.step()`` allocates (the user's optimizer, not ours)."""

        def pause(*_: Any) -> None:
            self._paused += 1

        def resume(*_: Any) -> None:
            self._paused -= 1

        handles = [optimizer.register_step_pre_hook(pause), optimizer.register_step_post_hook(resume)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @property
    def largest(self) -> int:
        return max(self.sizes, default=0)

    @property
    def total(self) -> int:
        return sum(self.sizes)
