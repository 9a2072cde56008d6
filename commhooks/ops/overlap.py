"""Overlapped weight averaging: start the replica mean now, apply it ``delay`` steps later.

A blocking synchronisation stops every rank for one all-reduce of the weights. Here the weights
``x_s`` of the synchronisation step are copied, their mean over replicas starts asynchronously on
the topology's dedicated weight group (so it never queues behind the gradient all-reduce), the
replicas keep stepping from their own weights, and ``delay`` steps later every replica applies
the correction

    x <- x + (mean_a(x_s) - x_s)

which moves it to where the blocking rule would have put it, plus the local progress made since
(docs/periodic.md, "Overlapped averaging"). An outer optimizer (``Context.average_formed``) replaces
``mean_a(x_s)`` by its outer step before the correction. Overlap Local-SGD (Wang, Liang & Joshi,
ICASSP 2020, arXiv 2002.09539) and Streaming DiLoCo (Douillard et al., arXiv 2501.18512) hide
the averaging behind local steps too, but mix the late average in differently (a pull towards
an anchor, a convex combination); this correction keeps every local step, and without an outer
optimizer it leaves the replicas' mean unchanged (``mean_a(T - x_s,a) = 0``).

Memory: two copies of the communicated weights (the snapshot and the mean in flight), allocated
once; the correction is formed in place, the distance chunk by chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..base.inplace import Scratch, add_scaled_difference_
from .averages import AsyncReplicaAverage, count_sync
from .component import Context


@dataclass(kw_only=True)
class Finished:
    """What an applied correction reports to its schedule.

    Args:
        step: ``k_s``, the step whose weights were averaged.
        lr: the optimizer's lr at step ``k_s``.
        squared: this rank's ``||mean_a(x_s) - x_s||^2`` over the parameters, or None when not
            asked for (0.0 with a single replica).
    """

    step: int
    lr: float
    squared: float | None


class DelayedAverage:
    """The snapshot, its asynchronous replica mean, and the correction ``delay`` steps later.

    Args:
        ctx: the shared context (weights, topology, meter, ``average_formed``).
        delay: steps between the snapshot and the correction (>= 1).
    """

    def __init__(self, ctx: Context, delay: int) -> None:
        assert delay >= 1
        self.ctx, self.delay = ctx, delay
        groups = ctx.weights.groups
        # One buffer per flat group (also empty ones), so that index i is group i throughout.
        self._snapshot = [torch.empty(g.comm_numel, dtype=g.flat.dtype, device=g.flat.device) for g in groups]
        self._mean = [torch.empty_like(t) for t in self._snapshot]
        self._int_snapshot = [torch.empty_like(t) for t in ctx.weights.max_segments()]
        self._int_max = [torch.empty_like(t) for t in self._int_snapshot]
        self._scratch = Scratch(ctx.weights)
        self._in_flight = AsyncReplicaAverage(ctx)
        self.step: int | None = None  # k_s of the correction not applied yet, or None
        self._lr = 0.0
        self._want_squared = False
        self._squared: float | None = None
        self._resolved = False  # the buffers hold the correction T - x_s (mean and hooks done)

    @property
    def pending(self) -> bool:
        return self.step is not None

    def due(self, k: int) -> bool:
        """Whether the correction is to be applied after step ``k``."""
        return self.step is not None and k == self.step + self.delay

    def start(self, k: int, lr: float, *, want_squared: bool) -> None:
        """Snapshot the weights after step ``k`` and start their replica mean (returns at once)."""
        assert self.step is None, "a correction is still pending: delay must be < the period"
        ctx = self.ctx
        with torch.no_grad():
            for snap, mean, g in zip(self._snapshot, self._mean, ctx.weights.groups, strict=True):
                snap.copy_(g.comm_segment)
                mean.copy_(snap)
            for snap, top, live in zip(self._int_snapshot, self._int_max, ctx.weights.max_segments(), strict=True):
                snap.copy_(live)
                top.copy_(snap)
        self._in_flight.start([t for t in self._mean if t.numel()], self._int_max)
        if ctx.topo.num_replicas > 1:
            count_sync(ctx)
        self.step, self._lr, self._want_squared = k, lr, want_squared
        self._squared, self._resolved = None, False

    def _params(self, buffers: list[torch.Tensor]) -> list[torch.Tensor]:
        """The parameter prefix of each group's buffer (what ``param_segments()`` is to the weights)."""
        return [t[: g.param_numel] for t, g in zip(buffers, self.ctx.weights.groups, strict=True)]

    def resolve(self) -> None:
        """Wait for the mean, measure, let the hooks replace it, and form ``T - x_s`` in place.

        A local wait on collectives every rank has already started: any rank may call it at any
        time before the correction. The result depends only on the mean and on values fixed at
        the synchronisation step, so resolving early (``state_dict``, ``consensus``) changes no bit.
        """
        if self._resolved or self.step is None:
            return
        ctx = self.ctx
        self._in_flight.finish()
        with torch.no_grad():
            if self._want_squared:
                self._squared = self._squared_distance()
            ctx.average_formed(self._params(self._mean), self._lr)
            for mean, snap in zip(self._mean, self._snapshot, strict=True):
                mean.sub_(snap)
            for top, snap in zip(self._int_max, self._int_snapshot, strict=True):
                top.sub_(snap)
        self._resolved = True

    def _squared_distance(self) -> float:
        if self.ctx.topo.num_replicas == 1:
            return 0.0
        total = torch.zeros((), dtype=torch.float64, device=self.ctx.weights.device)
        for mean, snap in zip(self._params(self._mean), self._params(self._snapshot), strict=True):
            if mean.numel():
                # alpha = 0: only the squares, chunk by chunk; ``mean`` is not written.
                add_scaled_difference_(mean, mean, snap, 0.0, self._scratch.for_tensor(mean), total)
        return float(total)

    def apply(self) -> Finished:
        """``x <- x + (T - x_s)`` for every communicated weight; returns what the schedule needs."""
        self.resolve()
        assert self.step is not None
        with torch.no_grad():
            for g, correction in zip(self.ctx.weights.groups, self._mean, strict=True):
                g.comm_segment.add_(correction)
            for live, correction in zip(self.ctx.weights.max_segments(), self._int_max, strict=True):
                live.add_(correction)
        done = Finished(step=self.step, lr=self._lr, squared=self._squared)
        self.step = None
        return done

    def corrected_params(self) -> list[torch.Tensor]:
        """Per group, the parameters with the pending correction applied (new tensors; for ``consensus``)."""
        self.resolve()
        return [seg + d for seg, d in zip(self.ctx.weights.param_segments(), self._params(self._mean), strict=True)]

    def state_dict(self) -> dict[str, Any]:
        """The pending correction, resolved (so the state holds no collective in flight)."""
        if self.step is None:
            return {"step": None}
        self.resolve()
        return {"step": self.step, "lr": self._lr, "squared": self._squared,
                "correction": [t.clone() for t in self._mean],
                "int_correction": [t.clone() for t in self._int_max]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._in_flight.finish()  # (nothing is in flight after build: averages start in steps)
        self.step = state["step"]
        if self.step is None:
            return
        self._lr, self._squared = float(state["lr"]), state["squared"]
        with torch.no_grad():
            for dst, src in zip(self._mean, state["correction"], strict=True):
                dst.copy_(src)
            for dst, src in zip(self._int_max, state["int_correction"], strict=True):
                dst.copy_(src)
        self._resolved = True
