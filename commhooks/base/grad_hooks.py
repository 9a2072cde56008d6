"""DDP communication hooks for gradients: all-reduce over a group, local, and compression.

DDP allows one ``register_comm_hook`` per model, but CPSGD/ADPSGD switch from SSGD (global
all-reduce) to local steps after warm-up, so the hook reads its group from a mutable state that
the algorithm sets before each backward. ``group=None`` means no exchange (local gradients).
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from .comm import CommMeter


@dataclass(kw_only=True)
class GradSyncState:
    """State of the gradient hook.

    Args:
        group: the group gradients are averaged over, or ``None`` for none (local gradients).
        meter: where bytes and blocked seconds are charged.
        on_backward: called once per backward, before the first bucket is reduced. Set by
            ``commhooks.Algorithm`` only, which checks the step there and dispatches the
            components' ``backward_started`` phase (the gossip exchange starts there so it
            overlaps the rest of the backward pass).
        step: the step whose backward runs (set by the algorithm; QSGD seeds its draws with it).
    """

    group: ProcessGroup | None
    meter: CommMeter
    on_backward: Callable[[], None] | None = None
    step: int = 0
    _started: bool = False
    _launched: list[float] = field(default_factory=list)
    _done: list[float] = field(default_factory=list)

    def begin_bucket(self) -> None:
        if not self._started:
            self._started = True
            if self.on_backward is not None:
                self.on_backward()

    def end_backward(self) -> None:
        """Charge the gradient communication that outlasted the backward pass, and re-arm.

        DDP waits for the hooks' futures inside backward, so the blocked time is estimated as
        the tail between the last bucket's launch (≈ the end of the gradient computation) and
        the last completion.
        """
        if self._launched and self._done:
            self.meter.comm_seconds += max(0.0, max(self._done) - max(self._launched))
        self._launched.clear()
        self._done.clear()
        self._started = False


Hook = Callable[[GradSyncState, dist.GradBucket], torch.futures.Future]


def _completed(tensor: torch.Tensor) -> torch.futures.Future:
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(tensor)
    return fut


# No ``from __future__ import annotations`` here: DDP checks hooks' annotations at runtime.
def allreduce_hook(state: GradSyncState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Mean of the bucket over ``state.group`` (divide, then sum: DDP's own arithmetic)."""
    state.begin_bucket()
    tensor = bucket.buffer()
    if state.group is None:
        return _completed(tensor)
    size = dist.get_world_size(state.group)
    tensor.div_(size)
    state.meter.count([tensor])
    state._launched.append(time.perf_counter())
    work = dist.all_reduce(tensor, group=state.group, async_op=True)

    def finish(fut: torch.futures.Future) -> torch.Tensor:
        state._done.append(time.perf_counter())
        reduced: torch.Tensor = fut.value()[0]
        return reduced

    return work.get_future().then(finish)


def compress_wrapper(hook: Hook, dtype: torch.dtype) -> Hook:
    """Wrap any gradient hook so that its bucket travels in ``dtype`` (fp16/bf16) and is cast back.

    Args:
        hook: the hook to wrap; it sees a bucket whose buffer is the compressed tensor.
        dtype: ``torch.float16`` or ``torch.bfloat16``.
    """

    def compressed_hook(state: GradSyncState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        if state.group is None:  # nothing travels: casting would only lose precision
            return hook(state, bucket)
        original = bucket.buffer()
        bucket.set_buffer(original.to(dtype))
        fut = hook(state, bucket)

        def decompress(f: torch.futures.Future) -> torch.Tensor:
            original.copy_(f.value())
            return original

        return fut.then(decompress)

    return compressed_hook
