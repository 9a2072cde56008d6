"""Shared pieces of the benchmarks: start-up under torchrun, timing, rank-0 printing."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist


def init() -> tuple[int, int]:
    """Join torchrun's gloo process group (the benchmarks run on CPU ranks)."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    dist.init_process_group("gloo", timeout=timedelta(minutes=5))
    return dist.get_rank(), dist.get_world_size()


def timed(fn: Callable[[], None], repeats: int, warmup: int = 2) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` runs, ranks aligned by a barrier each time."""
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


def say(*args: object) -> None:
    if dist.get_rank() == 0:
        print(*args, flush=True)
