"""Periodic weight averaging (CPSGD, ADPSGD): local steps after a warm-up, averaged every period.

Jiang & Agrawal, "Adaptive Periodic Averaging", Algorithm 1 (constant period) and Algorithm 2
(adaptive period), arXiv 2007.06134. Not to be confused with "AD-PSGD" (asynchronous decentralized
parallel SGD) elsewhere in the literature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..base.comm import replica_mean_scalar, start_distance_mean
from ..base.config import ConfigBase, check, hparam
from ..ops.averages import synchronize_weights
from ..ops.component import Component, Context
from ..ops.overlap import DelayedAverage
from ..ops.probe import ConsensusProbe
from ..ops.schedules import Schedule


@dataclass(frozen=True, kw_only=True)
class PeriodicConfig(ConfigBase):
    """The fields of :class:`PeriodicAveraging` (the schedule has its own config)."""

    warmup_steps: int = hparam(0, valid="an integer >= 0",
                               help="steps of synchronous SGD before the local steps begin (w)", int_at_least=0)


@dataclass(frozen=True, kw_only=True)
class OverlapConfig(ConfigBase):
    """The ``delay`` of :class:`PeriodicAveraging` (overlapped averaging, docs/periodic.md).

    An algorithm's config that takes it calls :meth:`check_delay` with its shortest period.
    """

    delay: int = hparam(0, valid="an integer >= 0 and < every period (0: blocking)",
                        help="overlap: start the weight average at the sync step and apply it as a correction "
                             "this many steps later, local steps continuing meanwhile; 0 = blocking average", int_at_least=0)

    def check_delay(self, shortest_period: int, period_name: str) -> None:
        """``delay`` below every period the schedule can take: a correction lands before the next snapshot."""
        check(self.delay < shortest_period, "delay",
              f"< {period_name} ({shortest_period}): a correction must land before the next average", self.delay)


class PeriodicAveraging(Component):
    """Local steps from ``warmup_steps`` on, with ``x_a = mean_a(x_a)`` every ``period`` of them.

    A synchronisation is the bare in-place mean. The consensus distance ``S`` is computed only
    where it is needed: exactly at every synchronisation when the schedule uses it (ADPSGD,
    an adaptive schedule, for which this holds one parameter-sized buffer), and otherwise
    (CPSGD) estimated by a :class:`ConsensusProbe` at the first synchronisation after every
    ``measure_every`` steps; in between, ``stats()`` reports the last measured value with its
    ``consensus_step``, and NaN before the first measurement (or always, with ``measure_every=0``).

    With ``delay > 0`` a synchronisation is overlapped (:class:`commhooks.ops.overlap.DelayedAverage`):
    the mean of the weights after step ``k_s`` is applied as a correction after step
    ``k_s + delay``, where the schedule's controller also runs (with ``S``, ``lr`` and ``k`` of
    step ``k_s``); ``S`` is then exact whenever it is measured. ``ctx.average_formed`` (outer
    optimizers) sees the mean before it is applied, in either mode.

    Args:
        ctx: the shared context.
        schedule: a :class:`~commhooks.ops.schedules.Schedule`, e.g. ``ConstantPeriod`` or
            ``AdaptivePeriod`` (an adaptive one gets the exact distance at every synchronisation).
        warmup_steps: steps ``k < warmup_steps`` are SSGD and never count towards a period.
        measure_every: estimate the consensus distance (kilobytes of measurement traffic, in
            ``measure_bytes``) at the first synchronisation after each multiple of this many
            steps; 0 never. Ignored when the schedule needs the exact ``S`` anyway.
        delay: steps between a synchronisation's snapshot and its correction; 0 = blocking.
            Must stay below every period the schedule can take (the configs check it).
    """

    def __init__(
        self, ctx: Context, schedule: Schedule, warmup_steps: int, measure_every: int = 0, delay: int = 0,
    ) -> None:
        self.ctx, self.schedule, self.warmup_steps = ctx, schedule, warmup_steps
        self.measure_every = measure_every
        self.local_steps = 0  # c: local steps since the last synchronisation
        self._measure_due = False
        several = ctx.topo.num_replicas > 1
        exact = several and schedule.adaptive
        self._measures = several and not exact and measure_every > 0
        self._delayed = DelayedAverage(ctx, delay) if delay else None
        blocking = self._delayed is None
        self._scratch = [torch.empty_like(s) for s in ctx.weights.param_segments()] if exact and blocking else None
        self._probe = ConsensusProbe(ctx.weights) if self._measures and blocking else None

    @classmethod
    def from_config(
        cls, ctx: Context, cfg: PeriodicConfig, schedule: Schedule, measure_every: int = 0, delay: int = 0,
    ) -> PeriodicAveraging:
        return cls(ctx, schedule, cfg.warmup_steps, measure_every, delay)

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
            self._delayed.start(k, self.ctx.lr, want_squared=self.schedule.adaptive or self._measure_due)
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
        self.ctx.average_formed(self.ctx.weights.param_segments(), self.ctx.lr)
        self.local_steps = 0
        self.schedule.update(distance, self.ctx.lr, k)

    def _apply_delayed(self) -> None:
        assert self._delayed is not None
        ctx = self.ctx
        done = self._delayed.apply()
        if self.schedule.adaptive:
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
        if self.schedule.adaptive:
            return {"period": float(self.schedule.period)}
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"local_steps": self.local_steps, "schedule": dict(vars(self.schedule)),
                "measure_due": self._measure_due,
                "delayed": None if self._delayed is None else self._delayed.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.local_steps = int(state["local_steps"])
        self._measure_due = bool(state.get("measure_due", False))
        if self._delayed is not None:
            self._delayed.load_state_dict(state.get("delayed") or {"step": None})  # saved blocking: none pending
        for key, value in state["schedule"].items():
            setattr(self.schedule, key, value)
