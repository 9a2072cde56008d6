"""Periodic weight averaging (CPSGD, ADPSGD) and the gradient scope with its warm-up.

Jiang & Agrawal, "Adaptive Periodic Averaging", Algorithm 1 (constant period) and Algorithm 2
(adaptive period), arXiv 2007.06134. Not to be confused with "AD-PSGD" (asynchronous decentralized
parallel SGD) elsewhere in the literature.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist

from .algorithm import Component, Context
from .comm import replica_max_, replica_mean_, replica_mean_scalar


class GradientScope(Component):
    """Gradients are averaged over all ranks before step ``global_until``, inside the replica after.

    Args:
        ctx: the shared context.
        global_until: the first step with local gradients (``math.inf``: always global, SSGD).
    """

    def __init__(self, ctx: Context, global_until: float) -> None:
        self.ctx, self.global_until = ctx, global_until

    def prepare(self, k: int) -> None:
        # Set before step k's backward: the hook reads it while DDP reduces buckets.
        if k < self.global_until:
            self.ctx.grad_state.group = dist.group.WORLD if self.ctx.topo.world_size > 1 else None
        else:
            self.ctx.grad_state.group = self.ctx.topo.replica_group


def synchronize_weights(ctx: Context, scratch: list[torch.Tensor]) -> float:
    """Replace every replica's weights by their average; return ``S = mean_a ||x̄ - x_a||^2``.

    One in-place collective per flat group (plus a max for integer buffers), and one scalar
    all-reduce for ``S`` (docs/periodic.md, ADPSGD step 2). ``S`` is over parameters only; the local
    parameters are kept in ``scratch`` (one device copy) and turned into ``x_a - x̄`` in place.
    """
    weights, topo, meter = ctx.weights, ctx.topo, ctx.meter
    if topo.num_replicas == 1:  # one replica is its own average: nothing to do or count
        return 0.0
    with torch.no_grad():
        for keep, seg in zip(scratch, weights.param_segments()):
            keep.copy_(seg)
        replica_mean_(weights.comm_segments(), topo, meter)
        replica_max_(weights.max_segments(), topo, meter)
        for keep, seg in zip(scratch, weights.param_segments()):
            keep.sub_(seg)
    meter.syncs += 1
    return record_distance(ctx, squared_norm(scratch))


def squared_norm(tensors: list[torch.Tensor]) -> float:
    """``sum ||t||^2`` over flat tensors, without temporaries."""
    with torch.no_grad():
        return sum(float(torch.dot(t, t)) for t in tensors)


def record_distance(ctx: Context, local_squared: float) -> float:
    """Store ``mean_a ||x̄ - x_a||^2`` (one scalar all-reduce of this rank's ``||x̄ - x_a||^2``)."""
    distance = replica_mean_scalar(local_squared, ctx.topo, ctx.meter, ctx.weights.device)
    ctx.meter.consensus_distance = distance
    return distance


@dataclass(kw_only=True)
class ConstantPeriod:
    """CPSGD: synchronise every ``period`` local steps (arXiv 2007.06134, Algorithm 1)."""

    period: int

    def update(self, distance: float, lr: float, k: int) -> None:
        pass


@dataclass(kw_only=True)
class AdaptivePeriod:
    """ADPSGD's controller (arXiv 2007.06134, Algorithm 2; docs/periodic.md, ADPSGD step 4).

    Before ``sample_steps`` it only records ``S / lr`` samples whose mean is ``C2``; after, it
    raises the period when ``S < low * lr * C2`` and lowers it when ``S > high * lr * C2``.
    If no sample was recorded before ``sample_steps`` (a sampling phase shorter than the first
    period), the first synchronisation's sample is taken so that ``C2`` is defined.
    """

    period: int
    sample_steps: int
    low: float
    high: float
    p_min: int
    p_max: int | None
    samples_sum: float = 0.0
    samples_count: int = 0

    @property
    def c2(self) -> float:
        return self.samples_sum / self.samples_count if self.samples_count else math.nan

    def update(self, distance: float, lr: float, k: int) -> None:
        if k < self.sample_steps or self.samples_count == 0:
            self.samples_sum += distance / lr
            self.samples_count += 1
        elif distance < self.low * lr * self.c2:
            self.period += 1
        elif distance > self.high * lr * self.c2:
            self.period = max(self.p_min, self.period - 1)
        if self.p_max is not None:
            self.period = min(self.period, self.p_max)


class PeriodicAveraging(Component):
    """Local steps from ``warmup_steps`` on, with ``x_a = mean_a(x_a)`` every ``period`` of them.

    Args:
        ctx: the shared context.
        schedule: a :class:`ConstantPeriod` or :class:`AdaptivePeriod`.
        warmup_steps: steps ``k < warmup_steps`` are SSGD and never count towards a period.
    """

    def __init__(self, ctx: Context, schedule: ConstantPeriod | AdaptivePeriod, warmup_steps: int):
        self.ctx, self.schedule, self.warmup_steps = ctx, schedule, warmup_steps
        self.local_steps = 0  # c: local steps since the last synchronisation
        self._scratch = [torch.empty_like(s) for s in ctx.weights.param_segments()]

    def after_optimizer(self, k: int) -> None:
        if k < self.warmup_steps:
            return
        self.local_steps += 1
        if self.local_steps == self.schedule.period:
            self.ctx.guard.before_exchange("periodic average", k)
            distance = synchronize_weights(self.ctx, self._scratch)
            self.local_steps = 0
            self.schedule.update(distance, self.ctx.lr, k)

    def stats(self) -> dict[str, float]:
        if isinstance(self.schedule, AdaptivePeriod):
            return {"period": float(self.schedule.period)}
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"local_steps": self.local_steps, "schedule": asdict(self.schedule)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.local_steps = int(state["local_steps"])
        for key, value in state["schedule"].items():
            setattr(self.schedule, key, value)
