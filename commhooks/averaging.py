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
from .comm import (
    replica_mean_,
    replica_mean_scalar,
    start_distance_mean,
    start_replica_max,
    start_replica_mean,
)
from .flat import FlatWeights
from .noise import step_generator
from .overlap import DelayedAverage


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
            for keep, seg in zip(scratch, weights.param_segments()):
                keep.copy_(seg)
        works = start_replica_max(weights.max_segments(), topo, meter)
        start_replica_mean(weights.comm_segments(), topo, meter).wait()
        meter.wait(works)
        meter.syncs += 1
        if scratch is None:
            return math.nan
        for keep, seg in zip(scratch, weights.param_segments()):
            keep.sub_(seg)
    distance = replica_mean_scalar(squared_norm(scratch), topo, meter, weights.device)
    meter.record_distance(distance, math.nan if step is None else step)
    return distance


def squared_norm(tensors: list[torch.Tensor]) -> float:
    """``sum ||t||^2`` over flat tensors, without temporaries."""
    with torch.no_grad():
        return sum(float(torch.dot(t, t)) for t in tensors)


#: The random stream the consensus probe draws its coordinates from (any fixed value: the
#: sample must only be the same on every rank, and differ between steps).
_PROBE_STREAM = 0x636F6E73


class ConsensusProbe:
    """An estimate of ``mean_a ||x̄ - x_a||^2`` from a random sample of coordinates.

    Every rank draws the same ``m = sample_size`` coordinates of each flat parameter group from
    ``(stream, step)``, so only kilobytes travel instead of a model. The draw is stratified: the
    group's ``N`` coordinates are cut into ``m`` equal stretches and one coordinate is drawn
    uniformly in each, so every layer is sampled in proportion to its size and every coordinate
    has the same chance ``m / N``. ``(N / m) * sum over the sample of (x̄_i - x_a,i)^2`` is then an
    unbiased estimate of the group's ``||x̄ - x_a||^2``; its relative error is at most about
    ``sqrt(2 / m)`` when the differences are spread evenly (2% at ``m = 4096``), more when a few
    coordinates dominate (measured on LeNet's gossiping replicas: 7% rms). A group of at most ``m`` parameters is taken whole, so the figure is
    exact for small models. Every buffer is allocated here, once: at most 44 bytes per sampled
    coordinate (180 KB per group at ``m = 4096``).

    Args:
        weights: the flat weights to sample.
        sample_size: coordinates per flat group.
    """

    def __init__(self, weights: FlatWeights, sample_size: int = 4096) -> None:
        self.weights = weights
        self.sizes = [g.param_numel for g in weights.groups]
        self.counts = [min(n, sample_size) for n in self.sizes]
        self._index = [
            torch.empty(m, dtype=torch.int64) if m < n else None for n, m in zip(self.sizes, self.counts)
        ]
        self._index_on_device = [
            None if idx is None or g.flat.device.type == "cpu" else torch.empty(m, dtype=torch.int64, device=g.flat.device)
            for idx, m, g in zip(self._index, self.counts, weights.groups)
        ]
        self._picked = [
            None if idx is None else torch.empty(m, dtype=g.flat.dtype, device=g.flat.device)
            for idx, m, g in zip(self._index, self.counts, weights.groups)
        ]
        self.local = [torch.empty(m, dtype=torch.float64, device=g.flat.device) for m, g in zip(self.counts, weights.groups)]
        self.mean = [torch.empty_like(t) for t in self.local]
        self._strata = [None if idx is None else torch.arange(m, dtype=torch.float64) for idx, m in zip(self._index, self.counts)]
        self._position = [None if idx is None else torch.empty(m, dtype=torch.float64) for idx, m in zip(self._index, self.counts)]

    def draw(self, step: int) -> None:
        """Draw step ``step``'s coordinates (the same on every rank): one in each of ``m`` stretches."""
        gen = step_generator(_PROBE_STREAM, step)
        for n, m, idx, on_device, strata, position in zip(
            self.sizes, self.counts, self._index, self._index_on_device, self._strata, self._position
        ):
            if idx is None:
                continue
            torch.rand(m, generator=gen, dtype=torch.float64, out=position)
            position.add_(strata).mul_(n / m).floor_()  # floor((j + u_j) * N / m), stretch j
            idx.copy_(position).clamp_(max=n - 1)  # (rounding at the top end)
            if on_device is not None:
                on_device.copy_(idx)

    def gather(self, into: list[torch.Tensor]) -> None:
        """Copy the sampled parameters, as they stand now, into ``into`` (``local`` or ``mean``)."""
        with torch.no_grad():
            for seg, idx, on_device, picked, out in zip(
                self.weights.param_segments(), self._index, self._index_on_device, self._picked, into
            ):
                if idx is None:
                    out.copy_(seg)
                else:
                    torch.index_select(seg, 0, idx if on_device is None else on_device, out=picked)
                    out.copy_(picked)

    def local_squared(self) -> torch.Tensor:
        """This rank's estimate of ``||x̄ - x_a||^2`` from ``mean`` and ``local`` (float64, 0-dim).

        Consumes ``mean`` (it becomes the difference).
        """
        total = torch.zeros((), dtype=torch.float64, device=self.local[0].device)
        for n, m, local, mean in zip(self.sizes, self.counts, self.local, self.mean):
            if m:
                diff = mean.sub_(local)
                total.add_(torch.dot(diff, diff), alpha=n / m)
        return total

    def measure(self, ctx: Context, step: int) -> None:
        """Measure now: draw, gather, average the sample over replicas, record the estimate.

        Collective. Two small collectives, both counted in ``measure_bytes``: the sample's mean
        (blocking) and the scalar mean of the per-rank estimates (finished when read).
        """
        if ctx.topo.num_replicas == 1:
            ctx.meter.record_distance(0.0, step)
            return
        self.draw(step)
        self.gather(self.local)
        for mean, local in zip(self.mean, self.local):
            mean.copy_(local)
        replica_mean_(self.mean, ctx.topo, ctx.meter, measurement=True)
        start_distance_mean(self.local_squared(), step, ctx.topo, ctx.meter)


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

    A synchronisation is the bare in-place mean. The consensus distance ``S`` is computed only
    where it is needed: exactly at every synchronisation when the schedule uses it (ADPSGD,
    :class:`AdaptivePeriod`, which holds one parameter-sized buffer for it), and otherwise
    (CPSGD) estimated by a :class:`ConsensusProbe` at the first synchronisation after every
    ``measure_every`` steps; in between, ``stats()`` reports the last measured value with its
    ``consensus_step``, and NaN before the first measurement (or always, with ``measure_every=0``).

    With ``delay > 0`` a synchronisation is overlapped (:class:`commhooks.overlap.DelayedAverage`):
    the mean of the weights after step ``k_s`` is applied as a correction after step
    ``k_s + delay``, where the schedule's controller also runs (with ``S``, ``lr`` and ``k`` of
    step ``k_s``); ``S`` is then exact whenever it is measured. Hooks in ``ctx.sync_hooks``
    (outer optimizers) see the mean before it is applied, in either mode.

    Args:
        ctx: the shared context.
        schedule: a :class:`ConstantPeriod` or :class:`AdaptivePeriod`.
        warmup_steps: steps ``k < warmup_steps`` are SSGD and never count towards a period.
        measure_every: estimate the consensus distance (kilobytes of measurement traffic, in
            ``measure_bytes``) at the first synchronisation after each multiple of this many
            steps; 0 never. Ignored when the schedule needs the exact ``S`` anyway.
        delay: steps between a synchronisation's snapshot and its correction; 0 = blocking.
            Must stay below every period the schedule can take (validated by the configs).
    """

    def __init__(
        self, ctx: Context, schedule: ConstantPeriod | AdaptivePeriod, warmup_steps: int, measure_every: int = 0,
        delay: int = 0,
    ) -> None:
        self.ctx, self.schedule, self.warmup_steps = ctx, schedule, warmup_steps
        self.measure_every = measure_every
        self.local_steps = 0  # c: local steps since the last synchronisation
        self._measure_due = False
        several = ctx.topo.num_replicas > 1
        exact = several and isinstance(schedule, AdaptivePeriod)
        self._measures = several and not exact and measure_every > 0
        self._delayed = DelayedAverage(ctx, delay) if delay else None
        blocking = self._delayed is None
        self._scratch = [torch.empty_like(s) for s in ctx.weights.param_segments()] if exact and blocking else None
        self._probe = ConsensusProbe(ctx.weights) if self._measures and blocking else None

    def after_optimizer(self, k: int) -> None:
        if self._measures and (k + 1) % self.measure_every == 0:
            self._measure_due = True
        if self._delayed is not None and self._delayed.due(k):
            self._apply_delayed()
        if k < self.warmup_steps:
            return
        self.local_steps += 1
        if self.local_steps != self.schedule.period:
            return
        self.ctx.guard.before_exchange("periodic average", k)
        if self._delayed is not None:
            adaptive = isinstance(self.schedule, AdaptivePeriod)
            self._delayed.start(k, self.ctx.lr, want_squared=adaptive or self._measure_due)
            self._measure_due = False
            self.local_steps = 0
            return
        probe = self._probe if self._measure_due else None
        if probe is not None:
            probe.draw(k)
            probe.gather(probe.local)
        distance = synchronize_weights(self.ctx, self._scratch, k + 1)
        if probe is not None:
            probe.gather(probe.mean)  # the average, at the same coordinates
            start_distance_mean(probe.local_squared(), k + 1, self.ctx.topo, self.ctx.meter)
            self._measure_due = False
        for hook in self.ctx.sync_hooks:
            hook(self.ctx.weights.param_segments(), self.ctx.lr)
        self.local_steps = 0
        self.schedule.update(distance, self.ctx.lr, k)

    def _apply_delayed(self) -> None:
        assert self._delayed is not None
        ctx = self.ctx
        done = self._delayed.apply()
        if isinstance(self.schedule, AdaptivePeriod):
            assert done.squared is not None
            distance = replica_mean_scalar(done.squared, ctx.topo, ctx.meter, ctx.weights.device)
            ctx.meter.record_distance(distance, done.step + 1)
            self.schedule.update(distance, done.lr, done.step)
        elif done.squared is not None:
            start_distance_mean(done.squared, done.step + 1, ctx.topo, ctx.meter)

    def consensus_params(self) -> list[torch.Tensor] | None:
        # A correction still pending belongs to the model: include it.
        if self._delayed is not None and self._delayed.pending:
            return self._delayed.corrected_params()
        return None

    def stats(self) -> dict[str, float]:
        if isinstance(self.schedule, AdaptivePeriod):
            return {"period": float(self.schedule.period)}
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"local_steps": self.local_steps, "schedule": asdict(self.schedule),
                "measure_due": self._measure_due,
                "delayed": None if self._delayed is None else self._delayed.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.local_steps = int(state["local_steps"])
        self._measure_due = bool(state.get("measure_due", False))
        if self._delayed is not None:
            self._delayed.load_state_dict(state.get("delayed") or {"step": None})  # saved blocking: none pending
        for key, value in state["schedule"].items():
            setattr(self.schedule, key, value)
