"""Averages over replicas that several components share: the blocking weight average, the
asynchronous reference and buffer averages, and the one way a synchronisation is counted."""

from __future__ import annotations

import math

import torch

from ..base.comm import (
    PendingMean,
    replica_mean_scalar,
    start_distance_mean,
    start_replica_max,
    start_replica_mean,
)
from .component import Context


def count_sync(ctx: Context, *, local_squared: torch.Tensor | None = None, step: int = 0) -> None:
    """Count one synchronisation; with ``local_squared`` (this rank's ``||x~ - x_a||^2``, 0-dim),
    also start the scalar mean that becomes the consensus distance at ``step`` (``measure_bytes``;
    no step waits for it)."""
    ctx.meter.syncs += 1
    if local_squared is not None:
        start_distance_mean(local_squared, step, ctx.topo, ctx.meter)


def synchronize_weights(ctx: Context, scratch: list[torch.Tensor] | None = None, step: int | None = None) -> float:
    """Replace every replica's weights by their average; with ``scratch``, return ``S``.

    One in-place collective per flat group, concurrent with a max over integer buffers: no copy
    and nothing else, which is all CPSGD needs. With ``scratch`` (a parameter-shaped buffer per
    group: one device copy) it also computes ``S = mean_a ||x̄ - x_a||^2`` over the parameters
    exactly, as ADPSGD's controller needs (Jiang & Agrawal, Algorithm 2: one scalar all-reduce,
    part of the algorithm's communication), records it as the consensus distance at ``step`` and
    returns it; without, it returns NaN (not measured).
    """
    weights, topo, meter = ctx.weights, ctx.topo, ctx.meter
    if topo.num_replicas == 1:  # one replica is its own average: nothing to do or count
        return 0.0
    with torch.no_grad():
        if scratch is not None:
            for keep, seg in zip(scratch, weights.param_segments(), strict=True):
                keep.copy_(seg)
        works = start_replica_max(weights.max_segments(), topo, meter)
        start_replica_mean(weights.comm_segments(), topo, meter).wait()
        meter.wait(works)
        count_sync(ctx)
        if scratch is None:
            return math.nan
        for keep, seg in zip(scratch, weights.param_segments(), strict=True):
            keep.sub_(seg)
    distance = replica_mean_scalar(squared_norm(scratch), topo, meter, weights.device)
    meter.record_distance(distance, math.nan if step is None else step)
    return distance


def squared_norm(tensors: list[torch.Tensor]) -> float:
    """``sum ||t||^2`` over flat tensors, without temporaries."""
    with torch.no_grad():
        return sum(float(torch.dot(t, t)) for t in tensors)


class ReferenceAverage:
    """``x~ = mean_a(source_a)`` computed asynchronously into persistent buffers.

    The all-reduce runs on the topology's dedicated weight group so it overlaps computation and
    never queues behind the gradient all-reduce.
    """

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.buffers = [torch.empty_like(s) for s in ctx.weights.param_segments()]
        self._pending: PendingMean | None = None
        self.started = False

    def start(self, sources: list[torch.Tensor]) -> None:
        self.discard()
        with torch.no_grad():
            for buf, src in zip(self.buffers, sources, strict=True):
                buf.copy_(src)
        topo = self.ctx.topo
        self._pending = start_replica_mean(self.buffers, topo, self.ctx.meter, group=topo.weight_group)
        self.started = True

    def get(self) -> list[torch.Tensor]:
        """Wait for the average (if still in flight) and return it."""
        assert self.started, "reference used before it was started"
        if self._pending is not None:
            self._pending.wait()
            self._pending = None
        return self.buffers

    def discard(self) -> None:
        if self._pending is not None:
            self._pending.wait()
            self._pending = None
        self.started = False


class AsyncReplicaAverage:
    """The mean over replicas of some tensors and the max of others, in place and asynchronously.

    :meth:`start` launches both on the topology's weight group (so they never queue behind the
    gradient all-reduce) and returns at once; :meth:`finish` waits for whatever is in flight.
    """

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._mean: PendingMean | None = None
        self._max: list = []

    def start(self, means: list[torch.Tensor], maxes: list[torch.Tensor]) -> None:
        self.finish()
        ctx = self.ctx
        group = ctx.topo.weight_group
        with torch.no_grad():
            self._mean = start_replica_mean(means, ctx.topo, ctx.meter, group=group)
            self._max = start_replica_max(maxes, ctx.topo, ctx.meter, group=group)

    def finish(self) -> None:
        if self._mean is not None:
            self._mean.wait()
            self._mean = None
        if self._max:
            self.ctx.meter.wait(self._max)
            self._max = []


class BufferAverage:
    """Average floating buffers and max-reduce integer ones (BatchNorm statistics), asynchronously.

    Start it once the forward pass that updates the statistics is over and finish it before the
    next forward reads them: the optimizer step runs in between, and the (small) traffic hides.
    """

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._average = AsyncReplicaAverage(ctx)

    def start(self) -> None:
        self._average.start(self.ctx.weights.buffer_segments(), self.ctx.weights.max_segments())

    def finish(self) -> None:
        self._average.finish()
